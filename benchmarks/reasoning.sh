#!/usr/bin/env bash
# The reasoning modes on the CPU demo model, end to end (`make reasoning`, after `make demo`): the tasks' data, the
# two fine-tuning stages (configs/sft-demo.yaml, then its synthesis sets and configs/sft-synthesis.yaml), and the
# measurements docs/REASONING.md quotes (docs/reasoning/*.json). Set N (held-out items per task) to go faster.
set -euo pipefail
N=${N:-50}
BIN=${BIN:-.venv/bin}
export OMP_NUM_THREADS=1
test -f runs/demo/export/model.safetensors || { echo "run make demo first (runs/demo/export)"; exit 1; }
test -f artifacts/reasoning/reasoning.json || $BIN/python -m data.reasoning --out artifacts/reasoning
rm -rf runs/sft-demo runs/sft-synthesis artifacts/synthesis
$BIN/torchrun --nproc_per_node=2 train.py --config configs/tiny.yaml --config configs/sft-demo.yaml
$BIN/python -m train.export runs/sft-demo
$BIN/python -m infer.synthesis --model runs/sft-demo --data artifacts/reasoning --out artifacts/synthesis
$BIN/torchrun --nproc_per_node=2 train.py --config configs/tiny.yaml --config configs/sft-demo.yaml \
  --config configs/sft-synthesis.yaml
$BIN/python -m train.export runs/sft-synthesis
mkdir -p docs/reasoning
cp artifacts/synthesis/synthesis.json docs/reasoning/synthesis-sets.json
for run in sft-demo sft-synthesis; do
  $BIN/python -m evals runs/$run --tasks count,twohop,digitsum,arith --data artifacts/reasoning \
    --modes instant,thinking,contemplating --n "$N" --json docs/reasoning/modes-$run.json
done
$BIN/python benchmarks/modes.py --model runs/sft-synthesis --n 3 --json docs/reasoning/latency-cpu.json
