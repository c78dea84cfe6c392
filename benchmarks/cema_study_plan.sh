#!/bin/bash
# The issue-10 study, stage by stage, as this project runs it (each stage is resumable: finished
# cells are skipped, so re-running this script continues where it stopped). One CPU-heavy job at a
# time: nothing else should run beside it. Create benchmarks/results/cema_study/PAUSE to hold it
# between cells (e.g. for a timing benchmark, or before merging code that changes a child's
# config or summary: a stage process keeps its imported code while its children load the newest).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
S=(benchmarks/cema_study.py)
# the rules run in the groups beyond the first (the preconditions' random 10/50% and distill-all too)
P=(--only "random 25%" cema random@cema oracle "cema budget 10%" "eata budget 10%")
run() { echo "=== $(date +%T) $*"; "$PY" "${S[@]}" "$@" || echo "!!! failed: $*"; }
# the first group in full, both edge normalizations
run --stage tune
run --stage preconditions
run --stage selection
# 10 classes (its own lr grid), severity 3 and the continual protocol (the severity-5 reset grid)
run --stage tune --classes 10 --norms running
for seeds in 0 "1 2"; do
  run --stage preconditions --classes 10 --norms running --seeds $seeds
  run --stage selection --classes 10 --norms running --seeds $seeds "${P[@]}"
  run --stage preconditions --severities 3 --norms running --seeds $seeds
  run --stage selection --severities 3 --norms running --seeds $seeds "${P[@]}"
  run --stage preconditions --protocols continual --norms running --seeds $seeds
  run --stage selection --protocols continual --norms running --seeds $seeds "${P[@]}"
  # the headline rows: all 15 corruptions
  run --stage preconditions --corruptions all --norms running --seeds $seeds --only distill_all
  run --stage selection --corruptions all --norms running --seeds $seeds --only cema random@cema
done
# the authors' cloud constants, untuned, beside ours
run --stage preconditions --norms running --cloud-preset authors
run --stage selection --norms running --cloud-preset authors "${P[@]}"
"$PY" "${S[@]}" --summary --plot docs/cema_study.png
echo "=== $(date +%T) plan done"
