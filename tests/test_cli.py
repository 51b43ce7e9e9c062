"""The command line as a user meets it: answers with stats, one-line errors, no tracebacks."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qcfuse.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "docs"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qcfuse", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture()
def docs(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("The orchard on Hill Road grows pears and plums. It was planted in 1962.")
    b.write_text("Plums are harvested in late August. Pears follow in September.")
    return [str(a), str(b)]


def test_generate_json(docs, capsys):
    rc = main(["generate", "-d", docs[0], "-d", docs[1], "-q", "When was the orchard planted?",
               "--method", "cacheblend", "--ratio", "0.3", "--max_new_tokens", "8", "--json", "--compare"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    for key in ("answer", "ttft_s", "selection_s", "recomputed_tokens", "context_tokens", "cache_hits",
                "cache_misses", "fullcomp_ttft_s", "speedup", "same_answer"):
        assert key in out
    assert out["cache_hits"] == 2 and out["cache_misses"] == 0
    assert out["recomputed_tokens"] == round(0.3 * out["context_tokens"])
    assert out["ttft_s"] > 0 and out["new_tokens"] <= 8


def test_generate_text_output(docs, capsys):
    rc = main(["generate", "-d", docs[0], "-d", docs[1], "-q", "What grows there?", "--method", "reuse",
               "--max_new_tokens", "4"])
    out = capsys.readouterr().out
    assert rc == 0 and "TTFT" in out and "chunk cache: 2 hits (by tier: 2 memory), 0 misses" in out


@pytest.mark.parametrize("make_args,message", [
    (lambda d, t: ["-d", d[0], "-d", str(t / "missing.txt")], "document not found"),
    (lambda d, t: ["-d", str(_write(t / "empty.txt", "  \n"))], "document is empty"),
    (lambda d, t: ["-d", d[0], "--method", "magic"], "unknown method"),
    (lambda d, t: ["-d", d[0], "--ratio", "1.5"], "ratio must be within"),
    (lambda d, t: ["-d", d[0], "--model", "no-such-model"], "unknown model"),
    (lambda d, t: ["-d", str(_write(t / "long.txt", "lorem ipsum " * 5000))], "exceeds the model's window"),
    (lambda d, t: ["-d", d[0], "--max_new_tokens", "0"], "max_new_tokens"),
])
def test_user_errors_are_one_line(docs, tmp_path, capsys, make_args, message):
    rc = main(["generate", "-q", "Anything?", *make_args(docs, tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _write(path, text):
    path.write_text(text)
    return path


def test_subprocess_error_has_no_traceback(tmp_path):
    done = run_cli("generate", "-d", str(tmp_path / "nope.txt"), "-q", "x")
    assert done.returncode == 2
    assert done.stderr.strip() == f"qcfuse: error: document not found: {tmp_path / 'nope.txt'}"


def test_subprocess_check_command():
    done = run_cli("check", "--json")
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["passed"], report


def test_examples_run_end_to_end():
    files = sorted(EXAMPLES.glob("*.txt"))
    assert len(files) >= 3
    args = ["generate", "--json", "--method", "cacheblend", "--ratio", "0.15", "--max_new_tokens", "4",
            "-q", "In which year was the Great Barrier Reef Marine Park established?"]
    for f in files:
        args += ["-d", str(f)]
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["context_tokens"] > 1000 and out["cache_hits"] == len(files)


def test_method_options_reach_the_selector(docs, capsys):
    rc = main(["generate", "-d", docs[0], "-d", docs[1], "-q", "When?", "--method", "qcfuse", "--ratio", "0.2",
               "--opt", "critical_layers=3,5", "--opt", "reduction=max", "--opt", "anchor_ratio=0.2",
               "--opt", "head_norm=true", "--opt", "query_rows=last", "--max_new_tokens", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["recomputed_tokens"] == round(0.2 * out["context_tokens"])
    rc = main(["generate", "-d", docs[0], "-q", "When?", "--method", "epic", "--opt", "colour=blue"])
    assert rc == 2 and "bad option for method 'epic'" in capsys.readouterr().err
    rc = main(["generate", "-d", docs[0], "-q", "When?", "--opt", "head_norm=maybe"])
    assert rc == 2 and "head_norm must be true or false" in capsys.readouterr().err


def test_profile_command(tmp_path, capsys):
    data = tmp_path / "calib.json"
    data.write_text(json.dumps([{"question": "Unused?", "answers": [], "ctxs": []}, {
        "question": "Who designed the granary?",
        "answers": ["Ilse Marrow"],
        "ctxs": [{"title": "Granary", "text": "The granary in Tromso was designed by Ilse Marrow in 1870."},
                 {"title": "Lighthouse", "text": "The Varna lighthouse burned whale oil until 1921."}],
    }]))
    out = tmp_path / "profile.json"
    rc = main(["profile", "--data", str(data), "--first", "1", "--samples", "1", "--passages", "2", "--out", str(out)])
    assert rc == 0
    prof = json.loads(out.read_text())
    assert prof["first_sample"] == 1 and prof["samples"] == 1       # the first item (no passages) was skipped
    kl = prof["mean_kl_per_layer"]
    assert len(kl) == 30 and len(prof["critical_layers"]) == 3
    assert sorted(prof["critical_layers"]) == sorted(sorted(range(30), key=kl.__getitem__)[:3])
    assert "critical" in capsys.readouterr().out
    assert main(["profile", "--data", str(tmp_path / "missing.json")]) == 2
    assert main(["profile", "--data", str(data), "--first", "2"]) == 2             # past the end: no samples
    assert main(["profile", "--data", str(data), "--first", "-1"]) == 2


def _break_layer_files(cache_dir, layer: int) -> int:
    parts = list(cache_dir.glob(f"entries/*/*/layer.{layer}.safetensors"))
    for part in parts:
        blob = bytearray(part.read_bytes())
        blob[len(blob) // 2] ^= 0x01
        part.write_bytes(bytes(blob))
    return len(parts)


def test_broken_cache_entries_are_misses_not_hits(docs, tmp_path, capsys):
    cache = tmp_path / "kv"
    args = ["generate", "-d", docs[0], "-d", docs[1], "-q", "When?", "--method", "reuse", "--max_new_tokens", "2",
            "--cache_dir", str(cache)]
    assert main(args + ["--json"]) == 0
    clean = json.loads(capsys.readouterr().out)
    assert (clean["cache_hits"], clean["cache_misses"], clean["cache_corrupt"]) == (2, 0, 0)
    assert _break_layer_files(cache, 3) == 3                    # the prompt prefix and both chunks
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["cache_hits"], out["cache_misses"], out["cache_corrupt"], out["chunks_recomputed"]) == (0, 2, 2, 3)
    assert out["hits_by_tier"] == {} and out["cached_tokens"] == 0 and out["answer"] == clean["answer"]
    _break_layer_files(cache, 7)
    assert main(args) == 0
    assert "chunk cache: 0 hits (by tier: none), 2 misses, 2 of them broken entries, dropped" in capsys.readouterr().out
