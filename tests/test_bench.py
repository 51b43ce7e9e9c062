"""`qcfuse bench` on the CPU with a tiny random config: every measurement present, the built-in exactness
check holds, records are written, and user mistakes end in one clear line. (Speed itself is never asserted
here: the benchmark prints measured ratios; tests only check that it measures.)"""
from __future__ import annotations

import json

import pytest
import torch

from qcfuse.bench import BenchConfig, config_names, load_config, run_bench
from qcfuse.cli import main
from qcfuse.model.rope import Rope

TINY = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 1024, "tie_word_embeddings": False}


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"_comment": "test shape", **TINY}))
    return str(path)


def _run(tiny_config, **kw):
    cfg = BenchConfig(device="cpu", config=tiny_config, tokens=[200, 330], ratios=[0.1, 0.5],
                      methods=["reuse", "cacheblend", "qcfuse"], chunk_tokens=64, **kw)
    return run_bench(cfg, log=lambda *_: None, progress=False)


def test_shipped_configs_build_real_shapes():
    assert {"qwen3-8b", "llama-3.1-8b", "smollm2-135m"} <= set(config_names())
    name, cfg = load_config("qwen3-8b")
    assert (cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]) == (36, 8, 128)
    assert "_comment" not in cfg
    from transformers import AutoConfig
    llama = AutoConfig.for_model(**load_config("llama-3.1-8b")[1])
    assert llama.rope_parameters["rope_type"] == "llama3" and llama.num_hidden_layers == 32


def test_bench_measures_every_method_and_ratio_and_checks_exactness(tiny_config):
    record = _run(tiny_config)
    assert record["device_type"] == "cpu" and record["weights"] == "random" and record["config"] == "tiny"
    assert record["versions"]["torch"] == torch.__version__
    assert [r["tokens"] for r in record["results"]] == [200, 330]
    # the fast path is exact: full prefill and recompute-everything fusion give transformers' logits (checked
    # once, at the shortest length)
    check = record["results"][0]["check"]
    assert check["passed"] and check["tokens"] == 200 and check["reference"] == "transformers forward"
    assert check["full"]["max_abs"] < 1e-4 and check["fused"]["max_abs"] < 1e-4
    assert "check" not in record["results"][1]
    for res in record["results"]:
        assert res["chunks"] == -(-(res["tokens"] - 96) // 64)
        assert res["transformers_ms"] > 0 and res["qcfuse_full_ms"] > 0
        assert res["attention_kernels"] == {"full prefill": {"None": "causal"}, "scattered rows": {"None": "blocked"}}
        runs = [(f["method"], f["ratio"]) for f in res["fused"]]
        assert runs == [("reuse", None), ("cacheblend", 0.1), ("cacheblend", 0.5), ("qcfuse", 0.1), ("qcfuse", 0.5)]
        for f in res["fused"]:
            assert f["ttft_ms"] > 0
            parts = f["selection_ms"] + f["load_wait_ms"] + f["compute_ms"]
            assert parts == pytest.approx(f["ttft_ms"], rel=1e-6)
            assert f["speedup_vs_transformers"] == pytest.approx(res["transformers_ms"] / f["ttft_ms"])
            docs = res["tokens"] - 96
            expected = 0 if f["ratio"] is None else round(f["ratio"] * docs)
            assert f["recomputed_tokens"] == expected
        qc = next(f for f in res["fused"] if f["method"] == "qcfuse")
        assert qc["selection_ms"] > 0
        # host operators per request, for every run; more recomputed rows never means fewer operators here
        # (row blocks), and every request dispatches at least a few per layer
        ops = {name: d["host_ops"] for name, d in res["dispatches"].items()}
        assert set(ops) == {"qcfuse full prefill", "reuse", "cacheblend 0.1", "cacheblend 0.5", "qcfuse 0.1",
                            "qcfuse 0.5"}
        assert all(n > 4 * 4 for n in ops.values())                # the tiny model has 4 layers
        assert ops["qcfuse 0.5"] >= ops["qcfuse 0.1"] and ops["qcfuse 0.1"] > ops["reuse"]


def test_fused_runs_are_timed_in_rotating_rounds():
    """Warm-ups first, then each round times every run once, starting one run later than the round before."""
    from qcfuse.bench.run import interleaved
    calls = []

    def call(key):
        calls.append(key)
        return {"n": len(calls)}
    a, b, c = ("reuse", 0.0), ("epic", 0.1), ("qcfuse", 0.1)
    timed = interleaved({key: (lambda key=key: call(key)) for key in (a, b, c)}, repeats=3, warmup=1)
    assert calls == [a, b, c] + [a, b, c] + [b, c, a] + [c, a, b]
    assert [s["n"] for s in timed[b]] == [5, 7, 12]       # its own calls, warm-up left out


def test_bench_profiles_one_request_per_length_into_the_record(tiny_config, tmp_path):
    record = _run(tiny_config, profile="qcfuse@0.1", attention="blocked")
    assert record["attention"] == "blocked"
    for res in record["results"]:
        assert res["profile"]["request"] == "qcfuse 0.1" and "aten::" in res["profile"]["table"]
    from qcfuse.bench.run import save_record
    md = save_record(record, tmp_path).with_suffix(".md").read_text()
    assert "## Profile: qcfuse 0.1 at 200 tokens" in md and "## Profile: qcfuse 0.1 at 330 tokens" in md


def test_bench_critical_layers_stand_in_for_a_profile(tiny_config, capsys):
    """--critical_layers: the layers QCFuse scores with and the query cache stores keys of, as a profile would
    give them; recorded and printed."""
    assert main(["bench", "--device", "cpu", "--config", tiny_config, "--tokens", "200", "--ratios", "0.2",
                 "--methods", "qcfuse", "--chunk_tokens", "64", "--critical_layers", "3,1", "--no_check",
                 "--json", "--out", "-"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["critical_layers"] == [1, 3]
    assert _run(tiny_config)["critical_layers"] != [1, 3]       # without it: the spread default


def test_bench_streams_from_disk(tiny_config, tmp_path):
    record = _run(tiny_config, kv_source="disk", cache_dir=str(tmp_path / "kv"))
    assert record["kv_source"] == "disk"
    fused = record["results"][0]["fused"]
    assert all(f["bytes_loaded"] > 0 for f in fused)
    assert record["results"][0]["check"]["passed"]


def test_cli_json_and_record(tiny_config, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--device", "cpu", "--config", tiny_config, "--tokens", "200", "--ratios", "0.2",
                 "--methods", "reuse,qcfuse", "--chunk_tokens", "64", "--json", "--out", str(out)])
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    assert [f["method"] for f in record["results"][0]["fused"]] == ["reuse", "qcfuse"]
    saved = list(out.glob("tiny_*_host_*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["results"] == record["results"]
    md = saved[0].with_suffix(".md").read_text()
    assert "transformers full prefill" in md and "qcfuse" in md
    png = saved[0].with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000


def test_cli_prints_tables(tiny_config, capsys):
    assert main(["bench", "--device", "cpu", "--config", tiny_config, "--tokens", "160", "--ratios", "0.3",
                 "--methods", "epic", "--chunk_tokens", "32", "--out", "-"]) == 0
    text = capsys.readouterr().out
    assert "transformers full prefill (SDPA)" in text and "epic" in text and "check at 160 tokens (float32" in text and "PASS" in text


@pytest.mark.parametrize("argv, message", [
    (["--config", "no-such-shape"], "unknown config 'no-such-shape'"),
    (["--device", "cuda"], "no CUDA GPU"),
    (["--tokens", "5000"], "does not fit the model's window of 1024"),
    (["--tokens", "50"], "at least 97"),
    (["--tokens", "2k"], "--tokens expects a comma-separated list"),
    (["--kv-source", "gpu"], "--kv-source gpu needs --device cuda"),
    (["--methods", "fullcomp"], "not a fusion method"),
    (["--methods", "magic"], "unknown method 'magic'"),
    (["--ratios", "1.5"], "ratio must be within [0, 1]"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--profile", "epic@x"], "--profile expects METHOD@RATIO"),
    (["--profile", "magic@0.1"], "unknown method 'magic'"),
    (["--critical_layers", "1,4"], "--critical_layers [1, 4]: outside 0..3"),
    (["--critical_layers", "one"], "--critical_layers expects a comma-separated list"),
])
def test_cli_user_mistakes(tiny_config, capsys, argv, message):
    if argv[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    options = {"--device": "cpu", "--config": tiny_config, "--tokens": "200", "--out": "-"}
    options.update(zip(argv[::2], argv[1::2]))
    args = ["bench", *[x for kv in options.items() for x in kv]]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["bench", "--device", "cpu", "--config", str(bad), "--out", "-"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    shapeless = tmp_path / "shapeless.json"
    shapeless.write_text("{}")
    assert main(["bench", "--device", "cpu", "--config", str(shapeless), "--out", "-"]) == 2
    assert "model_type" in capsys.readouterr().err


def test_rope_tables_match_direct_computation():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    rope = Rope(inv_freq, attention_scaling=0.9, max_positions=64)
    x = torch.randn(2, 5, 16)
    for positions in (torch.tensor([0, 3, 7, 8, 63]), torch.arange(10, 15), torch.tensor([1, 2, 60, 64, 900])):
        direct_cos, direct_sin = rope._compute(positions, torch.float32)
        cos, sin = rope.cos_sin(positions, torch.float32)
        torch.testing.assert_close(cos, direct_cos, atol=1e-6, rtol=0)
        torch.testing.assert_close(sin, direct_sin, atol=1e-6, rtol=0)
        out = torch.empty(2, 5, 16)
        rope.apply(x, positions, out=out)
        torch.testing.assert_close(out, rope.apply(x, positions), atol=0, rtol=0)
        half = x[..., 8:], x[..., :8]                  # the textbook form: x*cos + rotate_half(x)*sin
        textbook = x * direct_cos + torch.cat((-half[0], half[1]), dim=-1) * direct_sin
        torch.testing.assert_close(rope.apply(x, positions), textbook, atol=1e-6, rtol=0)
    # a range reads slices of the table (in and past the window), and remembered angles never go stale
    for span in (range(10, 15), range(62, 67), range(10, 15)):
        torch.testing.assert_close(rope.apply(x, span), rope.apply(x, torch.arange(span.start, span.stop)),
                                   atol=1e-6, rtol=0)
