#!/usr/bin/env bash
# Thought compression on the CPU demo (docs/RL.md): RL from the demo's Thinking model (runs/sft-demo, `make
# reasoning`) at three strengths of Kimi k1.5's length term, zero included (the control), three seeds each, two runs
# at a time (one process per core: all eight prompts a step on one rank), then the report:
# curves, frontier, and the cut-thought baseline.
#   bash benchmarks/rl.sh [STEPS] [OUT]
set -euo pipefail
STEPS=${1:-30}; OUT=${2:-runs/rl-study}
mkdir -p "$OUT"
run() {  # alpha seed
  OMP_NUM_THREADS=1 python train.py --config configs/tiny.yaml --config configs/rl-demo.yaml run_dir="$OUT/a$1-s$2" \
    steps="$STEPS" seed="$2" rl.penalty=kimi rl.alpha="$1" rl.eval_every=10 rl.eval_items=25 optim.lr=1e-4 \
    > "$OUT/a$1-s$2.log" 2>&1
}
jobs=()
for seed in 0 1 2; do for alpha in 0 0.25 0.5; do jobs+=("$alpha $seed"); done; done
for ((i = 0; i < ${#jobs[@]}; i += 2)); do
  run ${jobs[i]} &
  [ $((i + 1)) -lt ${#jobs[@]} ] && run ${jobs[i + 1]} &
  wait
done
python benchmarks/rl_report.py "$OUT" --json docs/rl/curves.json
