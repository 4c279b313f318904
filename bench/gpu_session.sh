#!/usr/bin/env bash
# The one prepared script run on a lent GPU machine (see docs/reproducing.md).
# Usage there: bash bench/gpu_session.sh MINUTES "name|experiment|overrides" ...
# All runs train in parallel on the one GPU for MINUTES each (Lightning's max_time), then
# test their best checkpoint on 600 episodes. Needs .whl/ (hydra-core, omegaconf, antlr4
# wheels) and .devdata/omniglot carried with the working tree. Writes $OUT/summary.txt and
# $OUT/results.tar.gz (logs, metrics, reports, best checkpoints).
# Environment: CHECKS=0 skips the GPU tests and benchmarks; VAL_EVERY and VAL_EPISODES set
# the validation cadence (default 2000 steps, 300 episodes); PAPER_SAMPLER=1 also tests each
# best checkpoint with the paper's sampler (disjoint=false); TRAINER=cpu tries the script
# here (MINUTES=1) before a lease.
set -u
MINUTES=$1; shift
CHECKS=${CHECKS:-1} VAL_EVERY=${VAL_EVERY:-2000} VAL_EPISODES=${VAL_EPISODES:-300}
PAPER_SAMPLER=${PAPER_SAMPLER:-0} TRAINER=${TRAINER:-gpu}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export METALEARN_DATA_DIR=$PWD/.devdata METALEARN_CACHE_DIR=/tmp/cache
R=/tmp/results; mkdir -p $R
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__)"; } > $R/device.txt 2>&1
# Decode Omniglot once before the parallel runs.
python3 -c "from metalearn.data.sets.omniglot import load_omniglot; load_omniglot('$METALEARN_DATA_DIR', '$METALEARN_CACHE_DIR', progress=False)"
START=$(date +%s)
for spec in "$@"; do
  IFS='|' read -r name exp overrides <<< "$spec"
  OMP_NUM_THREADS=2 timeout $(( MINUTES * 60 + 150 )) python3 train.py experiment=$exp trainer=$TRAINER \
    "+trainer.max_time=00:00:$(printf %02d $MINUTES):00" trainer.max_steps=1000000 \
    trainer.val_check_interval=$VAL_EVERY data.val_episodes=$VAL_EPISODES data.test_episodes=600 \
    logger=csv extras.print_config=false hydra.run.dir=$R/$name $overrides > $R/$name.log 2>&1 &
done
# The checks that need a GPU run beside the trainings (their timings are then pessimistic).
if [ "$CHECKS" = 1 ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py > $R/pytest_gpu.txt 2>&1
  timeout 90 python3 bench/step_speed.py --device cuda --repeats 20 > $R/step_speed_cuda.jsonl 2>&1
  timeout 60 python3 bench/sampling_speed.py --device cuda > $R/sampling_speed_cuda.jsonl 2>&1
fi
wait
if [ "$PAPER_SAMPLER" = 1 ]; then
  for spec in "$@"; do
    IFS='|' read -r name exp overrides <<< "$spec"
    best=$(ls $R/$name/checkpoints/best-*.ckpt 2>/dev/null | tail -1)
    [ -n "$best" ] && OMP_NUM_THREADS=2 timeout 120 python3 evaluate.py ckpt_path=$best \
      trainer=$TRAINER disjoint=false episodes=600 extras.print_config=false \
      hydra.run.dir=$R/$name/paper_sampler > $R/$name.paper.log 2>&1 &
  done
  wait
fi
echo "training + test wall time: $(( $(date +%s) - START )) s" > $OUT/summary.txt
for spec in "$@"; do
  IFS='|' read -r name exp overrides <<< "$spec"
  rm -f $R/$name/checkpoints/last.ckpt
  echo "$name ($exp $overrides): $(grep -a 'test accuracy' $R/$name.log | tail -1)"
  [ "$PAPER_SAMPLER" = 1 ] && echo "  paper sampler: $(grep -a '±' $R/$name.paper.log | tail -1)"
  echo "  steps: $(tail -1 $R/$name/csv/metrics.csv | cut -d, -f2)"
done >> $OUT/summary.txt
cat $R/device.txt >> $OUT/summary.txt
[ "$CHECKS" = 1 ] && cat $R/pytest_gpu.txt $R/step_speed_cuda.jsonl $R/sampling_speed_cuda.jsonl >> $OUT/summary.txt
tar czf $OUT/results.tar.gz -C /tmp results
cat $OUT/summary.txt
