"""Issue 20, part 2: would "escalate a 2% pass whose first token differs from plain reuse's" catch ratio auto's
misses? The check that led to the margin rule's reuse check (built since: fusion/budget.py; `qcfuse calibrate` now
logs the tokens themselves). Checked on the calibration split only (musique_s 80-99, RULER seed 1, 6 each), whose
rows come from

    qcfuse sweep --dataset musique_s --first 80 --size 20 --methods reuse,qcfuse --ratios 0.02 --threads 1 --quiet \
        --out_dir results/auto/margin/reuse_check/musique_s
    qcfuse sweep --dataset ruler_T --seed 1 --size 6 --tokens 4096 --chunk_tokens 512 --methods reuse,qcfuse \
        --ratios 0.02 --threads 1 --quiet --out_dir results/auto/margin/reuse_check/ruler_T     # T = mv, mq, vt

Rows keep the decoded answers, not token ids, so a first token is re-read from the answer's text; the last column
checks that re-reading against the rows' own first-token verdicts.

    .venv/bin/python scripts/reuse_check.py [--dir results/auto/margin/reuse_check]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from qcfuse.eval.runner import rows_by_id
from qcfuse.model.loader import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="results/auto/margin/reuse_check")
    args = ap.parse_args()
    tok = load_tokenizer("smollm2-135m")
    first = lambda text: (tok(text, add_special_tokens=False).input_ids or [None])[0]
    print("| set | n | 2% keeps the first token | reuse keeps it | 2% misses caught (2% token differs from "
          "reuse's) | right 2% passes flagged (false alarms) | re-read tokens match the rows' verdicts |")
    print("|---|---|---|---|---|---|---|")
    for folder in sorted(Path(args.dir).iterdir()):
        reuse, fused = rows_by_id(folder / "reuse.jsonl"), rows_by_id(folder / "qcfuse_r0.02.jsonl")
        ids = sorted(set(reuse) & set(fused))
        if not ids:
            continue
        differs = {i: first(fused[i]["prediction"]) != first(reuse[i]["prediction"]) for i in ids}
        consistent = sum((first(r[i]["prediction"]) == first(r[i]["prediction_full"])) == bool(r[i]["top1"])
                         for r in (reuse, fused) for i in ids)
        misses = [i for i in ids if not fused[i]["top1"]]
        right = [i for i in ids if fused[i]["top1"]]
        print(f"| {folder.name} | {len(ids)} | {len(right)} | {sum(reuse[i]['top1'] for i in ids)} | "
              f"{sum(differs[i] for i in misses)} of {len(misses)} | {sum(differs[i] for i in right)} of {len(right)} | {consistent} of {2 * len(ids)} |")


if __name__ == "__main__":
    main()
