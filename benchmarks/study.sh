#!/usr/bin/env bash
# The study in one command (`make study`): build the study data unless present, run the IsoFLOP sweep and the LR
# check of its hyperparameter rule on this host's GPUs, then fit, report and check the rule. Restartable: finished
# cells are skipped. Results: runs/sweeps/study/{results.csv,fit/}, runs/sweeps/study-lr{,-next}/results.csv.
set -euo pipefail
# the raw shards (artifacts/study) and their prepared copy, which the study config reads (tokenised and decoded once)
[ -f artifacts/study-prepared/dataset.json ] ||
  python -m data.study --out artifacts/study --prepared artifacts/study-prepared --train "${STUDY_TRAIN:-300000}"
# the GPU's busy share and the host's load every 5 s while the sweeps run (docs/study/STUDY.md, "GPU time")
mkdir -p runs/sweeps/study
while sleep 5; do
  echo "$(date +%s) $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader) $(cut -d' ' -f1-3 /proc/loadavg)"
done >> runs/sweeps/study/util.log &
sampler=$!
trap 'kill $sampler' EXIT
python -m scaling run configs/sweeps/study.yaml
python -m scaling run configs/sweeps/study-lr.yaml
python -m scaling run configs/sweeps/study-lr-next.yaml  # the same check at the study's own horizon, below the rule
python -m scaling report configs/sweeps/study.yaml
python -m scaling lrcheck configs/sweeps/study-lr.yaml
python -m scaling lrcheck configs/sweeps/study-lr-next.yaml runs/sweeps/study/results.csv  # factor 1: the study's
python -m scaling time configs/sweeps/study.yaml --peak-tflops "${PEAK_TFLOPS:-989}"  # H200 dense bf16
