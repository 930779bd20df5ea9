#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install the pinned stack.
# Idempotent: a second run on a machine that already has the venv only checks versions.
#   VENV=path   where the virtualenv lives (default: .venv in the repository root)
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

# 2. The virtualenv, on Python 3.11.
if [ ! -x "$PY" ]; then
  PYTHON311="$(command -v python3.11 || true)"
  if [ -z "$PYTHON311" ]; then
    echo "[setup] error: python3.11 not found on PATH; install Python 3.11 first" >&2
    exit 1
  fi
  log "creating virtualenv $VENV with $PYTHON311"
  "$PYTHON311" -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip "setuptools<81" wheel
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
if ! installed simuleval "$SIMULEVAL_VERSION" || ! "$PY" -c "import sentencepiece, sacrebleu, soundfile, pytest, matplotlib" 2>/dev/null; then
  log "installing simuleval==$SIMULEVAL_VERSION sentencepiece sacrebleu soundfile pytest matplotlib"
  "$PY" -m pip install -q "simuleval==$SIMULEVAL_VERSION" sentencepiece sacrebleu soundfile pytest matplotlib
fi
if ! installed ruff "$RUFF_VERSION"; then  # the linter of `make lint` (settings: ruff.toml)
  log "installing ruff==$RUFF_VERSION"
  "$PY" -m pip install -q "ruff==$RUFF_VERSION"
fi
if ! "$PY" -m pip show -q leapformer_fairseq >/dev/null 2>&1; then
  log "installing leapformer_fairseq (editable)"
  "$PY" -m pip install -q --no-build-isolation --no-deps -e "$ROOT"
fi
log "ready: $VENV ($("$PY" -c 'import torch, fairseq; print("torch", torch.__version__, "fairseq", fairseq.__version__)'))"
