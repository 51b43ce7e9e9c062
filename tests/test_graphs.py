"""QCFuse's question pass as a replayed graph (fusion/graphs.py), proved on the CPU with a test double.

The double 'captures' by running the pass once under a guard that fails on what a CUDA graph cannot hold
(a read back to the host, a tensor made from host data), and 'replays' by running the captured function
again on the captured input buffers, writing into the captured output. So a pass that read anything but
its inputs (say, the capturing request's own suffix) would give the capturing request's scores on replay,
and the tests below would see it. Capture on a real GPU is checked by scripts/gpu_check.sh.
"""
import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from needle import QUESTION, needle_documents
from qcfuse.fusion import FusionInputs, ReusedKV, make_selector
from qcfuse.fusion import graphs
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
    """Two prompts of one shape and different content (each chunk rotated by a few tokens), and one longer."""
    a = smollm2_engine.layout(needle_documents(), QUESTION)
    b = PromptLayout(a.prefix, [c[7:] + c[:7] for c in a.chunks], a.suffix, a.question)
    longer = smollm2_engine.layout(needle_documents(n_chunks=6), QUESTION)
    return a, b, longer


def _scores(smollm2, smollm2_engine, layout, **options):
    pieces = [smollm2_engine._entry(ids)[0] for ids in [layout.prefix, *layout.chunks]]
    reused = ReusedKV(pieces, prefix_len=len(layout.prefix))
    return make_selector("qcfuse", 0.15, **options).scores(FusionInputs(smollm2.transformer, layout, reused))


def test_the_question_pass_is_captured_on_a_shapes_second_request_and_replayed_exactly(smollm2, smollm2_engine,
                                                                                     layouts, backend):
    eager = {}
    for name, layout in zip("abl", layouts):
        graphs.FAILURES.append("off")                    # the reference: no graph at all
        eager[name] = _scores(smollm2, smollm2_engine, layout)
        graphs.FAILURES.clear()
    assert not torch.equal(eager["a"], eager["b"])       # same shape, other content: other scores
    model = smollm2.transformer
    runs = [("a", "eager"), ("a", "capture"), ("b", "replay"), ("a", "replay"), ("l", "eager"), ("b", "replay")]
    for i, (name, how) in enumerate(runs):
        got = _scores(smollm2, smollm2_engine, dict(zip("abl", layouts))[name])
        assert torch.equal(got, eager[name]), (i, name, how)
        assert graphs.counts(model)[how] == sum(1 for _, h in runs[:i + 1] if h == how)
    assert backend.captures == 1
    # the replayed scores are the caller's own: a later replay does not change them
    first = _scores(smollm2, smollm2_engine, layouts[1])
    _scores(smollm2, smollm2_engine, layouts[0])
    assert torch.equal(first, eager["b"])


def test_a_graphed_request_decodes_what_the_eager_one_does(smollm2, smollm2_engine, layouts, backend):
    layout = layouts[0]
    graphs.FAILURES.append("off")
    ref, _ = smollm2_engine.prefill(layout, make_selector("qcfuse", 0.15), 1)
    graphs.FAILURES.clear()
    for _ in range(3):                                    # eager, capture, replay
        out, _ = smollm2_engine.prefill(layout, make_selector("qcfuse", 0.15), 1)
        assert torch.equal(out.logits, ref.logits) and torch.equal(out.recomputed, ref.recomputed)
    assert graphs.counts(smollm2.transformer) == {"eager": 1, "capture": 1, "replay": 1}


def test_the_guard_catches_what_a_graph_cannot_hold():
    x = torch.ones(3)
    for bad in (lambda: x.sum().item(), lambda: torch.tensor([1, 2]) + x[:2], lambda: x.nonzero()):
        with pytest.raises(AssertionError, match="cannot be captured"), NoHostTraffic():
            bad()


def test_a_failed_capture_falls_back_to_eager_for_good(smollm2, smollm2_engine, layouts, backend, monkeypatch,
                                                       caplog):
    monkeypatch.setitem(graphs.BACKENDS, "cpu", FailingGraphs())
    graphs.FAILURES.append("off")
    ref = _scores(smollm2, smollm2_engine, layouts[0])
    graphs.FAILURES.clear()
    with caplog.at_level(logging.WARNING, logger="qcfuse.graphs"):
        for _ in range(3):
            assert torch.equal(_scores(smollm2, smollm2_engine, layouts[0]), ref)
    assert len(graphs.FAILURES) == 1 and "not permitted" in graphs.FAILURES[0]
    assert sum("running it eagerly" in r.message for r in caplog.records) == 1
    assert not graphs.enabled(torch.device("cpu"))


def test_graphs_off_by_environment_and_off_for_the_value_weighted_study(smollm2, smollm2_engine, layouts, backend,
                                                                        monkeypatch):
    monkeypatch.setenv("QCFUSE_GRAPHS", "0")
    for _ in range(2):
        _scores(smollm2, smollm2_engine, layouts[0])
    monkeypatch.delenv("QCFUSE_GRAPHS")
    for _ in range(2):
        _scores(smollm2, smollm2_engine, layouts[0], value_weight=True)
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
