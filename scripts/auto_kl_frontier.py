"""Issue 20, part 2 (b): can a margin-rule ladder beat fixed ratios on first-token KL at equal mean share?

On the calibration log (every grid ratio's verdict, KL and margin per sample), every ladder the fit may choose
(1-3 grid ratios, optionally then 1.0) at every logged margin is replayed. Its mean KL is set against the fixed
ratios' mean KL curve on the same samples (linear between grid ratios, 1.0 = exact) at the ladder's mean share
(every pass counted). Printed per share band: the best difference found (negative: the ladder wins), among all ladders or only those
that keep a share --min_top1 of first tokens. In-sample (the best of many ladders on the same samples), so an
upper bound on what a fitted ladder would show held out.

    .venv/bin/python scripts/auto_kl_frontier.py [--log results/auto/margin/calibration_smollm2-135m.jsonl] [--min_top1 1]
"""
from __future__ import annotations

import argparse
import itertools
import json

import numpy as np

from qcfuse.profile import ladder_stop

BANDS = (0.02, 0.04, 0.06, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7)


def replay(tried: dict, ladder: tuple, min_margin: float) -> tuple[bool, float, float]:
    """(first token kept, KL, share over all passes) of one sample under one ladder and margin."""
    ratio, spent = ladder_stop(tried, ladder, min_margin)
    return (True, 0.0, spent) if ratio >= 1.0 else (tried[ratio]["agrees"], tried[ratio]["kl"], spent)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", default="results/auto/margin/calibration_smollm2-135m.jsonl")
    ap.add_argument("--min_top1", type=float, default=0.0, help="only ladders that keep this share of first tokens")
    args = ap.parse_args()
    samples = [{t["ratio"]: t for t in json.loads(line)["tried"]} for line in open(args.log) if line.strip()]
    grid = sorted(set.intersection(*(set(s) for s in samples)))
    curve = [(r, float(np.mean([s[r]["kl"] for s in samples]))) for r in grid] + [(1.0, 0.0)]
    margins = sorted({0.0} | {t["margin"] for s in samples for t in s.values()})
    best = {}
    for n in range(1, 4):
        for rungs in itertools.combinations(grid, n):
            for ladder in (rungs, rungs + (1.0,)):
                for m in margins:
                    runs = [replay(s, ladder, m) for s in samples]
                    if np.mean([r[0] for r in runs]) < args.min_top1 - 1e-9:
                        continue
                    share = float(np.mean([r[2] for r in runs]))
                    if share > curve[-2][0]:
                        continue
                    kl = float(np.mean([r[1] for r in runs]))
                    gap = kl - float(np.interp(share, *zip(*curve)))
                    band = max(b for b in BANDS if b <= share + 1e-12)
                    if band not in best or gap < best[band][0]:
                        best[band] = (gap, share, kl, float(np.mean([r[0] for r in runs])), ladder, m)
    print(f"{len(samples)} calibration samples; fixed-ratio mean KL: "
          + ", ".join(f"{r:g} {kl:.4f}" for r, kl in curve))
    print("| mean share | best ladder, margin | its share | top-1 | its KL | fixed KL at that share | difference |")
    print("|---|---|---|---|---|---|---|")
    for band in sorted(best):
        gap, share, kl, top1, ladder, m = best[band]
        print(f"| >= {band:g} | {', '.join(f'{r:g}' for r in ladder)} at {m:.3f} | {share:.3f} | {100 * top1:.0f}% | "
              f"{kl:.4f} | {kl - gap:.4f} | {gap:+.4f} |")


if __name__ == "__main__":
    main()
