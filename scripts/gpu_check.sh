#!/usr/bin/env bash
# One prepared device run (a lent H100/H200): environment (and the fused RMSNorm's deviation), attention kernels
# alone, `qcfuse bench` with the given arguments (record kept), QCFuse's selection breakdown beside
# ProphetKV/FuseRAG and the reuse check's cost
# (scripts/selection_breakdown.py, shipped eight critical layers; BREAKDOWN_TOKENS=skip leaves it out), then any
# EXTRA benches (one per ';'-separated argument list, tables only).
# Every stage has its own timeout and its own log under $OUT (default ./gpu-out), so a stage that fails or runs
# long leaves the others' results. Usage: EXTRA="--kv-source gpu --tokens 4096" bash scripts/gpu_check.sh ARGS...
set -u
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
untqdm() { tr '\r' '\n' | grep --line-buffered -v -E '^\s*$|(it|run|chunk)/s\]'; }
{
  date -u; nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  # model/norm.py's fused RMSNorm against transformers' on this GPU (bitwise on the CPU; here the reduction may differ)
  timeout 60 python3 -c "
import torch, transformers.models.qwen3.modeling_qwen3 as m
from qcfuse.model.norm import rms_norm
n = m.Qwen3RMSNorm(4096).cuda().bfloat16(); torch.nn.init.normal_(n.weight)
x = torch.randn(4096, 4096, device='cuda', dtype=torch.bfloat16) * torch.logspace(-3, 3, 4096, device='cuda')[:, None]
with torch.no_grad(): a, b = rms_norm(n, x), n(x)
print('fused rms_norm vs transformers, bf16: elements that differ', (a != b).sum().item(), 'of', a.numel(),
      '; max relative difference', ((a - b).abs() / b.abs().clamp_min(1e-30)).max().item())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if [ "${ATTN_TOKENS:-}" != skip ]; then
  echo "== attention kernels alone"
  timeout "${ATTN_TIMEOUT:-150}" python3 scripts/bench_attention.py --tokens "${ATTN_TOKENS:-4096,16384,32768}" \
    --out "$OUT/attention.json" 2>&1 | tee "$OUT/attention.log"
fi
echo "== qcfuse bench $*"
timeout "${BENCH_TIMEOUT:-330}" python3 -m qcfuse bench --device cuda --config qwen3-8b --out "$OUT/bench" "$@" 2>&1 \
  | untqdm | tee "$OUT/bench.log"
if [ "${BREAKDOWN_TOKENS:-}" != skip ]; then
  echo "== selection breakdown (interleaved rounds, one process)"
  timeout "${BREAKDOWN_TIMEOUT:-200}" python3 scripts/selection_breakdown.py --tokens "${BREAKDOWN_TOKENS:-4096,16384,32768}" \
    --rounds 5 --profile_tokens '' --out "$OUT/breakdown" 2>&1 | grep --line-buffered -v -E 'USDT|_warn_once|acc_events' \
    | tee "$OUT/breakdown.log"
fi
IFS=';' read -ra extras <<< "${EXTRA:-}"
for args in "${extras[@]}"; do
  echo "== qcfuse bench $args" | tee -a "$OUT/extra.log"
  # shellcheck disable=SC2086
  timeout "${EXTRA_TIMEOUT:-150}" python3 -m qcfuse bench --device cuda --config qwen3-8b --out - $args 2>&1 \
    | untqdm | tee -a "$OUT/extra.log"
done
echo "== done $(date -u)"
