"""`qcfuse sweep`: a grid of methods x ratios through the runner, then `table.md` and `tradeoff.png`.

One results file per run in the output directory (`fullcomp.jsonl`, `reuse.jsonl`, `{method}_r{ratio}.jsonl`),
each resumable; full prefill always runs (its rows are the shared references) and `fullcomp`/`reuse` run once,
ratio-free. The model and the samples are loaded once for the whole grid.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from ..errors import QcfuseError
from .runner import RATIO_FREE, EvalConfig, load_samples, open_engine, read_rows, run_eval, run_name, summarize

FIDELITY_TOP1 = 0.99        # "within 1% of full prefill" on fidelity: agreement in at least 99% of samples
WITHIN = 0.99               # ... on the task score: at least 99% of full prefill's
HEAD_TO_HEAD = "qcfuse"     # the project's own method, compared sample by sample with every other selector


def parse_list(text: str, what: str, cast=str) -> list:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise QcfuseError(f"--{what} is empty")
    try:
        return [cast(t) for t in items]
    except ValueError:
        raise QcfuseError(f"--{what} expects a comma-separated list, got '{text}'") from None


def grid(methods: list[str], ratios: list[float]) -> list[tuple[str, float | None]]:
    runs: list[tuple[str, float | None]] = [("fullcomp", None)]
    for m in methods:
        for r in ([None] if m in RATIO_FREE else sorted(ratios, key=lambda r: (isinstance(r, str), str(r)
                                                                                  if isinstance(r, str) else r))):
            if isinstance(r, str) and not _query_aware(m):
                continue                                   # ratio auto: query-aware methods only
            if (m, r) not in runs:
                runs.append((m, r))
    return runs


def _query_aware(method: str) -> bool:
    from ..fusion import SELECTORS
    return method in SELECTORS and SELECTORS[method].query_aware


def run_sweep(base: EvalConfig, methods: list[str], ratios: list[float], out_dir: str | Path, log=print) -> dict:
    from ..fusion import make_selector
    out_dir = Path(out_dir)
    if not ratios and any(m not in RATIO_FREE for m in methods):
        raise QcfuseError("--ratios is empty")
    for m in methods:                       # fail on a bad method or ratio before loading anything
        for r in ([0.0] if m in RATIO_FREE else ratios):
            if not (isinstance(r, str) and not _query_aware(m)):
                make_selector(m, r)
    runs = grid(methods, ratios)
    configs = [replace(base, method=m, ratio=r, out=str(out_dir / f"{run_name(m, r)}.jsonl"),
                       options=dict(base.options)).resolved() for m, r in runs]
    first = configs[0]
    engine = None
    samples = None
    for cfg in configs:
        done = {r["id"] for r in read_rows(Path(cfg.out), cfg.row_config())}
        if samples is None:
            samples = load_samples(cfg)
        if all(s.id in done for s in samples):
            run_eval(cfg, engine=engine, samples=samples, log=log)       # prints the summary only
            continue
        if engine is None:
            engine = open_engine(first.model, first.cache_dir, first.dtype)
        run_eval(cfg, engine=engine, samples=samples, log=log)
    return write_report(out_dir, base.dataset, [(m, r) for m, r in runs], {s.id for s in samples}, log=log)


def report_finished(out_dir: str | Path, dataset: str, methods: list[str], ratios: list[float], log=print) -> dict:
    """Tables of a sweep still running or stopped: only the samples that every run of the grid has finished
    (so every row compares the same samples); runs with no results yet are named."""
    out_dir = Path(out_dir)
    runs = grid(methods, ratios)
    ids, missing = None, []
    for m, r in runs:
        path = out_dir / f"{run_name(m, r)}.jsonl"
        done = {row["id"] for row in read_rows(path)} if path.is_file() else set()
        if not done:
            missing.append(run_name(m, r))
            continue
        ids = done if ids is None else ids & done
    if not ids:
        raise QcfuseError(f"no sample is finished by every run in {out_dir}")
    if missing:
        log(f"not run yet: {', '.join(missing)}")
    return write_report(out_dir, dataset, [run for run in runs if run_name(*run) not in missing], ids, log=log)


# -- report ---------------------------------------------------------------------------------------------------
def _load(out_dir: Path, runs, ids) -> dict:
    out = {}
    for m, r in runs:
        path = out_dir / f"{run_name(m, r)}.jsonl"
        rows = [row for row in read_rows(path) if ids is None or row["id"] in ids] if path.is_file() else []
        if rows:
            out[(m, r)] = rows
    return out


def rate_interval(rows: list[dict], key: str) -> tuple[float, float] | None:
    """95% Wilson interval of an agreement rate: at n = 10 a perfect 10/10 still allows 72%, so a reader
    needs the interval to tell "within 1%" from luck."""
    from scipy.stats import binomtest
    values = [bool(row[key]) for row in rows if row.get(key) is not None]
    if not values:
        return None
    ci = binomtest(sum(values), len(values)).proportion_ci(confidence_level=0.95, method="wilson")
    return ci.low, ci.high


def paired_kl(ours: list[dict], theirs: list[dict]) -> dict | None:
    """Sample-by-sample KL of two runs on the same samples: how often ours is lower or higher, and the
    two-sided Wilcoxon signed-rank p-value of the differences (mean KL alone hides a few outliers)."""
    from scipy.stats import wilcoxon
    theirs_by_id = {row["id"]: row["kl"] for row in theirs if row.get("kl") is not None}
    diffs = [row["kl"] - theirs_by_id[row["id"]] for row in ours
             if row.get("kl") is not None and row["id"] in theirs_by_id]
    if not diffs:
        return None
    nonzero = [d for d in diffs if d != 0.0]
    p = float(wilcoxon(nonzero).pvalue) if nonzero else 1.0
    return {"n": len(diffs), "lower": sum(d < 0 for d in diffs), "higher": sum(d > 0 for d in diffs), "p": p}


def _methods(runs) -> list[str]:
    """Method names of (method, ratio) keys, in first-seen order."""
    return list(dict.fromkeys(m for m, _ in runs))


def write_report(out_dir: Path, dataset: str, runs, ids=None, log=print) -> dict:
    """Rebuild table.md and tradeoff.png from the results files in `out_dir`."""
    out_dir = Path(out_dir)
    rows = _auto_as_methods(_load(out_dir, runs, ids))
    if not rows:
        raise QcfuseError(f"no results in {out_dir}")
    stats = {run: summarize(run_rows) for run, run_rows in rows.items()}
    apart = _timed_apart(rows)
    mark = lambda run: TIMED_APART if run in apart else ""
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    num = lambda x, f=".3f": "-" if x is None else format(x, f)

    def rate(run, key):                 # "90.0% (60-98)": the rate and its 95% interval
        ci = rate_interval(rows[run], key)
        return pct(stats[run][key]) + ("" if ci is None else f" ({100 * ci[0]:.0f}-{100 * ci[1]:.0f})")

    any_row = next(iter(stats.values()))
    lines = [f"# {dataset}: quality, fidelity and TTFT per method and ratio", "",
             "Score is the dataset's metric against the gold answers (LongBench QA F1, or RULER string-match-all); "
             "*relative* divides it by full prefill's score on the same samples. Fidelity compares with full "
             "prefill of the same prompt: same greedy answer, same first token (top-1), KL(full || fused) of the "
             "first-token distribution (brackets: 95% Wilson interval of the rate). TTFT is the engine's time "
             "from the tokenized prompt to the first token's logits (chunk cache loading and selection included); "
             "speedup = mean full-prefill TTFT / mean TTFT.",
             "", f"n = {any_row['n']} samples per run (see the n column).", "",
             "| method | ratio | n | score | relative | same answer | top-1 | mean KL | TTFT ms | speedup |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (m, r), s in stats.items():
        lines.append(f"| {m} | {'-' if r is None else f'{r:g}'} | {s['n']} | {num(s['score'])} | {num(s['rel_score'])} "
                     f"| {rate((m, r), 'same_answer')} | {rate((m, r), 'top1')} | {num(s['kl'], '.4f')} "
                     f"| {num(1000 * s['ttft_s'], '.0f')}{mark((m, r))} | {num(s['speedup'], '.2f')}x{mark((m, r))} |")
    if apart:
        lines += ["", f"{TIMED_APART} Timed apart: these rows carry another full-prefill time than this table's "
                  "full-prefill rows (rows merged in from another run, day or load). Their speedup is over the "
                  "full prefill recorded with them, so it compares only as far as the two loads were alike; "
                  "their TTFT in ms does not compare with the other rows. They are left out of the equal-TTFT "
                  "comparison and placed in the plot by their speedup."]
    # "within 1% of full prefill", by three criteria: they disagree (a first token that is a formatting
    # token agrees almost always; whole greedy answers rarely do on a small model), so all three are shown
    criteria = [("score", "task score >= 99% of full prefill's", lambda s: s["rel_score"], WITHIN),
                ("same_answer", "same answer in >= 99% of samples", lambda s: s["same_answer"], FIDELITY_TOP1),
                ("top1", "same first token in >= 99% of samples", lambda s: s["top1"], FIDELITY_TOP1)]
    lines += ["", "Smallest ratio that stays within 1% of full prefill, per criterion (TTFT speedup there):", "",
              "| method | " + " | ".join(label for _, label, _, _ in criteria) + " |",
              "|---|" + "---|" * len(criteria)]
    methods = [m for m in _methods(stats) if m != "fullcomp" and not m.endswith(AUTO_SUFFIX)]
    smallest: dict[str, dict[str, float | None]] = {key: {} for key, _, _, _ in criteria}
    for m in methods:
        cells = []
        for key, _, value, bound in criteria:
            ok = sorted((r, s) for (mm, r), s in stats.items()
                        if mm == m and value(s) is not None and value(s) >= bound - 1e-9)
            if m in RATIO_FREE:
                cells.append("yes (ratio-free)" if ok else "no (ratio-free)")
                continue
            if all(value(s) is None for (mm, _), s in stats.items() if mm == m):
                smallest[key][m] = None
                cells.append("n/a (full prefill scores 0)")
                continue
            r, s = (ok[0] if ok else (None, None))
            smallest[key][m] = r
            cells.append(f"{r:g} ({s['speedup']:.2f}x{mark((m, r))})" if ok else "none in grid")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    auto = _auto_section(stats)
    lines += auto["lines"]
    head_to_head = _head_to_head(rows, HEAD_TO_HEAD)
    equal_ttft = _equal_ttft({run: s for run, s in stats.items() if run not in apart}, HEAD_TO_HEAD)
    if apart and any(m == HEAD_TO_HEAD for m, _ in apart):
        equal_ttft["lines"] = ["", f"At equal TTFT: not shown, since {HEAD_TO_HEAD}'s rows here were timed apart "
                               f"({TIMED_APART}). Compare speed side by side in one run (`qcfuse bench`)."]
    lines += head_to_head["lines"] + equal_ttft["lines"]
    (out_dir / "table.md").write_text("\n".join(lines) + "\n")
    _plot(out_dir / "tradeoff.png", dataset, stats, apart)
    log("\n".join(lines))
    log(f"wrote {out_dir / 'table.md'} and {out_dir / 'tradeoff.png'}")
    return {"stats": {f"{m}:{r}": s for (m, r), s in stats.items()}, "smallest_ratio": smallest["top1"],
            "smallest_ratio_by": smallest, "head_to_head": head_to_head["pairs"], "equal_ttft": equal_ttft["kl"],
            "auto": auto["rows"]}


AUTO_SUFFIX = " auto"
TIMED_APART = "†"


def _timed_apart(rows: dict) -> set:
    """Runs whose rows carry another full-prefill time than this table's own full-prefill rows: rows merged in
    from another run, day or load, whose TTFT would otherwise be read against the wrong reference."""
    full = {row["id"]: row.get("ttft_s") for row in rows.get(("fullcomp", None), [])}
    apart = set()
    for run, run_rows in rows.items():
        if run[0] == "fullcomp":
            continue
        if any(row.get("ttft_full_s") is not None and full.get(row["id"]) is not None
               and not math.isclose(row["ttft_full_s"], full[row["id"]], rel_tol=1e-9) for row in run_rows):
            apart.add(run)
    return apart


def _auto_as_methods(rows: dict) -> dict:
    """Runs at ratio "auto:T" become points (m + " auto", T) of a curve of their own: one per target."""
    from ..fusion.budget import parse_ratio
    out = {}
    for (m, r), run_rows in rows.items():
        target = parse_ratio(r)[1] if isinstance(r, str) else None
        out[(m + AUTO_SUFFIX, target) if target is not None else (m, r)] = run_rows
    return out


def _auto_section(stats: dict) -> dict:
    """Ratio auto against the same method's fixed ratios: (a) the smallest fixed ratio keeping the first token
    in >= 99% of samples, beside each auto target's agreement and mean recomputed share; (b) the fixed-ratio
    curve's mean KL at auto's mean share (linear between grid ratios; nothing claimed outside the grid)."""
    import numpy as np
    autos = [(m, t) for m, t in stats if m.endswith(AUTO_SUFFIX)]
    if not autos:
        return {"lines": [], "rows": []}
    lines = ["", "Ratio auto (its budget per request; the share recomputed counts every pass of the margin rule) "
             "against the same method at fixed ratios:", "",
             "| method | target | n | mean share recomputed | mean passes | reuse checked | top-1 | mean KL | fixed "
             "ratio with top-1 >= 99% (its top-1) | fixed-ratio KL at auto's share |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    out = []
    for m, t in sorted(autos):
        base, s = m[: -len(AUTO_SUFFIX)], stats[(m, t)]
        fixed = sorted((r, f) for (mm, r), f in stats.items() if mm == base and r is not None)
        enough = [(r, f) for r, f in fixed if f["top1"] is not None and f["top1"] >= FIDELITY_TOP1 - 1e-9]
        curve = [(r, f["kl"]) for r, f in fixed if f["kl"] is not None]
        at_share = (float(np.interp(s["share"], *zip(*curve)))
                    if s["share"] is not None and len(curve) >= 2 and curve[0][0] <= s["share"] <= curve[-1][0]
                    else None)
        best = enough[0] if enough else None
        out.append({"method": base, "target": t, "n": s["n"], "share": s["share"], "passes": s.get("passes"),
                    "reuse_checked": s.get("reuse_checked"), "top1": s["top1"], "kl": s["kl"],
                    "fixed_ratio_99": best[0] if best else None, "fixed_top1": best[1]["top1"] if best else None,
                    "fixed_kl_at_share": at_share})
        fixed_cell = f"{best[0]:g} ({_fmt(best[1]['top1'], pct=True)})" if best else "none in grid"
        shared_cell = "outside grid" if at_share is None else _fmt(at_share, ".4f")
        lines.append(f"| {base} | {t:g} | {s['n']} | {_fmt(s['share'])} | {_fmt(s.get('passes'), '.2f')} | "
                     f"{_fmt(s.get('reuse_checked'), pct=True)} | {_fmt(s['top1'], pct=True)} | "
                     f"{_fmt(s['kl'], '.4f')} | {fixed_cell} | {shared_cell} |")
    return {"lines": lines, "rows": out}


def _fmt(x, spec: str = ".3f", pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else format(x, spec)


def _head_to_head(rows: dict, ours: str) -> dict:
    """The project's method against every other selector at the same ratio, paired by sample."""
    others = [m for m in _methods(rows) if m not in (ours, "fullcomp") and m not in RATIO_FREE
              and not m.endswith(AUTO_SUFFIX)]
    ratios = sorted(r for m, r in rows if m == ours)
    pairs = {f"{other}:{r:g}": paired_kl(rows[(ours, r)], rows[(other, r)])
             for r in ratios for other in others if (other, r) in rows}
    if not ratios or not others:
        return {"lines": [], "pairs": pairs}
    lines = ["", f"{ours} against each selector at the same ratio, sample by sample: in how many samples its "
             f"first-token KL is lower / higher, and the two-sided Wilcoxon signed-rank p-value of the "
             f"differences (small p: the difference is unlikely to be chance).", "",
             "| ratio | " + " | ".join(f"vs {o}" for o in others) + " |", "|---|" + "---|" * len(others)]
    for r in ratios:
        cells = []
        for other in others:
            pair = pairs.get(f"{other}:{r:g}")
            cells.append("-" if pair is None
                         else f"{pair['lower']} / {pair['higher']} of {pair['n']} (p {pair['p']:.2g})")
        lines.append(f"| {r:g} | " + " | ".join(cells) + " |")
    return {"lines": lines, "pairs": pairs}


def _equal_ttft(stats: dict, ours: str) -> dict:
    """Each other selector's mean KL at the project's method's mean TTFT, linear between its grid points:
    a faster method buys its speed back as a larger ratio, so equal ratio alone is not the fair comparison.
    Outside a selector's TTFT range nothing is claimed (None)."""
    import numpy as np
    measured = {run: s for run, s in stats.items() if s["ttft_s"] is not None and s["kl"] is not None}
    ratios = sorted(r for m, r in measured if m == ours)
    curves = {}                                            # selector -> [(TTFT, KL)] in TTFT order
    for other in _methods(measured):
        if other not in (ours, "fullcomp") and other not in RATIO_FREE:
            points = sorted((s["ttft_s"], s["kl"]) for (m, _), s in measured.items() if m == other)
            if len(points) >= 2:
                curves[other] = points
    kl = {}
    for r in ratios:
        t = measured[(ours, r)]["ttft_s"]
        for other, points in curves.items():
            inside = points[0][0] <= t <= points[-1][0]
            kl[f"{other}:{r:g}"] = float(np.interp(t, *zip(*points))) if inside else None
    if not ratios or not curves:
        return {"lines": [], "kl": kl}
    lines = ["", f"At equal TTFT: each selector's mean KL at {ours}'s mean TTFT, linear between its two grid "
             f"points around it (\"outside\": {ours}'s TTFT lies outside that selector's grid).", "",
             f"| ratio | {ours} TTFT ms | {ours} mean KL | " + " | ".join(f"{o} there" for o in curves) + " |",
             "|---|---|---|" + "---|" * len(curves)]
    for r in ratios:
        s = measured[(ours, r)]
        cells = ["outside" if kl[f"{o}:{r:g}"] is None else f"{kl[f'{o}:{r:g}']:.4f}" for o in curves]
        lines.append(f"| {r:g} | {1000 * s['ttft_s']:.0f} | {s['kl']:.4f} | " + " | ".join(cells) + " |")
    return {"lines": lines, "kl": kl}


def _plot(path: Path, dataset: str, stats: dict, apart: set = frozenset()) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    panels = [("rel_score", "quality relative to full prefill"),
              ("kl", "mean KL(full || fused), first token (lower is better)"),
              ("top1", "same first token as full prefill (share of samples)")]     # what auto's target means
    methods = _methods(stats)
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(m for m in methods if m != "fullcomp")}
    full = stats.get(("fullcomp", None), {}).get("ttft_s")

    def ttft_ms(run, s):        # a run timed apart sits where its own speedup puts it against this full prefill
        return 1000 * (full / s["speedup"] if run in apart and full and s["speedup"] else s["ttft_s"])

    for ax, (key, label) in zip(axes, panels):
        for m in methods:
            pts = sorted(((ttft_ms((mm, r), s), s[key], r) for (mm, r), s in stats.items()
                          if mm == m and s[key] is not None), key=lambda p: p[0])
            if not pts:
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            if m == "fullcomp":
                ax.scatter(xs, ys, marker="*", s=160, color="black", label="full prefill", zorder=3)
            elif m in RATIO_FREE:
                ax.scatter(xs, ys, marker="x", s=60, label=m, color=colors[m], zorder=3)
            else:
                timed_apart = any(mm == m for mm, _ in apart)
                ax.plot(xs, ys, marker="o", color=colors[m], linestyle="--" if timed_apart else "-",
                        markerfacecolor="none" if timed_apart else colors[m],
                        label=m + (f" ({TIMED_APART} placed by its speedup)" if timed_apart else ""))
                for x, y, r in pts:
                    ax.annotate(f"{r:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                                color=colors[m])
        ax.set_xlabel("TTFT (ms)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key == "rel_score" and not any(s["rel_score"] is not None for s in stats.values()):
            ax.text(0.5, 0.5, "full prefill scores 0: no relative quality", ha="center", transform=ax.transAxes)
    axes[1].legend(fontsize=8, loc="upper right")
    fig.suptitle(f"{dataset}: quality vs TTFT (labels: recompute ratio; for 'auto' curves, the target)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
