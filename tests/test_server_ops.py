"""Operating `qcfuse serve`: API keys, health while a tier is down, honest cache accounting when entries break,
queue depth and bytes per tier in /metrics, and the store and thread flags. Real servers (the CLI in a
subprocess) with a real private Redis, through the official `openai` client."""
import threading
import time

import httpx
import openai
import pytest

from qcfuse.cli import main
from servers import MODEL, free_port, metric, serve, start_redis

KEY = "sk-qcfuse-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
DOCS = ["The ferry to Skarn leaves the harbour at seven.", "Tickets are sold at the kiosk by the pier."]
QUESTION = "When does the ferry leave?"


@pytest.fixture(scope="module")
def redis_port():
    port = free_port()
    proc = start_redis(port)
    state = {"proc": proc, "port": port}
    yield state
    state["proc"].kill()


@pytest.fixture(scope="module")
def ops(tmp_path_factory, redis_port):
    """A server with a key, a disk tier (no memory tier, so every request reads the disk) and Redis."""
    cache = tmp_path_factory.mktemp("ops") / "kv"
    running = serve(tmp_path_factory, "--api_key", KEY, "--cache_dir", str(cache), "--memory_gb", "0",
                    "--disk_gb", "1", "--redis_url", f"redis://127.0.0.1:{redis_port['port']}/0", "--threads", "1")
    url = next(running)
    yield {"url": url, "cache": cache}
    next(running, None)


@pytest.fixture(scope="module")
def keyed(ops):
    return openai.OpenAI(base_url=f"{ops['url']}/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(client, documents=DOCS, **kwargs):
    kwargs.setdefault("max_tokens", 4)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                          extra_body={"documents": documents}, **kwargs)


# -- auth ---------------------------------------------------------------------------------------------------------
def test_every_v1_route_wants_the_key(ops, keyed):
    url = ops["url"]
    before = metric(url, "qcfuse_request_errors_total", status="401")
    for wrong in ("nope", KEY + "x"):
        anonymous = openai.OpenAI(base_url=f"{url}/v1", api_key=wrong, max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError) as caught:
            anonymous.models.list()
        assert caught.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            ask(anonymous)
        with pytest.raises(openai.AuthenticationError):
            anonymous.completions.create(model=MODEL, prompt="Hello", max_tokens=1)
    for path in ("/v1/models", "/v1/nothing"):
        r = httpx.get(f"{url}{path}")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert metric(url, "qcfuse_request_errors_total", status="401") == before + 8
    assert [m.id for m in keyed.models.list().data] == [MODEL]
    assert ask(keyed).choices[0].message.content is not None
    assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{url}/metrics").status_code == 200


def test_auth_all_routes_guards_health_and_metrics_too(tmp_path_factory):
    running = serve(tmp_path_factory, "--auth_all_routes", env={"QCFUSE_API_KEY": KEY}, key=KEY)
    url = next(running)
    try:
        for path in ("/health", "/metrics"):
            assert httpx.get(f"{url}{path}").status_code == 401
            assert httpx.get(f"{url}{path}", headers=AUTH).status_code == 200
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        assert client.completions.create(model=MODEL, prompt="Hello", max_tokens=1).choices[0].finish_reason
    finally:
        next(running, None)


# -- health -------------------------------------------------------------------------------------------------------
def test_health_is_degraded_while_redis_is_down_and_ok_when_it_returns(ops, keyed, redis_port):
    url = ops["url"]
    assert httpx.get(f"{url}/health").json() == {"status": "ok", "model": MODEL, "problems": []}
    assert metric(url, "qcfuse_cache_tier_up", tier="redis") == 1
    redis_port["proc"].kill()
    redis_port["proc"].wait()
    try:
        health = httpx.get(f"{url}/health")
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert any(p.startswith("redis tier:") and "unreachable" in p for p in health.json()["problems"])
        assert ask(keyed).choices[0].message.content is not None        # the disk tier still serves
        assert metric(url, "qcfuse_cache_tier_up", tier="redis") == 0
    finally:
        redis_port["proc"] = start_redis(redis_port["port"])
    assert httpx.get(f"{url}/health").json()["status"] == "ok"          # ready again at the next probe
    assert metric(url, "qcfuse_cache_tier_up", tier="redis") == 1


# -- honest cache accounting --------------------------------------------------------------------------------------
def test_broken_entries_are_misses_everywhere(ops, keyed):
    url, cache = ops["url"], ops["cache"]
    docs = ["The lantern festival in Oskar Bay is held in March.", "Its lanterns are made of rice paper."]
    ask(keyed, docs)                                                # computed and stored (disk and Redis)
    clean = ask(keyed, docs).model_extra["fusion"]
    assert (clean["cache_hits"], clean["cache_misses"], clean["cache_corrupt"]) == (2, 0, 0)
    assert clean["hits_by_tier"] == {"disk": 2}
    counts = {name: metric(url, name) for name in ("qcfuse_cache_hits_total", "qcfuse_cache_misses_total",
                                                    "qcfuse_cache_corrupt_total")}
    broken = 0
    for part in cache.glob("entries/*/*/layer.9.safetensors"):
        blob = bytearray(part.read_bytes())
        blob[len(blob) // 2] ^= 0x01
        part.write_bytes(bytes(blob))
        broken += 1
    assert broken >= 3                                              # at least the prefix and the two chunks
    reply = ask(keyed, docs)
    stats = reply.model_extra["fusion"]
    assert (stats["cache_hits"], stats["cache_misses"], stats["cache_corrupt"]) == (0, 2, 2)
    assert stats["hits_by_tier"] == {} and reply.usage.prompt_tokens_details.cached_tokens == 0
    assert metric(url, "qcfuse_cache_hits_total") == counts["qcfuse_cache_hits_total"]
    assert metric(url, "qcfuse_cache_misses_total") == counts["qcfuse_cache_misses_total"] + 2
    assert metric(url, "qcfuse_cache_corrupt_total") == counts["qcfuse_cache_corrupt_total"] + 2
    again = ask(keyed, docs).model_extra["fusion"]                  # recomputed entries were stored clean
    assert (again["cache_hits"], again["cache_corrupt"]) == (2, 0)


# -- metrics ------------------------------------------------------------------------------------------------------
def test_metrics_hold_bytes_per_tier(ops, keyed):
    ask(keyed)
    url = ops["url"]
    assert metric(url, "qcfuse_cache_tier_bytes", tier="memory") == 0            # --memory_gb 0
    assert metric(url, "qcfuse_cache_tier_bytes", tier="disk") > 0
    assert metric(url, "qcfuse_cache_tier_bytes", tier="redis") > 0
    assert metric(url, "qcfuse_cache_tier_entries", tier="disk") >= 3


def test_queue_depth_apart_from_the_running_request(ops, keyed):
    url = ops["url"]
    long = {"model": MODEL, "messages": [{"role": "user", "content": "Count from 1 to 300, separated by commas."}],
            "max_tokens": 1000, "stream": True}
    waiting = {}

    def second_request():
        waiting["reply"] = ask(keyed, max_tokens=2)

    with httpx.stream("POST", f"{url}/v1/chat/completions", json=long, headers=AUTH, timeout=60) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
                break                                               # it holds the engine now
        thread = threading.Thread(target=second_request)
        thread.start()
        deadline = time.monotonic() + 30
        while (metric(url, "qcfuse_queue_depth"), metric(url, "qcfuse_requests_running")) != (1, 1):
            assert time.monotonic() < deadline, "the second request never showed as queued"
            time.sleep(0.1)
        assert metric(url, "qcfuse_requests_in_flight") == 2
    thread.join(timeout=120)
    assert waiting["reply"].choices[0].message.content is not None
    deadline = time.monotonic() + 15
    while metric(url, "qcfuse_requests_running") or metric(url, "qcfuse_queue_depth"):
        assert time.monotonic() < deadline
        time.sleep(0.1)


# -- the serve command's own checks, before any model loads -----------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["--memory_gb", "-1"], "--memory_gb must be 0 or more"),
    (["--disk_gb", "0"], "--disk_gb must be positive"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--api_key", " "], "must not be empty"),
    (["--auth_all_routes"], "--auth_all_routes needs --api_key"),
    (["--method", "magic"], "unknown method"),
])
def test_serve_flag_mistakes_are_one_line(capsys, monkeypatch, args, message):
    monkeypatch.delenv("QCFUSE_API_KEY", raising=False)
    assert main(["serve", "--port", str(free_port()), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
