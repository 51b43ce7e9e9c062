"""Ratio auto's held-out rows after a refit that keeps the first rung and lowers the margin (stop 34): which
requests can change, checked against logs of those requests, then merged with the rows that cannot change.

A request that stopped at the first rung under the old rule had a margin at or above the old threshold and kept
reuse's token, so under a rule with the same first rung, a threshold no higher and the same check it stops
there again, with the same pass (the engine is deterministic). Only the requests that climbed can change. For
those, `qcfuse calibrate --log` on the held-out samples (every grid ratio's verdict, KL, margin and token, plus
reuse's token) gives what each rule does, and fresh `qcfuse eval` rows under the new profile give what it did:

    qcfuse calibrate --model smollm2-135m --sets "musique_s[7:8],...,ruler_mq[42:44]" --seed 0 --tokens 4096 \
        --chunk_tokens 512 --threads 1 --log results/auto/margin/refit/heldout_climbers.jsonl --out /tmp/x.json
    qcfuse eval --dataset D --first I --size 1 --baseline qcfuse --ratio auto:0.99 --threads 1 --quiet \
        [--tokens 4096 --chunk_tokens 512] --out results/auto/margin/refit/fresh/D.jsonl      # per climber

The script checks, per request:
- the log, replayed under the old rule, gives the old row (passes, first-token verdict, KL);
- the log, replayed under the new rule, gives the fresh row;
- fresh rows of requests that did not climb (controls) equal the old rows;
then writes the merged rows (`--write`): the fresh row for every climber, the old row for everything else.

    .venv/bin/python scripts/auto_refit_rows.py [--write]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from qcfuse.eval.runner import rows_by_id
from qcfuse.profile import kept_at, ladder_stop

OLD_RULE = ((0.02, 0.2, 1.0), 0.452583)          # the 0.99 ladder and margin shipped until stop 34
NEW_RULE = ((0.02, 0.3, 0.5, 1.0), 0.341511)     # refit from the same calibration log, the check fitted with it
DATASETS = ("musique_s", "ruler_mv", "ruler_mq", "ruler_vt")
KL_TOL = 2e-4


def replay(log: dict, rule) -> dict:
    """What a ladder and margin (with the reuse check on the first pass) do on one logged request."""
    ladder, margin = rule
    tried = {t["ratio"]: t for t in log["tried"]}
    stop, _ = ladder_stop(tried, ladder, margin, log["reuse_token"])
    return {"passes": list(ladder).index(stop) + 1, "top1": kept_at(tried, stop),
            "kl": 0.0 if stop >= 1.0 else tried[stop]["kl"]}


def same(row: dict, want: dict) -> bool:
    return row["passes"] == want["passes"] and bool(row["top1"]) == want["top1"] and abs(row["kl"] - want["kl"]) < KL_TOL


def summary(rows: list[dict]) -> str:
    n = len(rows)
    return (f"n {n}, share {sum(r['recomputed_total_share'] for r in rows) / n:.3f}, passes "
            f"{sum(r['passes'] for r in rows) / n:.2f}, top-1 {100 * sum(bool(r['top1']) for r in rows) / n:.1f}%, "
            f"KL {sum(r['kl'] for r in rows) / n:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", default="results/auto/margin", help="folder of the old rows, {dataset}/qcfuse_rauto0.99.jsonl")
    ap.add_argument("--refit", default="results/auto/margin/refit", help="heldout_climbers.jsonl and fresh/{dataset}.jsonl")
    ap.add_argument("--write", action="store_true", help="write {refit}/{dataset}/qcfuse_rauto0.99.jsonl")
    args = ap.parse_args()
    logs = {}
    for line in (Path(args.refit) / "heldout_climbers.jsonl").read_text().splitlines():
        row = json.loads(line)
        logs[row["sample"]] = row
    problems = 0
    for dataset in DATASETS:
        old = rows_by_id(Path(args.old) / dataset / "qcfuse_rauto0.99.jsonl")
        fresh_file = Path(args.refit) / "fresh" / f"{dataset}.jsonl"
        fresh = rows_by_id(fresh_file) if fresh_file.exists() else {}
        merged = []
        for rid, row in old.items():
            if row["passes"] == 1:                                      # stopped at the first rung: unchanged
                if rid in fresh and not same(fresh[rid], {**row, "top1": bool(row["top1"])}):
                    print(f"  {rid}: a control differs from its old row"); problems += 1
                merged.append(row)
                continue
            log = logs.get(rid)
            if log is None or rid not in fresh:
                print(f"  {rid}: climbed, but {'no log' if log is None else 'no fresh row'}"); problems += 1
                merged.append(None)
                continue
            if not same(row, replay(log, OLD_RULE)):
                print(f"  {rid}: the log does not replay to the old row"); problems += 1
            want = replay(log, NEW_RULE)
            if not same(fresh[rid], want):
                print(f"  {rid}: the fresh row differs from the log's replay {want}"); problems += 1
            merged.append(fresh[rid])
        climbers = [rid for rid, row in old.items() if row["passes"] > 1]
        print(f"{dataset}: {len(climbers)} climbed under the old rule, {sum(r in fresh for r in climbers)} re-run, "
              f"{sum(r not in climbers for r in fresh)} controls")
        print(f"  old rule: {summary(list(old.values()))}")
        if all(merged):
            print(f"  new rule: {summary(merged)}")
            if args.write:
                out = Path(args.refit) / dataset / "qcfuse_rauto0.99.jsonl"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text("".join(json.dumps(r) + "\n" for r in merged))
    print("all checks passed" if not problems else f"{problems} problem(s)")
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
