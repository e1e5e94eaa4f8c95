#!/usr/bin/env bash
# The grid mode of benchmarks/gpu.sh (steps 4-6 of MODE=grid; see the comment at the top of gpu.sh
# and benchmarks/README.md). `bash benchmarks/gpu_grid.sh` is `MODE=grid bash benchmarks/gpu.sh`;
# gpu.sh sources this file after its steps 1-3 (packages, data, throughput), with its variables
# and functions (say, elapsed, keep) set.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  MODE=grid exec bash "$(dirname "$0")/gpu.sh" "$@"
fi

GRID="$WORK/grid"
TRAIN_SWEEP="$GRID/train"
FT_EPOCHS=${FT_EPOCHS:-2}
GRID_BATCH=${GRID_BATCH:-256}
EVAL_S=${EVAL_S:-170}  # kept for steps 5-6 (H200, 2026-11-28: 12 kNN/linear evaluations 70 s, 6 fine-tunings 55 s, report 13 s)
LOSSES=(classic multi)
left() { echo $(( GRID_S - $(elapsed) )); }
rm -rf "$GRID"

# ---------------------------------------------------------------- 4. pretraining, classic and multi
PRETRAIN_S=$(( $(left) - EVAL_S ))
[ "$PRETRAIN_S" -ge 60 ] || PRETRAIN_S=60
read -r EPOCHS WARM_EPOCHS EPOCH_S < <("$PY" - "$OUT/bench_b$GRID_BATCH.json" "$PRETRAIN_S" "$SMOKE" \
  "${#LOSSES[@]}" <<'EOF'
import json, sys
path, budget, smoke, runs = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
try:
    epoch_s = json.load(open(path))["seconds_per_epoch"]["cifar"]["ours"]
except (OSError, KeyError, ValueError, TypeError):
    epoch_s = None
if smoke:
    epochs = 1
elif not epoch_s:
    epochs = 5  # no throughput figure: a few epochs, the timeout still holds
else:  # ~40 s start-up for the sweep; x1.35: last.ckpt and epoch ends every epoch, multi's extra heads
    epochs = max(1, int((budget - 40) / (runs * 1.35 * epoch_s)))
warm = min(10.0, round(epochs / 10, 2)) if epochs >= 5 else 0  # 10% of the run, at most the recipe's 10
print(epochs, warm, f"{epoch_s:.2f}" if epoch_s else "unknown")
EOF
)
GRID_BATCH_ARGS=(); [ "$SMOKE" = 1 ] || GRID_BATCH_ARGS=(data.batch_size="$GRID_BATCH")
# the JPEG copy of CIFAR-10 through the image-folder path, normalised with CIFAR-10's statistics
TRAIN_ARGS=(experiment=cifar10 loss=classic,multi data=imagefolder "${GRID_BATCH_ARGS[@]}"
            "data.mean=[0.4914,0.4822,0.4465]" "data.std=[0.2470,0.2435,0.2616]"
            trainer.max_epochs="$EPOCHS" optim.scheduler.warmup_epochs="$WARM_EPOCHS"
            trainer.enable_progress_bar=false checkpoint.every_n_epochs=100000 "${COMPILE_SET[@]}" "${GRID_TINY[@]}")
say "grid pretraining: ${LOSSES[*]}, $EPOCHS epochs each (${EPOCH_S} s/epoch at batch $GRID_BATCH measured;" \
    "budget ${PRETRAIN_S}s for both) -> $TRAIN_SWEEP"
P0=$(date +%s)
timeout $(( PRETRAIN_S + 60 )) "$PY" train.py -m "${TRAIN_ARGS[@]}" data.root="$DATA" \
  hydra.sweep.dir="$TRAIN_SWEEP" 'hydra.sweep.subdir=${hydra:runtime.choices.loss}'
PRETRAIN_RC=$?
PRETRAIN_WALL=$(( $(date +%s) - P0 ))
say "grid pretraining exit $PRETRAIN_RC after ${PRETRAIN_WALL}s"

# ---------------------------------------------------------------- 5. evaluations (+ random-init baseline)
EVAL_ARGS=(pretrained="$TRAIN_SWEEP" allow_incomplete=true)  # a run cut by the timeout still shows, marked
FT_ARGS=(eval.epochs="$FT_EPOCHS")
[ "$SMOKE" = 1 ] && FT_ARGS=(eval.epochs=1)
run_eval() {  # NAME TIMEOUT ARGS...: one evaluation sweep into $GRID/NAME; sets EVAL_NOTE
  local name=$1 limit=$2 e0 rc
  shift 2
  [ "$limit" -ge 60 ] || limit=60
  say "grid evaluation $name (timeout ${limit}s): $*"
  e0=$(date +%s)
  timeout "$limit" "$PY" evaluate.py -m "${EVAL_ARGS[@]}" "$@" hydra.sweep.dir="$GRID/$name"
  rc=$?
  EVAL_NOTE="exit $rc after $(( $(date +%s) - e0 )) s"
  say "grid evaluation $name: $EVAL_NOTE"
}
if [ -d "$TRAIN_SWEEP" ]; then
  run_eval eval $(( ($(left) - 20) * 2 / 3 )) repr=avgpool,combined eval=knn,linear  # 12 evaluations
  KL_NOTE=$EVAL_NOTE
  run_eval finetune $(( $(left) - 20 )) repr=avgpool,combined eval=finetune "${FT_ARGS[@]}"  # 6
  FT_NOTE=$EVAL_NOTE
else
  KL_NOTE="not run (no pretraining sweep)"; FT_NOTE=$KL_NOTE
fi

# ---------------------------------------------------------------- 6. report, figures
REPORT="$GRID/report"
SCANNED=()
for d in "$GRID/eval" "$GRID/finetune"; do [ -d "$d" ] && SCANNED+=("$d"); done
REPORT_RC="not run (no evaluation)"
if [ "${#SCANNED[@]}" -gt 0 ]; then
  say "report: ${SCANNED[*]} -> $REPORT"
  timeout 120 "$PY" -m byol.report "${SCANNED[@]}" --out "$REPORT"
  REPORT_RC="exit $?"
fi
FIGURES=()  # by what they tell: the table's chart, the two runs' curves overlaid, then each run's own
[ -f "$REPORT/results.png" ] && keep "$REPORT/results.png" results.png && FIGURES+=("results.png ($REPORT/results.png)")
[ -f "$REPORT/curves.png" ] && keep "$REPORT/curves.png" curves_overlay.png &&
  FIGURES+=("curves_overlay.png, classic and multi overlaid ($REPORT/curves.png)")
for loss in "${LOSSES[@]}"; do
  for png in "$TRAIN_SWEEP/$loss"/*.png; do
    [ -f "$png" ] || continue
    name="${png##*/}"; name="${name%.png}_$loss.png"
    if keep "$png" "$name"; then FIGURES+=("$name ($png)"); else FIGURES+=("not copied: $png"); fi
  done
done
[ -f "$REPORT/results.csv" ] && keep "$REPORT/results.csv" results.csv

{
  echo
  echo "Grid with the GPU recipe (budget ${GRID_S} s for the whole script). Pretraining, one sweep:" \
       "\`python train.py -m ${TRAIN_ARGS[*]}\`: exit $PRETRAIN_RC, $EPOCHS epochs per run (sized from" \
       "ours at batch $GRID_BATCH: ${EPOCH_S} s/epoch, budget ${PRETRAIN_S} s for both runs), ${PRETRAIN_WALL} s" \
       "wall for both (start-up, data loading and checkpoints included)."
  echo "Evaluation of both runs and a random-init encoder (the baseline), on the runs' own data:" \
       "\`python evaluate.py -m pretrained=SWEEP allow_incomplete=true repr=avgpool,combined eval=knn,linear\`:" \
       "$KL_NOTE; \`... repr=avgpool,combined eval=finetune ${FT_ARGS[*]}\`: $FT_NOTE." \
       "Report (\`python -m byol.report EVAL FINETUNE --out DIR\`): $REPORT_RC."
  echo
  if [ -f "$REPORT/results.md" ]; then
    sed '1{/^# Results$/d}' "$REPORT/results.md"
  else
    echo "No results table (see gpu.log)."
  fi
  echo
  if [ "${#FIGURES[@]}" -gt 0 ]; then
    echo "Figures (in the \$OUT of the run that wrote this section; path on the GPU machine in brackets):" \
         "$(IFS=';'; echo "${FIGURES[*]}" | sed 's/;/; /g')."
  else
    echo "Figures: none written."
  fi
} >>"$SECTION"
