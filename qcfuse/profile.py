"""`qcfuse profile` and `qcfuse calibrate`: a model's calibration for QCFuse's critical layers and for ratio auto.

Criterion (documented and measured): for each layer l, select the top `ratio` document tokens by the
question's attention at layer l alone (full view), fuse with exactly those tokens, and measure the KL
divergence of the first-token distribution from full prefill. The critical layers are the `n` layers with
the lowest mean KL: the layers whose question attention best predicts which tokens matter for the answer.

Ratio auto (fusion/budget.py): per calibration sample and method, the first token's verdict and margin when the
top-scored tokens of each grid ratio are fused. The mass rule reads the smallest ratio that keeps full prefill's
first token as the share of the method's scores those tokens hold; the margin rule picks the ladder and threshold
that keep it most cheaply.
"""
from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .engine import FusionEngine
from .errors import QcfuseError
from .fusion import ReusedKV, Selector, make_selector
from .fusion.budget import first_token_margin, mass_of_top
from .fusion.probe import attention_probs, run_probe, top_positions


class _Fixed(Selector):
    """Recompute a given set of positions (profiling only; not registered)."""
    name = "fixed"

    def __init__(self, positions: torch.Tensor):
        super().__init__(0.0)
        self.positions = positions

    def select(self, inputs):
        return self.positions


def kl_first_token(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(P || Q) of the first-token distributions, P the full-prefill reference."""
    p, q = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum())


def per_layer_scores(engine: FusionEngine, layout, reused: ReusedKV) -> torch.Tensor:
    """Question attention on each document token at every layer (full view): [L, n_doc], rows sum to 1."""
    model = engine.model.transformer
    ctx_pos = torch.arange(layout.context_len)
    q_pos = layout.suffix_positions()
    doc0 = len(layout.prefix)
    out = torch.zeros(model.n_layers, layout.n_doc_tokens)

    def on_layer(layer, q):
        keys = model.rope(layer, reused.layer(layer)[0], ctx_pos)
        s = attention_probs(model, layer, q, q_pos, keys, ctx_pos)[:, :, doc0:].mean(dim=(0, 1))
        out[layer] = s / s.sum().clamp_min(1e-30)

    run_probe(model, torch.tensor(layout.suffix), q_pos, lambda layer: (ctx_pos, *reused.layer(layer)),
              model.n_layers, on_layer)
    return out


def profile_model(engine: FusionEngine, samples: list[tuple[list[str], str]], ratio: float = 0.15,
                  n_critical: int = 3, progress: bool = True) -> dict:
    model = engine.model.transformer
    kls = torch.zeros(len(samples), model.n_layers)
    t0 = time.perf_counter()
    for i, (docs, question) in enumerate(tqdm(samples, desc="profiling layers", unit="sample", disable=not progress)):
        layout = engine.layout(docs, question)
        full = engine.generate_layout(layout, make_selector("fullcomp"), 1).first_logits
        pieces = [engine._entry(ids)[0] for ids in [layout.prefix, *layout.chunks] if ids]
        scores = per_layer_scores(engine, layout, ReusedKV(pieces, len(layout.prefix)))
        budget = int(round(ratio * layout.n_doc_tokens))
        for layer in range(model.n_layers):
            chosen = top_positions(scores[layer], layout.doc_positions(), budget)
            fused = engine.generate_layout(layout, _Fixed(chosen), 1).first_logits
            kls[i, layer] = kl_first_token(full, fused)
    mean_kl = kls.mean(dim=0)
    critical = sorted(mean_kl.argsort()[:n_critical].tolist())
    return {
        "critical_layers": critical,
        "critical_layers_choice": f"the {n_critical} layers of lowest mean KL by the criterion below",
        "lowest_kl_layers": critical,
        "criterion": f"lowest mean first-token KL to full prefill when fusing the top {ratio:g} document tokens "
                     "chosen by the question's attention at that single layer (full view)",
        "ratio": ratio,
        "samples": len(samples),
        "mean_kl_per_layer": [round(float(x), 6) for x in mean_kl],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def musique_samples(path: Path, n: int, passages: int, first: int = 0) -> list[tuple[list[str], str]]:
    if first < 0 or n < 1:
        raise QcfuseError("--first must be at least 0 and --samples at least 1")
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise QcfuseError(f"cannot read calibration data {path}: {exc}") from None
    out = []
    for item in data[first:first + n]:
        docs = [f"{c['title']}\n{c['text']}" for c in item["ctxs"][:passages]]
        out.append((docs, item["question"]))
    if not out:
        raise QcfuseError(f"no samples in {path}")
    return out


# -- ratio auto ------------------------------------------------------------------------------------------------
AUTO_GRID = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7)
AUTO_TARGETS = (0.8, 0.9, 0.95, 0.99)
MAX_RUNGS = 3            # the margin rule's ladders: up to this many grid ratios, then (optionally) everything


def needed_share(engine: FusionEngine, layout, scores: torch.Tensor, full_logits: torch.Tensor,
                 grid=AUTO_GRID, every: bool = False) -> dict:
    """The smallest grid ratio whose top-scored tokens, fused, give full prefill's first token (1.0 when none
    does), and the share of the scores' total those tokens hold: what ratio auto must reach on this sample.
    every=True fuses at every grid ratio (the margin rule's calibration needs each one's verdict and margin);
    otherwise the grid stops at the first that agrees."""
    n_doc, top1 = layout.n_doc_tokens, int(full_logits.argmax())
    tried, found = [], None
    for ratio in grid:
        k = int(round(ratio * n_doc))
        fused = engine.generate_layout(layout, _Fixed(top_positions(scores, layout.doc_positions(), k)), 1)
        agrees = int(fused.first_logits.argmax()) == top1
        tried.append({"ratio": ratio, "agrees": agrees, "kl": round(kl_first_token(full_logits, fused.first_logits), 6),
                      "margin": round(first_token_margin(fused.first_logits), 6),
                      "token": int(fused.first_logits.argmax()), "seconds": round(fused.stats["ttft_s"], 4)})
        if agrees and found is None:
            found = {"ratio": ratio, "mass": round(mass_of_top(scores, k), 6)}
            if not every:
                break
    return {**(found or {"ratio": 1.0, "mass": 1.0}), "tried": tried}


def ladder_stop(tried: dict[float, dict], ladder: tuple[float, ...], min_margin: float,
                reuse_token: int | None = None) -> tuple[float, float]:
    """Where the margin rule stops on one calibration sample: (the rung whose pass it keeps, share recomputed
    over all passes). `tried`: that sample's verdict, margin and token per grid ratio; a rung of 1.0
    recomputes everything. reuse_token: plain reuse's first token, for the reuse check (None: no check)."""
    spent = 0.0
    for i, ratio in enumerate(ladder):
        spent += ratio
        if ratio >= 1.0:
            return ratio, spent                             # exact: full prefill's first token
        last = i == len(ladder) - 1
        sure = tried[ratio]["margin"] >= min_margin
        if sure and i == 0 and reuse_token is not None:
            sure = tried[ratio]["token"] == reuse_token     # a first pass that overturns reuse is escalated
        if last or sure:
            return ratio, spent
    raise ValueError("empty ladder")


def ladder_cost(ladder, stopped_at: float, pass_cost: float) -> float:
    """What a request that stopped at rung `stopped_at` paid, in full prefills: each fused pass its share plus
    `pass_cost` (what a pass costs besides its recompute: the suffix, the reads, the selection), a rung of 1.0
    one plain prefill."""
    rungs = list(ladder)[:list(ladder).index(stopped_at) + 1]
    return sum(r if r >= 1.0 else r + pass_cost for r in rungs)


def pass_cost_of(rows: list[dict]) -> float:
    """A fused pass's cost besides its recompute, as a share of full prefill's time: the median over logged
    passes of (pass time - ratio x full prefill's time) / full prefill's time (0 where the rows carry no
    times, as logs before it do)."""
    costs = sorted((t["seconds"] - t["ratio"] * r["full_seconds"]) / r["full_seconds"]
                   for r in rows if r.get("full_seconds") for t in r["tried"] if "seconds" in t)
    return round(max(0.0, costs[len(costs) // 2]), 4) if costs else 0.0


def kept_at(tried: dict[float, dict], ratio: float) -> bool:
    """Whether the pass a sample stopped at keeps full prefill's first token (a rung of 1.0 is exact)."""
    return ratio >= 1.0 or tried[ratio]["agrees"]


def _accepted_pairs(by_ratio: list[dict], first_checked: float | None,
                    reuse_tokens: list[int] | None) -> list[tuple[float, bool]]:
    """(margin, agrees) of every logged pass a margin could accept. With the reuse check on a ladder's first
    rung (`first_checked`), a pass at that ratio which overturns reuse's token climbs whatever its margin, so
    it does not count for or against a margin."""
    return [(t["margin"], t["agrees"]) for i, r in enumerate(by_ratio) for t in r.values()
            if first_checked is None or t["ratio"] != first_checked or t["token"] == reuse_tokens[i]]


def _precision(pairs: list[tuple[float, bool]], min_margin: float) -> float:
    kept = [agrees for margin, agrees in pairs if margin >= min_margin]
    return sum(kept) / len(kept) if kept else 1.0


def fit_margin_rule(samples: list[list[dict]], targets=AUTO_TARGETS, max_rungs: int = MAX_RUNGS,
                    reuse_tokens: list[int] | None = None, pass_cost: float = 0.0) -> list[dict]:
    """Per target t: the ladder and margin with the least mean cost that keep full prefill's first token in a
    share >= t of the calibration samples, among margins that hold at every grid ratio (below). The cost counts
    every pass: its recompute share, plus `pass_cost` for each fused pass (ladder_cost); with pass_cost 0 it is
    the share recomputed. Ladders: 1 to `max_rungs` ratios of the grid the samples were fused at, the last
    accepted as it is, or followed by a full recompute (required for targets finer than the set resolves). A
    ladder gives way to one plain full prefill (ladder [1.0], exact, cost 1) unless it is cheaper with some
    confidence: its mean cost plus two standard errors over the samples below 1.
    reuse_tokens (reuse's first token per sample, when logged with each pass's token): targets finer than the
    set resolves are fitted with the reuse check as part of the rule. A first pass that overturns reuse's
    token climbs whatever its margin, so the margin is trusted on the passes the rule would accept: at the
    ladder's first rung those that keep reuse's token, elsewhere all."""
    by_ratio = [{t["ratio"]: t for t in tried} for tried in samples]
    grid = sorted(set.intersection(*(set(r) for r in by_ratio))) if by_ratio else []
    if not grid:
        return []
    ladders = [c + tail for n in range(1, max_rungs + 1) for c in itertools.combinations(grid, n)
               for tail in ((), (1.0,))]
    margins = sorted({0.0} | {t["margin"] for r in by_ratio for t in r.values()})
    margins.append(round(margins[-1] + 1.0, 6))            # above every one seen: escalate always
    steps = []
    for target in targets:
        # n samples resolve failure rates down to 1/n: a finer target cannot be checked on them, so there the
        # ladder must end in a full recompute (exact) rather than trust a rung that happened to suffice
        exact = target > 1.0 - 1.0 / len(by_ratio) + 1e-9
        check = reuse_tokens if exact else None
        best, trusted = None, {}
        for ladder in (c for c in ladders if c[-1] >= 1.0 or not exact):
            # a threshold must hold beyond the ladder it is fitted with: the passes it would accept, at any grid
            # ratio of any sample, keep full prefill's first token in a share >= t (more failures to learn from
            # than the few a small calibration set has at the rungs)
            first_checked = ladder[0] if check is not None else None      # exact ladders have 2+ rungs
            if first_checked not in trusted:
                pairs = _accepted_pairs(by_ratio, first_checked, check)
                trusted[first_checked] = [m for m in margins if _precision(pairs, m) >= target - 1e-9]
            for min_margin in trusted[first_checked]:
                step = _replay_step(by_ratio, ladder, min_margin, check, pass_cost)
                # against the best's cost rounded to 4 places, as fits have compared from the start: it decides
                # between thresholds that tie on the set, so the shipped ladders stay reproducible
                cheaper = best is None or step["cost"] < round(best["cost"], 4) - 1e-12
                if step["agreement"] >= target - 1e-9 and cheaper:
                    best = {"target": target, **step, **({"reuse_check": True} if first_checked is not None else {})}
        if best is None or best["cost_bound"] >= 1.0:       # not surely cheaper than a plain prefill, which is exact
            best = {"target": target, "ladder": [1.0], "min_margin": 0.0, "agreement": 1.0, "mean_share": 1.0,
                    "cost": 1.0}
        cost = best.pop("cost")
        best.pop("cost_bound", None)
        steps.append({**best, **({"mean_cost": round(cost, 4)} if pass_cost else {})})
    return steps


def _replay_step(by_ratio: list[dict], ladder, min_margin: float, reuse_tokens: list[int] | None,
                 pass_cost: float) -> dict:
    """A ladder and margin replayed on the calibration samples: its agreement, mean share and mean cost."""
    stops = [ladder_stop(r, ladder, min_margin, None if reuse_tokens is None else reuse_tokens[i])
             for i, r in enumerate(by_ratio)]
    kept = [kept_at(r, ratio) for r, (ratio, _) in zip(by_ratio, stops)]
    costs = [ladder_cost(ladder, ratio, pass_cost) for ratio, _ in stops]
    mean = sum(costs) / len(costs)
    spread = math.sqrt(sum((c - mean) ** 2 for c in costs) / max(1, len(costs) - 1) / len(costs))
    return {"ladder": list(ladder), "min_margin": min_margin, "agreement": round(sum(kept) / len(kept), 4),
            "mean_share": round(sum(spent for _, spent in stops) / len(stops), 4),
            "cost": mean, "cost_bound": mean + 2 * spread}


def calibrate_auto(engine: FusionEngine, samples: list, methods: list[str], targets=AUTO_TARGETS,
                   grid=AUTO_GRID, progress: bool = True, on_sample=None, pass_cost: float | None = None) -> dict:
    """Fuse every calibration sample at every grid ratio, per method (`on_sample` gets each sample's row as it
    is done, e.g. to log it), and fit both rules of ratio auto from those rows (`fit_auto`)."""
    from .fusion import FusionInputs
    rows = []
    t0 = time.perf_counter()
    for sample in tqdm(samples, desc="calibrating ratio auto", unit="sample", disable=not progress):
        layout = engine.layout(sample.documents, sample.question)
        full_run = engine.generate_layout(layout, make_selector("fullcomp"), 1)
        full = full_run.first_logits
        reuse_token = int(engine.generate_layout(layout, make_selector("reuse"), 1).first_logits.argmax())
        pieces = [engine._entry(ids)[0] for ids in [layout.prefix, *layout.chunks] if ids]
        for method in methods:
            selector = make_selector(method, 0.15)
            scores = selector.scores(FusionInputs(engine.model.transformer, layout,
                                                  ReusedKV(pieces, len(layout.prefix))))
            found = needed_share(engine, layout, scores, full, grid, every=True)
            rows.append({"sample": sample.id, "method": method, **found, "reuse_token": reuse_token,
                         "full_seconds": round(full_run.stats["ttft_s"], 4)})
            if on_sample is not None:
                on_sample(rows[-1])
    out = fit_auto(rows, scoring_now(engine.model.transformer, methods), targets, pass_cost)
    return {"auto": out, "seconds": round(time.perf_counter() - t0, 1)}


def scoring_now(model, methods: list[str]) -> dict[str, dict]:
    """What each method's scores depend on with today's settings on `model`: recorded with a calibration, which
    holds only for the same."""
    return {m: make_selector(m, 0.15).scoring(model) for m in methods}


def fit_auto(rows: list[dict], scoring: dict[str, dict], targets=AUTO_TARGETS,
             pass_cost: float | None = None) -> dict:
    """Both rules of ratio auto (fusion/budget.py), per method in `scoring` (what its scores depend on now),
    from calibration rows (one per sample and method, as `calibrate_auto` logs them): the attention share that
    served each sample, at its t-quantile per target t (the higher neighbour: on the calibration set at least a
    share t of samples needed no more), and the margin rule's ladder and threshold per target, fitted on cost
    with `pass_cost` (None: measured from the rows' times, `pass_cost_of`)."""
    out = {}
    for method, how in scoring.items():
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            raise QcfuseError(f"no calibration rows for '{method}'")
        ordered = sorted(r["mass"] for r in mine)
        quantile = [ordered[min(len(ordered) - 1, max(0, math.ceil(t * len(ordered)) - 1))] for t in targets]
        every = [r["tried"] for r in mine if r["tried"] and all("margin" in t for t in r["tried"])]
        checked = all("reuse_token" in r and all("token" in t for t in r["tried"]) for r in mine)
        cost = pass_cost_of(mine) if pass_cost is None else pass_cost
        margin = (fit_margin_rule(every, targets, reuse_tokens=[r["reuse_token"] for r in mine] if checked else None,
                                  pass_cost=cost)
                  if len(every) == len(mine) else [])
        out[method] = {"targets": list(targets), "mass": [round(m, 6) for m in quantile], "samples": len(mine),
                       "grid": sorted({t["ratio"] for r in mine for t in r["tried"]}),
                       **({"margin": margin, "pass_cost": cost} if margin else {}),
                       **({"scoring": how} if how else {})}
    return out
