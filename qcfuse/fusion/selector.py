"""The Selector interface: which document tokens the fuse loop recomputes.

A selector answers once before layer 0 (`select`), and may narrow its answer after chosen layers
(`refine_layers` / `refine`) using what the loop just computed there: fresh and reused K/V of the active rows.
Selectors that need a probe of the query run it inside `select`, reading layers from `inputs.reused`
(which records what was read, so pipelining claims can be tested). Adding a selector never touches the loop.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..cache.kv import ChunkKV
from ..cache.loader import LayerLoader, to_device
from ..errors import QcfuseError
from ..model.transformer import Transformer
from ..prompt import PromptLayout
from .budget import AutoBudget, parse_ratio
from .probe import top_positions


class ReusedKV:
    """The reused context (prefix + chunks, pre-RoPE) as one span, read layer by layer.

    `pieces` are chunk caches (ChunkKV) or store-backed sources: anything with n_tokens, n_layers, extras
    (the small query cache, read first) and layer(l). Full layers come through a LayerLoader, which may read
    ahead in the background. Three kinds of read, each logged in `reads` as (kind, layer) so pipelining
    claims can be tested: "layer" (full K and V), "keys" (full K only), "anchors" (the prefix plus each
    chunk's anchor tokens). "keys" and "anchors" are served from the query cache when it holds them, staged on
    the compute device by `stage_query` in one transfer per chunk and tensor.
    """

    def __init__(self, pieces: list, prefix_len: int = 0, loader: LayerLoader | None = None):
        self.pieces = pieces
        self.prefix_len = prefix_len                  # leading context tokens that are never compressed
        self.starts = [0]
        for p in pieces:
            self.starts.append(self.starts[-1] + p.n_tokens)
        self.n_layers = pieces[0].n_layers if pieces else 0
        self.loader = loader if loader is not None else LayerLoader(pieces, self.n_layers, background=False)
        self.device = self.loader.device              # where compute runs; stored extras may sit on the host
        self.reads: list[tuple[str, int]] = []
        self._consumed: set[int] = set()
        self._anchors: _Staged | None = None          # staged anchor view of layers 0..A-1
        self._critical: _Staged | None = None         # staged keys of the critical layers

    @property
    def layers_read(self) -> list[int]:
        return [layer for kind, layer in self.reads if kind == "layer"]

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-RoPE keys and values of every context token at `layer`: [Hkv, C, D] each."""
        if layer not in self._consumed:
            self.reads.append(("layer", layer))
            self._consumed.add(layer)
        return self.loader.layer(layer)

    def group(self, layer: int) -> tuple[range, torch.Tensor, torch.Tensor]:
        """`layer` and the layers that arrive with it (the loader's read group): (layers, pre-RoPE K, V), K and V
        [G, Hkv, C, D], so the fuse loop places several layers of the reused context in one go."""
        span = self.loader.span(layer)
        for l in span:
            if l not in self._consumed:
                self.reads.append(("layer", l))
                self._consumed.add(l)
        return (span, *self.loader.layers(span))

    # -- the query cache ----------------------------------------------------------------------------------
    def stage_query(self, anchor_layers: int, anchor_ratio: float, critical: list[int],
                    name: str = "anchor_rank") -> None:
        """Move what a compressed-view selection reads to the compute device, before any full layer: every
        prefix token and each chunk's first ceil(anchor_ratio*n) anchors for layers 0..anchor_layers-1, and the
        full keys of the `critical` layers. One asynchronous copy per chunk and tensor (all layers at once), on
        the loader's stream, so it travels ahead of the layers the loader streams after it. Idempotent."""
        wanted = (anchor_layers, anchor_ratio, tuple(critical), name)
        if self._anchors is not None and self._anchors.key == wanted:
            return
        with self._copy_stream():
            self._anchors = self._stage_anchors(anchor_layers, anchor_ratio, name)
            self._critical = self._stage_critical(critical)
        self._anchors.key = wanted
        for staged in (self._anchors, self._critical):
            if staged is not None:
                staged.handoff(self.loader.stream)

    def _stage_anchors(self, n_layers: int, ratio: float, name: str) -> _Staged:
        positions, ks, vs = [], [], []
        for piece, start in zip(self.pieces, self.starts):
            extras = piece.extras
            m = max(1, math.ceil(ratio * piece.n_tokens))
            stored = extras.get("anchor_k")
            if start < self.prefix_len or name not in extras:          # every token: the prefix
                pairs = [piece.layer(layer) for layer in range(n_layers)]
                k, v = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
                pos = torch.arange(piece.n_tokens, dtype=torch.int32).expand(n_layers, -1)
            elif stored is not None and stored.shape[2] >= m:    # the stored anchors, in rank order:
                pos = extras.get("anchor_pos", extras[name])[:n_layers, :m]    # any smaller share is a prefix
                k, v = stored[:n_layers, :, :m], extras["anchor_v"][:n_layers, :, :m]
            else:                    # more anchors than stored: the top m by rank, gathered from full layers
                pos = extras[name][:n_layers, :m]
                pairs = [piece.layer(layer) for layer in range(n_layers)]
                k = torch.stack([p[0][:, pos[layer].long()] for layer, p in enumerate(pairs)])
                v = torch.stack([p[1][:, pos[layer].long()] for layer, p in enumerate(pairs)])
            positions.append(pos)
            ks.append(k)
            vs.append(v)
        pos = [p.long() + start for p, start in zip(to_device(positions, self.device), self.starts)]
        return _Staged(torch.cat(pos, dim=1), torch.cat(to_device(ks, self.device), dim=2),
                       torch.cat(to_device(vs, self.device), dim=2))

    def _stage_critical(self, layers: list[int]) -> _Staged | None:
        """Keys of the critical layers for the whole context: [|C|, Hkv, C, D], None unless every piece
        stores them all."""
        if not layers:
            return None
        parts = []
        for piece in self.pieces:
            extras = piece.extras
            if "critical_k" not in extras:
                return None
            stored = extras["critical_layers"].tolist()
            if not set(layers) <= set(stored):
                return None
            ck = extras["critical_k"]
            parts.append(ck if stored == list(layers) else ck[[stored.index(layer) for layer in layers]])
        staged = _Staged(None, torch.cat(to_device(parts, self.device), dim=2), None)
        staged.index = {layer: i for i, layer in enumerate(layers)}
        return staged

    @contextlib.contextmanager
    def _copy_stream(self):
        if self.loader.stream is None:
            yield
            return
        with torch.cuda.stream(self.loader.stream):
            yield

    def keys(self, layer: int) -> torch.Tensor:
        """Pre-RoPE keys of every context token at `layer` (no values): [Hkv, C, D]."""
        if layer in self._consumed:
            return self.loader.layer(layer)[0]
        self.reads.append(("keys", layer))
        if self._critical is not None and layer in self._critical.index:
            return self._critical.ready().k[self._critical.index[layer]]
        stored = [_critical_keys(p.extras, layer) for p in self.pieces]
        if all(k is not None for k in stored):
            return torch.cat(to_device(stored, self.device), dim=1)
        return self.loader.layer(layer)[0]

    def anchors(self, layer: int, ratio: float, name: str = "anchor_rank"):
        """A compressed view at `layer`: every prefix token plus, per chunk, its first ceil(ratio*n) tokens in
        the chunk's stored anchor ranking. Returns (positions [m], pre-RoPE k [Hkv, m, D], v), in no particular
        order (attention does not care; the positions say where each key sits)."""
        staged = self._staged_anchors(layer + 1, ratio, name)
        self.reads.append(("anchors", layer))
        return staged.pos[layer], staged.k[layer], staged.v[layer]

    def anchors_upto(self, n_layers: int, ratio: float, name: str = "anchor_rank"):
        """The compressed views of layers 0..n_layers-1 at once: (positions [A, m], k [A, Hkv, m, D], v)."""
        staged = self._staged_anchors(n_layers, ratio, name)
        self.reads += [("anchors", layer) for layer in range(n_layers)]
        return staged.pos[:n_layers], staged.k[:n_layers], staged.v[:n_layers]

    def _staged_anchors(self, n_layers: int, ratio: float, name: str) -> _Staged:
        staged = self._anchors
        if staged is None or (staged.key[1], staged.key[3]) != (ratio, name) or n_layers > staged.key[0]:
            critical = list(staged.key[2]) if staged is not None else []
            self.stage_query(self.n_layers, ratio, critical, name)      # read directly: stage every layer
            staged = self._anchors
        return staged.ready()


class _Staged:
    """Tensors staged on the compute device by the loader's stream; `ready()` makes the compute stream wait
    for them (once) without the host waiting."""

    def __init__(self, pos, k, v):
        self.pos, self.k, self.v = pos, k, v
        self.key, self.index, self._event = None, {}, None

    def handoff(self, stream) -> None:
        if stream is not None:
            self._event = torch.cuda.Event()
            self._event.record(stream)

    def ready(self) -> _Staged:
        if self._event is not None:
            compute = torch.cuda.current_stream()
            compute.wait_event(self._event)
            for t in (self.pos, self.k, self.v):
                if t is not None and t.is_cuda:
                    t.record_stream(compute)
            self._event = None
        return self


def _critical_keys(extras: dict, layer: int) -> torch.Tensor | None:
    if "critical_k" not in extras:
        return None
    where = (extras["critical_layers"] == layer).nonzero()
    return extras["critical_k"][int(where[0])] if where.numel() else None


@dataclass
class FusionInputs:
    model: Transformer
    layout: PromptLayout
    reused: ReusedKV
    attempt: int = 0          # ratio auto's margin rule: 0 on the first pass, 1 after one escalation, ...


@dataclass
class LayerView:
    """What the loop computed at one layer, for the rows still active."""
    layer: int
    rows: torch.Tensor        # [n] absolute positions (document rows first, then the suffix)
    n_doc_rows: int           # rows[:n_doc_rows] are document tokens
    k_fresh: torch.Tensor     # [Hkv, n, D] pre-RoPE
    v_fresh: torch.Tensor
    k_reused: torch.Tensor    # [Hkv, n_doc_rows, D] the cached values for the document rows
    v_reused: torch.Tensor
    hidden: torch.Tensor      # [n, E] the rows' output of this layer


class Selector:
    name: ClassVar[str]
    uses_cache: ClassVar[bool] = True          # False: plain prefill of everything, nothing read from the store
    query_aware: ClassVar[bool] = False        # True: scores tokens by the question's attention (ratio auto works)
    refine_layers: tuple[int, ...] = ()

    def __init__(self, ratio: float | str = 0.15):
        fixed, target = parse_ratio(ratio)
        self.auto: AutoBudget | None = None
        if target is not None:
            if not self.query_aware:
                raise QcfuseError(f"ratio auto needs a query-aware method (qcfuse, prophetkv, fuserag); "
                                  f"'{self.name}' has no per-token question scores to size its budget from")
            self.auto = AutoBudget(target)
        # a number, or "auto:TARGET" (the share each request recomputed is in its stats)
        self.ratio: float | str = fixed if target is None else f"auto:{target:g}"

    def budget(self, layout: PromptLayout) -> int:
        """How many document tokens to recompute: the ratio always means a share of the document tokens."""
        if self.auto is not None:
            raise QcfuseError(f"{self.name}: ratio auto sizes the budget from scores (use `top`)")
        return int(round(self.ratio * layout.n_doc_tokens))

    def top(self, scores: torch.Tensor, inputs: FusionInputs) -> torch.Tensor:
        """The document positions to recompute, given a score per document token: the top `budget`, or
        with ratio auto as many as its rule says for this pass (fusion/budget.py)."""
        layout = inputs.layout
        if self.auto is None:
            return top_positions(scores, layout.doc_positions(), self.budget(layout))
        count = self.auto.count(scores, self.auto_table(inputs.model), inputs.attempt)
        return top_positions(scores, layout.doc_positions(), count)

    def auto_table(self, model) -> dict:
        """Ratio auto's calibration of this method on `model` (a clear error when there is none that holds)."""
        return self.auto.table(getattr(model, "auto_calibration", None), self.name, self.scoring(model))

    def auto_rule(self, model) -> str | None:
        """Which rule of ratio auto sizes this selector's budget on `model` (None at a fixed ratio)."""
        return None if self.auto is None else self.auto.rule_for(self.auto_table(model))

    def settled(self, model, logits: torch.Tensor | None, attempt: int, reuse_token=None) -> bool:
        """After pass `attempt`: whether the request is done (ratio auto's margin rule may ask for another
        pass with more tokens; a fixed ratio never does). reuse_token: a call that gives plain reuse's first
        token, for the margin rule's reuse check."""
        return self.auto is None or self.auto.settled(logits, self.auto_table(model), attempt, reuse_token)

    def recomputes_everything(self, model, attempt: int) -> bool:
        """Ratio auto's rule asks for every document token on pass `attempt`: the engine runs that pass as a
        plain full prefill, which reads and places no chunk cache (a fixed ratio of 1.0 still runs the fuse
        loop, as the exactness tests want)."""
        return self.auto is not None and self.auto.everything(self.auto_table(model), attempt)

    def checks_reuse(self, model) -> bool:
        """Whether ratio auto's margin rule checks a first pass against plain reuse's first token on `model`."""
        return self.auto is not None and self.auto.checks_reuse(self.auto_table(model))

    def scoring(self, model) -> dict:
        """What this method's scores depend on besides its name and the prompt: ratio auto's calibration,
        which records it, holds only for the same (default: nothing)."""
        return {}

    @classmethod
    def offline(cls, model, ids: list[int], entry: ChunkKV) -> None:
        """Add this method's small per-chunk data to `entry.extras` when a chunk is prepared (default: none)."""

    def stage(self, inputs: FusionInputs) -> None:
        """Start the small reads `select` will need (e.g. the query cache) before the full layers start
        streaming behind them (default: none)."""

    def select(self, inputs: FusionInputs) -> torch.Tensor:
        """Absolute positions of the document tokens to recompute from layer 0 (the suffix always is).
        Query-aware selectors implement `scores` instead and keep the top."""
        if self.query_aware:
            return self.top(self.scores(inputs), inputs)
        raise NotImplementedError

    def scores(self, inputs: FusionInputs) -> torch.Tensor:
        """Query-aware selectors: one score per document token (summing to 1), in document order."""
        raise NotImplementedError

    def refine(self, view: LayerView) -> torch.Tensor:
        """Positions (a subset of the active document rows) that stay active after `view.layer`."""
        return view.rows[: view.n_doc_rows]


SELECTORS: dict[str, type[Selector]] = {}
DEFAULT_METHOD, DEFAULT_RATIO = "qcfuse", 0.15     # the CLI, the Python API and the server, when none is named


def register(cls: type[Selector]) -> type[Selector]:
    SELECTORS[cls.name] = cls
    return cls


def make_selector(name: str, ratio: float | str = DEFAULT_RATIO, **options) -> Selector:
    """A selector by name; ratio is a share in [0, 1] or "auto[:TARGET]" (then options may bound it with
    max_ratio and min_ratio, name its rule with auto_rule: margin or mass, and turn the margin rule's reuse
    check on or off with reuse_check)."""
    if name not in SELECTORS:
        raise QcfuseError(f"unknown method '{name}' (choose from: {', '.join(sorted(SELECTORS))})")
    bounds = {key: options.pop(key) for key in ("max_ratio", "min_ratio", "auto_rule", "reuse_check") if key in options}
    try:
        selector = SELECTORS[name](ratio=ratio, **options)
    except TypeError as exc:          # an option this method does not have
        raise QcfuseError(f"bad option for method '{name}': {exc}") from None
    if bounds:
        if selector.auto is None:
            raise QcfuseError(f"{', '.join(bounds)} appl{'ies' if len(bounds) == 1 else 'y'} to ratio auto only")
        rule = bounds.pop("auto_rule", None)
        check = bounds.pop("reuse_check", None)
        if check is not None:
            check = {"true": True, "1": True, "false": False, "0": False}.get(str(check).lower(), check)
        try:
            selector.auto = AutoBudget(selector.auto.target, **{k: float(v) for k, v in bounds.items()},
                                       rule=None if rule is None else str(rule), reuse_check=check)
        except (TypeError, ValueError):
            raise QcfuseError(f"max_ratio and min_ratio must be numbers, got {bounds}") from None
    return selector
