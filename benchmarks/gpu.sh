#!/usr/bin/env bash
# One prepared run for a lent GPU (H100/H200); see benchmarks/README.md. Three modes:
#
# MODE=single (default; budgeted at about 7 minutes, not yet run on a GPU):
#   1. installs hydra-core/omegaconf/antlr4 from the carried .whl/ folder (no network there),
#   2. extracts the shared CIFAR-10 JPEGs,
#   3. throughput of our training step (and the floor; lightly/byol-pytorch if importable) for the
#      ResNet-18 CIFAR stem at each of BATCHES (256 512; empty: none): images/s, s/epoch, peak GPU memory,
#   4. a BYOL pretraining for as many epochs as fit in PRETRAIN_S seconds (EPOCHS: that many instead) at
#      PRETRAIN_BATCH (the last of BATCHES, else 512: it overrides a recipe's own batch, e.g. experiment=cifar10's
#      256, and the learning rate follows it), with TRAIN_EXTRA's overrides,
#   5. the linear probe's test accuracy on the run's own data (evaluate.py; the benchmark part survives its failure).
#   The GPU recipe's 100-epoch target (README: Results; 427 s on an H200 at batch 512 on 2026-11-30):
#     OUT=$OUT WORK=outputs/gpu BATCHES= PRETRAIN_BATCH=512 EPOCHS=100 DEADLINE_S=575 \
#       TRAIN_EXTRA="experiment=cifar10 monitor=off data.mean=[0.4914,0.4822,0.4465] data.std=[0.2470,0.2435,0.2616]" \
#       EVAL_EXTRA="split.val_size=0" bash benchmarks/gpu.sh
#
# MODE=grid (the study's grid with the GPU recipe, budgeted at GRID_S = 540 s from the start):
#   1.-3. as above (the throughput with experiment=cifar10, ours and the floor only unless PEERS),
#   4. pretrains loss=classic,multi with experiment=cifar10 (batch 256) in one sweep, each run for as
#      many epochs as fit in what is left of GRID_S after EVAL_S (170 s) is kept for steps 5-6,
#      sized from the step-3 figure at batch 256 (s/epoch x 1.35 for checkpoints and multi's heads),
#   5. evaluates both runs and the random-init baseline: kNN and linear on avgpool and combined, then
#      fine-tuning for FT_EPOCHS (2) epochs on both (the 8 cells + kNN), each sweep under a timeout,
#   6. python -m byol.report on both sweeps; results.md/.csv/.png and the runs' curves PNGs into $OUT.
#
# MODE=ab (our training code against benchmarks/reference_byol.py at the GPU recipe, AB_EPOCHS = 20 epochs each,
#   then kNN of both; DEADLINE_S = 580 s for the whole script; no throughput unless AB_BATCHES): benchmarks/gpu_ab.sh.
#
# All append a dated section naming the card to benchmarks/RESULTS.md (copied to $OUT, since only
# $OUT comes back from the GPU machine; at most 8 files are kept there). The train.py/evaluate.py
# commands the section records are abbreviated: data.root, hydra.run.dir/sweep.dir (and the grid's
# sweep.subdir) and, in single mode, trainer.enable_progress_bar=false checkpoint.every_n_epochs=100000
# are passed but not written (the throughput lines record the whole command).
#
# SMOKE=1 runs the same steps with tiny settings on whatever device there is (CPU here): its results
# go only under $OUT, never into the repository's RESULTS.md, its run folders under WORK (default
# /tmp/byol-gpu-runs) and a missing DATA is extracted; the way to test this script without a GPU.
# Environment: MODE (single|grid), OUT (results folder), DATA (dataset root; default /tmp/cifar10,
# extracted if missing), PYTHON (default python3), PRETRAIN_S (single: 240), BATCHES (default "256 512"),
# PEERS, COMPILE=1, WORK (run folders); single: EPOCHS, PRETRAIN_BATCH, TRAIN_EXTRA, EVAL_EXTRA
# (evaluate.py overrides of the probe: split.val_size=0 fits on all 50,000 images, as solo-learn), DEADLINE_S
# (seconds from the start by which the whole script ends: the pretraining is stopped, resumably, PROBE_S (60)
# before it, and the probe gets the rest, each at least 30 s; the throughput step before them is not limited by it:
# BATCHES= skips it; for a lent machine's per-call limit), KEEP_ENCODER=1 (the run's
# encoder.pt into $OUT in 15 MiB parts, for evaluations elsewhere; 3 files for a ResNet-18, written only if they
# fit in the 8 files that come back); grid: GRID_S (540), EVAL_S (170), FT_EPOCHS (2), GRID_BATCH (256).
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
MODE=${MODE:-single}
FIXED_EPOCHS=${EPOCHS:-}  # single: pretrain this many epochs instead of what fits in PRETRAIN_S
read -r -a TRAIN_EXTRA_ARGS <<<"${TRAIN_EXTRA:-}"
read -r -a EVAL_EXTRA_ARGS <<<"${EVAL_EXTRA:-}"  # single: evaluate.py overrides for the linear probe
case "$MODE" in single | grid | ab) ;; *) echo "gpu.sh: MODE must be single, grid or ab, not '$MODE'" >&2; exit 2 ;; esac
OUT=${OUT:-/tmp/byol-gpu-out}
DATA=${DATA:-/tmp/cifar10}
WORK=${WORK:-/tmp/byol-gpu-runs}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/gpu.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
say() { echo "[gpu.sh +$(elapsed)s] $*"; }
MAX_OUT_FILES=8  # what comes back from the GPU machine
keep() {  # keep SRC as $OUT/NAME unless $OUT is full (MAX_OUT_FILES, one kept for RESULTS.md, copied last)
  local n
  n=$(find "$OUT" -maxdepth 1 -type f | wc -l)
  [ -e "$OUT/RESULTS.md" ] || n=$((n + 1))
  if [ -e "$OUT/$2" ] || [ "$n" -lt "$MAX_OUT_FILES" ]; then cp "$1" "$OUT/$2" && return 0; fi
  say "not copied to \$OUT (already $n files): $1"; return 1
}

if [ "$SMOKE" = 1 ]; then
  BATCHES=${BATCHES-16}; STEPS=1; WARMUP=1; PRETRAIN_S=${PRETRAIN_S:-60}; GRID_S=${GRID_S:-3600}
  # a quarter-width network: the smoke test checks the steps, not the network (the full CIFAR-stem ResNet-18 made
  # the grid's smoke test 341 s of a 2-core AMD EPYC's test suite, in bf16)
  TINY=(data.subset=64 backbone.width=0.25 head.proj_hidden_dim=64 head.pred_hidden_dim=64 head.proj_dim=32)
  EVAL_TINY=(data.subset=64 eval.epochs=1)
  GRID_TINY=(data.batch_size=16 "${TINY[@]}")
  # (the throughput's network too: bf16 autocast at full width took 15 s a contender on a CPU without bf16)
  BENCH_SET=(--set backbone.width=0.25 --set head.proj_hidden_dim=64 --set head.pred_hidden_dim=64 --set head.proj_dim=32)
  RESULTS="$OUT/RESULTS.md"  # never touch the repository's file in smoke mode
  [ -f "$RESULTS" ] || cp benchmarks/RESULTS.md "$RESULTS" 2>/dev/null || : >"$RESULTS"
else
  BATCHES=${BATCHES-256 512}; PRETRAIN_S=${PRETRAIN_S:-240}; GRID_S=${GRID_S:-540}  # BATCHES= : no throughput
  [ "$MODE" = ab ] && BATCHES=${AB_BATCHES:-}  # the A/B needs all the time there is (AB_BATCHES: measure anyway)
  if [ "$MODE" = grid ]; then STEPS=30; else STEPS=50; fi
  WARMUP=10; TINY=(); EVAL_TINY=(); GRID_TINY=(); BENCH_SET=()
  RESULTS="$REPO/benchmarks/RESULTS.md"
fi
BENCH_TIMEOUT=240
if [ "$MODE" = grid ]; then
  PEERS=${PEERS:-ours,ours_ddp,floor}; BENCH_TIMEOUT=150
  BENCH_SET+=(--set experiment=cifar10)  # the recipe's step (CLI batch and heads still win)
fi
COMPILE_ARGS=(); COMPILE_SET=()
if [ "${COMPILE:-0}" = 1 ]; then COMPILE_ARGS=(--compile); COMPILE_SET=(compile=true); fi

# ---------------------------------------------------------------- 1. packages
if ! "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    say "hydra-core/omegaconf missing and no .whl/ folder: build it here with"
    say "  pip wheel --no-deps hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 -w .whl  (carry .whl)"
    exit 1
  fi
  say "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

# ---------------------------------------------------------------- 2. data
if [ ! -d "$DATA/train" ]; then
  ARCHIVE=""
  for a in shared/data/cifar10-jpeg.tar.gz ../shared/data/cifar10-jpeg.tar.gz; do
    [ -f "$a" ] && ARCHIVE=$a && break
  done
  [ -n "$ARCHIVE" ] || { say "no $DATA/train and no shared/data/cifar10-jpeg.tar.gz (nor ../shared/data)"; exit 1; }
  say "extracting $ARCHIVE -> $DATA"
  mkdir -p "$DATA" && tar xzf "$ARCHIVE" -C "$DATA" || exit 1
fi

if command -v nvidia-smi >/dev/null && CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1) \
   && [ -n "$CARD" ]; then :; else CARD="no GPU ($(uname -m) CPU)"; fi
[ "$SMOKE" = 1 ] && CARD="$CARD, SMOKE test"
say "card: $CARD; data: $DATA; python: $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)')"

SECTION="$WORK/section.md"
{
  echo
  echo "## $(date -u '+%Y-%m-%d %H:%M UTC'): $CARD (benchmarks/gpu.sh$([ "$MODE" != single ] && echo ", MODE=$MODE"))"
} >"$SECTION"

# ---------------------------------------------------------------- 3. throughput
for B in $BATCHES; do
  say "throughput, CIFAR stem, batch $B"
  timeout "$BENCH_TIMEOUT" "$PY" benchmarks/throughput.py --stem cifar --batch-size "$B" --steps "$STEPS" --warmup "$WARMUP" \
    --data "$DATA" --peers "${PEERS:-ours,lightly,byol_pytorch,floor}" --json "$OUT/bench_b$B.json" --markdown "$SECTION" "${COMPILE_ARGS[@]}" "${BENCH_SET[@]}" \
    || say "throughput at batch $B failed or timed out (exit $?)"
done

if [ "$MODE" = grid ] && [ "$SMOKE" != 1 ] && ! "$PY" -c "import json, sys; sys.exit(not json.load(open(sys.argv[1]))['cifar']['ours'])" \
     "$OUT/bench_b${BATCHES%% *}.json" 2>/dev/null; then
  # our own step failed on this machine: the grid would fail the same way; stop while there is time to fix and rerun
  say "our training step did not run at batch ${BATCHES%% *} (see above): grid not started"
  exit 3
fi

finish() {  # append the section to RESULTS.md and copy it into $OUT
  echo "Whole script: $(elapsed) s." >>"$SECTION"
  cat "$SECTION" >>"$RESULTS"
  [ "$RESULTS" = "$OUT/RESULTS.md" ] || cp "$RESULTS" "$OUT/RESULTS.md"
  say "appended to $RESULTS (copy in $OUT/RESULTS.md):"
  cat "$SECTION"
}

if [ "$MODE" = grid ]; then
  # shellcheck source=benchmarks/gpu_grid.sh
  source benchmarks/gpu_grid.sh
  finish
  exit 0
fi
if [ "$MODE" = ab ]; then
  # shellcheck source=benchmarks/gpu_ab.sh
  source benchmarks/gpu_ab.sh
  finish
  exit 0
fi

# ---------------------------------------------------------------- 4. pretraining
LAST_B=${PRETRAIN_BATCH:-${BATCHES##* }}
LAST_B=${LAST_B:-512}
if [ -n "$FIXED_EPOCHS" ]; then EPOCHS=$FIXED_EPOCHS; else
EPOCHS=$("$PY" - "$OUT/bench_b$LAST_B.json" "$PRETRAIN_S" "$SMOKE" <<'EOF'
import json, sys
path, budget, smoke = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
try:
    bench = json.load(open(path))
    ips, n = bench["cifar"]["ours"], bench["settings"]["epoch_images"]
except (OSError, KeyError, ValueError, TypeError):
    ips = None
if smoke or not ips:
    print(1)
else:  # ~30 s of start-up and data loading, 15% for checkpoints and epoch ends
    print(max(1, int((budget - 30) / (1.15 * n / ips))))
EOF
)
fi
WARM_EPOCHS=$(( EPOCHS >= 20 ? 10 : EPOCHS / 10 ))
RUN="$WORK/pretrain"
rm -rf "$RUN"
say "pretraining: $EPOCHS epochs (budget ${PRETRAIN_S}s) at batch $LAST_B -> $RUN"
P0=$(date +%s)
until_deadline() {  # seconds left before DEADLINE_S less $1, at least 30
  local t=$(( DEADLINE_S - $(elapsed) - $1 ))
  echo $(( t < 30 ? 30 : t ))
}
PRETRAIN_LIMIT=$(( PRETRAIN_S + 120 ))
# stop (resumably: SIGTERM saves last.ckpt) with PROBE_S left for the probe
[ -n "${DEADLINE_S:-}" ] && PRETRAIN_LIMIT=$(until_deadline "${PROBE_S:-60}")
timeout "$PRETRAIN_LIMIT" "$PY" train.py data=imagefolder data.root="$DATA" data.batch_size="$LAST_B" \
  trainer.max_epochs="$EPOCHS" optim.scheduler.warmup_epochs="$WARM_EPOCHS" trainer.enable_progress_bar=false \
  checkpoint.every_n_epochs=100000 hydra.run.dir="$RUN" "${COMPILE_SET[@]}" "${TINY[@]}" "${TRAIN_EXTRA_ARGS[@]}"
PRETRAIN_RC=$?
PRETRAIN_WALL=$(( $(date +%s) - P0 ))
say "pretraining exit $PRETRAIN_RC after ${PRETRAIN_WALL}s"
[ -f "$RUN/metrics.csv" ] && cp "$RUN/metrics.csv" "$OUT/pretrain_metrics.csv"
if [ "${KEEP_ENCODER:-0}" = 1 ] && [ -f "$RUN/encoder.pt" ]; then  # in parts: a file coming back holds 16 MiB at most
  PART=$((15 * 1024 * 1024))
  PARTS=$(( ($(stat -c %s "$RUN/encoder.pt") + PART - 1) / PART ))
  # what is in $OUT now, and RESULTS.md and linear_results.json, which come after
  HELD=$(find "$OUT" -maxdepth 1 -type f ! -name RESULTS.md ! -name linear_results.json | wc -l)
  if [ $(( HELD + 2 + PARTS )) -le "$MAX_OUT_FILES" ]; then
    split -b "$PART" -d "$RUN/encoder.pt" "$OUT/encoder.pt.part" \
      && say "encoder.pt in $PARTS parts under \$OUT: cat encoder.pt.part* > encoder.pt"
  else
    say "encoder.pt not kept: its $PARTS parts would make $(( HELD + 2 + PARTS )) files in \$OUT, and $MAX_OUT_FILES come back" \
        "(BATCHES= leaves out the throughput's files)"
  fi
fi

# ---------------------------------------------------------------- 5. linear probe
PROBE="not run"
if [ "$PRETRAIN_RC" != 0 ] || [ ! -f "$RUN/encoder.pt" ]; then
  PROBE="not run (pretraining failed or was stopped by its time limit: \`python train.py resume=$RUN\` continues it)"
elif [ ! -f evaluate.py ]; then
  PROBE="not run (evaluate.py not in this checkout)"
else
  say "linear probe"
  rm -rf "$WORK/linear"
  PROBE_LIMIT=240
  [ -n "${DEADLINE_S:-}" ] && PROBE_LIMIT=$(until_deadline 0)
  if timeout "$PROBE_LIMIT" "$PY" evaluate.py pretrained="$RUN" eval=linear \
       hydra.run.dir="$WORK/linear" "${EVAL_TINY[@]}" "${EVAL_EXTRA_ARGS[@]}"; then
    if [ -f "$WORK/linear/results.json" ]; then
      cp "$WORK/linear/results.json" "$OUT/linear_results.json"
      PROBE=$("$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); \
v=r.get('val_acc'); val='no val split' if v is None else f'val {100*v:.2f}%'; \
print(f\"test accuracy {100*r['test_acc']:.2f}% ({val}), repr {r.get('repr')}\")" \
        "$WORK/linear/results.json" 2>/dev/null || echo "finished; results.json unreadable")
    else
      PROBE="finished, but no results.json in $WORK/linear"
    fi
  else
    PROBE="failed or timed out (exit $?); see gpu.log"
  fi
fi
say "linear probe: $PROBE"

# ---------------------------------------------------------------- results
{
  echo
  echo "Pretraining (\`python train.py data=imagefolder data.batch_size=$LAST_B trainer.max_epochs=$EPOCHS" \
       "optim.scheduler.warmup_epochs=$WARM_EPOCHS ${TINY[*]} ${COMPILE_SET[*]} ${TRAIN_EXTRA_ARGS[*]}\`): exit $PRETRAIN_RC," \
       "$([ "$PRETRAIN_RC" = 124 ] && echo "stopped by its time limit (resumable) after" || echo "$EPOCHS epochs in")" \
       "${PRETRAIN_WALL} s wall (start-up, data loading and checkpoints included)."
  echo "Linear probe, on the run's own data and normalisation (\`python evaluate.py pretrained=RUN eval=linear ${EVAL_TINY[*]} ${EVAL_EXTRA_ARGS[*]}\`): $PROBE."
} >>"$SECTION"
finish
