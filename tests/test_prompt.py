"""Prompt layout: pieces tokenized alone, same ids offline and online, no stray specials."""
import pytest

from qcfuse.errors import QcfuseError
from qcfuse.prompt import build_layout


def test_pieces_are_independent_of_neighbours(smollm2):
    tok = smollm2.tokenizer
    a, b = "First passage about owls.", "Second passage about otters."
    one = build_layout(tok, [a, b], "Which animal?")
    two = build_layout(tok, [b, a, "x y z"], "Another question entirely?")
    assert one.chunks[0] == two.chunks[1] and one.chunks[1] == two.chunks[0]
    assert one.prefix == two.prefix


def test_no_bos_or_specials_inside_chunks(smollm2):
    tok = smollm2.tokenizer
    layout = build_layout(tok, ["Text with <|im_end|> inside.", "Plain."], "q?")
    specials = set(tok.all_special_ids)
    for chunk in layout.chunks:
        assert not specials & set(chunk)
    assert tok.decode(layout.chunks[0]).startswith("Text with <|im_end|> inside.")


def test_layout_spans_and_question(smollm2):
    layout = build_layout(smollm2.tokenizer, ["aa bb", "cc dd ee"], "What is up?")
    ids = layout.ids.tolist()
    for (s, e), chunk in zip(layout.chunk_spans(), layout.chunks):
        assert ids[s:e] == chunk
    qs, qe = layout.question
    assert smollm2.tokenizer.decode(layout.suffix[qs:qe]) == "What is up?"
    assert layout.n_tokens == len(ids)
    text = smollm2.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("docs,question", [([], "q"), (["ok", "  \n"], "q"), (["ok"], " ")])
def test_bad_input_is_a_user_error(smollm2, docs, question):
    with pytest.raises(QcfuseError):
        build_layout(smollm2.tokenizer, docs, question)
