#!/usr/bin/env bash
# Simultaneous speech translation on MuST-C with LeaP attention in every block, as plain
# commands: the data preparation of scripts/s2t_recipe.py (fbank, CMVN, SentencePiece, one wav
# per evaluation segment), ASR pre-training and wait-k ST with fairseq-train (the options of
# configs/s2t/asr_small.yaml and st_small.yaml; the ST encoder starts from the ASR model), the
# simuleval CLI with the speech agent, and the plain and computation-aware re-scoring. The
# commands are the Python recipe's (tests/test_shell_recipes.py checks it). Set the variables
# below in the environment.
#
#   . .venv/bin/activate && MUSTC_ROOT=/data/MUSTC_v1.0 bash scripts/run_mustc_simulst.sh
#   DRY_RUN=1 MUSTC_ROOT=... bash scripts/run_mustc_simulst.sh     # print the commands only
#   MUSTC_ROOT=... ARCH=leapformer_s2t_waitk_tiny MAX_UPDATE=2 TRAIN_EXTRA=--cpu SENTENCES=2 \
#       VOCAB_SIZE=60 OUT=work/sh-s2t bash scripts/run_mustc_simulst.sh              # smoke size
set -euo pipefail
cd "$(dirname "$0")/.."

MUSTC_ROOT="${MUSTC_ROOT:?set MUSTC_ROOT to the folder holding en-<lang>/data/<split>}"
LANG_TGT="${LANG_TGT:-de}"
OUT="${OUT:-work/mustc-en-$LANG_TGT}"
VOCAB_SIZE="${VOCAB_SIZE:-8000}"      # SentencePiece pieces of the ASR and the ST targets
ATTN="${ATTN:-leap}"                  # every block: leap, softmax, hedgehog, cosformer, linear
WAITK="${WAITK:-5}"
FRAMES_PER_UNIT="${FRAMES_PER_UNIT:-9}"   # 40 ms encoder frames per wait-k unit (9: 360 ms)
ARCH="${ARCH:-leapformer_s2t_waitk_small}"
MAX_UPDATE="${MAX_UPDATE:-20000}"     # per training step
TRAIN_EXTRA="${TRAIN_EXTRA:-}"        # more fairseq-train options (e.g. --cpu)
SEGMENT_MS="${SEGMENT_MS:-200}"       # audio per agent call
SENTENCES="${SENTENCES:-0}"           # SimulEval on the first N tst-COMMON segments (0: all)
DRY_RUN="${DRY_RUN:-0}"
ASR="$OUT/runs/asr_${ATTN}_k${WAITK}"
ST="$OUT/runs/st_${ATTN}_k${WAITK}"

run() {  # print the command (shell-quoted), then run it unless DRY_RUN=1
  printf '+'; printf ' %q' "$@"; echo
  if [ "$DRY_RUN" != 1 ]; then "$@"; fi
}

# 1. Data: train, dev, tst-COMMON (and tst-HE, a second evaluation set).
run python scripts/s2t_recipe.py prepare --data-root "$MUSTC_ROOT" --lang "$LANG_TGT" \
  --out "$OUT" --heldout-split tst-HE --vocab-size-asr "$VOCAB_SIZE" --vocab-size-st "$VOCAB_SIZE" \
  --max-eval "$SENTENCES"

# 2. ASR pre-training (configs/s2t/asr_small.yaml), then wait-k ST from its encoder
#    (configs/s2t/st_small.yaml: the same options).
for TASK in asr st; do
  SAVE="$ASR"
  INIT=()
  if [ "$TASK" = st ]; then SAVE="$ST"; INIT=(--load-pretrained-encoder-from "$ASR/checkpoint_last.pt"); fi
  # shellcheck disable=SC2086  # TRAIN_EXTRA is a list of options
  run fairseq-train "$OUT" --user-dir leapformer_fairseq --task speech_to_text \
    --config-yaml "config_$TASK.yaml" --train-subset "train_$TASK" --valid-subset "dev_$TASK" \
    "${INIT[@]}" --save-dir "$SAVE" --arch "$ARCH" --encoder-attn-type "$ATTN" \
    --decoder-attn-type "$ATTN" --cross-attn-type "$ATTN" --leap-feature-map hedgehog \
    --waitk-lagging "$WAITK" --frames-per-unit "$FRAMES_PER_UNIT" \
    --criterion label_smoothed_cross_entropy --label-smoothing 0.1 --report-accuracy \
    --optimizer adam --adam-betas '(0.9, 0.98)' --clip-norm 10.0 --lr 0.001 \
    --lr-scheduler inverse_sqrt --warmup-updates 1000 --max-tokens 20000 \
    --max-update "$MAX_UPDATE" --seed 1 --required-batch-size-multiple 1 \
    --skip-invalid-size-inputs-valid-test --no-epoch-checkpoints --log-format simple \
    --log-interval 10 --num-workers 0 $TRAIN_EXTRA
done

# 3. SimulEval with the speech agent on both evaluation sets, then plain and computation-aware
#    latency side by side (scores_plain_ca.tsv; SimulEval 1.1.4's own table has AL = AL_CA).
for SET in eval heldout; do
  run simuleval --agent simuleval_agents/leap_waitk_speech_agent.py \
    --source "$OUT/$SET.wav_list" --target "$OUT/$SET.$LANG_TGT" \
    --checkpoint "$ST/checkpoint_last.pt" --data-dir "$OUT" --config-yaml config_st.yaml \
    --waitk "$WAITK" --output "$ST/$SET" --source-segment-size "$SEGMENT_MS" \
    --source-type speech --target-type text --quality-metrics BLEU \
    --latency-metrics AL LAAL AP DAL ATD --eval-latency-unit word --computation-aware
  run python -m leapformer_fairseq.simuleval_scores "$ST/$SET"
done
