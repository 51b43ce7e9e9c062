"""`--ratio auto`: a per-request budget, the least recompute that keeps full prefill's first token.

Two rules, both calibrated by `qcfuse calibrate` on samples kept out of what is reported:

- "margin" (the default where calibrated): fuse with the top-scored share of a short ladder of ratios, e.g.
  0.02; accept when the fused first token leads the runner-up by at least a calibrated log-probability margin,
  otherwise fuse again at the next rung (the last rung is always accepted). A confident fused answer is rarely
  a wrong one, and how hard a request is shows only in its own result, so easy requests stop at a tiny share
  and hard ones pay more. Every pass is counted in what the request spent (`recomputed_total_share`).
  Where the calibration turns on its reuse check (targets it cannot resolve, whose ladders end in a full
  recompute), a first pass is accepted only if its first token is also plain reuse's: a first pass recomputes
  so little that overturning reuse's answer is a sign it is unsure, whatever its margin. Reuse's token comes
  with the first pass: its suffix rows run once more per layer over the reused K/V (fusion/fuse.py,
  with_reuse), with no second read of the chunk caches.
- "mass": recompute the smallest set of top-scored tokens that holds a calibrated share of the question's
  attention (the scores sum to 1): the per-sample share that kept the first token, at its t-quantile over the
  calibration set. One pass, but the share a task needs varies by task more than by request.

Both are bounded by [min_ratio, max_ratio] of the document tokens. A pass that recomputes every document token
(`everything`) runs as plain full prefill: the engine reads no chunk cache for it.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import QcfuseError

AUTO = "auto"
DEFAULT_TARGET = 0.99
DEFAULT_MAX_RATIO = 1.0
RULES = ("margin", "mass")


def parse_ratio(ratio) -> tuple[float | None, float | None]:
    """A ratio spec: a number in [0, 1], or "auto" / "auto:TARGET". Returns (fixed ratio, auto target)."""
    if isinstance(ratio, str):
        text = ratio.strip().lower()
        if text == AUTO or text.startswith(AUTO + ":"):
            target = text[len(AUTO) + 1:] or None
            try:
                value = DEFAULT_TARGET if target is None else float(target)
            except ValueError:
                raise QcfuseError(f"bad ratio '{ratio}': the auto target must be a number, e.g. auto:0.99") from None
            if not 0.0 < value < 1.0:
                raise QcfuseError(f"the auto target must be within (0, 1), got {value:g}")
            return None, value
        try:
            ratio = float(text)
        except ValueError:
            raise QcfuseError(f"ratio must be a number within [0, 1] or 'auto', got '{ratio}'") from None
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        raise QcfuseError(f"ratio must be a number within [0, 1] or 'auto', got {ratio!r}")
    if not 0.0 <= float(ratio) <= 1.0:
        raise QcfuseError(f"ratio must be within [0, 1], got {ratio}")
    return float(ratio), None


def ratio_spec(ratio: str | float, target: float | None = None) -> float | str:
    """What --ratio and --target on a command line mean together: a number, or "auto:TARGET"."""
    fixed, auto_target = parse_ratio(ratio)
    if target is not None:
        if fixed is not None:
            raise QcfuseError("--target applies to --ratio auto only")
        fixed, auto_target = parse_ratio(f"{AUTO}:{target}")
    return fixed if auto_target is None else f"{AUTO}:{auto_target:g}"


def ratio_label(ratio: float | str | None) -> str:
    """How runs are named: 0.15 -> '0.15', auto at 0.99 -> 'auto0.99'."""
    if ratio is None:
        return "-"
    fixed, target = parse_ratio(ratio)
    return f"{fixed:g}" if target is None else f"auto{target:g}"


@dataclass
class AutoBudget:
    target: float = DEFAULT_TARGET
    max_ratio: float = DEFAULT_MAX_RATIO
    min_ratio: float = 0.0
    rule: str | None = None          # None: "margin" where the model's calibration has it, else "mass"
    reuse_check: bool | None = None  # the margin rule's reuse check; None: as calibrated for the target

    def __post_init__(self):
        if not 0.0 <= self.min_ratio <= self.max_ratio <= 1.0:
            raise QcfuseError(f"need 0 <= min_ratio <= max_ratio <= 1, got {self.min_ratio:g} and {self.max_ratio:g}")
        if self.rule is not None and self.rule not in RULES:
            raise QcfuseError(f"unknown auto rule '{self.rule}' (choose from: {', '.join(RULES)})")
        if self.reuse_check is not None and not isinstance(self.reuse_check, bool):
            raise QcfuseError(f"reuse_check must be true or false, got {self.reuse_check!r}")

    def table(self, calibration: dict | None, selector: str, scoring: dict | None = None) -> dict:
        """This selector's calibration. `scoring`: how the selector scores now; a calibration that recorded
        other settings does not apply."""
        table = (calibration or {}).get(selector)
        if not table:
            raise QcfuseError(f"ratio auto: no calibration of '{selector}' for this model (run `qcfuse calibrate "
                              f"--model ... --methods {selector}` once; it is stored with the model)")
        recorded = table.get("scoring") or {}
        changed = sorted(k for k in recorded if k in (scoring or {}) and recorded[k] != scoring[k])
        if changed:
            raise QcfuseError(f"ratio auto: '{selector}' was calibrated with "
                              + ", ".join(f"{k}={recorded[k]}" for k in changed) + ", and scores now with "
                              + ", ".join(f"{k}={scoring[k]}" for k in changed)
                              + f" (use those settings, or run `qcfuse calibrate --model ... --methods {selector}` "
                              "with the new ones)")
        return table

    def rule_for(self, table: dict) -> str:
        if self.rule == "margin" and not table.get("margin"):
            raise QcfuseError("ratio auto: the margin rule has no calibration for this model and method (run "
                              "`qcfuse calibrate`, or use rule mass)")
        return self.rule or ("margin" if table.get("margin") else "mass")

    def count(self, scores: torch.Tensor, table: dict, attempt: int = 0) -> int:
        """How many top-scored tokens this pass recomputes (attempt: 0 for the first pass, 1 after one
        escalation, ...)."""
        if self.rule_for(table) == "mass":
            return self.tokens(scores, self.mass_for(table))
        ladder = self.ladder(table)
        n = scores.numel()
        return clamp_count(round(ladder[min(attempt, len(ladder) - 1)] * n), n, self.min_ratio, self.max_ratio)

    def everything(self, table: dict, attempt: int) -> bool:
        """Whether the pass numbered `attempt` recomputes every document token, whatever the scores: a margin
        ladder's last rung of 1.0, or a calibrated attention share of 1.0 (a calibration sample kept its first
        token at no grid ratio)."""
        if self.min_ratio >= 1.0:
            return True
        if self.rule_for(table) == "mass":
            return self.max_ratio >= 1.0 and self.mass_for(table) >= 1.0
        ladder = self.ladder(table)
        return ladder[min(attempt, len(ladder) - 1)] >= 1.0

    def settled(self, logits: torch.Tensor | None, table: dict, attempt: int,
                reuse_token: Callable[[], int] | None = None) -> bool:
        """Whether the pass numbered `attempt` is the request's last: always for the mass rule; for the margin
        rule when its first token leads by the calibrated margin (and, on a first pass where the calibration
        checks reuse, is reuse's first token as well), or no rung is left. reuse_token: computes reuse's first
        token when called (called at most once here, only when it decides)."""
        if self.rule_for(table) == "mass" or logits is None or attempt + 1 >= len(self.ladder(table)):
            return True
        step = self.margin_step(table)
        if first_token_margin(logits) < step["min_margin"]:
            return False
        if attempt == 0 and self.checks_reuse(table) and reuse_token is not None:
            return int(logits.argmax()) == reuse_token()
        return True

    def checks_reuse(self, table: dict) -> bool:
        """Whether a first pass must also agree with plain reuse's first token (the margin rule only; off by
        choice saves the suffix rows' second run through the layers, at the agreement the calibration had
        without it)."""
        if self.rule_for(table) != "margin":
            return False
        return bool(self.margin_step(table).get("reuse_check")) if self.reuse_check is None else self.reuse_check

    def margin_step(self, table: dict) -> dict:
        """The margin rule's calibration for this target: the lowest calibrated target at or above it
        (conservative: no interpolation between thresholds)."""
        steps = sorted(table["margin"], key=lambda s: s["target"])
        for step in steps:
            if step["target"] >= self.target - 1e-9:
                return step
        raise QcfuseError(f"ratio auto: target {self.target:g} is above the margin rule's calibrated targets "
                          f"(up to {steps[-1]['target']:g})")

    def ladder(self, table: dict) -> list[float]:
        """The rungs for this target, within [min_ratio, max_ratio] (rungs the bounds make equal merge)."""
        rungs = [min(max(r, self.min_ratio), self.max_ratio) for r in self.margin_step(table)["ladder"]]
        return sorted(set(rungs))

    def mass_for(self, table: dict) -> float:
        """The mass rule's calibrated attention share for this target (linear between calibrated targets)."""
        targets, masses = table["targets"], table["mass"]
        if not targets[0] <= self.target <= targets[-1]:
            raise QcfuseError(f"ratio auto: target {self.target:g} is outside the calibrated range "
                              f"{targets[0]:g}..{targets[-1]:g}")
        for (t0, m0), (t1, m1) in zip(zip(targets, masses), zip(targets[1:], masses[1:])):
            if t0 <= self.target <= t1:
                return m0 if t1 == t0 else m0 + (m1 - m0) * (self.target - t0) / (t1 - t0)
        return masses[-1]

    def tokens(self, scores: torch.Tensor, mass: float) -> int:
        """How many top-scored tokens hold `mass` of the scores' total, within the ratio bounds."""
        n = scores.numel()
        if n == 0:
            return 0
        return clamp_count(tokens_for_mass(scores, mass), n, self.min_ratio, self.max_ratio)


def first_token_margin(logits: torch.Tensor) -> float:
    """How far the top first token leads the runner-up, in log-probability (nats)."""
    top = logits.float().log_softmax(-1).topk(2).values
    return float(top[0] - top[1])


def tokens_for_mass(scores: torch.Tensor, mass: float) -> int:
    """The smallest k whose top-k scores hold `mass` of the total (one read of a scalar from the device)."""
    ordered = scores.float().sort(descending=True).values.cumsum(0)
    return int((ordered < mass * ordered[-1]).sum()) + 1 if mass > 0 else 0


def mass_of_top(scores: torch.Tensor, k: int) -> float:
    """The share of the scores' total held by the top k (what calibration records per sample)."""
    ordered = scores.float().sort(descending=True).values
    total = float(ordered.sum())
    return float(ordered[:k].sum()) / total if total > 0 else 1.0


def clamp_count(k: int, n: int, min_ratio: float, max_ratio: float) -> int:
    return max(math.ceil(min_ratio * n - 1e-9), min(k, math.floor(max_ratio * n + 1e-9), n))
