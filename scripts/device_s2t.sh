#!/usr/bin/env bash
# Train the speech models on a GPU machine without package access, from text alone: synthesise
# gettext-mt en-de with the carried espeak-ng on every core (train, dev, tst-COMMON and the
# held-out voices' tst-HE), prepare, then for each attention type ASR pre-training and wait-k
# ST, the types side by side on the one GPU, each step for a fixed wall-clock budget. Writes to
# OUT what evaluation on this side needs: the prepared text files, the ST checkpoints without
# optimizer state in fp16 (python -m leapformer_fairseq.compact), the training logs.
#
# Here, once:   bash scripts/device_bundle.sh
# There (the device tool's command, with .device carried):
#   . scripts/device_env.sh && bash scripts/device_s2t.sh
# Back here: make_tts_corpus.py --splits tst-COMMON,tst-HE, then s2t_recipe.py receive (docs/recipes.md).
# A CPU smoke run here (what CI runs, at tiny size):
#   MAX_TRAIN=40 MAX_TEST=4 ASR_MINUTES=0.1 ST_MINUTES=0.1 \
#     TRAIN_ARGS="--set arch=leapformer_s2t_waitk_tiny --set max-update=2 --cpu" bash scripts/device_s2t.sh
#
# Variables [default]:
#   OUT [work/device-s2t]     results (the device tool's $OUT there)
#   WORK [/tmp/device-s2t]    corpus, features and runs
#   CORPUS [data/gettext-mt-full/en-de.{split}.tsv]; MAX_TRAIN, MAX_TEST [0: all]
#   ATTN_TYPES ["leap softmax"]; ASR_CONFIG [s2t/asr_small]; ST_CONFIG [s2t/st_small]
#   ASR_MINUTES [3], ST_MINUTES [4]: wall-clock training budget per step (fairseq's
#                             --stop-time-hours; the configurations' max-update still applies)
#   TRAIN_ARGS []             more options for both training steps (e.g. --set lr=0.002)
#   JOBS [nproc]              espeak-ng processes
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-work/device-s2t}"
WORK="${WORK:-/tmp/device-s2t}"
DEFAULT_CORPUS='data/gettext-mt-full/en-de.{split}.tsv'
CORPUS="${CORPUS:-$DEFAULT_CORPUS}"
MAX_TRAIN="${MAX_TRAIN:-0}"
MAX_TEST="${MAX_TEST:-0}"
ATTN_TYPES="${ATTN_TYPES:-leap softmax}"
ASR_CONFIG="${ASR_CONFIG:-s2t/asr_small}"
ST_CONFIG="${ST_CONFIG:-s2t/st_small}"
ASR_MINUTES="${ASR_MINUTES:-3}"
ST_MINUTES="${ST_MINUTES:-4}"
TRAIN_ARGS="${TRAIN_ARGS:-}"
JOBS="${JOBS:-$(nproc)}"
log() { echo "[device-s2t $(date +%H:%M:%S)] $*"; }
hours() { python3 -c "print($1 / 60)"; }

mkdir -p "$OUT" "$WORK"
START=$SECONDS
log "synthesising $CORPUS with $JOBS espeak-ng jobs"
python3 scripts/make_tts_corpus.py --corpus "$CORPUS" --src en --tgt de --out "$WORK/tts" \
  --max-train "$MAX_TRAIN" --max-valid "$MAX_TEST" --max-test "$MAX_TEST" --jobs "$JOBS"
python3 scripts/s2t_recipe.py prepare --data-root "$WORK/tts" --lang de --out "$WORK/data" \
  --heldout-split tst-HE
log "corpus and features ready in $((SECONDS - START)) s"

for attn in $ATTN_TYPES; do
  (
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of options
    python3 scripts/s2t_recipe.py train-asr --data "$WORK/data" --config "$ASR_CONFIG" \
      --attn-type "$attn" --set "stop-time-hours=$(hours "$ASR_MINUTES")" $TRAIN_ARGS
    # shellcheck disable=SC2086
    python3 scripts/s2t_recipe.py train-st --data "$WORK/data" --config "$ST_CONFIG" \
      --attn-type "$attn" --set "stop-time-hours=$(hours "$ST_MINUTES")" $TRAIN_ARGS
  ) > "$OUT/train_$attn.log" 2>&1 &
done
wait_all=0
for job in $(jobs -p); do wait "$job" || wait_all=1; done
[ "$wait_all" = 0 ] || { tail -n 30 "$OUT"/train_*.log; log "a training failed"; exit 1; }
log "trained in $((SECONDS - START)) s"

for run in "$WORK"/data/runs/st_*; do
  python3 -m leapformer_fairseq.compact --checkpoint "$run/checkpoint_last.pt" \
    --out "$OUT/$(basename "$run").pt" --fp16
done
tar -czf "$OUT/data.tgz" -C "$WORK/data" recipe.json config_st.yaml config_asr.yaml gcmvn.npz \
  spm_st.model spm_st.txt spm_asr.model spm_asr.txt
cp "$WORK/tts/en-de/tts_corpus.json" "$OUT/"
log "done in $((SECONDS - START)) s: $(ls "$OUT" | tr '\n' ' ')"
