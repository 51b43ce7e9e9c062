"""Ratio auto: parsing, the budget rule, the selectors' use of it, calibration, CLI and sweep."""
import json

import pytest
import torch

from needle import QUESTION, needle_documents
from qcfuse.cli import main
from qcfuse.errors import QcfuseError
from qcfuse.fusion import FusionInputs, ReusedKV, make_selector
from qcfuse.fusion.budget import (AutoBudget, clamp_count, mass_of_top, parse_ratio, ratio_label, ratio_spec,
                                  tokens_for_mass)
from qcfuse.profile import AUTO_GRID, calibrate_auto, needed_share

CALIBRATION = {"qcfuse": {"targets": [0.8, 0.99], "mass": [0.5, 0.9]},
               "prophetkv": {"targets": [0.8, 0.99], "mass": [0.5, 0.9]}}


def test_ratio_specs():
    assert parse_ratio(0.15) == (0.15, None) and parse_ratio("0.3") == (0.3, None)
    assert parse_ratio("auto") == (None, 0.99) and parse_ratio("AUTO:0.9") == (None, 0.9)
    assert ratio_spec("auto", 0.95) == "auto:0.95" and ratio_spec("0.2") == 0.2
    assert ratio_label(0.15) == "0.15" and ratio_label("auto:0.9") == "auto0.9" and ratio_label(None) == "-"
    for bad, message in [("x", "or 'auto'"), (1.5, "within [0, 1]"), ("auto:1", "within (0, 1)"),
                         ("auto:y", "must be a number"), (float("nan"), "or 'auto'"), (True, "or 'auto'")]:
        with pytest.raises(QcfuseError) as caught:
            parse_ratio(bad)
        assert message in str(caught.value)
    with pytest.raises(QcfuseError, match="--target applies to --ratio auto only"):
        ratio_spec("0.2", 0.9)


def test_budget_rule_by_hand():
    scores = torch.tensor([0.05, 0.5, 0.1, 0.3, 0.05])          # sorted: 0.5 0.3 0.1 0.05 0.05
    assert tokens_for_mass(scores, 0.5) == 1 and tokens_for_mass(scores, 0.51) == 2
    assert tokens_for_mass(scores, 0.8) == 2 and tokens_for_mass(scores, 0.85) == 3 and tokens_for_mass(scores, 1.0) == 5
    assert tokens_for_mass(scores, 0.0) == 0
    assert mass_of_top(scores, 2) == pytest.approx(0.8) and mass_of_top(scores, 0) == 0.0
    assert AutoBudget(0.9, max_ratio=0.4).tokens(scores, 1.0) == 2          # floor(0.4 * 5)
    assert AutoBudget(0.9, min_ratio=0.6).tokens(scores, 0.5) == 3          # ceil(0.6 * 5)
    assert clamp_count(7, 5, 0.0, 1.0) == 5
    budget = AutoBudget(0.9)
    assert budget.mass_for(budget.table(CALIBRATION, "qcfuse")) == pytest.approx(0.5 + 0.4 * (0.1 / 0.19))
    with pytest.raises(QcfuseError, match="outside the calibrated range"):
        AutoBudget(0.5).mass_for(CALIBRATION["qcfuse"])
    with pytest.raises(QcfuseError, match="qcfuse calibrate"):
        budget.table(CALIBRATION, "fuserag")
    with pytest.raises(QcfuseError, match="min_ratio <= max_ratio"):
        AutoBudget(0.9, max_ratio=0.1, min_ratio=0.2)


def test_only_query_aware_methods_take_auto():
    assert make_selector("qcfuse", "auto").ratio == "auto:0.99"
    assert make_selector("fuserag", "auto:0.9", max_ratio=0.5).auto.max_ratio == 0.5
    for method in ("epic", "cacheblend", "reuse", "fullcomp"):
        with pytest.raises(QcfuseError, match="query-aware"):
            make_selector(method, "auto")
    with pytest.raises(QcfuseError, match="to ratio auto only"):
        make_selector("qcfuse", 0.15, max_ratio=0.5)
    with pytest.raises(QcfuseError, match="does not combine"):
        make_selector("qcfuse", "auto", chunk_heads=4)


@pytest.fixture(scope="module")
def needle_layout(smollm2_engine):
    layout = smollm2_engine.layout(needle_documents(), QUESTION)
    smollm2_engine.prepare_layout(layout, progress=False)
    return layout


def test_auto_recomputes_the_fewest_tokens_holding_the_calibrated_share(smollm2, smollm2_engine, needle_layout,
                                                                       monkeypatch, method="qcfuse"):
    monkeypatch.setattr(smollm2.transformer, "auto_calibration", CALIBRATION)
    layout = needle_layout
    pieces = [smollm2_engine._entry(ids)[0] for ids in [layout.prefix, *layout.chunks]]
    scores = make_selector(method, 0.15).scores(
        FusionInputs(smollm2.transformer, layout, ReusedKV(pieces, len(layout.prefix))))
    assert scores.sum().item() == pytest.approx(1.0, abs=1e-4)
    chosen = {}
    for target, mass in ((0.8, 0.5), (0.99, 0.9)):
        _, stats = smollm2_engine.prefill(layout, make_selector(method, f"auto:{target}"), 1)
        assert stats["ratio"] == f"auto:{target:g}"
        assert stats["recomputed_tokens"] == tokens_for_mass(scores, mass)
        assert stats["recomputed_share"] == pytest.approx(stats["recomputed_tokens"] / layout.n_doc_tokens)
        chosen[target] = stats["recomputed_tokens"]
    assert 0 < chosen[0.8] < chosen[0.99] < layout.n_doc_tokens     # a higher target buys more tokens
    _, capped = smollm2_engine.prefill(layout, make_selector(method, "auto:0.99", max_ratio=0.05), 1)
    assert capped["recomputed_tokens"] == int(0.05 * layout.n_doc_tokens)


def test_auto_without_calibration_is_a_clear_error(smollm2, smollm2_engine, needle_layout, monkeypatch):
    monkeypatch.setattr(smollm2.transformer, "auto_calibration", None)
    with pytest.raises(QcfuseError, match="no calibration of 'qcfuse'"):
        smollm2_engine.prefill(needle_layout, make_selector("qcfuse", "auto"), 1)


def test_auto_refuses_a_calibration_made_with_other_scoring(smollm2, smollm2_engine, needle_layout, monkeypatch):
    """The calibrated shares hold for the scores they were measured with: other critical layers (or options)
    are a clear error, not a silently wrong budget."""
    scoring = make_selector("qcfuse", 0.15).scoring(smollm2.transformer)
    assert scoring["critical_layers"] == smollm2.transformer.critical_layers
    monkeypatch.setattr(smollm2.transformer, "auto_calibration",
                        {"qcfuse": {**CALIBRATION["qcfuse"], "scoring": scoring}})
    _, stats = smollm2_engine.prefill(needle_layout, make_selector("qcfuse", "auto:0.9"), 1)
    assert stats["recomputed_tokens"] > 0
    for options, message in (({"critical_layers": [5, 6, 7]}, r"critical_layers=\[3, 5, 7"),
                             ({"head_norm": True}, "head_norm=False")):
        with pytest.raises(QcfuseError, match=message):
            smollm2_engine.prefill(needle_layout, make_selector("qcfuse", "auto:0.9", **options), 1)


def test_shipped_calibration_is_sane(smollm2):
    table = smollm2.transformer.auto_calibration["qcfuse"]
    assert table["targets"] == sorted(table["targets"]) and 0.99 in table["targets"]
    assert table["mass"] == sorted(table["mass"]) and all(0.0 < m <= 1.0 for m in table["mass"])
    assert table["samples"] >= 10
    assert table["scoring"] == make_selector("qcfuse", 0.15).scoring(smollm2.transformer)   # made with the defaults


def test_needed_share_is_the_smallest_grid_ratio_that_keeps_the_first_token(smollm2, smollm2_engine,
                                                                             needle_layout):
    from qcfuse.fusion.probe import top_positions
    from qcfuse.profile import _Fixed
    layout, engine = needle_layout, smollm2_engine
    pieces = [engine._entry(ids)[0] for ids in [layout.prefix, *layout.chunks]]
    scores = make_selector("qcfuse", 0.15).scores(
        FusionInputs(smollm2.transformer, layout, ReusedKV(pieces, len(layout.prefix))))
    full = engine.generate_layout(layout, make_selector("fullcomp"), 1).first_logits
    found = needed_share(engine, layout, scores, full)
    grid = [r for r in AUTO_GRID if r <= found["ratio"]]
    assert [t["ratio"] for t in found["tried"]] == grid
    for ratio in grid:                     # recheck each verdict independently
        k = int(round(ratio * layout.n_doc_tokens))
        fused = engine.generate_layout(layout, _Fixed(top_positions(scores, layout.doc_positions(), k)), 1)
        agrees = int(fused.first_logits.argmax()) == int(full.argmax())
        assert agrees == (ratio == found["ratio"]), ratio
        assert found["tried"][grid.index(ratio)]["token"] == int(fused.first_logits.argmax())   # the reuse check's
        assert found["tried"][grid.index(ratio)]["seconds"] > 0                                  # the pass cost's
    assert found["mass"] == pytest.approx(mass_of_top(scores, int(round(found["ratio"] * layout.n_doc_tokens))),
                                          abs=1e-5)


def test_calibration_takes_the_target_quantile(monkeypatch, smollm2_engine):
    from types import SimpleNamespace

    import qcfuse.profile as profile
    needs = iter([0.2, 0.9, 0.5, 0.7])
    monkeypatch.setattr(profile, "needed_share", lambda *a, **k: {"ratio": 0.1, "mass": next(needs), "tried": []})
    samples = [SimpleNamespace(id=str(i), documents=[f"Note {i}: the sky is blue.", "Grass is green."],
                               question="What colour is the sky?") for i in range(4)]
    seen = []
    out = calibrate_auto(smollm2_engine, samples, ["qcfuse"], targets=(0.5, 0.75, 0.99), progress=False,
                         on_sample=seen.append)
    assert out["auto"]["qcfuse"]["mass"] == [0.5, 0.7, 0.9]         # 2nd, 3rd and 4th of 0.2 0.5 0.7 0.9
    # what the scores depended on is recorded with them
    assert out["auto"]["qcfuse"]["scoring"]["critical_layers"] == smollm2_engine.model.transformer.critical_layers
    assert [row["sample"] for row in seen] == ["0", "1", "2", "3"]
    for row, sample in zip(seen, samples):                 # plain reuse's first token, for the reuse check
        layout = smollm2_engine.layout(sample.documents, sample.question)
        reuse = smollm2_engine.generate_layout(layout, make_selector("reuse"), 1).first_logits
        assert row["reuse_token"] == int(reuse.argmax())
        assert row["full_seconds"] > 0                   # full prefill's time, for the pass cost


@pytest.mark.parametrize("args,message", [
    (["--sets", "musique_s"], "expected NAME[A:B]"),
    (["--sets", "musique_s[3:1]"], "expected NAME[A:B]"),
    (["--sets", "musique_s[0:1]", "--methods", "epic"], "query-aware"),
])
def test_calibrate_cli_errors(capsys, args, message):
    assert main(["calibrate", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_generate_cli_reports_what_auto_chose(capsys, tmp_path):
    docs = []
    for i, text in enumerate(needle_documents()[:2]):
        path = tmp_path / f"d{i}.txt"
        path.write_text(text)
        docs += ["-d", str(path)]
    assert main(["generate", *docs, "-q", QUESTION, "--method", "qcfuse", "--ratio", "auto", "--target", "0.9",
                 "--max_new_tokens", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ratio"] == "auto:0.9" and 0 < out["recomputed_share"] <= 1
    assert main(["generate", *docs, "-q", QUESTION, "--method", "epic", "--ratio", "auto"]) == 2
    assert "query-aware" in capsys.readouterr().err


def test_recalibrating_one_method_keeps_the_others(tmp_path):
    from qcfuse.model.profiles import load_profile, update_profile
    path = tmp_path / "qcfuse-profile.json"
    update_profile(path, {"critical_layers": [5, 6, 7], "auto": {"prophetkv": CALIBRATION["prophetkv"]}})
    update_profile(path, {"auto": {"qcfuse": CALIBRATION["qcfuse"]}, "auto_sets": "x[0:1]"})
    profile = load_profile(tmp_path, None)
    assert profile["auto"] == CALIBRATION and profile["critical_layers"] == [5, 6, 7]
    update_profile(path, {"critical_layers": [3]})                  # plain values are replaced
    assert load_profile(tmp_path, None)["critical_layers"] == [3]
