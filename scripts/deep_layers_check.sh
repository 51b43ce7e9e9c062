#!/usr/bin/env bash
# Held-out check of the one lead from scripts/selection_study.py: QCFuse with eight critical layers spread
# over the depth (3,5,7,10,14,18,22,26) instead of the profiled 5,6,7. Same samples as results/eval (RULER seed
# 0, the first SIZE), whose ProphetKV and QCFuse rows the rows here are compared with, sample by sample.
cd "$(dirname "$0")/.."
[ "$1" = report ] || for t in ${TASKS:-mv mq}; do
  for r in 0.1 0.15 0.3; do
    .venv/bin/python -m qcfuse eval --dataset ruler_$t --method qcfuse --ratio $r \
      --opt critical_layers=3,5,7,10,14,18,22,26 --size ${SIZE:-10} --tokens 4096 --chunk_tokens 512 --threads 1 \
      --quiet --out results/selectors/deep_layers/ruler_$t/qcfuse_r$r.jsonl
  done
done
# the comparison, over the samples present in all three rows files of a ratio
.venv/bin/python - <<'PY'
from pathlib import Path

from qcfuse.eval.runner import rows_by_id

def rows(path):
    return rows_by_id(Path(path))

print("| task | ratio | n | ProphetKV KL | QCFuse 5,6,7 KL | QCFuse deep KL | deep lower than ProphetKV | deep lower than 5,6,7 | deep top-1 | selection ms deep / 5,6,7 / ProphetKV |")
print("|---|---|---|---|---|---|---|---|---|---|")
for t in ("mv", "mq"):
    for r in ("0.1", "0.15", "0.3"):
        deep = rows(f"results/selectors/deep_layers/ruler_{t}/qcfuse_r{r}.jsonl")
        pk, qc = (rows(f"results/eval/ruler_{t}/prophetkv_r{r}.jsonl"),
                  rows(f"results/eval/ruler_{t}/qcfuse_3layers/qcfuse_r{r}.jsonl"))
        ids = sorted(set(deep) & set(pk) & set(qc))
        if not ids:
            continue
        mean = lambda d, k="kl": sum(d[i][k] for i in ids) / len(ids)
        print(f"| ruler_{t} | {r} | {len(ids)} | {mean(pk):.4f} | {mean(qc):.4f} | {mean(deep):.4f} | "
              f"{sum(deep[i]['kl'] < pk[i]['kl'] for i in ids)} of {len(ids)} | "
              f"{sum(deep[i]['kl'] < qc[i]['kl'] for i in ids)} of {len(ids)} | {mean(deep, 'top1'):.0%} | "
              f"{1000 * mean(deep, 'selection_s'):.0f} / {1000 * mean(qc, 'selection_s'):.0f} / {1000 * mean(pk, 'selection_s'):.0f} |")
PY
