"""The evaluation harness: loaders, the RULER generator, metrics, `qcfuse eval` (with resume) and `qcfuse sweep`."""
import json
import math
import re
from pathlib import Path

import pytest
import torch

from qcfuse import FusionEngine
from qcfuse.cache import open_store
from qcfuse.cli import main
from qcfuse.errors import QcfuseError
from qcfuse.eval import ruler
from qcfuse.eval.datasets import Sample, default_data_dir, load_dataset, split_passages
from qcfuse.eval.metrics import f1_score, fidelity, rouge_l, string_match_all
from qcfuse.eval.runner import EvalConfig, fit_window, read_rows, run_eval, run_name
from qcfuse.eval.sweep import grid, write_report
from qcfuse.prompt import build_layout

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "longbench"


WORDS = ("river harbor lantern orchard meadow copper winter signal garden bridge letter market village engine "
         "window teacher doctor island forest candle morning evening journey pattern question answer number "
         "history science music paper stone water mountain valley station train road city country friend "
         "family dinner summer autumn spring garden method reason result moment people year work idea").split()


@pytest.fixture(autouse=True, scope="module")
def data_dir(tmp_path_factory):
    """The data directory the harness finds by default (QCFUSE_DATA_DIR), filled with text we generate here, so
    the tests do not depend on ../shared/data being present: a seeded haystack of plain sentences (the RULER
    generator's pg_essays) and a musique_s.json of two samples with ten passages each."""
    import os
    import random
    root = tmp_path_factory.mktemp("qcfuse") / "data"
    rng = random.Random(0)

    def sentence() -> str:
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 18))]
        return " ".join(words).capitalize() + "."
    (root / "pg_essays").mkdir(parents=True)
    for i in range(3):
        paragraphs = [" ".join(sentence() for _ in range(5)) for _ in range(120)]
        (root / "pg_essays" / f"essay{i}.txt").write_text("\n\n".join(paragraphs))
    samples = [{"question": f"Question {i}?", "answers": [f"answer {i}"],
                "ctxs": [{"title": f"Title {i}.{j}", "text": " ".join(sentence() for _ in range(4))} for j in range(10)]}
               for i in range(2)]
    (root / "musique_s.json").write_text(json.dumps(samples))
    before = os.environ.get("QCFUSE_DATA_DIR")
    os.environ["QCFUSE_DATA_DIR"] = str(root)
    yield root
    if before is None:
        del os.environ["QCFUSE_DATA_DIR"]
    else:
        os.environ["QCFUSE_DATA_DIR"] = before


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The machine's cores are shared: one intra-op thread avoids oversubscription (results do not change)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- loaders ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["hotpotqa", "2wikimqa", "musique"])
def test_longbench_loader(name):
    samples = load_dataset(name, FIXTURES)
    rows = [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]
    assert len(samples) == len(rows) >= 2
    for s, row in zip(samples, rows):
        assert s.id == row["_id"] and s.question == row["input"] and s.answers == row["answers"]
        n_passages = len(re.findall(r"^Passage \d+:", row["context"], flags=re.M))
        assert len(s.documents) == n_passages >= 2
        assert all(d.startswith(f"Passage {i}:") for i, d in enumerate(s.documents, 1))
        assert "\n".join(s.documents) == row["context"].strip()
    assert [s.id for s in load_dataset(name, FIXTURES, size=1)] == [samples[0].id]


def test_split_passages_only_at_line_starts():
    context = "Intro line.\nPassage 1:\nA\nsee Passage 2: inline\nPassage 2:\nB"
    assert split_passages(context) == ["Intro line.", "Passage 1:\nA\nsee Passage 2: inline", "Passage 2:\nB"]


def test_musique_s_loader(tmp_path):
    data = [{"ctxs": [{"title": f"t{i}", "text": f"text {i}"} for i in range(3)], "question": "q?", "answers": ["a"]}]
    (tmp_path / "musique_s.json").write_text(json.dumps(data))
    [s] = load_dataset("musique_s", tmp_path)
    assert s.documents == ["t0\ntext 0", "t1\ntext 1", "t2\ntext 2"] and s.question == "q?" and s.answers == ["a"]
    shared = load_dataset("musique_s", size=2)          # the default data dir's set: 10 passages per sample
    assert default_data_dir().name == "data" and len(shared) == 2
    assert all(len(x.documents) == 10 for x in shared)
    # --first: one run split over processes covers the same samples as one process
    whole = load_dataset("musique_s")
    assert [x.id for x in load_dataset("musique_s", size=5, first=1)] == [whole[1].id]
    assert [x.id for x in load_dataset("musique_s", first=1)] == [whole[1].id] != [whole[0].id]
    for first in (-1, len(whole)):
        with pytest.raises(QcfuseError, match="--first"):
            load_dataset("musique_s", first=first)


def test_loader_errors(tmp_path):
    bad = tmp_path / "hotpotqa.jsonl"
    bad.write_text((FIXTURES / "hotpotqa.jsonl").read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(QcfuseError, match=r"hotpotqa.jsonl:2: malformed JSON line"):
        load_dataset("hotpotqa", tmp_path)
    bad.write_text(json.dumps({"input": "q", "answers": ["a"]}) + "\n")
    with pytest.raises(QcfuseError, match=r":1: field 'context' missing"):
        load_dataset("hotpotqa", tmp_path)
    with pytest.raises(QcfuseError, match="file not found"):
        load_dataset("musique", tmp_path)
    with pytest.raises(QcfuseError, match="unknown dataset"):
        load_dataset("squad", tmp_path)
    with pytest.raises(QcfuseError, match="data directory not found"):
        load_dataset("hotpotqa", tmp_path / "nowhere")
    with pytest.raises(QcfuseError, match="qcfuse data ruler"):
        load_dataset("ruler_vt", tmp_path)


# -- RULER generator -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2.tokenizer


@pytest.mark.parametrize("task,n_answers", [("mv", 4), ("mq", 4), ("vt", 5)])
def test_ruler_sample(tokenizer, task, n_answers):
    s = ruler.generate_sample(task, 0, tokenizer)                       # defaults: 7000 tokens, 512-token chunks
    assert s == ruler.generate_sample(task, 0, tokenizer)               # deterministic
    assert s["documents"] != ruler.generate_sample(task, 0, tokenizer, seed=1)["documents"]
    layout = build_layout(tokenizer, s["documents"], s["input"])
    assert layout.n_tokens == s["prompt_tokens"]
    assert 0.97 * 7000 <= s["prompt_tokens"] <= 7000
    assert len(s["answers"]) == len(set(s["answers"])) == n_answers
    context = "\n".join(s["documents"])
    for needle, c in zip(s["needles"], s["needle_chunks"]):
        assert c >= 1 and needle in s["documents"][c] and needle not in s["documents"][0]
    for answer in s["answers"]:                                          # every answer is findable
        assert answer in context and answer not in s["documents"][0]
    sizes = [len(c) for c in layout.chunks]
    body = sizes[1:-1] if task == "vt" else sizes[:-1]                  # vt: chunk 0 is the one-shot example
    assert all(0.85 * 512 <= n <= 512 + 40 for n in body), sizes
    if task == "mv":
        key = re.search(r"numbers for (\S+) mentioned", s["input"]).group(1)
        assert all(key in n for n in s["needles"])
    if task == "mq":
        keys = [n.split()[7] for n in s["needles"]]
        assert len(set(keys)) == 4 and all(k in s["input"] for k in keys)
    if task == "vt":
        first, *hops = s["needles"]
        value = re.search(r"the value (\d+) in", s["input"]).group(1)
        assert first == f"VAR {s['answers'][0]} = {value}."
        assert hops == [f"VAR {b} = VAR {a}." for a, b in zip(s["answers"], s["answers"][1:])]
        positions = [context.index(n) for n in s["needles"]]
        assert positions == sorted(positions)                            # the chain reads in order
        assert s["documents"][0].startswith("Example:") and "Answer:" in s["documents"][0]


def test_ruler_set_is_prefix_stable_and_short_targets(tokenizer, tmp_path):
    small = ruler.generate("mq", 2, tokenizer, tokens=900, chunk_tokens=256)
    assert ruler.generate("mq", 3, tokenizer, tokens=900, chunk_tokens=256)[:2] == small
    on_the_fly = dict(model="smollm2-135m", tokenizer=tokenizer, tokens=900, chunk_tokens=256)
    assert [x.documents for x in load_dataset("ruler_mq", size=1, first=1, **on_the_fly)] == [small[1]["documents"]]
    assert all(850 <= s["prompt_tokens"] <= 900 for s in small)
    out = ruler.write_jsonl(small, tmp_path / "ruler_mq.jsonl")
    loaded = load_dataset("ruler_mq", tmp_path)
    assert [x.id for x in loaded] == [s["_id"] for s in small] and loaded[0].documents == small[0]["documents"]
    assert out.read_text().count("\n") == 2
    for s in ruler.generate("mv", 5, tokenizer, tokens=2000, chunk_tokens=256, seed=3):   # 20 needles, 7-8 chunks
        assert min(s["needle_chunks"]) >= 1 and len(s["documents"]) >= 7
        assert all(v not in s["documents"][0] and v in "".join(s["documents"]) for v in s["answers"])
    with pytest.raises(QcfuseError, match="beyond the first chunk"):
        ruler.generate_sample("mv", 0, tokenizer, tokens=500)


# -- metrics ---------------------------------------------------------------------------------------------------
def test_metrics_by_hand():
    assert f1_score("The River Dee.", ["River Dee"]) == 1.0
    assert f1_score("river dee in chester", ["River Dee"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert f1_score("Paris", ["London", "paris"]) == 1.0 and f1_score("", ["x"]) == 0.0
    assert f1_score("an apple", ["the apple"]) == 1.0                      # articles do not count
    assert rouge_l("the cat sat on the mat", ["the cat on the mat"]) == pytest.approx(10 / 11)
    assert rouge_l("dogs", ["cats", "dog"]) == 1.0 and rouge_l("", ["x"]) == 0.0   # stemmed, best gold
    assert string_match_all("Numbers: 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert string_match_all("vars abcde FGHIJ", ["ABCDE", "FGHIJ"]) == 1.0
    p = torch.tensor([0.6, 0.4]).log()
    q = torch.tensor([0.9, 0.1]).log()
    f = fidelity([1, 2], p, [1, 2], q)
    kl = 0.6 * math.log(0.6 / 0.9) + 0.4 * math.log(0.4 / 0.1)
    assert f["same_answer"] and f["top1"] and f["kl"] == pytest.approx(kl, rel=1e-5)
    f = fidelity([1, 2], p * 3.0, [1, 3], torch.tensor([0.1, 0.9]).log())
    assert not f["same_answer"] and not f["top1"] and f["kl"] > 0
    assert fidelity([5], p, [5], p.log_softmax(-1) + 7.0)["kl"] == pytest.approx(0.0, abs=1e-6)  # logits or log-probs


# -- window fitting -------------------------------------------------------------------------------------------
def test_fit_window_drops_middle_passages(smollm2_engine):
    long = lambda tag: f"{tag} " + "word " * 2500                        # ~2.5K tokens each
    sample = Sample("x", [long(t) for t in "ABCDE"], "Which?", ["A"])
    docs, layout, dropped = fit_window(smollm2_engine, sample, 32)
    assert dropped == [1, 2] and docs == [sample.documents[i] for i in (0, 3, 4)]    # middle out
    assert layout.n_tokens + 32 <= smollm2_engine.model.transformer.max_positions
    assert fit_window(smollm2_engine, Sample("y", ["word " * 9000], "Which?", ["A"]), 32) is None


# -- qcfuse eval, end to end -----------------------------------------------------------------------------------
def _cli(capsys, *args):
    rc = main([*args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_eval_end_to_end_with_resume(tmp_path, capsys, smollm2_engine):
    cache, out, full_out = tmp_path / "cache", tmp_path / "run.jsonl", tmp_path / "full.jsonl"
    common = ["eval", "--dataset", "hotpotqa", "--data_dir", str(FIXTURES), "--size", "2", "--cache_dir", str(cache),
              "--max_new_tokens", "4", "--quiet"]
    args = [*common, "--baseline", "cacheblend", "--ratio", "0.3", "--out", str(out)]
    rc, text, err = _cli(capsys, *args)
    assert rc == 0, err
    rows = read_rows(out)
    assert [r["id"] for r in rows] == [s.id for s in load_dataset("hotpotqa", FIXTURES, size=2)]
    for r in rows:
        for key in ("prediction", "gold", "score", "rougeL", "same_answer", "top1", "kl", "ttft_s", "ttft_full_s",
                    "selection_s", "recomputed_tokens", "context_tokens", "prediction_full", "score_full"):
            assert key in r, key
        assert r["method"] == "cacheblend" and r["ratio"] == 0.3 and r["metric"] == "qa_f1"
        assert 0 <= r["score"] <= 1 and 0 <= r["rougeL"] <= 1 and r["kl"] >= 0
        assert r["recomputed_tokens"] == round(0.3 * r["context_tokens"]) and r["ttft_s"] > 0
        assert r["cache_misses"] == r["cache_corrupt"] == 0 and r["cache_hits"] > 0 and r["new_tokens"] <= 4
    refs = sorted((cache / "refs").glob("*.pt"))
    assert len(refs) == 2
    assert "over 2 samples" in text and "TTFT" in text

    before = out.read_bytes()                                        # resume: nothing new
    rc, text, _ = _cli(capsys, *args)
    assert rc == 0 and out.read_bytes() == before and "nothing new" in text

    lines = before.decode().splitlines()                             # an interrupted run: one row + a torn line
    out.write_text(lines[0] + "\n" + lines[1][:40])
    cfg = dict(dataset="hotpotqa", data_dir=str(FIXTURES), size=2, cache_dir=str(cache), max_new_tokens=4,
               progress=False)
    summary = run_eval(EvalConfig(method="cacheblend", ratio=0.3, out=str(out), **cfg), engine=smollm2_engine)
    again = read_rows(out)
    assert summary["new"] == 1 and summary["n"] == 2
    assert len(again) == 2 and again[0] == rows[0] and again[1]["id"] == rows[1]["id"]
    assert "unfinished last line" in capsys.readouterr().err

    # fullcomp rows are the stored references (same prompt, same model: same reference files)
    run_eval(EvalConfig(method="fullcomp", out=str(full_out), **cfg), engine=smollm2_engine)
    full = read_rows(full_out)
    assert len(full) == 2 and sorted((cache / "refs").glob("*.pt")) == refs
    assert all(r["same_answer"] and r["top1"] and r["kl"] == pytest.approx(0, abs=1e-6) for r in full)
    assert [r["ttft_s"] for r in full] == [r["ttft_full_s"] for r in rows]
    assert [r["prediction"] for r in full] == [r["prediction_full"] for r in rows]
    assert full[0]["ratio"] is None

    rc, _, err = _cli(capsys, *args[:-1], str(full_out))                                   # another run's file
    assert rc == 2 and "holds results of another run" in err

    # broken chunk caches: the rows count them as misses (and corrupt), never as hits
    for part in (cache / "entries").glob("*/*/layer.5.safetensors"):
        blob = bytearray(part.read_bytes())
        blob[len(blob) // 2] ^= 0x01
        part.write_bytes(bytes(blob))
    summary = run_eval(EvalConfig(method="cacheblend", ratio=0.3, out=str(tmp_path / "broken.jsonl"), **cfg),
                       engine=FusionEngine(smollm2_engine.model, store=open_store(str(cache))))
    broken = read_rows(tmp_path / "broken.jsonl")
    assert summary["n"] == 2 and broken[0]["cache_corrupt"] == broken[0]["cache_misses"] > 0
    assert broken[0]["cache_hits"] == 0
    assert [r["prediction"] for r in broken] == [r["prediction"] for r in rows]        # recomputed: same answers


def test_sweep_writes_table_and_plot(tmp_path, capsys):
    out_dir = tmp_path / "sweep"
    args = ["sweep", "--dataset", "2wikimqa", "--data_dir", str(FIXTURES), "--methods", "cacheblend,epic",
            "--ratios", "0.5,0.1", "--size", "1", "--max_new_tokens", "2", "--out_dir", str(out_dir), "--quiet"]
    rc, text, err = _cli(capsys, *args)
    assert rc == 0, err
    names = sorted(p.name for p in out_dir.glob("*.jsonl"))
    assert names == ["cacheblend_r0.1.jsonl", "cacheblend_r0.5.jsonl", "epic_r0.1.jsonl", "epic_r0.5.jsonl",
                     "fullcomp.jsonl"]
    assert len(list((out_dir / "refs").glob("*.pt"))) == 1                 # one reference shared by every run
    table = (out_dir / "table.md").read_text()
    for row in ("| fullcomp | - | 1 |", "| cacheblend | 0.1 | 1 |", "| cacheblend | 0.5 | 1 |", "| epic | 0.1 |",
                "| epic | 0.5 |"):
        assert row in table, row
    assert "Smallest ratio that stays within 1%" in table and "| cacheblend | " in table and "| epic | " in table
    assert "| fullcomp | - | 1 | " in table and "| 100.0% (21-100) | 100.0% (21-100) | 0.0000 |" in table
    png = (out_dir / "tradeoff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    stamp = {p.name: p.read_bytes() for p in out_dir.glob("*.jsonl")}
    rc, text, _ = _cli(capsys, *args)                                        # resumable: nothing new
    assert rc == 0 and text.count("nothing new") == 5
    assert {p.name: p.read_bytes() for p in out_dir.glob("*.jsonl")} == stamp


def test_report_smallest_ratio_within_one_percent(tmp_path):
    def rows(method, ratio, top1s):
        path = tmp_path / (f"{method}.jsonl" if ratio is None else f"{method}_r{ratio:g}.jsonl")
        path.write_text("".join(json.dumps({"id": str(i), "method": method, "ratio": ratio, "score": 0.5,
                                            "score_full": 0.5, "same_answer": t, "top1": t, "kl": 0.0,
                                            "ttft_s": 1.0 if ratio is None else ratio + 0.2, "ttft_full_s": 1.0,
                                            "selection_s": 0.0}) + "\n" for i, t in enumerate(top1s)))
    rows("fullcomp", None, [True] * 100)
    rows("good", 0.1, [True] * 98 + [False] * 2)
    rows("good", 0.3, [True] * 99 + [False])
    rows("good", 0.5, [True] * 100)
    rows("bad", 0.1, [False] * 100)
    rows("bad", 0.3, [True] * 50 + [False] * 50)
    runs = [("fullcomp", None), ("good", 0.1), ("good", 0.3), ("good", 0.5), ("bad", 0.1), ("bad", 0.3)]
    assert grid(["reuse", "good", "fullcomp"], [0.5, 0.1, 0.3]) == [("fullcomp", None), ("reuse", None), *runs[1:4]]
    result = write_report(tmp_path, "toy", runs, log=lambda *_: None)
    table = (tmp_path / "table.md").read_text()
    assert result["smallest_ratio"] == {"good": 0.3, "bad": None}
    by = result["smallest_ratio_by"]
    assert by["top1"] == by["same_answer"] == {"good": 0.3, "bad": None}
    assert by["score"] == {"good": 0.1, "bad": 0.1}       # every run scores as full prefill does
    assert "| good | 0.1 (3.33x) | 0.3 (2.00x) | 0.3 (2.00x) |" in table
    assert "| bad | 0.1 (3.33x) | none in grid | none in grid |" in table
    assert "| good | 0.5 | 100 | 0.500 | 1.000 | 100.0% (96-100) | 100.0% (96-100) | 0.0000 | 700 | 1.43x |" in table
    assert "| bad | 0.3 | 100 | 0.500 | 1.000 | 50.0% (40-60) |" in table
    assert "against each selector" not in table                # no qcfuse runs: no head-to-head


def test_report_pairs_qcfuse_with_each_selector_by_sample(tmp_path):
    def rows(method, ratio, kls):
        (tmp_path / f"{method}_r{ratio:g}.jsonl").write_text("".join(json.dumps({
            "id": str(i), "method": method, "ratio": ratio, "score": 0.5, "score_full": 0.5, "same_answer": True,
            "top1": i > 0, "kl": kl, "ttft_s": 0.5, "ttft_full_s": 1.0, "selection_s": 0.0}) + "\n"
            for i, kl in enumerate(kls)))
    (tmp_path / "fullcomp.jsonl").write_text("".join(json.dumps({
        "id": str(i), "method": "fullcomp", "ratio": None, "score": 0.5, "score_full": 0.5, "same_answer": True,
        "top1": True, "kl": 0.0, "ttft_s": 1.0, "ttft_full_s": 1.0, "selection_s": 0.0}) + "\n" for i in range(10)))
    ours = [0.01 * (i + 1) for i in range(10)]
    rows("qcfuse", 0.1, ours)
    rows("epic", 0.1, [2 * kl for kl in ours[:9]] + [ours[9] - 0.001])          # worse on 9 samples, better on one
    rows("prophetkv", 0.1, ours)                                            # identical: no difference to test
    rows("cacheblend", 0.3, ours)                                           # no qcfuse run at this ratio
    runs = [("fullcomp", None), ("qcfuse", 0.1), ("epic", 0.1), ("prophetkv", 0.1), ("cacheblend", 0.3)]
    result = write_report(tmp_path, "toy", runs, log=lambda *_: None)
    pairs = result["head_to_head"]
    assert set(pairs) == {"epic:0.1", "prophetkv:0.1"}
    assert pairs["epic:0.1"]["lower"] == 9 and pairs["epic:0.1"]["higher"] == 1 and pairs["epic:0.1"]["n"] == 10
    assert pairs["epic:0.1"]["p"] < 0.05
    assert pairs["prophetkv:0.1"] == {"n": 10, "lower": 0, "higher": 0, "p": 1.0}
    table = (tmp_path / "table.md").read_text()
    assert "| ratio | vs epic | vs prophetkv | vs cacheblend |" in table
    assert f"| 0.1 | 9 / 1 of 10 (p {pairs['epic:0.1']['p']:.2g}) | 0 / 0 of 10 (p 1) | - |" in table
    assert "| qcfuse | 0.1 | 10 | 0.500 | 1.000 | 100.0% (72-100) | 90.0% (60-98) |" in table


def test_report_compares_qcfuse_with_each_selector_at_equal_ttft(tmp_path):
    def run(method, ratio, ttft, kl):
        name = "fullcomp.jsonl" if ratio is None else f"{method}_r{ratio:g}.jsonl"
        (tmp_path / name).write_text("".join(json.dumps({
            "id": str(i), "method": method, "ratio": ratio, "score": 0.5, "score_full": 0.5, "same_answer": True,
            "top1": True, "kl": kl, "ttft_s": ttft, "ttft_full_s": 10.0, "selection_s": 0.0}) + "\n" for i in range(4)))
    run("fullcomp", None, 10.0, 0.0)
    run("qcfuse", 0.1, 2.0, 0.05)          # faster than every prophetkv point: nothing to compare with
    run("qcfuse", 0.3, 4.0, 0.03)          # a quarter of the way from prophetkv's 3 s point to its 7 s point
    run("prophetkv", 0.1, 3.0, 0.04)
    run("prophetkv", 0.3, 7.0, 0.02)
    run("epic", 0.1, 1.0, 0.10)            # one grid point: no curve to read, no column
    runs = [("fullcomp", None), ("qcfuse", 0.1), ("qcfuse", 0.3), ("prophetkv", 0.1), ("prophetkv", 0.3),
            ("epic", 0.1)]
    result = write_report(tmp_path, "toy", runs, log=lambda *_: None)
    assert set(result["equal_ttft"]) == {"prophetkv:0.1", "prophetkv:0.3"}
    assert result["equal_ttft"]["prophetkv:0.1"] is None
    assert result["equal_ttft"]["prophetkv:0.3"] == pytest.approx(0.035)
    table = (tmp_path / "table.md").read_text()
    assert "| ratio | qcfuse TTFT ms | qcfuse mean KL | prophetkv there |" in table
    assert "| 0.1 | 2000 | 0.0500 | outside |" in table and "| 0.3 | 4000 | 0.0300 | 0.0350 |" in table


def test_report_marks_rows_timed_against_another_full_prefill(tmp_path):
    def run(method, ratio, ttft, full):
        name = "fullcomp.jsonl" if ratio is None else f"{method}_r{ratio:g}.jsonl"
        (tmp_path / name).write_text("".join(json.dumps({
            "id": str(i), "method": method, "ratio": ratio, "score": 0.5, "score_full": 0.5, "same_answer": True,
            "top1": True, "kl": 0.01 / ratio if ratio else 0.0, "ttft_s": ttft, "ttft_full_s": full,
            "selection_s": 0.0}) + "\n" for i in range(4)))
    runs = [("fullcomp", None), ("qcfuse", 0.1), ("prophetkv", 0.1), ("prophetkv", 0.3)]
    run("fullcomp", None, 10.0, 10.0)
    run("prophetkv", 0.1, 3.0, 10.0)
    run("prophetkv", 0.3, 7.0, 10.0)
    run("qcfuse", 0.1, 4.0, 10.0)                 # same reference: compared at equal TTFT
    result = write_report(tmp_path, "toy", runs, log=lambda *_: None)
    table = (tmp_path / "table.md").read_text()
    assert "†" not in table and result["equal_ttft"]["prophetkv:0.1"] == pytest.approx(0.0833, abs=1e-4)
    run("qcfuse", 0.1, 4.0, 20.0)                 # merged in from a run whose full prefill took 20 s
    result = write_report(tmp_path, "toy", runs, log=lambda *_: None)
    table = (tmp_path / "table.md").read_text()
    assert "| qcfuse | 0.1 | 4 | " in table and "| 4000† | 5.00x† |" in table
    assert "| prophetkv | 0.1 | 4 | " in table and "| 3000 | 3.33x |" in table
    assert "† Timed apart" in table and "At equal TTFT: not shown" in table and result["equal_ttft"] == {}
    png = (tmp_path / "tradeoff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_of_an_unfinished_sweep_compares_the_same_samples(tmp_path, capsys):
    def rows(name, method, ratio, n, top1=True, first=0):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({
            "id": str(first + i), "method": method, "ratio": ratio, "score": 0.5, "score_full": 0.5, "same_answer": top1,
            "top1": top1, "kl": 0.0, "ttft_s": 0.5, "ttft_full_s": 1.0, "selection_s": 0.0}) + "\n"
            for i in range(n)))
    rows("fullcomp", "fullcomp", None, 10)
    rows("reuse", "reuse", None, 10, top1=False)
    rows("qcfuse_r0.1", "qcfuse", 0.1, 7)             # stopped mid-step: only the first 7 samples
    rc, text, err = _cli(capsys, "sweep", "--dataset", "musique_s", "--methods", "reuse,qcfuse",
                         "--ratios", "0.1,0.5", "--report", "--out_dir", str(tmp_path))
    assert rc == 0, err
    assert "not run yet: qcfuse_r0.5" in text
    table = (tmp_path / "table.md").read_text()
    assert "| fullcomp | - | 7 |" in table and "| reuse | - | 7 |" in table and "| qcfuse | 0.1 | 7 |" in table
    assert "| reuse | yes (ratio-free) | no (ratio-free) | no (ratio-free) |" in table
    assert "qcfuse | 0.5" not in table
    rows("qcfuse_r0.1", "qcfuse", 0.1, 3, first=50)     # samples no other run has
    rc, _, err = _cli(capsys, "sweep", "--dataset", "musique_s", "--methods", "qcfuse", "--ratios", "0.1",
                      "--report", "--out_dir", str(tmp_path))
    assert rc == 2 and "no sample is finished by every run" in err


# -- command-line errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["eval", "--dataset", "hotpotqa", "--data_dir", "/no/such/dir", "--baseline", "reuse"], "data directory not found"),
    (["eval", "--dataset", "squad", "--data_dir", str(FIXTURES), "--baseline", "reuse"], "unknown dataset"),
    (["eval", "--dataset", "hotpotqa", "--data_dir", str(FIXTURES), "--baseline", "magic"], "unknown method"),
    (["eval", "--dataset", "hotpotqa", "--data_dir", str(FIXTURES), "--baseline", "epic", "--ratio", "1.5"],
     "ratio must be within"),
    (["eval", "--dataset", "hotpotqa", "--data_dir", "{bad}", "--baseline", "reuse"], "hotpotqa.jsonl:2: malformed"),
    (["sweep", "--dataset", "hotpotqa", "--data_dir", str(FIXTURES), "--methods", "epic", "--ratios", "0.1,x"],
     "ratio must be a number within [0, 1] or 'auto', got 'x'"),
    (["sweep", "--dataset", "hotpotqa", "--data_dir", str(FIXTURES), "--methods", "epic,nope"], "unknown method"),
    (["data", "ruler", "--task", "vt", "--n", "0", "--out", "{bad}/x.jsonl"], "--n must be at least 1"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, message):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "hotpotqa.jsonl").write_text((FIXTURES / "hotpotqa.jsonl").read_text().splitlines()[0] + "\n{oops\n")
    args = [a.replace("{bad}", str(bad)) for a in args]
    extra = {"eval": ["--out", str(tmp_path / "o.jsonl")], "sweep": ["--out_dir", str(tmp_path / "s")]}
    rc, _, err = _cli(capsys, *args, *extra.get(args[0], []))
    assert rc == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_report_compares_ratio_auto_with_fixed_ratios(tmp_path):
    def run(method, ratio, top1s, kl, share, **extra):
        name = "fullcomp.jsonl" if ratio is None else f"{run_name(method, ratio)}.jsonl"
        n_doc = 1000
        (tmp_path / name).write_text("".join(json.dumps({
            "id": str(i), "method": method, "ratio": ratio, "score": 0.5, "score_full": 0.5, "same_answer": t,
            "top1": t, "kl": kl, "ttft_s": 0.2 + share, "ttft_full_s": 1.0, "selection_s": 0.0,
            "recomputed_tokens": round(share * n_doc), "context_tokens": n_doc, **extra}) + "\n"
            for i, t in enumerate(top1s)))
    run("fullcomp", None, [True] * 100, 0.0, 1.0)
    run("qcfuse", 0.1, [True] * 90 + [False] * 10, 0.04, 0.1)
    run("qcfuse", 0.3, [True] * 99 + [False], 0.02, 0.3)
    run("qcfuse", 0.5, [True] * 100, 0.01, 0.5)
    # the margin rule's passes all count: the cache kept 0.1 recomputed, the request spent 0.2 in two passes
    run("qcfuse", "auto:0.99", [True] * 100, 0.015, 0.1, recomputed_total_share=0.2, passes=2,
        reuse_checked=True)
    run("epic", 0.1, [False] * 100, 0.5, 0.1)
    runs = grid(["epic", "qcfuse"], [0.1, 0.3, 0.5, "auto:0.99"])
    assert ("epic", "auto:0.99") not in runs and runs[-1] == ("qcfuse", "auto:0.99")
    result = write_report(tmp_path, "toy", runs, log=lambda *_: None)
    [auto] = result["auto"]
    assert auto["method"] == "qcfuse" and auto["target"] == 0.99 and auto["share"] == pytest.approx(0.2)
    assert auto["fixed_ratio_99"] == 0.3 and auto["top1"] == 1.0
    assert auto["fixed_kl_at_share"] == pytest.approx(0.03)           # halfway between 0.1 (0.04) and 0.3 (0.02)
    table = (tmp_path / "table.md").read_text()
    assert auto["reuse_checked"] == 1.0
    assert "| qcfuse | 0.99 | 100 | 0.200 | 2.00 | 100.0% | 100.0% | 0.0150 | 0.3 (99.0%) | 0.0300 |" in table
    assert "qcfuse auto" not in result["smallest_ratio"]                # auto is not a fixed-ratio row
    assert set(result["head_to_head"]) == {"epic:0.1"}
