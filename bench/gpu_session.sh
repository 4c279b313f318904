#!/usr/bin/env bash
# Trainings and the GPU checks of one GPU machine in one call (docs/reproducing.md records
# the runs made with it).
#
#   METALEARN_DATA_DIR=/path/to/data bash bench/gpu_session.sh MINUTES "name|experiment|overrides" ...
#
# Every "name|experiment|overrides" run trains in parallel on the one GPU for MINUTES
# (Lightning's max_time; validation every VAL_EVERY steps on VAL_EPISODES episodes), then
# tests its best checkpoint on 600 episodes. Beside them, unless CHECKS=0, the GPU tests
# (tests/test_gpu.py) and the step and sampling benchmarks run (their timings are then
# pessimistic). Writes $OUT/summary.txt (one line per run, the device, the checks) and
# $OUT/results.tar.gz (logs, metrics, reports, best checkpoints).
#
# Needs: python3 with metalearn installed (pip install -e '.[dev]'), or wheels of its
# dependencies in WHEELS=<folder> for a machine without an index; the data under
# METALEARN_DATA_DIR (Omniglot: <dir>/omniglot, see data/README.md).
# Environment: OUT (default ./gpu_session), CHECKS=0 skips the GPU tests and benchmarks,
# VAL_EVERY / VAL_EPISODES (default 2000 / 300), PAPER_SAMPLER=1 also tests each best
# checkpoint with the paper's sampler (disjoint=false), THREADS CPU threads per run
# (default 2), PYTHON the interpreter (default python3), TRAINER=cpu tries the script on a
# CPU first (MINUTES=1).
set -u
if [ $# -lt 2 ]; then
  sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 2
fi
MINUTES=$1; shift
: "${METALEARN_DATA_DIR:?set METALEARN_DATA_DIR to the folder that holds the data sets}"
CHECKS=${CHECKS:-1} VAL_EVERY=${VAL_EVERY:-2000} VAL_EPISODES=${VAL_EPISODES:-300}
PAPER_SAMPLER=${PAPER_SAMPLER:-0} TRAINER=${TRAINER:-gpu} THREADS=${THREADS:-2} PYTHON=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_session}; mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/metalearn-site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/metalearn-site:$PWD
fi
export PYTHONUNBUFFERED=1 METALEARN_DATA_DIR
export METALEARN_CACHE_DIR=${METALEARN_CACHE_DIR:-/tmp/metalearn-cache}
R=$(mktemp -d)/results; mkdir -p "$R"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PYTHON" -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__)"; } > "$R/device.txt" 2>&1
# Decode Omniglot once before the parallel runs (they share the cache).
"$PYTHON" -c "from metalearn.data.sets.omniglot import load_omniglot; load_omniglot('$METALEARN_DATA_DIR', '$METALEARN_CACHE_DIR', progress=False)" || exit 1
START=$(date +%s)
for spec in "$@"; do
  IFS='|' read -r name exp overrides <<< "$spec"
  # shellcheck disable=SC2086  # the overrides are words
  OMP_NUM_THREADS=$THREADS timeout $(( MINUTES * 60 + 150 )) "$PYTHON" train.py experiment="$exp" \
    trainer="$TRAINER" "+trainer.max_time=00:00:$(printf %02d "$MINUTES"):00" trainer.max_steps=1000000 \
    trainer.val_check_interval="$VAL_EVERY" data.val_episodes="$VAL_EPISODES" data.test_episodes=600 \
    logger=csv extras.print_config=false hydra.run.dir="$R/$name" $overrides > "$R/$name.log" 2>&1 &
done
if [ "$CHECKS" = 1 ]; then
  timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$R/pytest_gpu.txt" 2>&1
  timeout 90 "$PYTHON" bench/step_speed.py --device cuda --repeats 20 > "$R/step_speed_cuda.jsonl" 2>&1
  timeout 60 "$PYTHON" bench/sampling_speed.py --device cuda > "$R/sampling_speed_cuda.jsonl" 2>&1
fi
wait
if [ "$PAPER_SAMPLER" = 1 ]; then
  for spec in "$@"; do
    IFS='|' read -r name exp overrides <<< "$spec"
    best=$(ls "$R/$name"/checkpoints/best-*.ckpt 2>/dev/null | tail -1)
    [ -n "$best" ] && OMP_NUM_THREADS=$THREADS timeout 120 "$PYTHON" evaluate.py ckpt_path="$best" \
      trainer="$TRAINER" disjoint=false episodes=600 extras.print_config=false \
      hydra.run.dir="$R/$name/paper_sampler" > "$R/$name.paper.log" 2>&1 &
  done
  wait
fi
echo "training + test wall time: $(( $(date +%s) - START )) s" > "$OUT/summary.txt"
for spec in "$@"; do
  IFS='|' read -r name exp overrides <<< "$spec"
  rm -f "$R/$name/checkpoints/last.ckpt"
  echo "$name ($exp $overrides): $(grep -a 'test accuracy' "$R/$name.log" | tail -1)"
  [ "$PAPER_SAMPLER" = 1 ] && echo "  paper sampler: $(grep -a '±' "$R/$name.paper.log" | tail -1)"
  echo "  steps: $(tail -1 "$R/$name/csv/metrics.csv" 2>/dev/null | cut -d, -f2)"
done >> "$OUT/summary.txt"
cat "$R/device.txt" >> "$OUT/summary.txt"
[ "$CHECKS" = 1 ] && cat "$R/pytest_gpu.txt" "$R/step_speed_cuda.jsonl" "$R/sampling_speed_cuda.jsonl" >> "$OUT/summary.txt"
tar czf "$OUT/results.tar.gz" -C "$(dirname "$R")" results
cat "$OUT/summary.txt"
