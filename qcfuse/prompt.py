"""RAG prompt layout: [prefix] + [chunk 1..k] + [suffix], each piece tokenized on its own.

Tokenizing pieces separately makes a chunk's token ids independent of its neighbours, so the ids computed
offline are exactly the ids used online. The chat template is rendered once around a marker and split
there, so the prefix and suffix carry the template's own special tokens and nothing is added twice.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import QcfuseError

SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the question using the passages the user gives you. "
    "Reply with a short answer only, no explanation."
)
PASSAGES_HEADER = "Passages:\n\n"
QUESTION_TEMPLATE = "Question: {question}\nAnswer in a few words."
CHUNK_TAIL = "\n\n"        # tokenized as part of each chunk, so chunks never run into each other
_DOCS = "\u0000QCFUSE_DOCS\u0000"
_QUESTION = "\u0000QCFUSE_QUESTION\u0000"


@dataclass
class PromptLayout:
    """Token ids of each piece and where each lands in the fused prompt."""
    prefix: list[int]
    chunks: list[list[int]]
    suffix: list[int]
    question: tuple[int, int] = (0, 0)   # the user's question as [start, end) inside the suffix
    chunk_starts: list[int] = field(init=False)

    def __post_init__(self):
        starts, pos = [], len(self.prefix)
        for chunk in self.chunks:
            starts.append(pos)
            pos += len(chunk)
        self.chunk_starts = starts

    @property
    def context_len(self) -> int:
        """Prefix + chunks: everything that can come from a cache."""
        return len(self.prefix) + sum(len(c) for c in self.chunks)

    @property
    def n_tokens(self) -> int:
        return self.context_len + len(self.suffix)

    @property
    def n_doc_tokens(self) -> int:
        return self.context_len - len(self.prefix)

    @property
    def ids(self) -> torch.Tensor:
        return torch.tensor(self.prefix + [t for c in self.chunks for t in c] + self.suffix, dtype=torch.long)

    def doc_positions(self) -> torch.Tensor:
        """Absolute positions of all document tokens: the only candidates for recomputation."""
        return torch.arange(len(self.prefix), self.context_len)

    def chunk_spans(self) -> list[tuple[int, int]]:
        return [(s, s + len(c)) for s, c in zip(self.chunk_starts, self.chunks)]

    def suffix_positions(self) -> torch.Tensor:
        return torch.arange(self.context_len, self.n_tokens)


def build_layout(tokenizer, documents: list[str], question: str, system_prompt: str = SYSTEM_PROMPT) -> PromptLayout:
    if not documents:
        raise QcfuseError("at least one document is required")
    for i, doc in enumerate(documents):
        if not isinstance(doc, str) or not doc.strip():
            raise QcfuseError(f"document {i + 1} is empty")
    if not isinstance(question, str) or not question.strip():
        raise QcfuseError("the question is empty")
    prefix_text, suffix_text = _render_template(tokenizer, system_prompt)
    before_q, _, after_q = suffix_text.partition(_QUESTION)

    def encode(text: str, user_text: bool) -> list[int]:
        # template text keeps its special tokens; user text never becomes one (no prompt injection)
        return tokenizer(text, add_special_tokens=False, split_special_tokens=user_text).input_ids

    head, q_ids = encode(before_q, False), encode(question.strip(), True)
    return PromptLayout(
        prefix=encode(prefix_text, False),
        chunks=[_document_ids(tokenizer, doc) for doc in documents],
        suffix=head + q_ids + encode(after_q, False),
        question=(len(head), len(head) + len(q_ids)),
    )


DOCUMENTS_MARKER = "{documents}"


def build_text_layout(tokenizer, documents: list[str], prompt: str) -> PromptLayout:
    """A prompt the client wrote itself (text completions): the documents go where it says `{documents}`, or
    first when it does not say. The text before them is the prefix (with the tokenizer's BOS, as a plain
    prompt would have), the text after them the suffix; special tokens in the client's text count as such
    (it may follow a chat template by hand), never in documents. Chunks are tokenized exactly as in chat
    requests, so both share the chunk caches."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise QcfuseError("the prompt is empty")
    if prompt.count(DOCUMENTS_MARKER) > 1:
        raise QcfuseError(f"the prompt may hold {DOCUMENTS_MARKER} once, to place the documents")
    for i, doc in enumerate(documents):
        if not isinstance(doc, str) or not doc.strip():
            raise QcfuseError(f"document {i + 1} is empty")
    if DOCUMENTS_MARKER in prompt and not documents:
        raise QcfuseError(f"the prompt places documents with {DOCUMENTS_MARKER}, but the request has none")
    before, marker, after = prompt.partition(DOCUMENTS_MARKER)
    if not marker:
        before, after = "", prompt
    if not after:
        raise QcfuseError(f"the prompt needs some text after {DOCUMENTS_MARKER} (the answer continues it)")
    prefix = tokenizer(before, add_special_tokens=True).input_ids
    suffix = tokenizer(after, add_special_tokens=False).input_ids
    chunks = [_document_ids(tokenizer, doc) for doc in documents]
    return PromptLayout(prefix=prefix, chunks=chunks, suffix=suffix, question=(0, len(suffix)))


def _document_ids(tokenizer, document: str) -> list[int]:
    """A chunk's ids: the same for every request and route, so its cache is found again."""
    return tokenizer(document.strip() + CHUNK_TAIL, add_special_tokens=False, split_special_tokens=True).input_ids


def _render_template(tokenizer, system_prompt: str) -> tuple[str, str]:
    """The chat prompt split at the documents: (prefix text, suffix text with a question marker)."""
    user = PASSAGES_HEADER + _DOCS + QUESTION_TEMPLATE.format(question=_QUESTION)
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": user}]
    if tokenizer.chat_template:
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # templates without a system role (e.g. some Gemma): fold it into the user turn
            messages = [{"role": "user", "content": system_prompt + "\n\n" + user}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        bos = tokenizer.bos_token or ""
        text = f"{bos}{system_prompt}\n\n{user}\nAnswer:"
    prefix, _, suffix = text.partition(_DOCS)
    return prefix, suffix
