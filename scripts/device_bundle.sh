#!/usr/bin/env bash
# Build .device/: what a GPU machine without package access needs to run the recipes' training
# there, small enough to carry (the device tool carries at most 64 MiB with the repository).
#
#   bash scripts/device_bundle.sh            # once per machine; the output is git-ignored
#
# The GPU machine has Python 3.12 with torch/torchaudio 2.11, triton, numpy, sentencepiece,
# sacrebleu, scikit-learn, regex, tqdm, PyYAML, einops, matplotlib and pytest, but no fairseq,
# soundfile, fla-core or espeak-ng. This writes
#   .device/wheels/   Python 3.12 wheels: fairseq-fixed and the packages it needs beyond those
#   .device/espeak/   espeak-ng: its binary, the shared libraries it loads beyond glibc's (from
#                     this machine's Debian packages), and its English voice data
# scripts/device_env.sh, sourced there, installs and puts both on the paths.
#   DEVICE_DIR=path   output folder (default: .device in the repository root)
#   MAX_MIB=N         refuse a bundle larger than N MiB (default 48: the repository travels too)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${DEVICE_DIR:-$ROOT/.device}"
MAX_MIB="${MAX_MIB:-48}"
PY="${PY:-python3}"
log() { echo "[bundle] $*"; }
fail() { echo "[bundle] error: $*" >&2; exit 1; }

# fla-core: the fla backend's kernels (benchmarks, device_speed.sh); its einops is there already
WHEELS=(fairseq-fixed==0.12.3.1 hydra-core==1.3.2 omegaconf==2.3.0 bitarray==3.8.0
        soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 fla-core==0.6.0)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux1_x86_64)

command -v espeak-ng >/dev/null || fail "espeak-ng not found on PATH (bash scripts/setup_env.sh installs it)"
rm -rf "$OUT"
mkdir -p "$OUT/wheels" "$OUT/espeak/bin" "$OUT/espeak/lib"

# 1. Wheels for CPython 3.12 on x86-64 Linux; antlr4's runtime has no wheel, so build one.
log "downloading ${#WHEELS[@]} wheels for Python 3.12"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]/#/--platform=}" -d "$OUT/wheels" "${WHEELS[@]}"
log "building antlr4-python3-runtime==4.9.3 (pure Python, published as source only)"
"$PY" -m pip wheel -q --no-deps -w "$OUT/wheels" antlr4-python3-runtime==4.9.3

# 2. espeak-ng: the binary, every library it loads but the C library's own, English data, and
#    a wrapper named espeak-ng that points the binary (alone) at them.
ESPEAK="$(command -v espeak-ng)"
cp "$ESPEAK" "$OUT/espeak/bin/espeak-ng.bin"
cat > "$OUT/espeak/bin/espeak-ng" <<'SH'
#!/bin/sh
here="$(dirname "$(readlink -f "$0")")"
LD_LIBRARY_PATH="$here/../lib" ESPEAK_DATA_PATH="$here/.." exec "$here/espeak-ng.bin" "$@"
SH
chmod +x "$OUT/espeak/bin/espeak-ng"
ldd "$ESPEAK" | awk '/=> \//{print $3}' | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*|ld-linux*) ;;  # the machine's own
    *) cp -L "$lib" "$OUT/espeak/lib/" ;;
  esac
done
DATA="$(dirname "$(readlink -f "$(ldd "$ESPEAK" | awk '/libespeak-ng/{print $3}')")")/espeak-ng-data"
[ -d "$DATA" ] || fail "espeak-ng data not found at $DATA"
mkdir -p "$OUT/espeak/espeak-ng-data/lang"
for item in phondata phondata-manifest phonindex phontab intonations en_dict voices; do
  cp -r "$DATA/$item" "$OUT/espeak/espeak-ng-data/"
done
cp -r "$DATA/lang/gmw" "$OUT/espeak/espeak-ng-data/lang/"

SIZE_MIB=$(( $(du -sb "$OUT" | cut -f1) / 1048576 ))
[ "$SIZE_MIB" -le "$MAX_MIB" ] || fail "$OUT is $SIZE_MIB MiB, over MAX_MIB=$MAX_MIB"
log "done: $OUT ($SIZE_MIB MiB: $(ls "$OUT/wheels" | wc -l) wheels, $(ls "$OUT/espeak/lib" | wc -l) libraries)"
