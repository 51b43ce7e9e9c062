"""Sampling as OpenAI defines it (qcfuse/sampling.py), in the engine, the Python API and the CLI.

Greedy stays the default and stays the exact path: the exactness tests run through it, and here it is checked
token for token against the plain argmax loop (fusion/fuse.py:greedy_decode).
"""
import json
import math

import pytest
import torch

from qcfuse import DEFAULT_METHOD, DEFAULT_RATIO, SamplingParams, make_selector
from qcfuse.cli import main
from qcfuse.fusion.fuse import greedy_decode
from qcfuse.sampling import Sampler, SamplingError, StopStrings

DOCS = ["The Great Barrier Reef Marine Park was established in 1975 to protect the reef.",
        "Coral reefs are home to a quarter of all marine fish species."]
QUESTION = "When was the marine park established?"


# -- the sampler on its own ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,param", [
    ({"temperature": -5}, "temperature"), ({"temperature": 2.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"temperature": "0.5"}, "temperature"),
    ({"top_p": 7}, "top_p"), ({"top_p": -0.1}, "top_p"), ({"seed": 1.5}, "seed"), ({"seed": 1 << 70}, "seed"),
    ({"seed": True}, "seed"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": [""]}, "stop"),
    ({"stop": [3]}, "stop"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"), ({"logprobs": 1}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"n": 0}, "n"), ({"n": 9}, "n"), ({"logit_bias": {5: 101}}, "logit_bias"), ({"logit_bias": {-1: 1}}, "logit_bias"),
    ({"logit_bias": [1]}, "logit_bias"),
])
def test_out_of_range_options_name_their_param(options, param):
    with pytest.raises(SamplingError) as caught:
        SamplingParams(**options)
    assert caught.value.param == param and param in str(caught.value)


def test_a_single_stop_string_is_a_list_of_one():
    assert SamplingParams(stop="\n").stop == ("\n",)


def test_greedy_is_the_argmax_and_never_draws():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    sampler = Sampler(SamplingParams(), 4)
    state = sampler.generator.get_state()
    assert all(sampler.choose(logits, []) == 1 for _ in range(5))
    assert torch.equal(sampler.generator.get_state(), state)


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    draws = [Sampler(SamplingParams(temperature=1.0, seed=7), 4) for _ in range(2)]
    first, second = ([s.choose(logits, []) for _ in range(4000)] for s in draws)
    assert first == second
    shares = torch.bincount(torch.tensor(first), minlength=4).float() / len(first)
    assert torch.allclose(shares, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03), shares
    other = Sampler(SamplingParams(temperature=1.0, seed=8), 4)
    assert [other.choose(logits, []) for _ in range(4000)] != first


def test_top_p_keeps_the_smallest_set_that_reaches_it():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=0), 4)
    picks = {sampler.choose(logits, []) for _ in range(2000)}
    assert picks == {0, 1}                       # 0.5 alone is short of 0.7; 0.5 + 0.3 reaches it
    tiny = Sampler(SamplingParams(temperature=1.0, top_p=0.0, seed=0), 4)
    assert {tiny.choose(logits, []) for _ in range(200)} == {0}


def test_penalties_and_bias_shift_the_logits_as_openai_documents():
    logits = torch.tensor([2.0, 1.5, 0.0])
    history = [0, 0, 2]
    # frequency: 2.0 - 2 * 0.6 = 0.8 < 1.5, so the argmax moves to token 1
    assert Sampler(SamplingParams(frequency_penalty=0.6), 3).choose(logits, history) == 1
    assert Sampler(SamplingParams(frequency_penalty=0.2), 3).choose(logits, history) == 0     # 1.6 > 1.5
    assert Sampler(SamplingParams(presence_penalty=0.6), 3).choose(logits, history) == 1      # 1.4 < 1.5
    assert Sampler(SamplingParams(logit_bias={2: 100}), 3).choose(logits, []) == 2
    with pytest.raises(SamplingError, match="vocabulary"):
        Sampler(SamplingParams(logit_bias={3: 1}), 3)


def test_stop_strings_are_found_once_and_never_half_released():
    stops = StopStrings(("Reef", "\n\n"))
    assert stops.find("The Great Barrier Reef", new_from=18) == 18
    assert stops.find("The Great Barrier Re", new_from=18) is None
    assert stops.partial("The Great Barrier Re") == 2 and stops.partial("ends with \n") == 1
    assert stops.partial("nothing here") == 0


# -- the engine and the Python API ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def layout(smollm2_engine):
    return smollm2_engine.layout(DOCS, QUESTION)


def test_default_greedy_is_the_plain_argmax_loop(smollm2, smollm2_engine, layout):
    selector = make_selector("cacheblend", 0.3)
    gen = smollm2_engine.generate_layout(layout, selector, 24)
    explicit = smollm2_engine.generate_layout(layout, selector, 24, sampling=SamplingParams(temperature=0.0))
    out, _ = smollm2_engine.prefill(layout, selector, 24)
    reference = greedy_decode(smollm2.transformer, out.buffer, out.logits, layout.n_tokens, 24, smollm2.stop_ids)
    assert gen.token_ids == explicit.token_ids == reference
    assert gen.answer == explicit.answer and "1975" in gen.answer
    assert torch.equal(gen.first_logits, explicit.first_logits)


def test_python_api_defaults_to_qcfuse_and_takes_sampling(smollm2_engine):
    assert (DEFAULT_METHOD, DEFAULT_RATIO) == ("qcfuse", 0.15)
    gen = smollm2_engine.generate(DOCS, QUESTION, max_new_tokens=1)
    assert (gen.stats["method"], gen.stats["ratio"]) == ("qcfuse", 0.15)
    sampled = [smollm2_engine.generate(DOCS, QUESTION, max_new_tokens=8,
                                       sampling=SamplingParams(temperature=1.5, seed=seed)).token_ids
               for seed in (1, 1, 2, 3)]
    assert sampled[0] == sampled[1]                      # same seed, same answer
    assert len({tuple(s) for s in sampled}) >= 2         # other seeds, other answers at temperature 1.5


def test_stop_string_ends_the_answer_before_it(smollm2_engine, layout):
    selector = make_selector("qcfuse", 0.15)
    full = smollm2_engine.generate_layout(layout, selector, 24)
    assert "1975" in full.answer
    cut = smollm2_engine.generate_layout(layout, selector, 24, sampling=SamplingParams(stop=("1975",)))
    assert cut.finish_reason == "stop" and "1975" not in cut.answer
    assert full.answer.startswith(cut.answer) and cut.answer
    assert len(cut.token_ids) < len(full.token_ids)      # decoding stopped there, not just the text


def test_streamed_steps_never_send_a_stop_string(smollm2_engine, layout):
    selector = make_selector("qcfuse", 0.15)
    answers = smollm2_engine.start(layout, selector, 24, SamplingParams(stop=("1975",)))
    decoding = answers.next()
    pieces = []
    while not decoding.finished:
        pieces.append(decoding.step())
    sent = "".join(pieces)
    assert decoding.finish_reason == "stop" and sent.strip() == decoding.text and "19" not in sent
    assert len([p for p in pieces if p]) >= 3            # handed out as it came, not all at the end


def test_logprobs_are_the_models_distribution(smollm2_engine, layout):
    selector = make_selector("qcfuse", 0.15)
    gen = smollm2_engine.generate_layout(layout, selector, 6, sampling=SamplingParams(logprobs=True, top_logprobs=3))
    first = gen.logprobs[0]
    expected = torch.log_softmax(gen.first_logits.float(), -1)
    assert first.token_id == gen.token_ids[0]
    assert math.isclose(first.logprob, float(expected[first.token_id]), abs_tol=1e-5)
    assert [i for i, _, _ in first.top] == expected.topk(3).indices.tolist()
    assert first.top[0][0] == first.token_id             # greedy picked the most likely token
    assert len(gen.logprobs) == len([t for t in gen.token_ids if t not in smollm2_engine.model.stop_ids])
    assert "".join(lp.token for lp in gen.logprobs).strip() == gen.answer
    assert all(lp.logprob <= 0 for lp in gen.logprobs)


def test_n_answers_from_one_prefill(smollm2_engine, layout):
    selector = make_selector("qcfuse", 0.15)
    greedy = smollm2_engine.generate_layout(layout, selector, 6)
    gen = smollm2_engine.generate_layout(layout, selector, 6, sampling=SamplingParams(n=3, temperature=1.2, seed=5))
    assert len(gen.choices) == 3 and gen.answer == gen.choices[0].text
    assert gen.stats["new_tokens"] == sum(len(c.token_ids) for c in gen.choices)
    assert len({tuple(c.token_ids) for c in gen.choices}) >= 2
    # the answers share the prompt's buffer: greedy choices after sampled ones are still the greedy answer
    again = smollm2_engine.generate_layout(layout, selector, 6, sampling=SamplingParams(n=2))
    assert again.choices[0].token_ids == again.choices[1].token_ids == greedy.token_ids


# -- the CLI takes the same options ------------------------------------------------------------------------------
@pytest.fixture()
def doc_files(tmp_path):
    paths = []
    for i, text in enumerate(DOCS):
        path = tmp_path / f"{i}.txt"
        path.write_text(text)
        paths.append(str(path))
    return paths


def test_cli_default_method_and_sampling_options(doc_files, capsys):
    args = ["generate", "-d", doc_files[0], "-d", doc_files[1], "-q", QUESTION, "--json", "--max_new_tokens", "16"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert (plain["method"], plain["ratio"], plain["finish_reason"]) == ("qcfuse", 0.15, "stop")
    assert main(args + ["--stop", "1975", "--logprobs", "--top_logprobs", "2", "--n", "2"]) == 0
    cut = json.loads(capsys.readouterr().out)
    assert cut["finish_reason"] == "stop" and "1975" not in cut["answer"] and plain["answer"].startswith(cut["answer"])
    assert len(cut["logprobs"]) >= 1 and len(cut["logprobs"][0]["top_logprobs"]) == 2
    assert [c["answer"] for c in cut["choices"]] == [cut["answer"]] * 2          # greedy twice: the same answer
    assert cut["new_tokens"] > 2 * len(cut["logprobs"])     # the stop text's tokens were decoded, not returned


def test_cli_help_states_the_default_method(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "(default: qcfuse)" in capsys.readouterr().out


@pytest.mark.parametrize("extra,message", [
    (["--temperature", "5"], "temperature must be a number from 0 to 2"),
    (["--top_p", "7"], "top_p must be"),
    (["--stop", "a", "--stop", "b", "--stop", "c", "--stop", "d", "--stop", "e"], "stop must be"),
    (["--top_logprobs", "2"], "top_logprobs needs logprobs"),
    (["--logit_bias", "x=1"], "--logit_bias expects TOKEN_ID=BIAS"),
    (["--n", "0"], "n must be an integer from 1 to 8"),
    (["--memory_gb", "-1"], "--memory_gb must be 0 or more"),
])
def test_cli_sampling_mistakes_are_one_line(doc_files, capsys, extra, message):
    rc = main(["generate", "-d", doc_files[0], "-q", QUESTION, *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
