#!/usr/bin/env bash
# A study cell's first steps with the batch-varying counts (image patches, text targets) compiled symbolic from the
# first call (train.engine.VARYING) against the old way (automatic dynamic shapes: a constant-shape compile, then a
# second compile at step 2), each cell alone on a fresh inductor cache: the fifth design's model (width 16 x depth,
# heads of 16, interleaved M-RoPE, the whole forward compiled) on a small build of the study data.
#   bash benchmarks/compile_once.sh                  # sizes 4 (64 rows) and 8 (96 rows), 40 steps each
#   CELLS="cell before4 off 4 64; cell after4 on 4 64" STEPS=10 bash benchmarks/compile_once.sh
# Prints per cell: exit code, recompiles logged (TORCH_LOGS=recompiles), first_steps_s, startup_s, final loss.
set -u
STEPS=${STEPS:-40}
mkdir -p runs
[ -f artifacts/study-prepared/dataset.json ] ||
  python -m data.study --out artifacts/study --prepared artifacts/study-prepared --train 20000 --val 500 > runs/compile-data.log 2>&1 ||
  { tail runs/compile-data.log; exit 1; }
cell() {  # name varying(on|off) depth rows
  rm -rf "/tmp/inductor-$1" "runs/compile-$1"
  TORCH_LOGS=recompiles TORCHINDUCTOR_CACHE_DIR="/tmp/inductor-$1" python -c "
import runpy, sys
import train.engine as engine
if '$2' == 'off':
    engine.VARYING = ()  # the old way
sys.argv = ['train.py', '--config', 'configs/study.yaml', 'run_dir=runs/compile-$1', 'steps=$STEPS', 'model.depth=$3',
            'model.aspect=16', 'model.head_dim=16', 'model.mrope_interleaved=true', 'deepspeed.compile_scope=model',
            'data.batch_size=$4', 'data.workers=2', 'logging.every=10']
runpy.run_path('train.py', run_name='__main__')" > "runs/compile-$1.log" 2>&1
  echo "$1 rc=$? recompiles=$(grep -c 'Recompiling' "runs/compile-$1.log") $(python -c "
import json
d = json.load(open('runs/compile-$1/summary.json'))
print(f\"first_steps_s={d['first_steps_s']:.1f} startup_s={d['startup_s']:.1f} loss={d['final_train_loss']:.4f}\")" 2>&1 | tail -1)"
}
eval "${CELLS:-cell before4 off 4 64; cell after4 on 4 64; cell before8 off 8 96; cell after8 on 8 96}"
