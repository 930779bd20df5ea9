#!/usr/bin/env bash
# Train the speech models on a GPU machine without package access, from text alone: synthesise
# gettext-mt en-de with the carried espeak-ng on every core (train, dev, tst-COMMON and the
# held-out voices' tst-HE), prepare, then for each attention type a text-to-text wait-k model
# (whose decoder the ST model starts from) beside ASR pre-training, then wait-k ST, the types
# side by side on the one GPU, each step for a fixed wall-clock budget.
# Writes to OUT what evaluation on this side needs: the prepared text files, the ST checkpoints
# without optimizer state in fp16 (python -m leapformer_fairseq.compact), the training logs.
#
# Here, once:   bash scripts/device_bundle.sh
# There (the device tool's command, with .device carried):
#   . scripts/device_env.sh && bash scripts/device_s2t.sh
# Back here: make_tts_corpus.py --splits tst-COMMON,tst-HE, then s2t_recipe.py receive (docs/recipes.md).
# A CPU smoke run here (what CI runs, at tiny size; the text model's decoder sized as the tiny
# speech model's):
#   MAX_TRAIN=40 MAX_TEST=4 T2T_MINUTES=0.1 ASR_MINUTES=0.1 ST_MINUTES=0.1 CTC_WEIGHT=0.3 \
#     TRAIN_ARGS="--set arch=leapformer_s2t_waitk_tiny --set max-update=2 --cpu" \
#     T2T_ARGS="--set arch=leapformer_waitk_transformer_tiny --set encoder-embed-dim=64
#       --set decoder-embed-dim=64 --set decoder-ffn-embed-dim=128 --set decoder-layers=1
#       --set decoder-attention-heads=2 --set required-batch-size-multiple=1 --set max-update=2
#       --cpu" bash scripts/device_s2t.sh
#
# Variables [default]:
#   OUT [work/device-s2t]     results (the device tool's $OUT there)
#   WORK [/tmp/device-s2t]    corpus, features and runs
#   CORPUS [data/gettext-mt-full/en-de.{split}.tsv]; MAX_TRAIN, MAX_TEST [0: all]
#   ATTN_TYPES ["leap softmax"]; ASR_CONFIG [s2t/asr_small]; ST_CONFIG [s2t/st_small]
#   T2T_CONFIG [t2t/small_prenorm]: the text model, whose decoder fits ST_CONFIG's
#   T2T_MINUTES [2], ASR_MINUTES [3], ST_MINUTES [4]: wall-clock training budget per step
#                             (fairseq's --stop-time-hours; the configurations' max-update still
#                             applies); T2T_MINUTES=0: no text model, the ST decoder from scratch
#   CTC_WEIGHT [0]            CTC on the encoder in ASR pre-training with this weight (0: none;
#                             no gain measured in the CPU screen, docs/recipes.md)
#   SPECAUGMENT []            prepare --specaugment POLICY (empty: none)
#   TRAIN_ARGS []             more options for both speech training steps (e.g. --set lr=0.002)
#   T2T_ARGS []               more options for the text model
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
T2T_CONFIG="${T2T_CONFIG:-t2t/small_prenorm}"
T2T_MINUTES="${T2T_MINUTES:-2}"
CTC_WEIGHT="${CTC_WEIGHT:-0}"
SPECAUGMENT="${SPECAUGMENT:-}"
TRAIN_ARGS="${TRAIN_ARGS:-}"
T2T_ARGS="${T2T_ARGS:-}"
JOBS="${JOBS:-$(nproc)}"
log() { echo "[device-s2t $(date +%H:%M:%S)] $*"; }
hours() { python3 -c "print($1 / 60)"; }

mkdir -p "$OUT" "$WORK"
START=$SECONDS
log "synthesising $CORPUS with $JOBS espeak-ng jobs"
python3 scripts/make_tts_corpus.py --corpus "$CORPUS" --src en --tgt de --out "$WORK/tts" \
  --max-train "$MAX_TRAIN" --max-valid "$MAX_TEST" --max-test "$MAX_TEST" --jobs "$JOBS"
prepare_options=()
if [ "$T2T_MINUTES" != 0 ]; then
  python3 scripts/t2t_recipe.py prepare --corpus "$CORPUS" --src en --tgt de --out "$WORK/t2t" \
    --max-train "$MAX_TRAIN" --max-valid "$MAX_TEST" --max-test "$MAX_TEST"
  prepare_options+=(--st-vocab-from "$WORK/t2t")
fi
[ -z "$SPECAUGMENT" ] || prepare_options+=(--specaugment "$SPECAUGMENT")
python3 scripts/s2t_recipe.py prepare --data-root "$WORK/tts" --lang de --out "$WORK/data" \
  --heldout-split tst-HE "${prepare_options[@]}"
log "corpus and features ready in $((SECONDS - START)) s"

asr_options=()
[ "$CTC_WEIGHT" = 0 ] || asr_options+=(--set criterion=label_smoothed_cross_entropy_with_ctc
                                       --set "ctc-weight=$CTC_WEIGHT")
for attn in $ATTN_TYPES; do
  (
    st_options=()
    if [ "$T2T_MINUTES" != 0 ]; then
      # shellcheck disable=SC2086  # T2T_ARGS is a list of options
      python3 scripts/t2t_recipe.py train --data "$WORK/t2t" --config "$T2T_CONFIG" \
        --attn-type "$attn" --set "stop-time-hours=$(hours "$T2T_MINUTES")" $T2T_ARGS &
      text_model=$!
    fi
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of options
    python3 scripts/s2t_recipe.py train-asr --data "$WORK/data" --config "$ASR_CONFIG" \
      --attn-type "$attn" --set "stop-time-hours=$(hours "$ASR_MINUTES")" "${asr_options[@]}" \
      $TRAIN_ARGS
    if [ "$T2T_MINUTES" != 0 ]; then
      wait "$text_model"
      st_options+=(--set "load-pretrained-decoder-from=$(ls "$WORK/t2t/runs/${attn}"_k*/checkpoint_last.pt)")
    fi
    # shellcheck disable=SC2086
    python3 scripts/s2t_recipe.py train-st --data "$WORK/data" --config "$ST_CONFIG" \
      --attn-type "$attn" --set "stop-time-hours=$(hours "$ST_MINUTES")" "${st_options[@]}" \
      $TRAIN_ARGS
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
