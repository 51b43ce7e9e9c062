"""Issue 20, part 1: QCFuse with eight critical layers (rows in results/eval_qcfuse8) against ProphetKV (rows in
results/eval) and QCFuse's former three layers (results/eval/*/qcfuse_3layers), sample by sample, on the samples
all three have.

KL and top-1 are exact properties of the engine and compare across machines. Times do not: the rows here
were measured on another day, engine and load than results/eval's (full prefill of the same prompts took
24 s here against 45 s there), so this table shows no speed; speed is compared side by side in one run
(`qcfuse bench`, results/eval_qcfuse8/README.md).

    .venv/bin/python scripts/qcfuse8_report.py [--new results/eval_qcfuse8] [--old results/eval]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from qcfuse.eval.runner import rows_by_id as rows
from qcfuse.eval.sweep import paired_kl

DATASETS = ("musique_s", "ruler_mv", "ruler_mq", "ruler_vt")
RATIOS = ("0.05", "0.1", "0.15", "0.3", "0.5")
# the eight layers were chosen on musique_s 90-99 and RULER seed 1 (scripts/selection_study.py): left out here
CALIBRATION = {f"musique_s-{i}" for i in range(90, 100)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", default="results/eval_qcfuse8")
    ap.add_argument("--old", default="results/eval")
    args = ap.parse_args()
    new_root, old_root = Path(args.new), Path(args.old)
    print("| dataset | ratio | n | ProphetKV KL | QCFuse 5,6,7 KL | QCFuse 8 layers KL | 8 layers vs ProphetKV: "
          "lower / higher (p) | 8 layers vs 5,6,7: lower / higher (p) | top-1: 8 layers / ProphetKV / 5,6,7 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dataset in DATASETS:
        for ratio in RATIOS:
            new = rows(new_root / dataset / f"qcfuse_r{ratio}.jsonl")
            pk = rows(old_root / dataset / f"prophetkv_r{ratio}.jsonl")
            old = rows(old_root / dataset / "qcfuse_3layers" / f"qcfuse_r{ratio}.jsonl")
            ids = sorted(set(new) & set(pk) & set(old) - CALIBRATION)
            if not ids:
                continue
            runs = [{i: r[i] for i in ids} for r in (new, pk, old)]

            def mean(run, key):
                return sum(run[i][key] for i in ids) / len(ids)

            def versus(a, b):
                p = paired_kl(list(a.values()), list(b.values()))
                return f"{p['lower']} / {p['higher']} (p {p['p']:.2g})"

            print(f"| {dataset} | {ratio} | {len(ids)} | {mean(runs[1], 'kl'):.4f} | {mean(runs[2], 'kl'):.4f} | "
                  f"**{mean(runs[0], 'kl'):.4f}** | {versus(runs[0], runs[1])} | {versus(runs[0], runs[2])} | "
                  + " / ".join(f"{mean(r, 'top1'):.0%}" for r in runs) + " |")


if __name__ == "__main__":
    main()
