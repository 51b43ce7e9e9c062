#!/usr/bin/env bash
# Issue 20, part 3: the key numbers again on a second real model, Gemma3-270M (`gemma3-270m`).
# Calibration split (kept out of what is reported): musique_s 90-97 for the profile; musique_s 80-99 and RULER
# generated with seed 1 (6 each of MV, MQ, VT) for ratio auto; the report is musique_s 0-29 (SIZE to change).
# The sweep keeps chunk caches and full-prefill references on disk under CACHE (default
# ~/.cache/qcfuse/eval-gemma3; Gemma's caches for 30 samples do not fit the 4 GB memory tier). Ratio auto is
# calibrated for QCFuse only, so only QCFuse gets auto points (the report names ProphetKV's as not run).
#   bash scripts/gemma_eval.sh profile | calibrate | sweep | report
cd "$(dirname "$0")/.."
PY=.venv/bin/python
M=gemma3-270m
OUT=results/gemma3
mkdir -p $OUT
case "$1" in
  profile) $PY -m qcfuse profile --model $M --data ../shared/data/musique_s.json --first 90 --samples 8 --out qcfuse/profiles/$M.json ;;
  calibrate)   # every grid ratio's verdict and margin (both rules), in two processes, then one fit from their logs
    rm -f $OUT/calibration_$M.a.jsonl $OUT/calibration_$M.b.jsonl
    $PY -m qcfuse calibrate --model $M --sets "musique_s[80:99]" --methods qcfuse --seed 1 --threads 1 --log $OUT/calibration_$M.a.jsonl --out /tmp/qcfuse-calibrate-a.json &
    $PY -m qcfuse calibrate --model $M --sets "ruler_mv[0:6],ruler_mq[0:6],ruler_vt[0:6],musique_s[99:100]" --methods qcfuse --seed 1 --tokens 4096 --chunk_tokens 512 --threads 1 --log $OUT/calibration_$M.b.jsonl --out /tmp/qcfuse-calibrate-b.json &
    wait && cat $OUT/calibration_$M.b.jsonl $OUT/calibration_$M.a.jsonl > $OUT/calibration_$M.jsonl && rm $OUT/calibration_$M.a.jsonl $OUT/calibration_$M.b.jsonl && \
    $PY -m qcfuse calibrate --model $M --from_logs $OUT/calibration_$M.jsonl --out qcfuse/profiles/$M.json ;;
  sweep) $PY -m qcfuse sweep --model $M --dataset musique_s --methods reuse,prophetkv,qcfuse --ratios 0.05,0.15,0.3 --size ${SIZE:-30} --threads 1 --quiet --cache_dir ${CACHE:-$HOME/.cache/qcfuse/eval-gemma3} --out_dir $OUT/musique_s && \
         $PY -m qcfuse sweep --model $M --dataset musique_s --methods qcfuse --ratios auto:0.9,auto:0.99 --size ${SIZE:-30} --threads 1 --quiet --cache_dir ${CACHE:-$HOME/.cache/qcfuse/eval-gemma3} --out_dir $OUT/musique_s ;;
  report) $PY -m qcfuse sweep --model $M --dataset musique_s --methods reuse,prophetkv,qcfuse --ratios 0.05,0.15,0.3,auto:0.9,auto:0.99 --size ${SIZE:-30} --out_dir $OUT/musique_s --report ;;
  *) echo "usage: bash scripts/gemma_eval.sh profile|calibrate|sweep|report"; exit 2 ;;
esac
