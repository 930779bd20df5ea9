#!/usr/bin/env bash
# The GPU speed measurements in one run, on a GPU machine without package access:
#   1. attention: benchmarks/attention.py --device cuda --dtype bfloat16 --attention causal,
#      batch 1, 8 heads, head dim 32 and 64 (d_model 256, 512), n = 64 ... 65536: fairseq softmax
#      (need_weights=False), SDPA (flash), LeaP (the package's PyTorch forms), LeaP through
#      fla-core's kernel (fla backend) and LeaP with its feature map compiled
#      (compile_feature_map); its decode-step and short-form cut-over sections too;
#   2. tests: the tests of the backends (tests/test_backends.py), whose fla-core checks run on
#      CUDA only;
#   3. train: benchmarks/train_speed.py, the small wait-k text model (t2t/small) on gettext-mt
#      en-de, softmax, LeaP, then LeaP with --compile-feature-map, each alone, fp16, max-tokens
#      4096, updates 201-700.
# Writes OUT/device_speed.tgz (the results folders, for benchmarks/results/) and
# OUT/test_backends.log.
#
# Here, once:   bash scripts/device_bundle.sh     (fairseq, fla-core and the rest as wheels)
# There (the device tool's command, with .device carried; not yet run on a GPU: about 10
# minutes on an H200 by estimate, a minute or two of it compiling LeaP's feature map for the
# leap_compiled and leap+compiled measurements; METHODS and TRAIN_TYPES without them save that):
#   . scripts/device_env.sh && bash scripts/device_speed.sh 2>&1 | tee $OUT/device_speed.log
# Back here:  tar xzf device_speed.tgz -C benchmarks/results   (docs/benchmarks.md)
# A CPU smoke run here (what CI runs, at tiny size; the backends' tests run in the suite anyway):
#   DEVICE=cpu PARTS=attention,train LENGTHS=64,128 HEAD_DIMS=8 METHODS=fairseq_softmax,sdpa,leap \
#     ATTENTION_ARGS="--decode-positions 1,16 --decode-rounds 1 --decode-steps 10
#       --cutover-lengths 16,32 --cutover-rounds 1 --repeats 1" MAX_TRAIN=400 WINDOW=4,8 \
#     LOG_INTERVAL=4 TRAIN_SETS="arch=leapformer_waitk_transformer_tiny max-tokens=512" \
#     bash scripts/device_speed.sh
#
# Variables [default]:
#   OUT [work/device-speed]   results (the device tool's $OUT there)
#   WORK [/tmp/device-speed]  prepared text, training runs, results before packing
#   PARTS [attention,tests,train]  what to run (a part left out is left out of the archive)
#   DEVICE [cuda]; DTYPE [bfloat16]: of the attention benchmark (training: TRAIN_SETS)
#   LENGTHS [64,128,...,65536]; HEAD_DIMS [32,64]; HEADS [8]
#   METHODS [fairseq_softmax,sdpa,leap,leap_fla,leap_compiled]; ATTENTION_ARGS []: more attention.py options
#                             (after the defaults --rounds 1 --repeats 10, so they win)
#   CORPUS [data/gettext-mt-full/en-de.{split}.tsv]; MAX_TRAIN [0: all]
#   T2T_CONFIG [t2t/small]; WINDOW [200,700]; LOG_INTERVAL [100]
#   TRAIN_TYPES [softmax,leap,leap+compiled]: train_speed.py's --attn-types
#   TRAIN_REPEATS [1]         rounds of the runs (the second round in reverse order)
#   TRAIN_SETS [fp16=true max-tokens=4096]: fairseq-train options KEY=VALUE for every run
#                             (fairseq 0.12's bf16=true means a TPU: fp16 is its GPU precision)
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-work/device-speed}"
WORK="${WORK:-/tmp/device-speed}"
PARTS="${PARTS:-attention,tests,train}"
DEVICE="${DEVICE:-cuda}"
DTYPE="${DTYPE:-bfloat16}"
LENGTHS="${LENGTHS:-64,128,256,512,1024,2048,4096,8192,16384,32768,65536}"
HEAD_DIMS="${HEAD_DIMS:-32,64}"
HEADS="${HEADS:-8}"
METHODS="${METHODS:-fairseq_softmax,sdpa,leap,leap_fla,leap_compiled}"
ATTENTION_ARGS="${ATTENTION_ARGS:-}"
DEFAULT_CORPUS='data/gettext-mt-full/en-de.{split}.tsv'
CORPUS="${CORPUS:-$DEFAULT_CORPUS}"
MAX_TRAIN="${MAX_TRAIN:-0}"
T2T_CONFIG="${T2T_CONFIG:-t2t/small}"
WINDOW="${WINDOW:-200,700}"
LOG_INTERVAL="${LOG_INTERVAL:-100}"
TRAIN_TYPES="${TRAIN_TYPES:-softmax,leap,leap+compiled}"
TRAIN_REPEATS="${TRAIN_REPEATS:-1}"
TRAIN_SETS="${TRAIN_SETS:-fp16=true max-tokens=4096}"
log() { echo "[device-speed $(date +%H:%M:%S)] $*"; }
fail() { echo "[device-speed] error: $*" >&2; exit 1; }
wants() { [[ ",$PARTS," == *",$1,"* ]]; }

for part in ${PARTS//,/ }; do
  case "$part" in attention|tests|train) ;; *) fail "PARTS: unknown part '$part' (attention, tests, train)";; esac
done
[ "$DEVICE" = cpu ] || [ "$DEVICE" = cuda ] || fail "DEVICE must be cuda or cpu, got '$DEVICE'"
if [ "$DEVICE" = cuda ]; then
  python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
    || fail "DEVICE=cuda: torch sees no CUDA device (DEVICE=cpu for the smoke run)"
fi
RESULTS="$WORK/results"
rm -rf "$RESULTS"
mkdir -p "$OUT" "$RESULTS"
SUFFIX="${DEVICE}_${DTYPE}"

if wants attention; then
  for head_dim in ${HEAD_DIMS//,/ }; do
    log "attention: head dim $head_dim"
    # shellcheck disable=SC2086  # ATTENTION_ARGS: several options
    python3 benchmarks/attention.py --device "$DEVICE" --dtype "$DTYPE" --attention causal \
      --embed-dim $((head_dim * HEADS)) --heads "$HEADS" --batch 1 --lengths "$LENGTHS" \
      --methods "$METHODS" --rounds 1 --repeats 10 $ATTENTION_ARGS \
      --out "$RESULTS/attention_${SUFFIX}_d$head_dim"
  done
fi

if wants tests; then
  log "tests: tests/test_backends.py"
  python3 -m pytest -q -p no:cacheprovider tests/test_backends.py 2>&1 \
    | tee "$OUT/test_backends.log" || fail "tests/test_backends.py failed; see $OUT/test_backends.log"
fi

if wants train; then
  log "train: prepare $CORPUS"
  python3 scripts/t2t_recipe.py prepare --corpus "$CORPUS" --out "$WORK/t2t" \
    --max-train "$MAX_TRAIN"
  sets=()
  for item in $TRAIN_SETS; do sets+=(--set "$item"); done
  device_flag=()
  [ "$DEVICE" = cpu ] && device_flag=(--cpu)
  log "train: $T2T_CONFIG, $TRAIN_TYPES, updates in ($WINDOW]"
  python3 benchmarks/train_speed.py --data "$WORK/t2t" --config "$T2T_CONFIG" \
    --attn-types "$TRAIN_TYPES" --repeats "$TRAIN_REPEATS" --window "$WINDOW" \
    --log-interval "$LOG_INTERVAL" \
    "${sets[@]}" "${device_flag[@]}" --work "$WORK/train_speed" \
    --out "$RESULTS/train_speed_gettext_en_de"
fi

tar czf "$OUT/device_speed.tgz" -C "$RESULTS" .
log "done: $OUT/device_speed.tgz ($(tar tzf "$OUT/device_speed.tgz" | grep -c '[^/]$') files)"
