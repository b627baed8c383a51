#!/usr/bin/env bash
# Regenerate the docs that come from runs of moeprune itself (not the benchmarks):
#   docs/data/sample_report/   the report of the README's demo run (make demo)
#   docs/data/img/similarity_<model>.png   similarity matrices with the groups of `diverse` at the lower sparsity
# Usage: bash scripts/refresh_docs.sh      (after `make install`; about 10 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
$BIN/moeprune prune demo-mixtral --method diverse --keep 6 --out runs/demo --overwrite --quiet
rm -rf docs/data/sample_report && mkdir -p docs/data/sample_report
cp -r runs/demo/report.md runs/demo/report.json runs/demo/plan.json runs/demo/img docs/data/sample_report/
for spec in "demo-mixtral 4" "demo-fine 16"; do
  set -- $spec
  $BIN/moeprune prune "$1" --method diverse --keep "$2" --out "runs/fig-$1" --overwrite --quiet --no-eval
  cp "runs/fig-$1/img/similarity.png" "docs/data/img/similarity_$1.png"
  cp "runs/fig-$1/img/routing.png" "docs/data/img/routing_kept_$1.png"
done
