#!/usr/bin/env bash
# The reasoning pipeline on one GPU (docs/RL.md, "On one H200"): the embedded data at --scale 4 and the reasoning
# tasks, pretraining (configs/think-gpu.yaml), fine-tuning (configs/sft-think-gpu.yaml), the modes' scores, then
# thought compression from that Thinking model: Kimi k1.5's length term at three strengths (0: the control), three
# seeds each, all nine runs on the GPU at once (configs/rl-think-gpu.yaml). Then the report (curves, the cut
# baselines, Contemplating with compressed chains; --device cpu works too, slower) and its frontier:
#   bash benchmarks/think_gpu.sh [OUT]
#   python benchmarks/rl_report.py OUT/rl --json docs/rl/gpu/curves.json --device cuda
#   python benchmarks/rl_frontier.py docs/rl/gpu/curves.json --png docs/rl/gpu/frontier.png
# SKIP_TO=rl starts from an existing runs/sft-think-gpu/export; PENALTY and ALPHAS pick another length term and
# strengths (PENALTY=sigmoid ALPHAS="0.2 0.5": Arora & Zanette's, which compares right answers only).
set -uo pipefail
OUT=${1:-runs/think}; PY=${PY:-python}
mkdir -p "$OUT/rl"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1
C="--config configs/tiny.yaml"
if [ "${SKIP_TO:-}" != rl ]; then
  $PY -m data.embedded --out artifacts/data --scale 4 || exit 1
  $PY -m data.reasoning --out artifacts/reasoning --train 12000 || exit 1
  $PY train.py $C --config configs/think-gpu.yaml || exit 1
  $PY -m train.export runs/think-gpu || exit 1
  $PY train.py $C --config configs/sft-demo.yaml --config configs/think-gpu.yaml --config configs/sft-think-gpu.yaml || exit 1
  $PY -m train.export runs/sft-think-gpu || exit 1
  $PY -m evals runs/sft-think-gpu --tasks count,twohop,digitsum,arith --data artifacts/reasoning \
    --modes instant,thinking --n 200 --json "$OUT/modes.json" || exit 1
fi
export OMP_NUM_THREADS=1
for seed in 0 1 2; do for alpha in ${ALPHAS:-0 0.25 0.5}; do
  $PY train.py $C --config configs/rl-demo.yaml --config configs/think-gpu.yaml --config configs/rl-think-gpu.yaml \
    run_dir="$OUT/rl/a$alpha-s$seed" seed=$seed rl.penalty=${PENALTY:-kimi} rl.alpha=$alpha > "$OUT/rl/a$alpha-s$seed.log" 2>&1 &
done; done
wait
status=0
for d in "$OUT"/rl/a*-s*/; do test -f "$d/summary.json" || { echo "$d did not finish (its log: ${d%/}.log)" >&2; status=1; }; done
exit $status
