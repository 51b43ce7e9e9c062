#!/usr/bin/env bash
# Usage: SIZE=10 bash scripts/auto_eval.sh musique   |   SIZE=5 bash scripts/auto_eval.sh ruler
# The fixed-ratio rows (qcfuse_r*.jsonl, fullcomp.jsonl) are copies of results/eval/<dataset>/ (engine of
# commit fb952bd; the three-layer QCFuse rows are now in results/eval/<dataset>/qcfuse_3layers/); only the auto
# rows are run (and the full-prefill references, kept under refs/, not committed).
# ratio auto on held-out samples: musique_s 0-9 by default here (calibration used 90-99), RULER seed 0 (calibration used seed 1)
cd "$(dirname "$0")/.."
PY=.venv/bin/python
R=0.05,0.1,0.15,0.3,0.5,auto:0.9,auto:0.99
case "$1" in
  musique) $PY -m qcfuse sweep --dataset musique_s --methods qcfuse --ratios $R --size ${SIZE:-10} --threads 1 --quiet --out_dir results/auto/musique_s ;;
  ruler) for t in mv mq vt; do $PY -m qcfuse sweep --dataset ruler_$t --methods qcfuse --ratios $R --size ${SIZE:-5} --threads 1 --quiet --tokens 4096 --chunk_tokens 512 --out_dir results/auto/ruler_$t; done ;;
esac
