#!/usr/bin/env bash
# Train the TiG/2 default (MoNE) and its dense baseline with the full recipe, at equal training FLOPs, as two
# processes on one GPU, then evaluate both; every log, checkpoint and result goes into one folder, OUT.
#
#   PYTHON=.venv/bin/python scripts/train-gpu.sh runs/tig2        # under 10 minutes of one H100 / H200
#   TINY=1 PYTHON=.venv/bin/python scripts/train-gpu.sh /tmp/t    # the same pipeline, tiny, on a CPU
#
# Both chains train from scratch with the same budget of training FLOPs (--budget-epochs: BUDGET dense epochs
# of the 55,000 training images; clip steps and MoNE's extra capacities spend from it) and the same recipe:
# AdamW, warm-up + cosine over the budget, label smoothing, crop/flip + RandAugment + random erasing +
# mixup/CutMix, a quarter of the steps on clips, an EMA of the weights.  MoNE runs the sandwich schedule
# (capacity 1.0, the grid's smallest and one more capacity each step) with in-place distillation from the
# step's capacity-1.0 forward.  MINUTES caps each chain's wall clock: the learning rate then follows the
# larger of the FLOPs share and the time share, so a chain that would overrun still ends annealed (its log
# then shows train_gflops below budget_gflops).
#
# OUT/ holds: dense/ and mone/ (each: last/ and ema/ checkpoints, log.jsonl, train_state.pt), dense.log,
# mone.log, eval.log and eval/ (results.json, table.md, ablation.md, accuracy_vs_gflops.png).
# With ABLATION=1 a ladder of MoNE runs at ABLATION_BUDGET follows (OUT/ablation/*), each adding one part
# of the recipe, and eval/ablation-ladder.md shows what each part bought at equal training FLOPs.
#
# Knobs: TINY, VARIANT, BUDGET, MINUTES, BATCH, CLIP_BATCH, LR, WARMUP, THREADS, DEVICE (of the evaluation),
# EVAL (0: train only), ABLATION, ABLATION_BUDGET, PYTHON, EXTRA (flags for every training run).
set -euo pipefail

OUT=${1:-${OUT:-runs/tig2}}
PYTHON=${PYTHON:-python}
TINY=${TINY:-0}
if [ "$TINY" = 1 ]; then
  VARIANT=${VARIANT:-Mi/4}
  BUDGET=${BUDGET:-1}
  MINUTES=${MINUTES:-2}
  BATCH=${BATCH:-32}
  CLIP_BATCH=${CLIP_BATCH:-4}
  WARMUP=${WARMUP:-2}
  THREADS=${THREADS:-1}
  ABLATION_BUDGET=${ABLATION_BUDGET:-0.5}
  SIZE="--train-limit 256 --val-size 64 --val-clips 8"
  EVAL_SIZE="--limit 200 --clips 16 --tome-r 0 2 4 --capacities 0.25 0.3 0.5 1.0"
else
  VARIANT=${VARIANT:-TiG/2}
  BUDGET=${BUDGET:-20}
  MINUTES=${MINUTES:-7}
  BATCH=${BATCH:-256}
  CLIP_BATCH=${CLIP_BATCH:-32}
  WARMUP=${WARMUP:-300}
  THREADS=${THREADS:-4}
  ABLATION_BUDGET=${ABLATION_BUDGET:-5}
  SIZE=""
  EVAL_SIZE="--tome-r 0 4 8 12 14"
fi
LR=${LR:-1e-3}
EVAL=${EVAL:-1}
ABLATION=${ABLATION:-0}
EXTRA=${EXTRA:-}
DEVICE=${DEVICE:-$($PYTHON -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}
TRAIN="$PYTHON -m mone.model.train"

mkdir -p "$OUT"
# The recipe of both chains; only the capacity schedule (and distillation, which needs it) differs.
OPTIM="--variant $VARIANT --batch-size $BATCH --lr $LR --min-lr 1e-5 --warmup-steps $WARMUP --weight-decay 0.05 \
  --label-smoothing 0.1 --threads $THREADS --no-progress $SIZE"
CLIPS="--clip-share 0.25 --clip-batch-size $CLIP_BATCH"
AUG="--crop-pad 2 --hflip --randaug-ops 2 --randaug-magnitude 0.4 --erase-prob 0.25 --mixup 0.2 --cutmix 1.0 \
  --mix-prob 0.5"
EMA="--ema-decay 0.998"
SANDWICH="--schedule sandwich --lower 2 --sandwich-min --alpha-init 0.2"
DISTILL="--distill 0.5 --distill-temperature 1.0"
RECIPE="$OPTIM $CLIPS $AUG $EMA $EXTRA"

echo "training into $OUT: $VARIANT, budget $BUDGET dense epochs per chain, at most $MINUTES min each"
$TRAIN --out "$OUT/dense" --capacity 1.0 --seed 0 --budget-epochs "$BUDGET" --max-minutes "$MINUTES" \
  $RECIPE > "$OUT/dense.log" 2>&1 &
dense=$!
$TRAIN --out "$OUT/mone" $SANDWICH $DISTILL --seed 1 --budget-epochs "$BUDGET" --max-minutes "$MINUTES" \
  $RECIPE > "$OUT/mone.log" 2>&1 &
mone=$!
status=0
wait $dense || status=$?
wait $mone || status=$?
echo "dense baseline ($OUT/dense): $(tail -n 1 "$OUT/dense/log.jsonl")"
echo "MoNE ($OUT/mone):            $(tail -n 1 "$OUT/mone/log.jsonl")"
[ "$status" = 0 ] || { echo "a training chain failed: see $OUT/dense.log and $OUT/mone.log" >&2; exit "$status"; }

if [ "$ABLATION" = 1 ]; then
  # Each rung adds one part of the recipe to the one above; every rung has the same FLOPs budget.  The
  # EMA costs nothing to train: the last rung's ema/ is the full recipe's row.
  A="$OUT/ablation"
  mkdir -p "$A"
  BASE="$OPTIM --budget-epochs $ABLATION_BUDGET --max-minutes $MINUTES --seed 2 $EXTRA"
  PAPER_CLIPS="--clip-every 6 --clip-batch-size $CLIP_BATCH"
  declare -A RUNG=(
    [1-paper]="--adaptive --full-rate 0.1 --alpha-init 0.2 $PAPER_CLIPS"
    [2-sandwich]="$SANDWICH $PAPER_CLIPS"
    [3-distill]="$SANDWICH $DISTILL $PAPER_CLIPS"
    [4-augment]="$SANDWICH $DISTILL $PAPER_CLIPS $AUG"
    [5-clips]="$SANDWICH $DISTILL $CLIPS $AUG $EMA"
  )
  pids=()
  for name in "${!RUNG[@]}"; do
    $TRAIN --out "$A/$name" $BASE ${RUNG[$name]} > "$A/$name.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  [ "$status" = 0 ] || { echo "an ablation run failed: see $A/*.log" >&2; exit "$status"; }
fi

if [ "$EVAL" = 1 ]; then
  mkdir -p "$OUT/eval"
  EVAL_CMD="$PYTHON -m mone.model.evaluate --device $DEVICE $EVAL_SIZE"
  {
    $EVAL_CMD --checkpoint "$OUT/mone/ema" --dense "$OUT/dense/ema" --out "$OUT/eval/results.json" \
      --plot "$OUT/eval/accuracy_vs_gflops.png" --table "$OUT/eval/table.md" \
      --ablation "dense=$OUT/dense/last" "dense+EMA=$OUT/dense/ema" "MoNE=$OUT/mone/last" \
      "MoNE+EMA=$OUT/mone/ema" --ablation-table "$OUT/eval/ablation.md"
    if [ "$ABLATION" = 1 ]; then
      $EVAL_CMD --checkpoint none --dense none --out "$OUT/eval/ablation-ladder.json" \
        --ablation "paper recipe=$OUT/ablation/1-paper/last" "+ sandwich=$OUT/ablation/2-sandwich/last" \
        "+ distillation=$OUT/ablation/3-distill/last" "+ augmentation=$OUT/ablation/4-augment/last" \
        "+ clip share 0.25=$OUT/ablation/5-clips/last" "+ EMA=$OUT/ablation/5-clips/ema" \
        --ablation-table "$OUT/eval/ablation-ladder.md"
    fi
  } > "$OUT/eval.log" 2>&1 || { echo "evaluation failed: see $OUT/eval.log" >&2; exit 1; }
  cat "$OUT/eval/ablation.md"
  if [ "$ABLATION" = 1 ]; then cat "$OUT/eval/ablation-ladder.md"; fi
fi
echo "done: $OUT"
