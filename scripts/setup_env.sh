#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install the pinned stack.
# Idempotent: a second run on a machine that already has the venv only checks versions.
#   VENV=path     where the virtualenv lives (default: .venv in the repository root)
#   PYTHON=cmd    the interpreter a new virtualenv is made with: Python 3.11 or 3.12 (default:
#                 the first of python3.11, python3.12 that runs, on PATH or in pyenv's versions)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

TORCH_VERSION=2.11.0
FAIRSEQ_VERSION=0.12.3.1
SIMULEVAL_VERSION=1.1.4
RUFF_VERSION=0.17.6

log() { echo "[setup] $*"; }

# 1. Debian packages: espeak-ng synthesises the English side of the speech corpus.
if ! command -v espeak-ng >/dev/null 2>&1; then
  log "installing espeak-ng (Debian package)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq espeak-ng >/dev/null
fi

# 2. The virtualenv, on Python 3.11 or 3.12.
SUPPORTED="3.11 3.12"
version_of() {  # version_of CMD -> "3.11" (nothing when CMD does not run)
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true
}
supported() { [[ " $SUPPORTED " == *" $1 "* ]]; }
describe() {  # describe CMD -> "Python 3.10" or "not runnable"
  local version; version="$(version_of "$1")"
  if [ -n "$version" ]; then echo "Python $version"; else echo "not runnable"; fi
}
resolve() {  # resolve CMD -> CMD's path if it runs; for python3.N also pyenv's installs of 3.N
  local candidate minor="${1#python3.}"
  for candidate in "$1" $( [[ "$1" == python3.* ]] && ls -d \
      "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3."$minor".*/bin/"$1" 2>/dev/null | sort -V -r); do
    if [ -n "$(version_of "$candidate")" ]; then command -v "$candidate"; return; fi
  done
}
if [ -n "${PYTHON:-}" ]; then
  BASE="$(resolve "$PYTHON")"
  BASE="${BASE:-$PYTHON}"
  supported "$(version_of "$BASE")" || {
    echo "[setup] error: PYTHON=$PYTHON is $(describe "$BASE"); need Python 3.11 or 3.12" >&2
    exit 1; }
fi
if [ ! -x "$PY" ]; then
  if [ -z "${PYTHON:-}" ]; then
    BASE="$(resolve python3.11)"
    BASE="${BASE:-$(resolve python3.12)}"
    [ -n "$BASE" ] || {
      echo "[setup] error: no Python 3.11 or 3.12 found (python3.11, python3.12 on PATH or in pyenv); install one or set PYTHON" >&2
      exit 1; }
  fi
  log "creating virtualenv $VENV with $BASE (Python $(version_of "$BASE"))"
  "$BASE" -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip "setuptools<81" wheel
fi
supported "$(version_of "$PY")" || {
  echo "[setup] error: $VENV is $(describe "$PY"); need Python 3.11 or 3.12 (remove it, or set VENV)" >&2
  exit 1; }
if [ -n "${PYTHON:-}" ] && [ "$(version_of "$PY")" != "$(version_of "$BASE")" ]; then
  echo "[setup] error: $VENV is $(describe "$PY"), PYTHON=$PYTHON is $(describe "$BASE"); set VENV to another folder" >&2
  exit 1
fi

installed() {  # installed DIST VERSION -> exit 0 when DIST==VERSION is in the venv
  "$PY" - "$1" "$2" <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    sys.exit(0 if version(sys.argv[1]) == sys.argv[2] else 1)
except PackageNotFoundError:
    sys.exit(1)
PYEOF
}

# 3. torch and torchaudio, pinned together (torchaudio's binary only loads beside its own torch).
if ! installed torch "$TORCH_VERSION" || ! installed torchaudio "$TORCH_VERSION"; then
  log "installing torch==$TORCH_VERSION torchaudio==$TORCH_VERSION (about 4.6 GB, 1-2 min)"
  "$PY" -m pip install -q "torch==$TORCH_VERSION" "torchaudio==$TORCH_VERSION"
fi

# 4. fairseq compiles C++ against the installed torch: no build isolation.
if ! installed fairseq-fixed "$FAIRSEQ_VERSION"; then
  log "building fairseq-fixed==$FAIRSEQ_VERSION against torch (about 3 min)"
  "$PY" -m pip install -q "numpy<2.3" cython
  "$PY" -m pip install -q --no-build-isolation "fairseq-fixed==$FAIRSEQ_VERSION"
fi

# 5. The rest of the stack, and the plugin itself in editable mode.
if ! installed simuleval "$SIMULEVAL_VERSION" || ! "$PY" -c "import sentencepiece, sacrebleu, soundfile, pytest, xdist, matplotlib, ninja" 2>/dev/null; then
  log "installing simuleval==$SIMULEVAL_VERSION sentencepiece sacrebleu soundfile pytest pytest-xdist matplotlib ninja"
  "$PY" -m pip install -q "simuleval==$SIMULEVAL_VERSION" sentencepiece sacrebleu soundfile pytest pytest-xdist \
    matplotlib ninja
fi
if ! installed ruff "$RUFF_VERSION"; then  # the linter of `make lint` (settings: ruff.toml)
  log "installing ruff==$RUFF_VERSION"
  "$PY" -m pip install -q "ruff==$RUFF_VERSION"
fi
if ! "$PY" -m pip show -q leapformer_fairseq >/dev/null 2>&1; then
  log "installing leapformer_fairseq (editable)"
  "$PY" -m pip install -q --no-build-isolation --no-deps -e "$ROOT"
fi
# 6. The fused CPU decode step (C++), built once here rather than at the first decode; PyTorch
#    caches it under TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions). Without it decode
#    steps run the eager ops (LEAPFORMER_STEP_BACKEND, docs/models.md).
log "building the fused CPU decode step (about a minute the first time)"
"$PY" - <<'PYEOF'
from leapformer_fairseq.ops.linear_attention.fused_step import build_error
error = build_error()
print("[setup] fused CPU decode step: " + ("ready" if error is None else
      f"did not build ({error}); decode steps will run the eager ops"))
PYEOF
log "ready: $VENV ($("$PY" -c 'import torch, fairseq; print("torch", torch.__version__, "fairseq", fairseq.__version__)'))"
