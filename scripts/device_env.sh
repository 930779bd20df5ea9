# Source on the GPU machine, in the repository root, after scripts/device_bundle.sh was run here
# and .device was carried along:   . scripts/device_env.sh
# Installs .device/wheels into /tmp/site (no index: that machine reaches none) and puts them and
# the carried espeak-ng first on PYTHONPATH and PATH; then checks that the stack imports.
#   DEVICE_DIR=path   the bundle (default: .device)
DEVICE_DIR="${DEVICE_DIR:-.device}"
if [ ! -d "$DEVICE_DIR/wheels" ]; then
  echo "[device] error: $DEVICE_DIR/wheels not found: run scripts/device_bundle.sh and carry .device" >&2
  return 1 2>/dev/null || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$DEVICE_DIR"/wheels/*.whl || { return 1 2>/dev/null || exit 1; }
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$(cd "$DEVICE_DIR/espeak/bin" && pwd):$PATH"
python3 -c "import torch, fairseq, soundfile, sentencepiece, sacrebleu, leapformer_fairseq; print('[device] python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'fairseq', fairseq.__version__, 'cuda', torch.cuda.is_available())" \
  && espeak-ng --version | sed 's/^/[device] /' || { return 1 2>/dev/null || exit 1; }
