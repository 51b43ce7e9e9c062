"""Issue 20, part 2: ratio auto's two rules against each other and against fixed ratios, on the held-out samples
each pair of runs shares.

Margin rule rows: results/auto/margin (this measurement). Mass rule rows: results/auto/qcfuse8, the one-pass
rule at target 0.99 with the same attention share (0.984107) and scoring as the current calibration gives, so
its rows are what the mass rule does today. Shares count every pass of the margin rule.

    .venv/bin/python scripts/auto_rules_report.py [--margin results/auto/margin] [--mass results/auto/qcfuse8]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from qcfuse.eval.runner import rows_by_id as rows, spent_share

DATASETS = ("musique_s", "ruler_mv", "ruler_mq", "ruler_vt")


def summary(run: dict, ids: list[str]) -> str:
    picked = [run[i] for i in ids]
    n = len(picked)
    return (f"{sum(spent_share(r) for r in picked) / n:.3f} | {100 * sum(r['top1'] for r in picked) / n:.1f}% | "
            f"{sum(r['kl'] for r in picked) / n:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--margin", default="results/auto/margin")
    ap.add_argument("--mass", default="results/auto/qcfuse8")
    args = ap.parse_args()
    print("| dataset | run | n | mean share (all passes) | top-1 | mean KL |")
    print("|---|---|---|---|---|---|")
    for dataset in DATASETS:
        here = Path(args.margin) / dataset
        runs = {p.stem.removeprefix("qcfuse_r"): rows(p) for p in sorted(here.glob("qcfuse_r*.jsonl"))}
        margin = runs.get("auto0.99", {})
        if not margin:
            continue
        ids = sorted(margin, key=lambda i: int(i.rsplit("-", 1)[1]))
        for name, run in sorted(runs.items(), key=lambda kv: (kv[0].startswith("auto"), kv[0])):
            if all(i in run for i in ids):
                label = f"auto {name[4:]} (margin)" if name.startswith("auto") else f"fixed {name}"
                print(f"| {dataset} | {label} | {len(ids)} | {summary(run, ids)} |")
        mass = rows(Path(args.mass) / dataset / "qcfuse_rauto0.99.jsonl")
        common = [i for i in ids if i in mass]
        if common:
            print(f"| {dataset} | auto 0.99, margin rule, same samples as the mass rule | {len(common)} | "
                  f"{summary(margin, common)} |")
            print(f"| {dataset} | auto 0.99, mass rule | {len(common)} | {summary(mass, common)} |")


if __name__ == "__main__":
    main()
