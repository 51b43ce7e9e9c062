#!/usr/bin/env bash
# The sweeps behind results/eval/: seven methods at five ratios on musique_s (all 100 samples) and on
# RULER MV, MQ and VT (50 samples each, generated at 4,096 tokens in 512-token chunks, seed 0).
#
#   bash scripts/eval_sweeps.sh musique_s          # one dataset ...
#   bash scripts/eval_sweeps.sh ruler              # ... or the three RULER tasks, interleaved
#
# Each dataset grows in steps of STEP samples, every step running the whole grid, so a run stopped at any
# point leaves every method and ratio measured on the same samples. Every step resumes: rows already in the
# results files are skipped, and the full-prefill references are kept under results/eval/*/refs (not committed).
# Chunk caches live in memory only (per step: a few GB), so nothing large is written to disk.
# METHODS, RATIOS and RULER_TASKS narrow the grid (e.g. one method's rows after a change to its defaults).
# FIRST and LAST bound the samples (FIRST <= id < LAST), so one dataset can be split over processes, each with its
# own OUT (then concatenate the results files).
# `python -m qcfuse sweep --dataset NAME --methods ... --out_dir results/eval/NAME --report` rebuilds table.md and
# tradeoff.png from whatever is finished, without running anything.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-results/eval}
STEP=${STEP:-5}
THREADS=${THREADS:-1}
METHODS=${METHODS:-reuse,cacheblend,epic,prophetkv,fuserag,qcfuse}
RATIOS=${RATIOS:-0.05,0.1,0.15,0.3,0.5}
RULER_TASKS=${RULER_TASKS:-mv mq vt}
RULER_TOKENS=4096
FIRST=${FIRST:-0}

sweep() {   # dataset size [extra flags]
    local dataset=$1 size=$2; shift 2
    "$PY" -m qcfuse sweep --dataset "$dataset" --methods "$METHODS" --ratios "$RATIOS" --size "$size" \
        --threads "$THREADS" --quiet --out_dir "$OUT/$dataset" --first "$FIRST" "$@"
}
sizes() {   # the steps: STEP, 2*STEP, ... up to LAST - FIRST samples
    seq "$STEP" "$STEP" "$(( ${LAST:-$1} - FIRST ))"
}

case "${1:-}" in
    musique_s) for size in $(sizes 100); do sweep musique_s "$size"; done ;;
    ruler)     for size in $(sizes 50); do
                   for task in $RULER_TASKS; do sweep "ruler_$task" "$size" --tokens "$RULER_TOKENS" --chunk_tokens 512; done
               done ;;
    *) echo "usage: $0 musique_s|ruler" >&2; exit 2 ;;
esac
