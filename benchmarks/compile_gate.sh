#!/usr/bin/env bash
# The sweep driver's compile gate (scaling.local.CompileGate) on a GPU host: the fifth design's LR check at one
# budget (configs/sweeps/study5-lr.yaml at BUDGET, 1e14 unless set: three sizes x four LRs, twelve cells of three
# compiled shapes, eight at once) with the gate on, or off (GATE=off), into runs/sweeps/compile-gate-<on|off>; prints
# the GPU time account and each cell's first steps (its compile) in launch order. The factor-1 cells are reused from
# the committed study.
#   bash benchmarks/compile_gate.sh            # needs the study data (benchmarks/study.sh builds it)
set -euo pipefail
gate=${GATE:-on}
out=runs/sweeps/compile-gate-$gate
mkdir -p "$out"
python - "$out" "$gate" "${BUDGET:-1.0e14}" <<'PY'
import sys, yaml
out, gate, budget = sys.argv[1:]
spec = yaml.safe_load(open("configs/sweeps/study5-lr.yaml"))
spec.update(name=f"compile-gate-{gate}", out=out, flops=[float(budget)])
spec["launcher"]["stagger_compiles"] = gate == "on"
yaml.safe_dump(spec, open(f"{out}/spec.yaml", "w"), sort_keys=False)
PY
python -m scaling run "$out/spec.yaml" --reuse docs/study/study5/results.csv
python -m scaling time "$out/spec.yaml" --peak-tflops "${PEAK_TFLOPS:-989}"
python - "$out" <<'PY'
import csv, json, pathlib, sys
rows = [r for r in csv.DictReader(open(f"{sys.argv[1]}/results.csv")) if not r.get("reused_from")]
cells = []
for r in rows:
    s = json.loads((pathlib.Path(sys.argv[1]) / "cells" / r["key"] / "summary.json").read_text())
    cells.append((s["launched_at"], r["size"], r["lr_scale"], float(r["warmup_s"]), float(r["startup_s"]), s["ended_at"]))
t0 = min(c[0] for c in cells)
print("launched  size  lr  first_steps_s  startup_s  ended")
for at, size, lr, warm, start, end in sorted(cells):
    print(f"{at - t0:8.1f}  {size:>4}  {lr:>4}  {warm:12.1f}  {start:9.1f}  {end - t0:6.1f}")
PY
