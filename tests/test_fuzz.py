"""No 500 for any bad input: property-based requests (hypothesis) against the shared real server.

Each example is a valid chat or text completion request with one or two of its fields replaced by a value that is
wrong by construction (a wrong type, out of range, NaN or Infinity, a huge number, a lone surrogate, deep nesting,
a field the server does not implement or OpenAI does not know), or a raw body that is not a request at all
(random bytes, invalid UTF-8, nesting thousands deep). Every one must get a 4xx in OpenAI's error shape, and the
server must answer a good request afterwards.
"""
import json

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from servers import MODEL

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID = {
    "chat": {"model": MODEL, "messages": [{"role": "user", "content": "What grows on Hill Road?"}],
             "documents": ["The orchard on Hill Road grows pears and plums."], "max_tokens": 1},
    "text": {"model": MODEL, "prompt": "Passages: {documents} The orchard grows", "max_tokens": 1,
             "documents": ["The orchard on Hill Road grows pears and plums."]},
}
ROUTES = {"chat": "/v1/chat/completions", "text": "/v1/completions"}

surrogate = st.sampled_from(["\ud800", "\udfff", "a\udc80b", "\ud83d"])
lone = st.builds(lambda head, s, tail: head + s + tail, st.text(max_size=5), surrogate, st.text(max_size=5))
huge_int = st.one_of(st.integers(min_value=1 << 63), st.integers(max_value=-(1 << 63) - 1))
bad_float = st.one_of(st.just(float("nan")), st.just(float("inf")), st.just(float("-inf")),
                      st.floats(min_value=1e6, allow_infinity=False), st.floats(max_value=-1e6, allow_infinity=False))
scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20), lone)
junk = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                    st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                    max_leaves=8)
not_a_number = st.one_of(st.booleans(), st.text(max_size=10), st.lists(scalar, max_size=2),
                         st.dictionaries(st.text(max_size=3), scalar, max_size=2))
not_an_int = st.one_of(not_a_number, st.floats(allow_nan=True))        # 5.0 is a float in JSON too: not an int
not_a_bool = st.one_of(st.integers(), st.floats(allow_nan=True), st.text(max_size=5), st.lists(scalar, max_size=2))
nested = st.integers(min_value=2, max_value=300).map(lambda depth: json.loads("[" * depth + "]" * depth))


def number_outside(low: float, high: float):
    return st.one_of(not_a_number, bad_float, st.floats(min_value=high, exclude_min=True, allow_infinity=False),
                     st.floats(max_value=low, exclude_max=True, allow_infinity=False))


def int_outside(low: int, high: int):
    return st.one_of(not_an_int, huge_int, st.integers(min_value=high + 1), st.integers(max_value=low - 1))


def non_empty_list_or_junk():
    return st.one_of(st.lists(junk, min_size=1, max_size=3), st.text(min_size=1, max_size=5), st.integers(),
                     st.dictionaries(st.text(max_size=3), scalar, min_size=1, max_size=2))


BAD_COMMON = {
    "model": st.one_of(st.integers(), st.lists(scalar, max_size=2), st.text(min_size=1, max_size=12).filter(
        lambda m: m != MODEL), lone),
    "documents": st.one_of(st.text(max_size=10), st.integers(), st.dictionaries(st.text(max_size=3), scalar, max_size=2),
                           st.lists(st.one_of(st.integers(), st.none(), st.lists(scalar)), min_size=1, max_size=3),
                           st.lists(st.sampled_from(["", " ", "\n\t"]), min_size=1, max_size=2),
                           st.lists(lone, min_size=1, max_size=2), nested),
    "fusion": st.one_of(st.text(max_size=5), st.integers(), st.lists(scalar, min_size=1, max_size=2),
                        st.fixed_dictionaries({"method": st.one_of(st.text(max_size=8).filter(
                            lambda m: m not in ("fullcomp", "reuse", "cacheblend", "epic", "prophetkv", "fuserag",
                                                "qcfuse")), st.integers(), lone)}),
                        st.fixed_dictionaries({"ratio": number_outside(0.0, 1.0)}),
                        st.dictionaries(st.text(min_size=1, max_size=6).filter(lambda k: k not in ("method", "ratio")),
                                        scalar, min_size=1, max_size=2)),
    "max_tokens": int_outside(1, 4096),
    "stream": not_a_bool,
    "stream_options": junk.filter(lambda v: v is not None),           # never valid without stream: true
    "temperature": number_outside(0.0, 2.0),
    "top_p": number_outside(0.0, 1.0),
    "presence_penalty": number_outside(-2.0, 2.0),
    "frequency_penalty": number_outside(-2.0, 2.0),
    "seed": st.one_of(not_an_int, huge_int),
    "n": int_outside(1, 8),
    "stop": st.one_of(st.integers(), st.just(""), st.lists(st.text(min_size=1, max_size=3), min_size=5, max_size=7),
                      st.lists(st.one_of(st.integers(), st.none(), st.just("")), min_size=1, max_size=3),
                      st.lists(lone, min_size=1, max_size=2), lone, st.dictionaries(st.text(max_size=3), scalar)),
    "logit_bias": st.one_of(st.text(max_size=5), st.lists(scalar, max_size=2), st.integers(),
                            st.dictionaries(st.text(min_size=1, max_size=4).filter(lambda k: not k.isascii() or
                                                                                   not k.isdigit()),
                                            st.integers(), min_size=1, max_size=2),
                            st.dictionaries(st.integers(0, 1000).map(str), number_outside(-100.0, 100.0), min_size=1,
                                            max_size=2),
                            st.dictionaries(st.integers(10 ** 6, 10 ** 9).map(str), st.integers(-100, 100),
                                            min_size=1, max_size=2)),
    "unknown field": st.tuples(st.text(min_size=1, max_size=12).filter(lambda k: k not in KNOWN), junk),
}
BAD = {
    "chat": {
        **BAD_COMMON,
        "messages": st.one_of(
            scalar.filter(lambda v: v is not None), st.just([]), st.lists(not_a_bool, min_size=1, max_size=3), nested,
            st.lists(st.fixed_dictionaries({"role": st.text(max_size=8).filter(
                lambda r: r not in ("system", "developer", "user", "assistant", "tool", "function")),
                "content": st.text(max_size=5)}), min_size=1, max_size=2),
            st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": st.one_of(
                lone, st.sampled_from(["", "  ", "\n"]), st.integers(), st.floats(allow_nan=True), st.booleans(),
                st.dictionaries(st.text(max_size=3), scalar, max_size=2),
                st.lists(st.one_of(scalar, st.fixed_dictionaries({"type": st.text(max_size=5).filter(
                    lambda t: t != "text"), "image_url": scalar})), min_size=1, max_size=2))}),
                min_size=1, max_size=2),
            st.just([{"role": "system", "content": "Be brief."}])),
        "max_completion_tokens": int_outside(1, 4096),
        "logprobs": not_a_bool,
        "top_logprobs": st.one_of(not_an_int, st.integers(min_value=1)),      # without logprobs: never valid
        "tools": st.one_of(st.lists(junk, min_size=1, max_size=2), st.text(min_size=1, max_size=5),
                           st.dictionaries(st.text(max_size=3), scalar, min_size=1, max_size=2)),
        "tool_choice": st.one_of(st.text(max_size=8).filter(lambda v: v not in ("none", "auto")),
                                 st.dictionaries(st.text(max_size=3), scalar, max_size=2)),
        "response_format": junk.filter(lambda v: v is not None and v != {"type": "text"}),
        "audio": junk.filter(lambda v: v is not None),
        "reasoning_effort": junk.filter(lambda v: v is not None),
    },
    "text": {
        **BAD_COMMON,
        "prompt": st.one_of(st.integers(), st.floats(allow_nan=True), st.booleans(), st.sampled_from(["", "   "]),
                            st.lists(st.integers(), min_size=1, max_size=4), lone,
                            st.lists(st.text(max_size=4), min_size=2, max_size=3), nested,
                            st.just("{documents} twice {documents}"), st.just("ends with {documents}")),
        "logprobs": st.one_of(st.booleans(), st.text(max_size=3), st.integers(min_value=6), st.integers(max_value=-1),
                              st.floats(allow_nan=True)),
        "echo": st.one_of(st.just(True), st.text(min_size=1, max_size=3), st.integers()),
        "best_of": st.one_of(st.integers().filter(lambda v: v != 1), st.text(max_size=3)),
        "suffix": st.one_of(st.text(min_size=1, max_size=5), st.integers()),
    },
}
KNOWN = {"model", "messages", "documents", "fusion", "max_tokens", "max_completion_tokens", "stream", "stream_options",
         "temperature", "top_p", "seed", "stop", "n", "presence_penalty", "frequency_penalty", "logit_bias",
         "logprobs", "top_logprobs", "prompt", "user", "metadata", "service_tier", "safety_identifier",
         "prompt_cache_key", "parallel_tool_calls", "tools", "functions", "tool_choice", "function_call",
         "response_format", "modalities", "store", "audio", "prediction", "web_search_options",
         "reasoning_effort", "verbosity", "echo", "best_of", "suffix"}


@st.composite
def broken_request(draw, route: str) -> bytes:
    body = dict(VALID[route])
    fields = draw(st.lists(st.sampled_from(sorted(BAD[route])), min_size=1, max_size=2, unique=True))
    for name in fields:
        value = draw(BAD[route][name])
        if name == "unknown field":
            body[value[0]] = value[1]
        else:
            body[name] = value
    return json.dumps(body).encode()          # NaN and Infinity go out as the bare tokens JavaScript would send


def _not_an_object(blob: bytes) -> bool:
    try:
        return not isinstance(json.loads(blob), dict)
    except (ValueError, RecursionError):
        return True


raw_body = st.one_of(
    st.binary(max_size=300).filter(_not_an_object),
    st.binary(max_size=50).map(lambda b: b'{"messages": [{"role": "user", "content": "' + b + b'\xff"}]}'),
    st.integers(min_value=500, max_value=100_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(min_value=500, max_value=50_000).map(lambda n: b'{"messages": ' + b"[" * n + b"]" * n + b"}"),
    st.sampled_from([b'{"messages": [{"role": "user", "content": "\\ud800"}]}', b'{"max_tokens": 1e999}',
                     b'{"temperature": NaN}', b'{"top_p": -Infinity}', b'{"n": ' + b"9" * 5000 + b"}",
                     b'{"prompt": "\\udfff", "max_tokens": 1}', b'\xff\xfe{"prompt": "hi"}', b'', b'null', b'"text"']),
)


def assert_clean_4xx(http: httpx.Client, path: str, body: bytes) -> None:
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300], body[:300])
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]


def assert_alive(server: str) -> None:
    assert httpx.get(f"{server}/health", timeout=30).status_code == 200
    r = httpx.post(f"{server}/v1/chat/completions", json=VALID["chat"], timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


def with_field(route: str, **fields) -> bytes:
    return json.dumps({**VALID[route], **fields}).encode()


# the inputs that once got a 500 are always among the examples, whatever hypothesis draws besides
ONCE_FATAL = {
    "chat": [with_field("chat", messages=[{"role": "user", "content": "\ud800"}]),
             with_field("chat", documents=["a\udfffb"]), with_field("chat", stop=["\ud83d"]),
             with_field("chat", messages=json.loads("[" * 300 + "]" * 300))],
    "text": [with_field("text", prompt="\ud800 {documents} x"), with_field("text", documents=["\udc80"])],
}


@pytest.mark.parametrize("route", ["chat", "text"])
def test_broken_requests_get_a_clean_4xx(server, route):
    fuzz(server, broken_request(route), lambda body: ROUTES[route], SETTINGS, examples=ONCE_FATAL[route])


def test_raw_bodies_get_a_clean_4xx(server):
    fuzz(server, st.tuples(raw_body, st.sampled_from(sorted(ROUTES.values()))), lambda drawn: drawn[1],
         settings(max_examples=60, deadline=None), body_of=lambda drawn: drawn[0])


def fuzz(server: str, strategy, path_of, config, body_of=lambda drawn: drawn, examples=()) -> None:
    with httpx.Client(base_url=server, timeout=60) as http:
        def check(drawn):
            assert_clean_4xx(http, path_of(drawn), body_of(drawn))
        for case in examples:
            check = example(drawn=case)(check)
        config(given(drawn=strategy)(check))()
    assert_alive(server)
