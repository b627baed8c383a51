#!/bin/bash
# docs/ABLATION.md step 5: how the share of self-written calibration windows moves today's default (and two
# references), on the all-out folds plus code and math out together. One model per call; run both side by side:
#   bash benchmarks/self_calib_sweep.sh demo-mixtral & bash benchmarks/self_calib_sweep.sh demo-fine
# Share 0.5 is step 5's main run. Results: runs/share/MODEL-SHARE.{json,md,log} (the JSON files are kept as
# docs/data/ablation-share/MODEL-SHARE.json). Runs from the repository root, whatever the working directory.
set -e
cd "$(dirname "$0")/.."
m=$1
mkdir -p runs/share
for s in 0 1.0 0.25 0.75; do
  OMP_NUM_THREADS=1 python -m benchmarks.ablation --protocol all-out --out-together code math --base step5 \
    --variants step5 --references frequency reap --valid-tokens 2048 --eval-tokens 2048 --models "$m" \
    --self-calib $s --work runs/share/work-"$m" --json runs/share/"$m"-$s.json --md runs/share/"$m"-$s.md \
    > runs/share/"$m"-$s.log 2>&1
done
