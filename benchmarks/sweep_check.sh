#!/bin/bash
# The sweep machinery on this host's GPUs: plan, run and report configs/sweeps/gpu-check.yaml, sampling GPU
# utilisation every 5 s, then the time split of the cells (training steps against start-up). Needs the project
# installed and the embedded data built (`make data`, or `python -m data.embedded --out artifacts/data`).
#   bash benchmarks/sweep_check.sh [OUT_DIR]      (OUT_DIR gets the logs and the results; default runs/sweep_check)
set -uo pipefail
out=${1:-runs/sweep_check}
spec=configs/sweeps/gpu-check.yaml
mkdir -p "$out"
rm -rf runs/sweeps/gpu-check
python3 -m scaling plan $spec | tee "$out/plan.txt"
(while sleep 5; do nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits; done) >"$out/gpu_util.txt" &
monitor=$!
start=$(date +%s)
python3 -m scaling run $spec >"$out/run.txt" 2>&1 || { kill $monitor; tail "$out/run.txt"; exit 1; }
wall=$(($(date +%s) - start))
kill $monitor
python3 -m scaling report $spec >"$out/report.txt" 2>&1
cp runs/sweeps/gpu-check/results.csv runs/sweeps/gpu-check/fit/report.md "$out/"
python3 - "$out" "$wall" <<'PY'
import csv, sys
out, wall = sys.argv[1], int(sys.argv[2])
rows = list(csv.DictReader(open(f"{out}/results.csv")))
util = [float(x) for x in open(f"{out}/gpu_util.txt").read().split()]
cell_wall = sum(float(r["wall_s"]) for r in rows)
train = sum(float(r["train_s"]) for r in rows)
print(f"{len(rows)} cells in {wall} s of sweep wall time; mean GPU utilisation {sum(util) / max(1, len(util)):.0f}%")
print(f"cell time {cell_wall:.0f} s: training loop {train:.0f} s ({train / cell_wall:.0%}), the rest (start-up) "
      f"{cell_wall - train:.0f} s; start-up per cell {sum(float(r['startup_s']) for r in rows) / len(rows):.1f} s")
PY
grep -m2 "NOT CONVERGED\|(converged)" "$out/report.txt" | cut -c1-160
