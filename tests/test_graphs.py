"""QCFuse's question pass as a replayed graph (fusion/graphs.py), proved on the CPU with a test double.

The double 'captures' by running the pass once under a guard that fails on what a CUDA graph cannot hold
(a read back to the host, a tensor made from host data), and 'replays' by running the captured function
again on the captured input buffers, writing into the captured output. So a pass that read anything but
its inputs (say, the capturing request's own suffix) would give the capturing request's scores on replay,
and the tests below would see it. Capture on a real GPU is checked by scripts/selection_breakdown.py (graph
against eager pass) and by `qcfuse bench` (its record counts captures, replays and failures).
"""
import logging
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from needle import QUESTION, needle_documents
from qcfuse.fusion import FusionInputs, ReusedKV, make_selector
from qcfuse.fusion import graphs
from qcfuse.fusion import qcfuse as qcfuse_mod
from qcfuse.prompt import PromptLayout

aten = torch.ops.aten
HOST_TRAFFIC = {aten._local_scalar_dense.default, aten.lift_fresh.default, aten.lift_fresh_copy.default,
                aten._pin_memory.default, aten.is_pinned.default, aten.nonzero.default}


class NoHostTraffic(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_TRAFFIC:
            raise AssertionError(f"{func} cannot be captured in a CUDA graph")
        return func(*args, **(kwargs or {}))


class RerunGraphs:
    def __init__(self):
        self.captures = 0

    def capture(self, fn, static):
        self.captures += 1
        with NoHostTraffic():
            out = fn(**static)

        def replay():
            out.copy_(fn(**static))
            return out
        return replay


class FailingGraphs:
    def capture(self, fn, static):
        raise RuntimeError("operation not permitted when stream is capturing")


@pytest.fixture
def backend(monkeypatch, smollm2):
    """Graphs on the CPU through the double, a fresh cache for the model, and no failure left over."""
    double = RerunGraphs()
    monkeypatch.setitem(graphs.BACKENDS, "cpu", double)
    monkeypatch.setattr(graphs, "FAILURES", [])
    monkeypatch.delenv("QCFUSE_GRAPHS", raising=False)
    graphs._caches.pop(smollm2.transformer, None)
    yield double
    graphs._caches.pop(smollm2.transformer, None)


@pytest.fixture(scope="module")
def layouts(smollm2_engine):
    """a and b: one shape, other content (each chunk rotated by a few tokens); six: a sixth chunk, 108 tokens
    more, which pads to the same bucket (602 and 710 context tokens -> 768); seven: a bucket of its own."""
    a = smollm2_engine.layout(needle_documents(), QUESTION)
    b = PromptLayout(a.prefix, [c[7:] + c[:7] for c in a.chunks], a.suffix, a.question)
    six, seven = (smollm2_engine.layout(needle_documents(n_chunks=n), QUESTION) for n in (6, 7))
    return {"a": a, "b": b, "six": six, "seven": seven}


def _scores(smollm2, smollm2_engine, layout, **options):
    pieces = [smollm2_engine._entry(ids)[0] for ids in [layout.prefix, *layout.chunks]]
    reused = ReusedKV(pieces, prefix_len=len(layout.prefix))
    return make_selector("qcfuse", 0.15, **options).scores(FusionInputs(smollm2.transformer, layout, reused))


def _without_graphs(fn, *args, **kwargs):
    """fn run with graphs switched off as a user would (QCFUSE_GRAPHS=0): the exact, unpadded pass."""
    saved = os.environ.get("QCFUSE_GRAPHS")
    os.environ["QCFUSE_GRAPHS"] = "0"
    try:
        return fn(*args, **kwargs)
    finally:
        os.environ.pop("QCFUSE_GRAPHS")
        if saved is not None:
            os.environ["QCFUSE_GRAPHS"] = saved


def test_prompts_that_pad_to_one_shape_share_a_graph_and_replay_exactly(smollm2, smollm2_engine, layouts, backend):
    model = smollm2.transformer
    padded = {}                          # each prompt's padded pass, run eagerly: its first sight in a fresh cache
    for name, layout in layouts.items():
        graphs._caches.pop(model, None)
        padded[name] = _scores(smollm2, smollm2_engine, layout)
    graphs._caches.pop(model, None)
    assert not torch.equal(padded["a"], padded["b"])      # same shape, other content: other scores
    runs = [("a", "eager"), ("b", "capture"), ("six", "replay"), ("a", "replay"), ("seven", "eager"),
            ("b", "replay")]
    for i, (name, how) in enumerate(runs):
        got = _scores(smollm2, smollm2_engine, layouts[name])
        assert got.shape == (layouts[name].n_doc_tokens,)
        assert torch.equal(got, padded[name]), (i, name, how)
        assert graphs.counts(model)[how] == sum(1 for _, h in runs[:i + 1] if h == how)
    assert backend.captures == 1
    # the replayed scores are the caller's own: a later replay does not change them
    first = _scores(smollm2, smollm2_engine, layouts["b"])
    _scores(smollm2, smollm2_engine, layouts["six"])
    assert torch.equal(first, padded["b"])


@pytest.mark.parametrize("options", [{}, {"query_rows": "question"}, {"query_rows": "last"},
                                     {"query_rows": "suffix+last", "reduction": "max", "head_norm": True}])
def test_the_padded_pass_scores_as_the_unpadded_one(smollm2, smollm2_engine, layouts, backend, options):
    """Filler rows score nothing and filler keys are hidden: the padded pass's scores are the unpadded pass's
    up to float rounding (the sums run over more terms), and pick the same tokens."""
    for name in ("a", "six"):
        layout = layouts[name]
        exact = _without_graphs(_scores, smollm2, smollm2_engine, layout, **options)
        for _ in range(3):                                # eager, capture, replay: all padded
            got = _scores(smollm2, smollm2_engine, layout, **options)
            assert torch.allclose(got, exact, rtol=1e-4, atol=1e-8), (got - exact).abs().max()
            k = round(0.15 * layout.n_doc_tokens)
            same = set(got.topk(k).indices.tolist()) & set(exact.topk(k).indices.tolist())
            assert len(same) >= k - 1
    assert graphs.counts(smollm2.transformer)["replay"] >= 2


def test_a_graphed_request_decodes_what_the_eager_padded_one_does(smollm2, smollm2_engine, layouts, backend):
    from prometheus_client import generate_latest
    from qcfuse.serve.metrics import ServerMetrics
    layout, metrics = layouts["a"], ServerMetrics()
    requests = [smollm2_engine.prefill(layout, make_selector("qcfuse", 0.15), 1) for _ in range(3)]
    runs = [out for out, _ in requests]
    for out in runs[1:]:                                  # capture, replay against the first (eager) request
        assert torch.equal(out.logits, runs[0].logits) and torch.equal(out.recomputed, runs[0].recomputed)
    assert graphs.counts(smollm2.transformer) == {"eager": 1, "capture": 1, "replay": 1}
    # each request's stats say how its pass ran, and the server's metrics count them
    assert [stats["question_graph"] for _, stats in requests] == [{"eager": 1}, {"capture": 1}, {"replay": 1}]
    for _, stats in requests + [smollm2_engine.prefill(layout, make_selector("qcfuse", 0.15), 1)]:
        metrics.observe(stats)
    text = generate_latest(metrics.registry).decode()
    assert 'qcfuse_question_graph_runs_total{how="replay"} 2.0' in text
    assert 'qcfuse_question_graph_runs_total{how="eager"} 1.0' in text
    assert smollm2_engine.prefill(layout, make_selector("prophetkv", 0.15), 1)[1]["question_graph"] == {}
    exact, _ = _without_graphs(smollm2_engine.prefill, layout, make_selector("qcfuse", 0.15), 1)
    assert len(set(exact.recomputed.tolist()) & set(runs[0].recomputed.tolist())) >= exact.recomputed.numel() - 1


def test_buckets_are_at_most_an_eighth_above_and_few():
    for n in range(1, 70000, 7):
        for step in (16, 64, 256):
            b = graphs.bucket(n, step)
            assert n <= b <= max(n + step - 1, n * 1.125) and b % step == 0
    assert len({graphs.bucket(n, 256) for n in range(4097, 8193)}) == 8          # (4096, 8192]: eight sizes
    assert graphs.bucket(602, 256) == graphs.bucket(710, 256) == 768


def test_the_guard_catches_what_a_graph_cannot_hold():
    x = torch.ones(3)
    for bad in (lambda: x.sum().item(), lambda: torch.tensor([1, 2]) + x[:2], lambda: x.nonzero()):
        with pytest.raises(AssertionError, match="cannot be captured"), NoHostTraffic():
            bad()


def test_a_failed_capture_falls_back_to_eager_for_good(smollm2, smollm2_engine, layouts, backend, monkeypatch,
                                                       caplog):
    monkeypatch.setitem(graphs.BACKENDS, "cpu", FailingGraphs())
    padded = _scores(smollm2, smollm2_engine, layouts["a"])          # first sight: eager, padded
    exact = _without_graphs(_scores, smollm2, smollm2_engine, layouts["a"])
    with caplog.at_level(logging.WARNING, logger="qcfuse.graphs"):
        # the capture fails: this request runs its padded pass eagerly, later ones the exact pass
        assert torch.equal(_scores(smollm2, smollm2_engine, layouts["a"]), padded)
        for _ in range(2):
            assert torch.equal(_scores(smollm2, smollm2_engine, layouts["a"]), exact)
    assert len(graphs.FAILURES) == 1 and "not permitted" in graphs.FAILURES[0]
    assert sum("running it eagerly" in r.message for r in caplog.records) == 1
    assert not graphs.enabled(torch.device("cpu"))


def test_graphs_off_by_environment_and_off_for_the_value_weighted_study(smollm2, smollm2_engine, layouts, backend,
                                                                        monkeypatch):
    monkeypatch.setenv("QCFUSE_GRAPHS", "0")
    for _ in range(2):
        _scores(smollm2, smollm2_engine, layouts["a"])
    monkeypatch.delenv("QCFUSE_GRAPHS")
    for _ in range(2):
        _scores(smollm2, smollm2_engine, layouts["a"], value_weight=True)
    assert graphs.counts(smollm2.transformer) == {} and backend.captures == 0


def test_the_least_recently_used_shape_goes_first():
    cache = graphs.GraphCache(RerunGraphs(), max_graphs=2)
    double = lambda x: 2 * x                              # noqa: E731
    shapes = [torch.ones(n) for n in (1, 2, 3)]
    for x in shapes[:2] * 2:                              # seen, then captured: two graphs
        cache.run(("k",), double, {"x": x})
    cache.run(("k",), double, {"x": shapes[0]})            # shape 1 used last
    for _ in range(2):
        cache.run(("k",), double, {"x": shapes[2]})        # a third graph: shape 2 goes
    assert [key[1][0][1] for key in cache.graphs] == [(1,), (3,)]
    assert torch.equal(cache.run(("k",), double, {"x": 3 * shapes[2]}), 6 * shapes[2])


def test_the_environment_sets_how_many_shapes_are_kept(smollm2, smollm2_engine, layouts, backend, monkeypatch,
                                                       caplog):
    monkeypatch.setenv("QCFUSE_GRAPHS", "1")          # "1" means on, with the default number of shapes
    assert graphs._setting() == graphs.MAX_GRAPHS
    monkeypatch.setenv("QCFUSE_GRAPHS", "2")
    for name in ("a", "seven", "a", "seven"):
        _scores(smollm2, smollm2_engine, layouts[name])
    assert graphs.stats(smollm2.transformer)["shapes_kept"] == 2
    monkeypatch.setenv("QCFUSE_GRAPHS", "lots")
    with caplog.at_level(logging.WARNING, logger="qcfuse.graphs"):
        assert graphs._setting() == graphs.MAX_GRAPHS
    assert "not a number" in caplog.text


def test_a_capture_neither_reads_nor_leaves_ropes_remembered_angles(smollm2, smollm2_engine, layouts, backend,
                                                                    monkeypatch):
    """RoPE's angle memo is set aside around the pass: a graph must not bake in angles eager code computed, nor
    leave the angles it computed (memory the graph owns) for eager code."""
    rope = smollm2.transformer.spec.layers[0].rope
    inside, around = [], []
    run, replayed = graphs.GraphCache._run, graphs.replayed

    def spy_run(self, *args):
        inside.append(len(rope._recent))
        return run(self, *args)

    def spy_replayed(*args):
        before = list(rope._recent)
        out = replayed(*args)
        around.append(len(before) > 0 and len(rope._recent) == len(before)
                      and all(a is b for a, b in zip(before, rope._recent)))
        return out
    monkeypatch.setattr(graphs.GraphCache, "_run", spy_run)
    monkeypatch.setattr(qcfuse_mod.graphs, "replayed", spy_replayed)
    for _ in range(3):                                       # eager, capture, replay
        _scores(smollm2, smollm2_engine, layouts["a"])
    assert inside == [0, 0, 0] and around == [True, True, True]
