"""Ratio auto's margin rule: fuse small, escalate while the first token is unsure (fusion/budget.py)."""
import json

import pytest
import torch

from needle import QUESTION, needle_documents
from qcfuse.cli import main
from qcfuse.errors import QcfuseError
from qcfuse.fusion import make_selector
from qcfuse.fusion import selector as selector_module
from qcfuse.fusion.budget import AutoBudget, first_token_margin
from qcfuse.profile import fit_auto, fit_margin_rule, ladder_cost, ladder_stop, pass_cost_of

LADDER = [0.02, 0.1, 1.0]


def margin_table(min_margin: float, ladder=LADDER) -> dict:
    steps = [{"target": t, "ladder": ladder, "min_margin": min_margin} for t in (0.9, 0.99)]
    return {"targets": [0.8, 0.99], "mass": [0.5, 0.9], "margin": steps}


def test_margin_of_the_first_token():
    logits = torch.tensor([0.0, 2.0, 1.0, -1.0])
    assert first_token_margin(logits) == pytest.approx(1.0)          # log-softmax keeps differences
    assert first_token_margin(torch.tensor([3.0, 3.0])) == 0.0


def test_margin_rule_by_hand():
    table = margin_table(1.0)
    scores = torch.ones(200) / 200
    budget = AutoBudget(0.95)
    assert budget.rule_for(table) == "margin" and AutoBudget(0.95, rule="mass").rule_for(table) == "mass"
    assert [budget.count(scores, table, a) for a in range(3)] == [4, 20, 200]
    assert budget.count(scores, table, 7) == 200                    # past the ladder: its last rung
    sure, unsure = torch.tensor([5.0, 1.0]), torch.tensor([1.0, 0.5])
    assert budget.settled(sure, table, 0) and not budget.settled(unsure, table, 0)
    assert not budget.settled(unsure, table, 1) and budget.settled(unsure, table, 2)    # the last rung is kept
    assert budget.settled(None, table, 0)                                               # nothing to judge by
    capped = AutoBudget(0.95, max_ratio=0.1)
    assert capped.ladder(table) == [0.02, 0.1] and capped.settled(unsure, table, 1)
    assert AutoBudget(0.95, min_ratio=0.5).ladder(table) == [0.5, 1.0]
    # the lowest calibrated target at or above the one asked for; none above is a clear error
    assert AutoBudget(0.5).margin_step(table)["target"] == 0.9 and budget.margin_step(table)["target"] == 0.99
    with pytest.raises(QcfuseError, match="above the margin rule's calibrated targets"):
        AutoBudget(0.995).margin_step(table)
    # without a margin calibration the mass rule serves, unless margin is asked for by name
    plain = {"targets": [0.8, 0.99], "mass": [0.5, 0.9]}
    assert budget.rule_for(plain) == "mass"
    with pytest.raises(QcfuseError, match="margin rule has no calibration"):
        AutoBudget(0.95, rule="margin").rule_for(plain)
    with pytest.raises(QcfuseError, match="unknown auto rule"):
        make_selector("qcfuse", "auto", auto_rule="guess")
    assert make_selector("qcfuse", "auto", auto_rule="mass", max_ratio=0.5).auto.rule == "mass"


def _tried(*cells):
    return [{"ratio": r, "agrees": a, "margin": m} for r, a, m in cells]


def test_ladder_and_threshold_fit_by_hand():
    easy = _tried((0.02, True, 2.0), (0.1, True, 2.5))
    hard = _tried((0.02, False, 0.5), (0.1, True, 1.5))
    worst = _tried((0.02, False, 0.3), (0.1, False, 0.4))
    assert ladder_stop({t["ratio"]: t for t in hard}, (0.02, 0.1), 1.0) == (0.1, pytest.approx(0.12))
    assert ladder_stop({t["ratio"]: t for t in worst}, (0.02, 0.1, 1.0), 1.0) == (1.0, pytest.approx(1.12))
    assert ladder_stop({t["ratio"]: t for t in worst}, (0.02, 0.1), 1.0) == (0.1, pytest.approx(0.12))   # kept, wrong
    steps = fit_margin_rule([easy, easy, hard, worst], targets=(0.5, 0.75, 1.0))
    # 0.5: stop at 0.02 always (2 of 4 kept); 0.75: escalate the unsure to 0.1; 1.0: the worst needs everything
    assert [s["ladder"] for s in steps] == [[0.02], [0.02, 0.1], [0.02, 0.1, 1.0]]
    assert steps[1]["min_margin"] > 0.5 and steps[2]["min_margin"] > 0.4
    assert [s["agreement"] for s in steps] == [0.5, 0.75, 1.0]
    assert steps[2]["mean_share"] == pytest.approx((0.02 + 0.02 + 0.12 + 1.12) / 4, abs=1e-4)
    # a confident failure at any grid ratio raises the threshold above it, even where the ladder never meets it
    trap = _tried((0.02, True, 1.0), (0.1, False, 1.2))
    sure = _tried((0.02, True, 2.0), (0.1, True, 2.0))
    assert fit_margin_rule([trap] + [sure] * 7, targets=(1.0,))[0]["min_margin"] == 2.0
    # 2 samples resolve failure rates of 1/2: at target 0.9 the ladder must end in a full recompute, though
    # stopping at 0.1 would have kept both
    both = fit_margin_rule([hard, easy], targets=(0.5, 0.9))
    assert both[0]["ladder"] == [0.02] and both[1]["ladder"] == [0.02, 0.1, 1.0]
    rows = [{"sample": str(i), "method": "qcfuse", "ratio": 0.1, "mass": 0.5, "tried": t}
            for i, t in enumerate([easy, easy, hard, worst])]
    table = fit_auto(rows, {"qcfuse": {"critical_layers": [1]}}, targets=(0.5, 1.0))["qcfuse"]
    assert [s["target"] for s in table["margin"]] == [0.5, 1.0] and table["grid"] == [0.02, 0.1]
    assert table["scoring"] == {"critical_layers": [1]}


def test_plain_prefill_wins_unless_a_ladder_is_surely_cheaper():
    """Each fused pass costs more than its recompute (the pass cost, charged per pass), and a ladder is shipped
    over plain full prefill only when its mean cost plus two standard errors stays below one full prefill."""
    assert ladder_cost((0.02, 0.1, 1.0), 0.1, 0.05) == pytest.approx(0.07 + 0.15)
    assert ladder_cost((0.02, 0.1, 1.0), 1.0, 0.05) == pytest.approx(0.07 + 0.15 + 1.0)    # 1.0: a plain prefill
    climbs = _tried((0.02, False, 0.1), (0.3, False, 0.1))               # every pass unsure: it climbs to the top
    stops = _tried((0.02, True, 2.0), (0.3, True, 2.0))
    samples = [climbs] * 10 + [stops] * 6
    free = fit_margin_rule(samples, targets=(0.99,))[0]
    assert free["ladder"] == [0.02, 1.0] and free["mean_share"] == pytest.approx((10 * 1.02 + 6 * 0.02) / 16, abs=1e-4)
    assert "mean_cost" not in free                                       # pass cost 0: the share is the cost
    cheap = fit_margin_rule(samples, targets=(0.99,), pass_cost=0.05)[0]
    assert cheap["ladder"] == [0.02, 1.0] and cheap["mean_cost"] == pytest.approx((10 * 1.07 + 6 * 0.07) / 16, abs=1e-4)
    dear = fit_margin_rule(samples, targets=(0.99,), pass_cost=0.3)[0]  # 0.945 on average: not surely below 1
    assert dear["ladder"] == [1.0] and dear["mean_share"] == 1.0 and dear["mean_cost"] == 1.0
    few = fit_margin_rule([climbs] * 3 + [stops], targets=(0.99,))[0]   # 0.77 on average, from 4 samples
    assert few["ladder"] == [1.0]
    # measured from logged times: the median of (pass time - ratio x full time) / full time; 0 without times
    timed = [{"full_seconds": 10.0, "tried": [{"ratio": 0.02, "seconds": 1.2}, {"ratio": 0.3, "seconds": 4.0}]},
             {"full_seconds": 20.0, "tried": [{"ratio": 0.02, "seconds": 2.4}, {"ratio": 0.3, "seconds": 6.6}]}]
    assert pass_cost_of(timed) == pytest.approx(0.1)                    # of 0.1, 0.1, 0.1 and 0.03
    assert pass_cost_of([{"tried": [{"ratio": 0.02}]}]) == 0.0
    rows = [{"sample": str(i), "method": "qcfuse", "ratio": 0.02, "mass": 0.5, "tried": [dict(t) for t in tried],
             "full_seconds": 10.0} for i, tried in enumerate(samples)]
    for row in rows:
        for t in row["tried"]:
            t["seconds"] = t["ratio"] * 10.0 + 3.0                        # a pass costs 0.3 beside its recompute
    table = fit_auto(rows, {"qcfuse": {}}, targets=(0.99,))["qcfuse"]
    assert table["pass_cost"] == pytest.approx(0.3) and table["margin"][0]["ladder"] == [1.0]
    assert fit_auto(rows, {"qcfuse": {}}, targets=(0.99,), pass_cost=0.0)["qcfuse"]["margin"][0]["ladder"] == [0.02, 1.0]


def test_reuse_check_by_hand():
    """A first pass sure by its margin is accepted only if reuse's first token is the same; reuse is asked at
    most once, and only when the margin would accept."""
    table = margin_table(1.0)
    for step in table["margin"]:
        step["reuse_check"] = True
    budget = AutoBudget(0.95)
    sure, unsure = torch.tensor([5.0, 1.0]), torch.tensor([1.0, 0.5])      # both pick token 0
    calls = []
    def reuse(token):
        return lambda: calls.append(token) or token
    assert budget.checks_reuse(table) and not budget.checks_reuse(margin_table(1.0))
    assert budget.settled(sure, table, 0, reuse(0)) and not budget.settled(sure, table, 0, reuse(1))
    assert calls == [0, 1]
    assert not budget.settled(unsure, table, 0, reuse(0)) and calls == [0, 1]          # the margin decides first
    assert budget.settled(sure, table, 1, reuse(1)) and calls == [0, 1]                # first passes only
    assert budget.settled(sure, margin_table(1.0), 0, reuse(1)) and calls == [0, 1]    # not calibrated: no check
    assert not AutoBudget(0.95, rule="mass").checks_reuse(table)
    # by choice: off (one suffix pass less), or on where the calibration has none
    assert not AutoBudget(0.95, reuse_check=False).checks_reuse(table)
    assert AutoBudget(0.95, reuse_check=True).checks_reuse(margin_table(1.0))
    assert make_selector("qcfuse", "auto", reuse_check="false").auto.reuse_check is False
    with pytest.raises(QcfuseError, match="true or false"):
        make_selector("qcfuse", "auto", reuse_check="maybe")
    with pytest.raises(QcfuseError, match="to ratio auto only"):
        make_selector("qcfuse", 0.1, reuse_check=True)


def _tokened(*cells):
    return [{"ratio": r, "agrees": a, "margin": m, "token": t} for r, a, m, t in cells]


def test_reuse_check_fit_by_hand():
    """At targets the set cannot resolve the check is part of the fitted rule. A confident first pass that
    overturns reuse climbs whatever its margin: the ladder is chosen with those climbs counted, and a confident
    failure the check catches no longer holds the margin above it."""
    easy = _tokened((0.02, True, 2.0, 7), (0.1, True, 2.5, 7))
    overturned = _tokened((0.02, True, 2.0, 7), (0.1, True, 2.5, 7))       # reuse said 5, fusion fixed it
    unsure = _tokened((0.02, True, 0.5, 7), (0.1, True, 1.5, 7))
    trap = _tokened((0.02, False, 2.0, 5), (0.1, True, 2.5, 7))            # reuse said 7: a sure, wrong 2% pass
    by_ratio = {t["ratio"]: t for t in overturned}
    assert ladder_stop(by_ratio, (0.02, 0.1), 1.0, reuse_token=5) == (0.1, pytest.approx(0.12))
    assert ladder_stop(by_ratio, (0.02, 0.1), 1.0, reuse_token=7) == (0.02, pytest.approx(0.02))
    assert ladder_stop(by_ratio, (0.02,), 1.0, reuse_token=5) == (0.02, pytest.approx(0.02))     # the last rung
    samples, tokens = [easy] * 7 + [overturned, unsure, trap], [7] * 7 + [5, 7, 7]
    plain = fit_margin_rule(samples, targets=(0.5, 0.99))
    checked = fit_margin_rule(samples, targets=(0.5, 0.99), reuse_tokens=tokens)
    assert "reuse_check" not in checked[0] and checked[0] == plain[0]       # a target the set resolves: no check
    # without the check the trap's margin (2.0) must not be trusted: every 2% pass climbs, so 0.1 comes first
    assert plain[1]["ladder"] == [0.1, 1.0] and plain[1]["min_margin"] == 2.5 and "reuse_check" not in plain[1]
    assert plain[1]["mean_share"] == pytest.approx((9 * 0.1 + 1.1) / 10, abs=1e-4)
    # with it the trap and the overturned pass climb to 0.1, and every other request stops at 2%
    exact = checked[1]
    assert exact["reuse_check"] and exact["ladder"] == [0.02, 0.1, 1.0] and exact["min_margin"] == 0.0
    assert exact["agreement"] == 1.0 and exact["mean_share"] == pytest.approx((8 * 0.02 + 2 * 0.12) / 10, abs=1e-4)
    rows = [{"sample": str(i), "method": "qcfuse", "ratio": 0.02, "mass": 0.5, "tried": t, "reuse_token": k}
            for i, (t, k) in enumerate(zip(samples, tokens))]
    table = fit_auto(rows, {"qcfuse": {}}, targets=(0.5, 0.99))["qcfuse"]
    assert table["margin"][1]["reuse_check"] and table["margin"][1]["ladder"] == [0.02, 0.1, 1.0]
    del rows[0]["reuse_token"]                                             # logs without reuse's token: no check
    assert fit_auto(rows, {"qcfuse": {}}, targets=(0.5, 0.99))["qcfuse"]["margin"][1] == plain[1]


@pytest.fixture(scope="module")
def needle_layout(smollm2_engine):
    layout = smollm2_engine.layout(needle_documents(), QUESTION)
    smollm2_engine.prepare_layout(layout, progress=False)
    return layout


def test_engine_escalates_until_the_first_token_is_sure(smollm2, smollm2_engine, needle_layout, monkeypatch):
    """Unsure at every rung: the request runs the whole ladder, keeps the last pass's cache and logits (the
    same as a fixed-ratio run at that rung) and counts every pass. Sure at once: one pass."""
    layout, engine = needle_layout, smollm2_engine
    ladder = [0.02, 0.1, 0.3]
    monkeypatch.setattr(smollm2.transformer, "auto_calibration", {"qcfuse": margin_table(1e9, ladder)})
    out, stats = engine.prefill(layout, make_selector("qcfuse", "auto:0.95"), 1)
    n = layout.n_doc_tokens
    counts = [round(r * n) for r in ladder]
    assert stats["passes"] == 3 and stats["recomputed_tokens"] == counts[-1] and stats["auto_rule"] == "margin"
    assert stats["recomputed_total_share"] == pytest.approx(sum(counts) / n)
    fixed, _ = engine.prefill(layout, make_selector("qcfuse", 0.3), 1)
    assert torch.equal(out.recomputed, fixed.recomputed)
    assert torch.allclose(out.logits, fixed.logits, atol=1e-5)
    monkeypatch.setattr(smollm2.transformer, "auto_calibration", {"qcfuse": margin_table(0.0, ladder)})
    _, once = engine.prefill(layout, make_selector("qcfuse", "auto:0.95"), 1)
    assert once["passes"] == 1 and once["recomputed_tokens"] == counts[0]
    assert once["recomputed_total_share"] == pytest.approx(once["recomputed_share"])
    assert not once["reuse_checked"]
    # the reuse check: a first pass sure by its margin is kept only where reuse's first token is the same
    reuse_token = int(engine.prefill(layout, make_selector("reuse"), 1)[0].logits.argmax())
    checked = margin_table(0.0, ladder)
    for step in checked["margin"]:
        step["reuse_check"] = True
    monkeypatch.setattr(smollm2.transformer, "auto_calibration", {"qcfuse": checked})
    first, _ = engine.prefill(layout, make_selector("qcfuse", 0.02), 1)
    calls, original = [], engine._fuse_pass
    monkeypatch.setattr(engine, "_fuse_pass", lambda *a, **k: calls.append(k.get("with_reuse")) or original(*a, **k))
    _, guarded = engine.prefill(layout, make_selector("qcfuse", "auto:0.95"), 1)
    monkeypatch.setattr(engine, "_fuse_pass", original)
    assert guarded["reuse_checked"]
    assert calls[0] and len(calls) == guarded["passes"]        # reuse's token came with the first pass
    assert guarded["passes"] == (1 if int(first.logits.argmax()) == reuse_token else 2)
    # the mass rule, and a fixed ratio, are always one pass
    _, mass = engine.prefill(layout, make_selector("qcfuse", "auto:0.95", auto_rule="mass"), 1)
    assert mass["passes"] == 1 and mass["auto_rule"] == "mass"
    fixed = engine.prefill(layout, make_selector("qcfuse", 0.1), 1)[1]
    assert fixed["passes"] == 1 and fixed["auto_rule"] is None
    # a first pass turned down by the check takes the next rung
    monkeypatch.setattr(selector_module.Selector, "settled",
                        lambda self, model, logits, attempt, reuse_token=None: attempt > 0 or reuse_token() == -1)
    _, forced = engine.prefill(layout, make_selector("qcfuse", "auto:0.95"), 1)
    assert forced["passes"] == 2 and forced["reuse_checked"]


def test_a_pass_of_every_token_is_a_plain_prefill(smollm2, smollm2_engine, needle_layout, monkeypatch):
    """Where ratio auto asks for every document token (a ladder's rung of 1.0, or a calibrated share of 1.0),
    that pass is full prefill's: the same logits, nothing read from the chunk caches for it, no selection."""
    layout, engine = needle_layout, smollm2_engine
    full, _ = engine.prefill(layout, make_selector("fullcomp"), 1)
    small = engine.prefill(layout, make_selector("qcfuse", 0.02), 1)[1]
    monkeypatch.setattr(smollm2.transformer, "auto_calibration", {"qcfuse": margin_table(1e9, [0.02, 1.0])})
    climbed, stats = engine.prefill(layout, make_selector("qcfuse", "auto:0.95"), 1)
    assert stats["passes"] == 2 and stats["recomputed_share"] == 1.0
    assert stats["recomputed_total_share"] == pytest.approx(1.0 + small["recomputed_share"])
    assert stats["bytes_loaded"] == small["bytes_loaded"] > 0          # only the first pass read the caches
    assert torch.equal(climbed.logits, full.logits)
    monkeypatch.setattr(smollm2.transformer, "auto_calibration",
                        {"qcfuse": {"targets": [0.8, 0.99], "mass": [0.5, 1.0]}})
    out, mass = engine.prefill(layout, make_selector("qcfuse", "auto:0.99"), 1)
    assert mass["passes"] == 1 and mass["recomputed_share"] == 1.0 and mass["auto_rule"] == "mass"
    assert mass["bytes_loaded"] == 0 and mass["cache_hits"] == 0 and mass["selection_s"] == 0
    assert torch.equal(out.logits, full.logits)
    # short of 1.0 the mass rule reads and selects; bounded below 1.0 it never asks for everything
    assert engine.prefill(layout, make_selector("qcfuse", "auto:0.9"), 1)[1]["bytes_loaded"] > 0
    capped = engine.prefill(layout, make_selector("qcfuse", "auto:0.99", max_ratio=0.5), 1)[1]
    assert capped["bytes_loaded"] > 0 and capped["recomputed_share"] <= 0.5
    # a fixed ratio of 1.0 still runs the fuse loop over the reused caches
    assert engine.prefill(layout, make_selector("qcfuse", 1.0), 1)[1]["bytes_loaded"] > 0


def test_reuse_logits_beside_a_fused_pass_are_plain_reuses(smollm2_engine, needle_layout):
    """The reuse check's shadow rows give what a plain reuse pass gives, and leave the fused pass as it was."""
    engine, layout = smollm2_engine, needle_layout
    sources = [engine._source(ids).source for ids in [layout.prefix, *layout.chunks] if ids]
    run = lambda selector, **kw: engine._fuse_pass(layout, sources, selector, layout.n_tokens, False, 0, [], **kw)
    both = run(make_selector("qcfuse", 0.05), with_reuse=True)
    alone = run(make_selector("qcfuse", 0.05))
    plain = run(make_selector("reuse"))
    assert alone.reuse_logits is None and not torch.equal(plain.logits, alone.logits)
    assert torch.allclose(both.reuse_logits, plain.logits, atol=1e-5)
    assert torch.allclose(both.logits, alone.logits, atol=1e-5) and torch.equal(both.recomputed, alone.recomputed)
    for layer in (0, smollm2_engine.model.transformer.n_layers - 1):      # the fused cache too
        assert torch.allclose(both.buffer.k[layer, :, :layout.n_tokens], alone.buffer.k[layer, :, :layout.n_tokens],
                              atol=1e-5)


def test_calibrate_refits_from_logs(tmp_path, capsys):
    easy = _tried((0.02, True, 2.0), (0.1, True, 2.5))
    hard = _tried((0.02, False, 0.5), (0.1, True, 1.5))
    log = tmp_path / "cal.jsonl"
    log.write_text("".join(json.dumps({"sample": f"s{i}", "method": "qcfuse", "ratio": 0.1, "mass": 0.6,
                                       "tried": t}) + "\n" for i, t in enumerate([easy, hard, easy])))
    out = tmp_path / "profile.json"
    assert main(["calibrate", "--from_logs", str(log), "--out", str(out)]) == 0
    table = json.loads(out.read_text())["auto"]["qcfuse"]
    assert table["samples"] == 3 and table["margin"][-1]["ladder"] == [0.02, 0.1, 1.0]     # 0.99: exact last
    assert "margin rule for 0.99" in capsys.readouterr().out
    assert main(["calibrate", "--from_logs", str(log), "--out", str(out), "--pass_cost", "0.5"]) == 0
    table = json.loads(out.read_text())["auto"]["qcfuse"]
    assert table["pass_cost"] == 0.5 and table["margin"][-1]["ladder"] == [0.1, 1.0]    # fewer, larger rungs
    assert table["margin"][-1]["mean_cost"] == pytest.approx(0.6)
    assert "costs 0.500 of a full prefill" in capsys.readouterr().out
    for args, message in ((["--from_logs", str(log), "--sets", "musique_s[0:1]"], "either --sets"), ([], "either --sets"),
                          (["--from_logs", str(tmp_path / "none.jsonl")], "no file"),
                          (["--from_logs", f"{log},{log}"], "appears twice"),
                          (["--from_logs", str(log), "--pass_cost", "-0.1"], "within [0, 1]"),
                          (["--from_logs", str(log), "--pass_cost", "nan"], "within [0, 1]")):
        assert main(["calibrate", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
