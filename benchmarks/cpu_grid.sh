#!/usr/bin/env bash
# The CPU-scale table of the study (issue 3) on a subset of the CIFAR-10 JPEGs:
#   1. BYOL pretraining, loss=classic and loss=multi (ResNet-18, ImageNet stem, SGD), one sweep;
#   2. kNN and the linear probe (cached features) on avgpool and combined for every run plus the
#      random-init baseline, one sweep;
#   3. fine-tuning for a few epochs, same models and representations, one sweep;
#   4. the report: results.md / results.csv / results.png in $OUT.
# BYOL needs far more steps than minutes of this CPU give: the table proves the machinery, not the
# method (see the issue). Expect about 40-50 minutes with the defaults on the 2-core machine (a check
# with SUBSET=256 EPOCHS=1 FT_EPOCHS=1 took 7 minutes, most of it feature extraction of the
# 5,000 validation and 10,000 test images for each of the 3 models in each of the 6 jobs).
# SEEDS=0,1,2 with seed 0 already trained took 30 minutes on the quiet machine on 2026-11-28 (4 pretraining
# runs of 3.5 to 5 minutes, then every evaluation of all 6 runs); the evaluations alone (3 steps after
# pretraining, per-seed baselines) took 9.4 minutes.
#
# Environment (defaults): DATA (/tmp/cifar10, laid out as DATA/{train,test}/<class>/*.jpg),
# SUBSET (10000 training images), EPOCHS (8, pretraining), SEEDS (0; e.g. 0,1,2), FT_EPOCHS (1),
# BATCH (256), OUT (outputs/cpu_grid), PYTHON (python).
# A quick check of the script itself: SUBSET=256 EPOCHS=1 FT_EPOCHS=1 OUT=/tmp/cpu_grid_check bash benchmarks/cpu_grid.sh
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DATA=${DATA:-/tmp/cifar10}
SUBSET=${SUBSET:-10000}
EPOCHS=${EPOCHS:-8}
SEEDS=${SEEDS:-0}
FT_EPOCHS=${FT_EPOCHS:-1}
BATCH=${BATCH:-256}
OUT=${OUT:-outputs/cpu_grid}
DATA_ARGS=(data=imagefolder "data.root=$DATA" "data.subset=$SUBSET" "data.batch_size=$BATCH")
EVAL_DATA_ARGS=(data=imagefolder "data.root=$DATA" "data.subset=$SUBSET")  # evaluate.py: no training batch size
T0=$(date +%s)
say() { echo "[cpu_grid +$(( $(date +%s) - T0 ))s] $*"; }

say "pretraining: loss=classic,multi seed=$SEEDS, $SUBSET images, $EPOCHS epochs -> $OUT/train"
"$PY" train.py -m "${DATA_ARGS[@]}" backbone.stem=imagenet optim=sgd loss=classic,multi "seed=$SEEDS" \
  "trainer.max_epochs=$EPOCHS" "hydra.sweep.dir=$OUT/train" 'hydra.sweep.subdir=${hydra:runtime.choices.loss}_seed${seed}'

say "kNN and linear probe on avgpool and combined (+ random-init baseline) -> $OUT/eval"
"$PY" evaluate.py -m "${EVAL_DATA_ARGS[@]}" "pretrained=$OUT/train" repr=avgpool,combined eval=knn,linear \
  "hydra.sweep.dir=$OUT/eval"

say "fine-tuning, $FT_EPOCHS epochs (+ random-init baseline) -> $OUT/finetune"
"$PY" evaluate.py -m "${EVAL_DATA_ARGS[@]}" "pretrained=$OUT/train" repr=avgpool,combined eval=finetune \
  "eval.epochs=$FT_EPOCHS" "hydra.sweep.dir=$OUT/finetune"

say "report -> $OUT/results.md"
"$PY" -m byol.report "$OUT/eval" "$OUT/finetune" --out "$OUT"
say "done"
