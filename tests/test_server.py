"""`qcfuse serve` as clients meet it: the official openai client, raw HTTP for bad input, concurrent load.

One real server (the CLI, in a subprocess, on a free loopback port, with the real default model; the `server`
fixture of conftest.py, shared with the other server tests).
"""
import asyncio
import time

import httpx
import openai
import pytest

from qcfuse.serve.loadgen import run_load, running_server
from qcfuse.serve.schema import MAX_TOKENS_LIMIT
from servers import MODEL, metric, serve

ORCHARD = ["The orchard on Hill Road grows pears and plums.", "Plums are harvested in late August.",
           "The orchard was planted in 1962 by the Marsh family."]


def ask(client, documents, question="What grows on Hill Road?", max_tokens=8, **kwargs):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
        extra_body={"documents": documents, "fusion": {"method": "qcfuse", "ratio": 0.15}}, **kwargs)


# -- the happy paths ---------------------------------------------------------------------------------------------
def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_second_request_reuses_every_chunk_in_any_order(client):
    docs = ["Maple Street has a bakery that sells rye bread.", "The bakery opens at six in the morning.",
            "Its owner, Ines, moved there from Porto in 2004."]
    ask(client, ["A request before: the template prefix is stored by now."], max_tokens=1)
    first = ask(client, docs, "When does the bakery open?")
    second = ask(client, [docs[2], docs[0], docs[1]], "When does the bakery open?")
    f1, f2 = first.model_extra["fusion"], second.model_extra["fusion"]
    assert (f1["cache_hits"], f1["cache_misses"], f1["cache_corrupt"]) == (0, 3, 0)
    assert (f2["cache_hits"], f2["cache_misses"], f2["cache_corrupt"]) == (3, 0, 0)
    assert f2["ttft_s"] < f1["ttft_s"]                 # the first computed the chunk caches, the second read them
    for key in ("cached_tokens", "recomputed_tokens", "ttft_s", "selection_s", "queue_s", "context_tokens"):
        assert key in f2
    # cached: the prompt tokens read from stored entries and not recomputed, i.e. every token before the question
    # (template prefix + documents) but the recomputed ones; the first request computed its chunks (none cached)
    before_question = f2["prompt_tokens"] - f2["suffix_tokens"]
    assert f2["cached_tokens"] + f2["recomputed_tokens"] == before_question > f2["context_tokens"] > 0
    assert f1["cached_tokens"] == before_question - f1["context_tokens"]      # the prefix only, seen before
    assert second.choices[0].message.content and second.choices[0].finish_reason in ("stop", "length")
    usage = second.usage
    assert usage.prompt_tokens == f2["prompt_tokens"] and 1 <= usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == f2["cached_tokens"]
    assert first.usage.prompt_tokens_details.cached_tokens == f1["cached_tokens"]


def test_streamed_answer_equals_the_plain_one(server, client):
    plain = ask(client, ORCHARD)
    chunks = list(ask(client, ORCHARD, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *answer, finish, last = chunks
    text = "".join(c.choices[0].delta.content or "" for c in answer)
    assert text.strip() == plain.choices[0].message.content
    # OpenAI's order: the finish chunk, then one chunk with empty choices and the usage; none before it has usage
    assert finish.choices[0].finish_reason == plain.choices[0].finish_reason and finish.usage is None
    assert all(c.usage is None for c in answer)
    assert last.choices == [] and last.usage.completion_tokens == plain.usage.completion_tokens
    assert last.usage.prompt_tokens_details.cached_tokens == last.model_extra["fusion"]["cached_tokens"] > 0
    streamed, plain_stats = last.model_extra["fusion"], plain.model_extra["fusion"]
    assert set(streamed) == set(plain_stats)           # the stream reports every key the engine reports
    assert streamed["cache_hits"] == len(ORCHARD) and streamed["recomputed_tokens"] == plain_stats["recomputed_tokens"]

    with httpx.stream("POST", f"{server}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "What grows there?"}], "documents": ORCHARD,
            "max_tokens": 4, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_no_documents_is_a_plain_prompt(client):
    answer = client.chat.completions.create(
        model=MODEL, max_completion_tokens=6,
        messages=[{"role": "system", "content": "ignored"}, {"role": "user", "content": "What is 2 + 2?"}])
    stats = answer.model_extra["fusion"]
    assert answer.choices[0].message.content
    assert stats["method"] == "fullcomp" and stats["cache_hits"] == stats["cache_misses"] == 0


def test_client_leaving_mid_stream_frees_the_engine(server, client):
    body = {"messages": [{"role": "user", "content": "Write the numbers from 1 to 300 separated by commas."}],
            "documents": ["Counting: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10."], "fusion": {"method": "reuse"},
            "max_tokens": 1000, "stream": True}
    before = metric(server, "qcfuse_client_disconnects_total")
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as r:
        seen = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen.append(line)
            if len(seen) == 4:                          # the role chunk and three tokens, then hang up
                break
    assert not any('"finish_reason": "' in line for line in seen)
    deadline = time.monotonic() + 15                    # 1000 more tokens would take minutes
    while metric(server, "qcfuse_requests_in_flight") or metric(server, "qcfuse_client_disconnects_total") == before:
        assert time.monotonic() < deadline, "the stream kept its turn after its client left"
        time.sleep(0.2)
    assert ask(client, ORCHARD, max_tokens=2).choices[0].message.content is not None


# -- bad input: a clear 4xx in OpenAI's error shape -------------------------------------------------------------
USER = [{"role": "user", "content": "What grows on Hill Road?"}]
BAD_REQUESTS = [   # (id, body or raw bytes, status, param, code)
    ("malformed json", b'{"messages": [', 400, None, "invalid_json"),
    ("not an object", b"[1, 2]", 400, None, "invalid_value"),
    ("no messages", {"documents": ORCHARD}, 400, "messages", "missing_required_parameter"),
    ("empty messages", {"messages": []}, 400, "messages", "invalid_value"),
    ("no user message", {"messages": [{"role": "system", "content": "Be brief."}]}, 400, "messages", "invalid_value"),
    ("unknown role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0]", "invalid_value"),
    ("blank question", {"messages": [{"role": "user", "content": "   "}]}, 400, "messages", "invalid_value"),
    ("documents not a list", {"messages": USER, "documents": "pears"}, 400, "documents", "invalid_value"),
    ("empty document", {"messages": USER, "documents": ["pears", "  "]}, 400, "documents[1]", "invalid_value"),
    ("non-string document", {"messages": USER, "documents": [3]}, 400, "documents[0]", "invalid_value"),
    ("unknown method", {"messages": USER, "fusion": {"method": "magic"}}, 400, "fusion.method", "invalid_value"),
    ("ratio above 1", {"messages": USER, "fusion": {"ratio": 1.5}}, 400, "fusion.ratio", "invalid_value"),
    ("negative ratio", {"messages": USER, "fusion": {"ratio": -0.1}}, 400, "fusion.ratio", "invalid_value"),
    ("ratio as text", {"messages": USER, "fusion": {"ratio": "0.2"}}, 400, "fusion.ratio", "invalid_value"),
    ("unknown fusion key", {"messages": USER, "fusion": {"speed": 2}}, 400, "fusion.speed", "invalid_value"),
    ("max_tokens 0", {"messages": USER, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("max_tokens too big", {"messages": USER, "max_tokens": MAX_TOKENS_LIMIT + 1}, 400, "max_tokens",
     "invalid_value"),
    ("max_completion_tokens 0", {"messages": USER, "max_completion_tokens": 0}, 400, "max_completion_tokens",
     "invalid_value"),
    ("max_tokens as text", {"messages": USER, "max_tokens": "8"}, 400, "max_tokens", "invalid_value"),
    ("stream not a bool", {"messages": USER, "stream": "yes"}, 400, "stream", "invalid_value"),
    ("n above 8", {"messages": USER, "n": 9}, 400, "n", "invalid_value"),
    ("prompt too long", {"messages": USER, "documents": ["lorem ipsum " * 5000]}, 400, "messages",
     "context_length_exceeded"),
    ("unknown model", {"model": "gpt-9", "messages": USER}, 404, "model", "model_not_found"),
    ("huge body", b'{"messages": [], "pad": "' + b"x" * (9 << 20) + b'"}', 413, None, "request_too_large"),
    # once answered with a 500 and a traceback
    ("lone surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "messages[0].content",
     "invalid_value"),
    ("surrogate in a document", b'{"messages": [{"role": "user", "content": "Hi"}], "documents": ["a\\udfffb"]}',
     400, "documents[0]", "invalid_value"),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, 400, None, "invalid_json"),
    ("NaN", b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}', 400, None, "invalid_json"),
    ("huge integer", b'{"messages": [{"role": "user", "content": "Hi"}], "seed": ' + b"9" * 5000 + b"}", 400, None,
     "invalid_json"),
    # once ignored
    ("temperature -5", {"messages": USER, "temperature": -5}, 400, "temperature", "invalid_value"),
    ("top_p 7", {"messages": USER, "top_p": 7}, 400, "top_p", "invalid_value"),
    ("logprobs not a bool", {"messages": USER, "logprobs": "yes"}, 400, "logprobs", "invalid_value"),
    ("tools", {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
     "unsupported_parameter"),
]


@pytest.mark.parametrize("body,status,param,code", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_a_clear_4xx(server, body, status, param, code):
    before = metric(server, "qcfuse_request_errors_total", status=str(status))
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{server}/v1/chat/completions", timeout=60, headers={"content-type": "application/json"},
                   **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)
    assert metric(server, "qcfuse_request_errors_total", status=str(status)) == before + 1


def test_bad_streaming_request_fails_before_the_stream(server):
    r = httpx.post(f"{server}/v1/chat/completions", timeout=60,
                   json={"messages": USER, "stream": True, "documents": ["lorem ipsum " * 5000]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_unknown_routes_and_verbs(server):
    assert httpx.get(f"{server}/v1/nothing").json()["error"]["code"] == "not_found"
    r = httpx.get(f"{server}/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError, match="ratio"):
        client.chat.completions.create(model=MODEL, messages=USER, extra_body={"fusion": {"ratio": 2}})
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-9", messages=USER)


# -- load and metrics ------------------------------------------------------------------------------------------
def test_concurrent_clients_lose_nothing(server):
    before = metric(server, "qcfuse_requests_total")
    report = asyncio.run(run_load(server, clients=32, duration_s=3.0, max_tokens=2, streaming_clients=8,
                                  method="reuse", model=MODEL, request_timeout_s=300))
    assert report.errors == 0, report.error_samples
    assert report.lost == 0 and report.ok == report.sent >= 32
    assert metric(server, "qcfuse_requests_total") == before + report.sent      # the server saw every one
    assert metric(server, "qcfuse_requests_in_flight") == 0
    assert report.percentile(50) <= report.percentile(99)


def test_a_full_queue_answers_429_with_retry_after(tmp_path_factory):
    busy_server = serve(tmp_path_factory, "--max_queue", "2")
    url = next(busy_server)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about the orchard."}],
            "max_tokens": 24, "documents": ORCHARD, "fusion": {"method": "reuse"}}

    async def burst():
        async with httpx.AsyncClient(timeout=300) as http:
            return await asyncio.gather(*[http.post(f"{url}/v1/chat/completions", json=body) for _ in range(8)])
    try:
        replies = asyncio.run(burst())
        codes = sorted(r.status_code for r in replies)
        assert codes.count(200) >= 2 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
        busy = next(r for r in replies if r.status_code == 429)
        assert 1 <= int(busy.headers["retry-after"]) <= 60
        error = busy.json()["error"]
        assert error["code"] == "server_busy" and "--max_queue 2" in error["message"]
        assert metric(url, "qcfuse_request_errors_total", status="429") == codes.count(429)
        # once the queue drains, the server answers again
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        assert ask(client, ORCHARD, max_tokens=2).choices[0].message.content is not None
    finally:
        next(busy_server, None)


def test_metrics_count_what_happened(server):
    text = httpx.get(f"{server}/metrics").text
    for name in ("qcfuse_requests_total", "qcfuse_request_errors_total", "qcfuse_cache_misses_total",
                 "qcfuse_cache_bytes_loaded_total", "qcfuse_ttft_seconds_bucket", "qcfuse_selection_seconds_bucket",
                 "qcfuse_request_seconds_bucket", "qcfuse_completion_tokens_total", "qcfuse_cached_tokens_total"):
        assert name in text
    assert metric(server, "qcfuse_cache_hits_total") >= 3          # summed over tiers
    assert metric(server, "qcfuse_cache_misses_total") >= 3
    assert metric(server, "qcfuse_ttft_seconds_count") >= 3
