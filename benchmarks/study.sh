#!/usr/bin/env bash
# The study in one command (`make study`): build the study data unless present, build the row store its cells read,
# run the sixth design's IsoFLOP sweep (configs/sweeps/study6.yaml: 40 cells, 1e14-3.2e15 FLOPs, two recipes) on this
# host's GPUs, then fit, report and print the GPU time. About 20 minutes on one H200 (docs/study/study6/STUDY.md,
# "One uninterrupted run"). Restartable: finished cells are skipped. Results: runs/sweeps/study6/{results.csv,fit/,
# util.log}. STUDY_LR_SPEC=SPEC adds an LR check of the hyperparameter rule (a spec with lr_scales) and its verdict.
# STUDY_SPEC picks another design: configs/sweeps/study5.yaml (the fifth: no step capture, no row store; with its
# LR check configs/sweeps/study5-lr.yaml, 1/4x-4x the rule's LR at 1e14 and 1e15, three sizes each),
# configs/sweeps/study4.yaml (the fourth: contiguous M-RoPE; with its check), configs/sweeps/study.yaml (the third).
set -euo pipefail
# the interpreter: $PYTHON, else `python`, else `python3` (some GPU images have only the last)
python=${PYTHON:-$(command -v python || command -v python3)}
# the raw shards (artifacts/study) and their prepared copy, which the study config reads (tokenised and decoded
# once); 600,000 samples a source so that no cell of the fourth or fifth design reads any sample more than a few times
[ -f artifacts/study-prepared/dataset.json ] ||
  "$python" -m data.study --out artifacts/study --prepared artifacts/study-prepared --train "${STUDY_TRAIN:-600000}"
spec=${STUDY_SPEC:-configs/sweeps/study6.yaml}
"$python" -m scaling store "$spec"  # the packed rows its cells read, when they read a row store (data.rows)
# the GPU's busy share and the host's load every 5 s while the sweeps run (docs/study/STUDY.md, "GPU time")
out=runs/sweeps/$(basename "$spec" .yaml)
mkdir -p "$out"
while sleep 5; do
  echo "$(date +%s) $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader) $(cut -d' ' -f1-3 /proc/loadavg)"
done >> "$out/util.log" &
sampler=$!
trap 'kill $sampler' EXIT
case "$spec" in
  configs/sweeps/study4.yaml) lr=${STUDY_LR_SPEC:-configs/sweeps/study4-lr.yaml} ;;
  configs/sweeps/study5.yaml) lr=${STUDY_LR_SPEC:-configs/sweeps/study5-lr.yaml} ;;
  *) lr=${STUDY_LR_SPEC:-} ;;
esac
"$python" -m scaling run "$spec"
# the LR check's factor-1 cells are the study's own: reused from its results, not trained again
[ -z "$lr" ] || "$python" -m scaling run "$lr" --reuse "$out/results.csv"
"$python" -m scaling report "$spec"
[ -z "$lr" ] || "$python" -m scaling lrcheck "$lr"
"$python" -m scaling time "$spec" --peak-tflops "${PEAK_TFLOPS:-989}"  # H200 dense bf16
