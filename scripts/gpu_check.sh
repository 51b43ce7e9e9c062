#!/usr/bin/env bash
# One prepared device run (a lent H100/H200): environment, attention kernels alone, then `qcfuse bench`.
# Every stage has its own timeout and writes its log under $OUT (default ./gpu-out), so a stage that fails or
# runs long leaves the others' results. Usage: bash scripts/gpu_check.sh [bench arguments...]
set -u
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
ATTN_TIMEOUT="${ATTN_TIMEOUT:-150}" BENCH_TIMEOUT="${BENCH_TIMEOUT:-330}"
{
  date -u; nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
echo "== attention kernels alone"
timeout "$ATTN_TIMEOUT" python3 scripts/bench_attention.py --tokens "${ATTN_TOKENS:-4096,16384,32768}" \
  --out "$OUT/attention.json" 2>&1 | tee "$OUT/attention.log"
echo "== qcfuse bench $*"
timeout "$BENCH_TIMEOUT" python3 -m qcfuse bench --device cuda --config qwen3-8b --out "$OUT/bench" "$@" 2>&1 \
  | tr '\r' '\n' | grep --line-buffered -v -E '^\s*$|(it|run|chunk)/s\]' | tee "$OUT/bench.log"
echo "== done $(date -u)"
