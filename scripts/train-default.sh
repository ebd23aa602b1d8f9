#!/usr/bin/env bash
# Train the default checkpoint (MoNE) and its dense baseline at equal training compute (isoFLOPs).
#
#   dense baseline : EPOCHS dense epochs, then EPOCHS2 more (a second warm-up + cosine, lower peak LR)
#   MoNE           : STAGE1 dense epochs, then an adaptive fine-tune of FT epochs, then FT2 more adaptive
#                    epochs (capacity sampled per step).  An adaptive step costs 0.61x a dense one on average,
#                    so FT = (EPOCHS - STAGE1) / 0.61 and FT2 = EPOCHS2 / 0.61 give both chains the same
#                    training FLOPs (each run logs its running total as train_gflops).
#
# The two chains run side by side (one GPU holds both).  The defaults are the shipped checkpoint's
# (docs/model-card.md).  Knobs: RUNS (output root), EPOCHS, EPOCHS2, STAGE1, FT, FT2, PY (the trainer
# command), EXTRA (flags for every run, e.g. --data-dir DIR).
set -euo pipefail

RUNS=${RUNS:-runs}
EPOCHS=${EPOCHS:-14}
EPOCHS2=${EPOCHS2:-9}
STAGE1=${STAGE1:-9}
FT=${FT:-$(python3 -c "print(round(($EPOCHS - $STAGE1) / 0.6119))")}
FT2=${FT2:-$(python3 -c "print(round($EPOCHS2 / 0.6119))")}
PY=${PY:-python -m mone.model.train}
EXTRA=${EXTRA:-}

# Recipe shared by every run: batch 256 images or 32 clips of 8 frames (one clip batch after every 6 image
# batches), AdamW + warm-up + cosine, label smoothing 0.1, random crop (pad 2) + horizontal flip.
mkdir -p "$RUNS"
COMMON="--batch-size 256 --clip-every 6 --clip-batch-size 32 --no-progress $EXTRA"
ADAPTIVE="--adaptive --full-rate 0.1"

(
  $PY --out "$RUNS/dense" --epochs "$EPOCHS" --lr 1.5e-3 --warmup-steps 500 $COMMON
  if [ "$EPOCHS2" -gt 0 ]; then
    $PY --out "$RUNS/dense2" --init-from "$RUNS/dense/last" --epochs "$EPOCHS2" --lr 5e-4 --warmup-steps 200 \
      --seed 2 $COMMON
  fi
) > "$RUNS/dense.log" 2>&1 &
dense=$!
(
  $PY --out "$RUNS/stage1" --epochs "$STAGE1" --lr 1.5e-3 --warmup-steps 500 $COMMON
  $PY --out "$RUNS/mone" --init-from "$RUNS/stage1/last" --alpha-init 0.2 $ADAPTIVE \
    --epochs "$FT" --lr 5e-4 --warmup-steps 200 --seed 1 $COMMON
  if [ "$FT2" -gt 0 ]; then
    $PY --out "$RUNS/mone2" --init-from "$RUNS/mone/last" $ADAPTIVE --epochs "$FT2" --lr 3e-4 \
      --warmup-steps 200 --seed 3 $COMMON
  fi
) > "$RUNS/mone.log" 2>&1 &
mone=$!
status=0
wait $dense || status=$?
wait $mone || status=$?
last_dense=$RUNS/dense2; [ "$EPOCHS2" -gt 0 ] || last_dense=$RUNS/dense
last_mone=$RUNS/mone2; [ "$FT2" -gt 0 ] || last_mone=$RUNS/mone
echo "dense baseline ($last_dense/last): $(tail -n 1 "$last_dense/log.jsonl")"
echo "MoNE ($last_mone/last):            $(tail -n 1 "$last_mone/log.jsonl")"
exit $status
