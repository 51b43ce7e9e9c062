"""The OpenAI API as the official `openai` client uses it: sampling, stop, logprobs, n, usage and streaming per
spec, /v1/completions, and a clear 400 for every field the server does not implement. Against the shared real
server of conftest.py (the CLI in a subprocess, with the real default model, on loopback)."""
import httpx
import openai
import pytest

from servers import MODEL, metric

DOCS = ["The Great Barrier Reef Marine Park was established in 1975 to protect the reef.",
        "Coral reefs are home to a quarter of all marine fish species."]
QUESTION = "When was the marine park established?"
USER = [{"role": "user", "content": QUESTION}]


def chat(client, **kwargs):
    kwargs.setdefault("max_tokens", 16)
    extra = {"documents": DOCS, **kwargs.pop("extra_body", {})}
    return client.chat.completions.create(model=MODEL, messages=USER, extra_body=extra, **kwargs)


def test_default_method_is_qcfuse(client):
    stats = chat(client, max_tokens=2).model_extra["fusion"]
    assert (stats["method"], stats["ratio"]) == ("qcfuse", 0.15)


def test_temperature_zero_is_the_greedy_default(client):
    default, explicit = chat(client), chat(client, temperature=0, top_p=1)
    assert default.choices[0].message.content == explicit.choices[0].message.content
    assert "1975" in default.choices[0].message.content


def test_seed_makes_sampling_reproducible(client):
    answers = [chat(client, temperature=1.5, seed=seed, max_tokens=12).choices[0].message.content
               for seed in (3, 3, 4, 5)]
    assert answers[0] == answers[1]
    assert len(set(answers)) >= 2
    assert chat(client, temperature=1.5, seed=3, max_tokens=12).system_fingerprint.startswith("qcfuse-")


def test_stop_strings_cut_the_answer(client):
    full = chat(client).choices[0].message.content
    assert "Reef" in full or "1975" in full
    stop = "Reef" if "Reef" in full else "1975"
    reply = chat(client, stop=[stop, "never appears"])
    text = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop" and stop not in text and full.startswith(text)
    streamed = list(chat(client, stop=stop, stream=True))
    sent = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert sent.strip() == text and stop not in sent
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_logprobs_and_top_logprobs(client):
    reply = chat(client, logprobs=True, top_logprobs=3, max_tokens=8)
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content).strip() == reply.choices[0].message.content
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob >= token.top_logprobs[2].logprob
        assert token.top_logprobs[0].token == token.token          # greedy: the chosen token is the likeliest
        assert bytes(token.bytes).decode() == token.token
    assert chat(client, max_tokens=2).choices[0].logprobs is None
    streamed = list(chat(client, logprobs=True, max_tokens=8, stream=True))
    tokens = [t.token for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert tokens == [t.token for t in content]


def test_n_answers(client):
    reply = chat(client, n=3, temperature=1.2, seed=9, max_tokens=10)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) >= 2
    assert reply.usage.completion_tokens == reply.model_extra["fusion"]["new_tokens"] >= 3
    streamed = list(chat(client, n=2, max_tokens=6, stream=True))
    texts = {i: "".join(c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == i)
             for i in (0, 1)}
    assert texts[0] == texts[1] and texts[0]                       # greedy twice: the same answer
    assert sum(1 for c in streamed if c.choices and c.choices[0].finish_reason) == 2


def test_penalties_and_logit_bias_change_the_answer(client):
    counting = [{"role": "user", "content": "Write the numbers from 1 to 20 separated by commas."}]
    plain = client.chat.completions.create(model=MODEL, messages=counting, max_tokens=16)
    penalized = client.chat.completions.create(model=MODEL, messages=counting, max_tokens=16, frequency_penalty=2)
    assert plain.choices[0].message.content.count(",") >= 4          # greedy repeats the comma...
    assert penalized.choices[0].message.content.count(",") < plain.choices[0].message.content.count(",")
    reply = chat(client, max_tokens=3, logit_bias={"28": 100}, logprobs=True)      # token 28 forced every step
    assert [t.token for t in reply.choices[0].logprobs.content] == [reply.choices[0].logprobs.content[0].token] * 3


def test_usage_chunk_comes_last_with_empty_choices(client):
    plain = chat(client, max_tokens=6)
    chunks = list(chat(client, max_tokens=6, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == chunks[-1].model_extra["fusion"]["cached_tokens"]
    assert all(c.usage is None for c in chunks[:-1])
    without = list(chat(client, max_tokens=6, stream=True))
    assert without[-1].choices[0].finish_reason and all(c.usage is None for c in without)
    assert "cache_hits" in without[-1].model_extra["fusion"]      # qcfuse's stats still ride on the last chunk


def test_cached_tokens_in_usage(client):
    docs = ["Ferns grew in the greenhouse on Larch Lane.", "The greenhouse was heated with a wood stove."]
    first = chat(client, extra_body={"documents": docs}, max_tokens=2)
    again = chat(client, extra_body={"documents": docs[::-1]}, max_tokens=2)
    f1, f2 = first.model_extra["fusion"], again.model_extra["fusion"]
    assert f1["cache_misses"] == 2 and f2["cache_hits"] == 2
    assert again.usage.prompt_tokens_details.cached_tokens == f2["cached_tokens"] \
        == f2["prompt_tokens"] - f2["suffix_tokens"] - f2["recomputed_tokens"]
    assert first.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens_details.cached_tokens


# -- /v1/completions ---------------------------------------------------------------------------------------------
def chat_template_prompt(question: str) -> str:
    """The prompt the chat route builds, written out by a client around {documents}."""
    from qcfuse.prompt import PASSAGES_HEADER, QUESTION_TEMPLATE, SYSTEM_PROMPT
    return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{PASSAGES_HEADER}{{documents}}"
            f"{QUESTION_TEMPLATE.format(question=question)}<|im_end|>\n<|im_start|>assistant\n")


def test_completions_with_documents_share_the_chat_caches(client):
    docs = ["The bell tower of Orvin was finished in 1888.", "Its bell was cast in Lyon."]
    first = chat(client, extra_body={"documents": docs}, max_tokens=12)
    text = client.completions.create(model=MODEL, prompt=chat_template_prompt(QUESTION.replace("marine park",
                                     "bell tower")), max_tokens=12, extra_body={"documents": docs})
    stats = text.model_extra["fusion"]
    assert text.object == "text_completion" and text.id.startswith("cmpl-")
    assert stats["cache_hits"] == 2 and stats["cache_misses"] == 0         # the chat request stored them
    assert text.choices[0].finish_reason in ("stop", "length") and "1888" in text.choices[0].text
    assert text.usage.prompt_tokens_details.cached_tokens == stats["cached_tokens"] > 0
    assert first.model_extra["fusion"]["cache_misses"] == 2
    # no {documents} in the prompt: they come first, then the prompt
    plain = client.completions.create(model=MODEL, prompt="\nQ: When was the bell tower finished?\nA: In",
                                      max_tokens=6, extra_body={"documents": docs})
    assert plain.model_extra["fusion"]["cache_hits"] == 2 and plain.choices[0].text


def test_completions_without_documents_and_streaming(client):
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8)
    assert "Paris" in plain.choices[0].text and plain.model_extra["fusion"]["method"] == "fullcomp"
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completions_logprobs_in_the_legacy_shape(client):
    prompt = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, logprobs=2, stop=["\n"])
    lp = reply.choices[0].logprobs
    assert "".join(lp.tokens) == reply.choices[0].text and len(lp.token_logprobs) == len(lp.tokens)
    assert all(len(top) <= 2 and max(top.values()) >= v for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


@pytest.mark.parametrize("body,param,code", [
    ({"prompt": "x {documents} y"}, "prompt", "invalid_value"),                      # marker without documents
    ({"prompt": "{documents}", "documents": ["a"]}, "prompt", "invalid_value"),       # nothing after them
    ({"prompt": "a {documents} b {documents} c", "documents": ["a"]}, "prompt", "invalid_value"),
    ({"prompt": [1, 2, 3]}, "prompt", "invalid_value"),
    ({"prompt": ["one", "two"]}, "prompt", "invalid_value"),
    ({}, "prompt", "missing_required_parameter"),
    ({"prompt": "hi", "logprobs": 6}, "logprobs", "invalid_value"),
    ({"prompt": "hi", "logprobs": True}, "logprobs", "invalid_value"),
    ({"prompt": "hi", "echo": True}, "echo", "unsupported_parameter"),
    ({"prompt": "hi", "best_of": 3}, "best_of", "unsupported_parameter"),
    ({"prompt": "hi", "suffix": "end"}, "suffix", "unsupported_parameter"),
    ({"prompt": "hi", "messages": USER}, "messages", "unknown_parameter"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens", "invalid_value"),
])
def test_bad_completions_are_a_clear_400(server, body, param, code):
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (param, code)


# -- fields the server does not implement, and sampling out of range ------------------------------------------------
@pytest.mark.parametrize("kwargs,param,code", [
    ({"temperature": -5}, "temperature", "invalid_value"),
    ({"top_p": 7}, "top_p", "invalid_value"),
    ({"temperature": 2.01}, "temperature", "invalid_value"),
    ({"seed": 2 ** 64}, "seed", "invalid_value"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({"top_logprobs": 2}, "top_logprobs", "invalid_value"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
    ({"n": 9}, "n", "invalid_value"),
    ({"presence_penalty": 3}, "presence_penalty", "invalid_value"),
    ({"frequency_penalty": -2.5}, "frequency_penalty", "invalid_value"),
    ({"logit_bias": {"999999": 5}}, "logit_bias", "invalid_value"),                  # not in the vocabulary
    ({"logit_bias": {"12": 300}}, "logit_bias", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]}, "tools",
     "unsupported_parameter"),
    ({"tool_choice": "required"}, "tool_choice", "unsupported_parameter"),
    ({"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
    ({"modalities": ["text", "audio"]}, "modalities", "unsupported_parameter"),
    ({"reasoning_effort": "high"}, "reasoning_effort", "unsupported_parameter"),
    ({"store": True}, "store", "unsupported_parameter"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),   # without stream
    ({"extra_body": {"frobnicate": 1}}, "frobnicate", "unknown_parameter"),
])
def test_out_of_range_and_unsupported_fields_are_400_with_param(client, kwargs, param, code):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, max_tokens=2, **kwargs)
    error = caught.value.body
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert error["message"]


def test_fields_that_ask_for_nothing_are_accepted(client):
    reply = chat(client, max_tokens=2, tools=[], tool_choice="none", response_format={"type": "text"},
                 modalities=["text"], store=False, user="someone", metadata={"team": "qa"},
                 parallel_tool_calls=True)
    assert reply.choices[0].message.content is not None


def test_metrics_count_requests_per_route(server, client):
    before = metric(server, "qcfuse_requests_total", route="text")
    client.completions.create(model=MODEL, prompt="<|im_start|>user\nHi<|im_end|>\n", max_tokens=1)
    assert metric(server, "qcfuse_requests_total", route="text") == before + 1
    text = httpx.get(f"{server}/metrics").text
    for name in ("qcfuse_queue_depth", "qcfuse_requests_running", "qcfuse_cache_corrupt_total",
                 'qcfuse_cache_tier_bytes{tier="memory"}', 'qcfuse_cache_tier_up{tier="memory"} 1.0'):
        assert name in text
    assert metric(server, "qcfuse_cache_tier_bytes", tier="memory") > 0


def test_ratio_auto_through_the_server(client):
    """fusion {"ratio": "auto"}: the share each request chose comes back in `fusion`; bad auto fields are 400s."""
    stats = chat(client, max_tokens=2, extra_body={"fusion": {"method": "qcfuse", "ratio": "auto", "target": 0.9}}
                 ).model_extra["fusion"]
    assert stats["ratio"] == "auto:0.9" and 0 < stats["recomputed_share"] <= 1
    assert stats["recomputed_tokens"] == round(stats["recomputed_share"] * stats["context_tokens"])
    capped = chat(client, max_tokens=2, extra_body={"fusion": {"ratio": "auto:0.99", "max_ratio": 0.05}}
                  ).model_extra["fusion"]
    assert capped["recomputed_share"] <= 0.05 + 1e-9
    mass = chat(client, max_tokens=2, extra_body={"fusion": {"ratio": "auto", "rule": "mass"}}).model_extra["fusion"]
    assert mass["passes"] == 1 and mass["recomputed_total_share"] == pytest.approx(mass["recomputed_share"])
    unchecked = chat(client, max_tokens=2, extra_body={"fusion": {"ratio": "auto", "reuse_check": False}}
                     ).model_extra["fusion"]
    assert unchecked["reuse_checked"] is False
    for fusion, param in [({"method": "epic", "ratio": "auto"}, "fusion"),
                          ({"ratio": "auto", "rule": "hunch"}, "fusion.rule"),
                          ({"ratio": 0.2, "rule": "mass"}, "fusion.rule"),
                          ({"ratio": "auto:2"}, "fusion.ratio"),
                          ({"ratio": "auto", "target": 1.5}, "fusion.target"),
                          ({"ratio": 0.2, "max_ratio": 0.5}, "fusion.max_ratio"),
                          ({"ratio": "auto", "reuse_check": "yes"}, "fusion.reuse_check"),
                          ({"ratio": 0.2, "reuse_check": True}, "fusion.reuse_check"),
                          ({"ratio": "most"}, "fusion.ratio")]:
        with pytest.raises(openai.BadRequestError) as caught:
            chat(client, max_tokens=2, extra_body={"fusion": fusion})
        assert caught.value.body["param"] == param, fusion
