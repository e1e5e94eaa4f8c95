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
# EPOCHS (pretraining epochs; default: experiment=cpu's 25), SCHEDULE_EPOCHS (empty: experiment=cpu's
# 40-epoch learning-rate schedule, cut at EPOCHS; null: the schedule spans the EPOCHS run), SEEDS (0,1,2),
# FT_EPOCHS (1), SUBSET (empty: all 50,000 training images), OUT (outputs/cpu_grid), PYTHON (python),
# EXTRA (more train.py overrides).
# The defaults make the README's table at the recipe's budget: six pretraining runs (2 losses x 3 seeds)
# one after the other, plus the evaluation of those 6 models and 3 random-init baselines. On the 2-core
# Intel Xeon (README: Results) a run took 11.4-14.5 minutes alone on the machine (seeds 3-4, 2026-11-29)
# and 22-34.5 minutes on slower or shared sittings (seeds 0-2: classic 23.7-34.5, multi 22.0-26.8), and
# kNN + linear took 23 minutes for 15 models (about 14 for these 9) and fine-tuning 4 minutes for one epoch:
# in all about 1.5 hours on a quiet machine, up to about 4 hours on a slow or shared one.
# Finished runs in OUT/train are skipped, an interrupted one resumes, so the grid can be made over several sittings; SEEDS=3,4 with the same OUT adds seeds (the
# evaluation then covers every run in OUT/train), or with OUT=DIR/s56 keeps them apart (the README's seeds 5
# and 6; byol.report takes both folders' evaluations). The earlier tables
# (benchmarks/CPU_HISTORY.md):
#   EPOCHS=10 bash benchmarks/cpu_grid.sh                 # 10 epochs of the same schedule: one hour
#   EPOCHS=5 SCHEDULE_EPOCHS=null EXTRA=backbone.width=0.5 bash benchmarks/cpu_grid.sh   # width 0.5
# A quick check of the script itself (about 4 minutes on 2 cores):
#   SUBSET=512 EPOCHS=1 SEEDS=0 FT_EPOCHS=1 OUT=/tmp/cpu_grid_check bash benchmarks/cpu_grid.sh
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DATA=${DATA:-/tmp/cifar10}
EPOCHS=${EPOCHS:-}  # empty: experiment=cpu's 25 epochs of its 40-epoch schedule (11-30 min a run here)
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
