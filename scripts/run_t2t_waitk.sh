#!/usr/bin/env bash
# Simultaneous text-to-text translation with LeaP attention in every block, as plain commands:
# the data preparation of scripts/t2t_recipe.py, fairseq-train with the options of
# configs/t2t/small.yaml, and the simuleval CLI with the text agent. The commands are the Python
# recipe's (tests/test_shell_recipes.py checks it). Set the variables below in the environment.
#
#   . .venv/bin/activate && bash scripts/run_t2t_waitk.sh
#   DRY_RUN=1 bash scripts/run_t2t_waitk.sh          # print the commands only
#   ARCH=leapformer_waitk_transformer_tiny MAX_UPDATE=2 TRAIN_EXTRA=--cpu SENTENCES=5 \
#       MAX_TRAIN=200 VOCAB_SIZE=300 OUT=work/sh-t2t bash scripts/run_t2t_waitk.sh   # smoke size
set -euo pipefail
cd "$(dirname "$0")/.."

DEFAULT_CORPUS='data/gettext-mt-full/en-de.{split}.tsv'
CORPUS="${CORPUS:-$DEFAULT_CORPUS}"   # gettext-mt TSVs, {split} = train, valid, test
SRC="${SRC:-en}"
TGT="${TGT:-de}"
MAX_TRAIN="${MAX_TRAIN:-0}"           # first N training pairs (0: all)
VOCAB_SIZE="${VOCAB_SIZE:-4000}"      # joint SentencePiece vocabulary
OUT="${OUT:-work/t2t-$SRC-$TGT}"
ATTN="${ATTN:-leap}"                  # every block: leap, softmax, hedgehog, cosformer, linear
WAITK="${WAITK:-3}"
ARCH="${ARCH:-leapformer_waitk_transformer_small}"
MAX_UPDATE="${MAX_UPDATE:-3000}"
TRAIN_EXTRA="${TRAIN_EXTRA:-}"        # more fairseq-train options (e.g. --cpu)
SENTENCES="${SENTENCES:-0}"           # SimulEval on the first N test sentences (0: all)
DRY_RUN="${DRY_RUN:-0}"
SAVE="$OUT/runs/${ATTN}_k${WAITK}"

run() {  # print the command (shell-quoted), then run it unless DRY_RUN=1
  printf '+'; printf ' %q' "$@"; echo
  if [ "$DRY_RUN" != 1 ]; then "$@"; fi
}

# 1. Data: SentencePiece on the training pairs, fairseq's binary data, the test files.
run python scripts/t2t_recipe.py prepare --corpus "$CORPUS" --src "$SRC" --tgt "$TGT" \
  --out "$OUT" --vocab-size "$VOCAB_SIZE" --max-train "$MAX_TRAIN"

# 2. Training: configs/t2t/small.yaml.
# shellcheck disable=SC2086  # TRAIN_EXTRA is a list of options
run fairseq-train "$OUT/data-bin" --user-dir leapformer_fairseq --task translation \
  --save-dir "$SAVE" --arch "$ARCH" --encoder-attn-type "$ATTN" --decoder-attn-type "$ATTN" \
  --cross-attn-type "$ATTN" --leap-feature-map hedgehog --waitk-lagging "$WAITK" \
  --share-all-embeddings --dropout 0.1 --criterion label_smoothed_cross_entropy \
  --label-smoothing 0.1 --optimizer adam --adam-betas '(0.9, 0.98)' --clip-norm 1.0 \
  --lr 0.001 --lr-scheduler inverse_sqrt --warmup-updates 400 --max-tokens 4096 \
  --max-update "$MAX_UPDATE" --seed 1 --skip-invalid-size-inputs-valid-test \
  --no-epoch-checkpoints --log-format simple --log-interval 20 --num-workers 0 $TRAIN_EXTRA

# 3. SimulEval with the text agent: BLEU, AL, LAAL, AP, DAL in $SAVE/eval/scores.tsv.
SOURCE="$OUT/test.$SRC"
TARGET="$OUT/test.$TGT"
if [ "$SENTENCES" != 0 ]; then
  run mkdir -p "$SAVE/eval"
  if [ "$DRY_RUN" != 1 ]; then
    head -n "$SENTENCES" "$SOURCE" > "$SAVE/eval/test.$SRC"
    head -n "$SENTENCES" "$TARGET" > "$SAVE/eval/test.$TGT"
  fi
  SOURCE="$SAVE/eval/test.$SRC"
  TARGET="$SAVE/eval/test.$TGT"
fi
run simuleval --agent simuleval_agents/leap_waitk_text_agent.py --source "$SOURCE" \
  --target "$TARGET" --checkpoint "$SAVE/checkpoint_last.pt" --data-bin "$OUT/data-bin" \
  --spm "$OUT/spm.model" --waitk "$WAITK" --output "$SAVE/eval" --source-type text \
  --target-type text --quality-metrics BLEU --latency-metrics AL LAAL AP DAL \
  --eval-latency-unit word
