"""Issue 20, part 2 (b): can a ladder rule beat fixed ratios on first-token KL at equal mean share?

On the calibration log (every grid ratio's verdict, KL and margin per sample), every ladder the fit may choose
(1-3 grid ratios, optionally then 1.0) at every logged threshold of a signal is replayed: climb to the next rung
while the signal calls the pass unsure. Its mean KL is set against the fixed ratios' mean KL curve on the same
samples (linear between grid ratios, 1.0 = exact) at the ladder's mean share (every pass counted). Printed per
share band: the best difference found (negative: the ladder wins), among all ladders or only those that keep a
share --min_top1 of first tokens. In-sample (the best of many ladders on the same samples), so an upper bound on
what a fitted ladder would show held out.

Signals: "margin" (the shipped rule: the first token's lead over the runner-up, in nats; low = unsure) and
"oracle" (the pass's true KL to full prefill: a bound no signal can pass). With --signals (logs of
scripts/auto_signal_study.py for the same samples) also "shift" (KL of the pass's first-token distribution from
plain reuse's) and "entropy" (of that distribution), at the rungs those logs cover.

    .venv/bin/python scripts/auto_kl_frontier.py [--log results/auto/margin/calibration_smollm2-135m.jsonl] [--min_top1 1]
    .venv/bin/python scripts/auto_kl_frontier.py --signals results/auto/signals/calibration_signals.jsonl --min_top1 0,1
"""
from __future__ import annotations

import argparse
import itertools
import json

import numpy as np

BANDS = (0.02, 0.04, 0.06, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7)
UNSURE = {                       # signal -> (the logged field, whether a high value means unsure)
    "margin": ("margin", False),
    "oracle": ("kl", True),
    "shift": ("shift", True),
    "entropy": ("entropy", True),
}


def replay(tried: dict, ladder: tuple, field: str, high_is_unsure: bool, cut: float) -> tuple[bool, float, float]:
    """(first token kept, KL, share over all passes) of one sample: climb while the pass's `field` is on the
    unsure side of `cut` (the last rung is kept; a rung of 1.0 is exact)."""
    spent = 0.0
    for i, ratio in enumerate(ladder):
        spent += ratio
        if ratio >= 1.0:
            return True, 0.0, spent
        value = tried[ratio][field]
        unsure = value > cut if high_is_unsure else value < cut
        if i == len(ladder) - 1 or not unsure:
            return tried[ratio]["agrees"], tried[ratio]["kl"], spent
    raise ValueError("empty ladder")


def load(log: str, signals: list[str]) -> list[dict]:
    samples = {}
    for line in open(log):
        if line.strip():
            row = json.loads(line)
            samples[row["sample"]] = {t["ratio"]: dict(t) for t in row["tried"]}
    for name in signals:
        for line in open(name):
            row = json.loads(line)
            for t in row["tried"]:
                logged = samples[row["sample"]][t["ratio"]]
                if logged.get("token") != t.get("token", logged.get("token")) or abs(logged["margin"] - t["margin"]) > 1e-4:
                    raise SystemExit(f"{name}: {row['sample']} at {t['ratio']} is not the logged pass (first token "
                                     f"{t['token']} at margin {t['margin']}, logged {logged['token']} at "
                                     f"{logged['margin']}): another model or selector setting?")
                logged.update(shift=t["shift"], entropy=t["entropy"])
    return list(samples.values())


def frontier(samples: list[dict], grid: list[float], curve: list, signal: str, min_top1: float) -> dict:
    """Per share band: (difference to the fixed curve, share, KL, top-1, ladder, threshold) of the best ladder."""
    field, high = UNSURE[signal]
    rungs_with = [r for r in grid if all(field in s[r] for s in samples)]
    best = {}
    for n in range(1, 4):
        for rungs in itertools.combinations(rungs_with, n):
            cuts = sorted({s[r][field] for s in samples for r in rungs} | {0.0})
            for ladder in (rungs, rungs + (1.0,)):
                for cut in cuts:
                    runs = [replay(s, ladder, field, high, cut) for s in samples]
                    top1 = float(np.mean([r[0] for r in runs]))
                    share = float(np.mean([r[2] for r in runs]))
                    if top1 < min_top1 - 1e-9 or share > curve[-2][0]:
                        continue
                    kl = float(np.mean([r[1] for r in runs]))
                    gap = kl - float(np.interp(share, *zip(*curve)))
                    band = max(b for b in BANDS if b <= share + 1e-12)
                    if band not in best or gap < best[band][0]:
                        best[band] = (gap, share, kl, top1, ladder, cut)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", default="results/auto/margin/calibration_smollm2-135m.jsonl")
    ap.add_argument("--signals", default="", help="logs of scripts/auto_signal_study.py, comma-separated")
    ap.add_argument("--min_top1", default="0", help="only ladders that keep this share of first tokens "
                                                    "(comma-separated: one table each)")
    args = ap.parse_args()
    samples = load(args.log, [s for s in args.signals.split(",") if s])
    grid = sorted(set.intersection(*(set(s) for s in samples)))
    curve = [(r, float(np.mean([s[r]["kl"] for s in samples]))) for r in grid] + [(1.0, 0.0)]
    signals = [s for s in UNSURE if all(UNSURE[s][0] in s_[grid[0]] for s_ in samples)]
    print(f"{len(samples)} calibration samples; fixed-ratio mean KL: "
          + ", ".join(f"{r:g} {kl:.4f}" for r, kl in curve))
    first = grid[0]
    kl = np.array([s[first]["kl"] for s in samples])
    rank = lambda v: np.argsort(np.argsort(v))
    print(f"Spearman correlation with the KL of a {first:g} pass, over samples: "
          + ", ".join(f"{s} {np.corrcoef(rank(kl), rank(np.array([x[first][UNSURE[s][0]] for x in samples])))[0, 1]:+.2f}"
                      for s in signals if s != "oracle"))
    for min_top1 in (float(x) for x in args.min_top1.split(",")):
        print(f"\nKeeping >= {min_top1:.0%} of first tokens: the best ladder per mean-share band")
        print("| signal | mean share | best ladder, threshold | its share | top-1 | its KL | fixed KL at that share | difference |")
        print("|---|---|---|---|---|---|---|---|")
        for signal in signals:
            for band, (gap, share, kl_, top1, ladder, cut) in sorted(frontier(samples, grid, curve, signal, min_top1).items()):
                print(f"| {signal} | >= {band:g} | {', '.join(f'{r:g}' for r in ladder)} at {cut:.3f} | {share:.3f} | "
                      f"{100 * top1:.0f}% | {kl_:.4f} | {kl_ - gap:.4f} | {gap:+.4f} |")


if __name__ == "__main__":
    main()
