"""The vLLM request helper without vLLM: exact chunk boundaries, and the connector's reading of the parameters."""
import pytest

from qcfuse import QcfuseError, vllm_prompt
from qcfuse.integrations.vllm_request import cache_salt, read_fusion
from qcfuse.model.loader import load_tokenizer
from qcfuse.prompt import build_layout

DOCS = ["The orchard on Hill Road grows pears and plums.", "It was planted in 1962 by the Marsh family."]
QUESTION = "When was the orchard planted?"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


def test_prompt_is_qcfuses_layout_piece_by_piece(tokenizer):
    p = vllm_prompt(tokenizer, DOCS, QUESTION, "qcfuse", 0.15, anchor_ratio=0.2)
    layout = build_layout(tokenizer, DOCS, QUESTION)
    assert p.prompt_token_ids == layout.ids.tolist()
    params = p.kv_transfer_params["qcfuse"]
    assert [p.prompt_token_ids[s:e] for s, e in params["chunks"]] == layout.chunks
    q0, q1 = params["question"]
    assert tokenizer.decode(p.prompt_token_ids[q0:q1]) == QUESTION
    assert (params["method"], params["ratio"], params["options"]) == ("qcfuse", 0.15, {"anchor_ratio": 0.2})
    assert p.prompt == {"prompt_token_ids": p.prompt_token_ids, "cache_salt": p.cache_salt}
    assert p.completion_fields()["kv_transfer_params"] == p.sampling_extra_args["kv_transfer_params"]
    assert vllm_prompt("smollm2-135m", DOCS, QUESTION).prompt_token_ids == p.prompt_token_ids   # alias works too


def test_connector_reads_back_the_same_layout(tokenizer):
    p = vllm_prompt(tokenizer, DOCS[::-1], QUESTION, "cacheblend", 0.3)
    plan = read_fusion(p.prompt_token_ids, p.kv_transfer_params, p.cache_salt)
    layout = build_layout(tokenizer, DOCS[::-1], QUESTION)
    assert (plan.layout.prefix, plan.layout.chunks, plan.layout.suffix) == (layout.prefix, layout.chunks, layout.suffix)
    assert plan.layout.question == layout.question and plan.context_len == layout.context_len
    assert (plan.method, plan.ratio, plan.options) == ("cacheblend", 0.3, {})


def test_salt_depends_on_every_token_and_parameter(tokenizer):
    p = vllm_prompt(tokenizer, DOCS, QUESTION)
    other_question = vllm_prompt(tokenizer, DOCS, "Who planted it?")
    other_ratio = vllm_prompt(tokenizer, DOCS, QUESTION, ratio=0.3)
    assert len({p.cache_salt, other_question.cache_salt, other_ratio.cache_salt}) == 3
    assert len(p.cache_salt) <= 128 and "/" not in p.cache_salt      # vLLM's rules for a cache_salt


def test_plain_requests_have_no_plan(tokenizer):
    assert read_fusion([1, 2, 3], None, None) is None
    assert read_fusion([1, 2, 3], {"do_remote_prefill": False}, None) is None


def _tampered(p, **changes):
    params = dict(p.kv_transfer_params["qcfuse"], **changes)
    return p.prompt_token_ids, {"qcfuse": params}, cache_salt(p.prompt_token_ids, params)


@pytest.mark.parametrize("changes,message", [
    ({"chunks": []}, "names no document chunks"),
    ({"chunks": [[5, 20], [21, 30]]}, "without gaps"),
    ({"question": [1, 3]}, "question span"),
    ({"question": [0, 10 ** 6]}, "question span"),
    ({"method": "nope"}, "unknown method"),
    ({"ratio": 1.5}, "ratio must be within"),
    ({"version": 2}, "version must be 1"),
    ({"chunks": "all"}, "malformed"),
])
def test_parameters_that_cannot_apply_are_refused_with_the_reason(tokenizer, changes, message):
    ids, params, salt = _tampered(vllm_prompt(tokenizer, DOCS, QUESTION), **changes)
    with pytest.raises(QcfuseError, match=message):
        read_fusion(ids, params, salt)


def test_salt_must_match_prompt_and_parameters(tokenizer):
    p = vllm_prompt(tokenizer, DOCS, QUESTION)
    with pytest.raises(QcfuseError, match="cache_salt does not match"):
        read_fusion(p.prompt_token_ids[:-1], p.kv_transfer_params, p.cache_salt)
    with pytest.raises(QcfuseError, match="cache_salt does not match"):
        read_fusion(p.prompt_token_ids, p.kv_transfer_params, None)
    with pytest.raises(QcfuseError, match="must be an object"):
        read_fusion(p.prompt_token_ids, {"qcfuse": "qcfuse"}, p.cache_salt)


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "nope"}, "unknown method"), ({"ratio": -0.1}, "ratio"), ({"bogus_option": 1}, "bad option"),
])
def test_helper_refuses_bad_fusion_before_building(tokenizer, kwargs, message):
    with pytest.raises(QcfuseError, match=message):
        vllm_prompt(tokenizer, DOCS, QUESTION, **kwargs)
    with pytest.raises(QcfuseError):
        vllm_prompt(tokenizer, [], QUESTION)
