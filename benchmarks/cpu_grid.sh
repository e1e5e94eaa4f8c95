#!/usr/bin/env bash
# The study's grid on a CPU (README: Results), with the CPU recipe experiment=cpu on the full
# CIFAR-10 training set (the shared JPEGs):
#   1. BYOL pretraining, loss=classic and loss=multi x SEEDS, one sweep (online kNN every epoch);
#   2. kNN and the cached linear probe on avgpool and combined for every run, plus the random-init
#      baseline (one encoder per seed), one sweep;
#   3. fine-tuning for FT_EPOCHS epochs, same models and representations, one sweep;
#   4. the report: results.md / results.csv / results.png and the runs' curves.png in $OUT.
# Evaluation reads each run's own data settings (folder, image size, normalisation).
#
# Environment (defaults): DATA (/tmp/cifar10, laid out as DATA/{train,test}/<class>/*.jpg),
# EPOCHS (10, pretraining epochs; empty: experiment=cpu's 25), SCHEDULE_EPOCHS (empty: experiment=cpu's
# 40-epoch learning-rate schedule, cut at EPOCHS; null: the schedule spans the EPOCHS run), SEEDS (0,1,2),
# FT_EPOCHS (1), SUBSET (empty: all 50,000 training images), OUT (outputs/cpu_grid), PYTHON (python),
# EXTRA (more train.py overrides).
# The defaults make the README's table (about an hour on 2 cores: 49 minutes of pretraining for the six
# runs, 10 of evaluation). The earlier table, made when experiment=cpu ran ResNet-18 at width 0.5:
#   EPOCHS=5 SCHEDULE_EPOCHS=null EXTRA=backbone.width=0.5 bash benchmarks/cpu_grid.sh
# A quick check of the script itself (about 4 minutes on 2 cores):
#   SUBSET=512 EPOCHS=1 SEEDS=0 FT_EPOCHS=1 OUT=/tmp/cpu_grid_check bash benchmarks/cpu_grid.sh
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DATA=${DATA:-/tmp/cifar10}
EPOCHS=${EPOCHS-10}  # the README table's budget; empty (EPOCHS=): experiment=cpu's 25 of 40 (18-27 min a run)
SEEDS=${SEEDS:-0,1,2}
FT_EPOCHS=${FT_EPOCHS:-1}
SUBSET=${SUBSET:-}
OUT=${OUT:-outputs/cpu_grid}
TRAIN_ARGS=(experiment=cpu data=imagefolder "data.root=$DATA")
[[ -n "$EPOCHS" ]] && TRAIN_ARGS+=("trainer.max_epochs=$EPOCHS")
[[ -n "${SCHEDULE_EPOCHS:-}" ]] && TRAIN_ARGS+=("schedule_epochs=$SCHEDULE_EPOCHS")  # null: spans the run
[[ -n "$SUBSET" ]] && TRAIN_ARGS+=("data.subset=$SUBSET")
# shellcheck disable=SC2206
[[ -n "${EXTRA:-}" ]] && TRAIN_ARGS+=($EXTRA)
T0=$(date +%s)
say() { echo "[cpu_grid +$(( $(date +%s) - T0 ))s] $*"; }

say "pretraining: loss=classic,multi seed=$SEEDS (${TRAIN_ARGS[*]}) -> $OUT/train"
"$PY" train.py -m "${TRAIN_ARGS[@]}" loss=classic,multi "seed=$SEEDS" \
  "hydra.sweep.dir=$OUT/train" 'hydra.sweep.subdir=${hydra:runtime.choices.loss}_seed${seed}'

say "kNN and linear probe on avgpool and combined (+ random-init baseline) -> $OUT/eval"
"$PY" evaluate.py -m "pretrained=$OUT/train" repr=avgpool,combined eval=knn,linear "hydra.sweep.dir=$OUT/eval"

say "fine-tuning, $FT_EPOCHS epoch(s) (+ random-init baseline) -> $OUT/finetune"
"$PY" evaluate.py -m "pretrained=$OUT/train" repr=avgpool,combined eval=finetune "eval.epochs=$FT_EPOCHS" \
  "hydra.sweep.dir=$OUT/finetune"

say "report -> $OUT/results.md"
"$PY" -m byol.report "$OUT/eval" "$OUT/finetune" --out "$OUT"
say "done"
