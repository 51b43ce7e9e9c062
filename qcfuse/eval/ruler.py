"""A seeded generator of RULER-style synthetic tasks, written after NVIDIA RULER's recipes.

Tasks (`--task`):
- `mv`  needle-in-a-haystack, multi-value: one key, 4 needles "One of the special magic numbers for {key} is:
        {value}." in a Paul Graham essay haystack; the answer is all 4 values.
- `mq`  needle-in-a-haystack, multi-query: 4 keys, one needle each; the question asks for all 4 keys.
- `vt`  variable tracking: one chain of 4 hops (`VAR AAAAA = 12345.`, `VAR BBBBB = VAR AAAAA.`, ... 5 variables)
        hidden in RULER's repeated noise filler, after a one-shot example; the answer is all 5 variable names.

Length is counted in the model's own tokens for the whole prompt as the engine lays it out (template, every
chunk, the question): each sample stays at most `tokens` and within a few percent of it. The context is split
into chunks of about `chunk_tokens` tokens at sentence (haystack) or line (noise) boundaries, and every needle
lies beyond the first chunk. Sample i depends only on (task, seed, tokens, chunk_tokens, i), so any prefix
of a larger set is the same as a smaller set. Metric: string-match-all (`metrics.string_match_all`).
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from ..errors import QcfuseError
from ..prompt import build_layout

TASKS = ("mv", "mq", "vt")
DEFAULT_TOKENS = 7000          # the default model's window is 8,192: room for up to ~1K new tokens
DEFAULT_CHUNK_TOKENS = 512
N_VALUES = 4                   # mv: values per key; mq: keys
N_HOPS = 4                     # vt: one chain of 4 hops, so 5 variables
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
MV_QUESTION = ("Some special magic numbers are hidden within the passages. What are all the special magic "
               "numbers for {key} mentioned in the provided text?")
MQ_QUESTION = ("Some special magic numbers are hidden within the passages. What are all the special magic "
               "numbers for {keys} mentioned in the provided text?")
VT_QUESTION = ("Memorize and track the chain(s) of variable assignment hidden in the passages. Find all "
               "variables that are assigned the value {value} in the text above.")
VT_ANSWER = ("According to the chain(s) of variable assignment in the text above, {n} variables are assigned the "
             "value {value}, they are: {names}")
NEEDLE = " One of the special magic numbers for {key} is: {value}."

_ADJECTIVES = ("amber ancient bitter brave bright calm clever cold crimson curly damp dusty eager early faint "
               "fancy fierce gentle giant golden hollow humble icy jolly lazy lively loud lucky misty modern "
               "narrow noisy odd pale plain proud quick quiet rapid rough rusty sandy shiny silent silver sleepy "
               "smooth snowy sour steady sticky sunny swift tame tender tidy vivid wild windy wooden young").split()
_NOUNS = ("anchor apple badger basket beacon bison bottle bramble button canyon cedar cherry cobalt comet "
          "cottage crane dolphin ember falcon fern fiddle garden glacier harbor hazel heron island jasper kettle "
          "lantern lemon maple meadow mirror nectar oak otter panda pebble pepper pine quarry raven river saddle "
          "salmon shadow spruce thistle tiger tulip violet walnut willow zephyr").split()

_HAYSTACK_CACHE: dict[tuple[str, str], list[tuple[str, int]]] = {}


def default_haystack_dir() -> Path:
    from .datasets import default_data_dir
    return default_data_dir() / "pg_essays"


def load_tokenizer(model: str):
    """Only the tokenizer of a model (alias, HF directory or GGUF): lengths are counted in its tokens."""
    from ..model.loader import _load_tokenizer, resolve_model_dir
    return _load_tokenizer(resolve_model_dir(model, quiet=True))


# -- haystacks ---------------------------------------------------------------------------------------------
def _sentences(text: str) -> list[str]:
    """Split text into sentences that keep their leading whitespace, so "".join(units) == text."""
    return [u for u in re.findall(r"\s*[^.!?]*(?:[.!?]+[\"')\]]*|$)", text) if u]


def _count(tokenizer, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids] if texts else []


def _fit_units(tokenizer, units: list[str], limit: int) -> list[tuple[str, int]]:
    """Units with their token counts; a unit longer than `limit` tokens is split at lines, then at words."""
    out = []
    for unit, n in zip(units, _count(tokenizer, units)):
        if n <= limit:
            out.append((unit, n))
            continue
        pieces = re.findall(r"\s*[^\n]+", unit) if "\n" in unit.strip() else []
        if len(pieces) < 2:
            words = re.findall(r"\s*\S+", unit)
            step = max(1, len(words) * limit // (2 * n))
            pieces = ["".join(words[i:i + step]) for i in range(0, len(words), step)]
        out.extend(_fit_units(tokenizer, pieces, limit))
    return out


def essay_units(tokenizer, haystack_dir: Path, limit: int) -> list[tuple[str, int]]:
    """Every sentence of every essay (sorted by file name, essays separated by a blank line) and its tokens."""
    haystack_dir = Path(haystack_dir)
    key = (str(haystack_dir.resolve()), f"{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}:{limit}")
    if key not in _HAYSTACK_CACHE:
        files = sorted(haystack_dir.glob("*.txt")) if haystack_dir.is_dir() else []
        if not files:
            raise QcfuseError(f"no haystack essays (*.txt) in {haystack_dir}")
        units = []
        for f in files:
            text = f.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                units += _sentences("\n\n" + text)
        _HAYSTACK_CACHE[key] = _fit_units(tokenizer, units, limit)
    return _HAYSTACK_CACHE[key]


# -- assembly ----------------------------------------------------------------------------------------------
def _pack(units: list[tuple[str, int]], limit: int) -> list[list[tuple[str, int]]]:
    chunks, current, size = [], [], 0
    for unit in units:
        if current and size + unit[1] > limit:
            chunks.append(current)
            current, size = [], 0
        current.append(unit)
        size += unit[1]
    if current:
        chunks.append(current)
    return chunks


def _insert(rng: random.Random, chunks: list[list], needles: list[tuple[str, int]], first: int,
            ordered: bool) -> None:
    """Insert needles at random unit boundaries of chunks[first:] (in the given order if `ordered`)."""
    slots = [(c, i) for c in range(first, len(chunks)) for i in range(len(chunks[c]) + 1)]
    picks = sorted(rng.sample(range(len(slots)), len(needles))) if ordered else rng.sample(range(len(slots)), len(needles))
    placed = sorted(zip(picks, range(len(needles))), reverse=True)   # insert back to front: slots stay valid
    for pick, k in placed:
        c, i = slots[pick]
        chunks[c].insert(i, (needles[k][0], needles[k][1], True))


def _texts(chunks: list[list]) -> list[str]:
    return ["".join(u[0] for u in chunk).strip() for chunk in chunks]


def _trim_to(tokenizer, chunks: list[list], question: str, tokens: int, first: int) -> int:
    """Drop non-needle units from the end until the whole prompt fits `tokens`; returns its token count."""
    while True:
        n = build_layout(tokenizer, _texts(chunks), question).n_tokens
        if n <= tokens:
            return n
        excess = n - tokens
        while excess > 0:
            c = max((c for c in range(first, len(chunks)) if any(len(u) == 2 for u in chunks[c])), default=None)
            if c is None:
                raise QcfuseError(f"--tokens {tokens} is too small for this task")
            i = max(i for i, u in enumerate(chunks[c]) if len(u) == 2)
            excess -= chunks[c].pop(i)[1]
            if not chunks[c]:
                chunks.pop(c)


def _overhead(tokenizer, question: str) -> int:
    layout = build_layout(tokenizer, ["x"], question)
    return len(layout.prefix) + len(layout.suffix)


def _numbers(rng: random.Random, n: int, digits: int, avoid: str = "") -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
        if v not in out and v not in avoid:
            out.append(v)
    return out


def _haystack_sample(rng, tokenizer, task, tokens, chunk_tokens, haystack_dir):
    units = essay_units(tokenizer, haystack_dir, max(8, chunk_tokens // 4))
    if task == "mv":
        key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        values = _numbers(rng, N_VALUES, 7)
        needles = [NEEDLE.format(key=key, value=v) for v in values]
        question = MV_QUESTION.format(key=key)
    else:
        keys: list[str] = []
        while len(keys) < N_VALUES:
            k = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
            if k not in keys:
                keys.append(k)
        values = _numbers(rng, N_VALUES, 7)
        needles = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
        question = MQ_QUESTION.format(keys=", ".join(keys[:-1]) + f", and {keys[-1]}")
    needle_units = list(zip(needles, _count(tokenizer, needles)))
    budget = tokens - _overhead(tokenizer, question) - sum(n for _, n in needle_units)
    start = rng.randrange(len(units))
    body, size, i = [], 0, start
    while size < budget:
        body.append(units[i % len(units)])
        size += units[i % len(units)][1]
        i += 1
        if i - start > len(units):
            raise QcfuseError(f"the haystack is too short for --tokens {tokens}")
    chunks = _pack(body, chunk_tokens)
    if len(chunks) < 2:
        raise QcfuseError(f"--tokens {tokens} gives a single chunk of {chunk_tokens} tokens: needles must lie "
                          "beyond the first chunk, so use more tokens or smaller chunks")
    _insert(rng, chunks, needle_units, first=1, ordered=False)
    return chunks, question, values, needles, 1


def _vt_sample(rng, tokenizer, tokens, chunk_tokens):
    names: list[str] = []
    while len(names) < 2 * (N_HOPS + 1):
        v = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if v not in names:
            names.append(v)
    example_vars, real_vars = names[: N_HOPS + 1], names[N_HOPS + 1:]
    example_value, value = _numbers(rng, 2, 5)

    def chain(variables, val):
        return [f"VAR {variables[0]} = {val}."] + [f"VAR {b} = VAR {a}." for a, b in zip(variables, variables[1:])]

    # the one-shot example: a short instance of the same task, with its answer, as the first chunk
    lines = [NOISE] * 8
    slots = sorted(rng.sample(range(len(lines) + 1), N_HOPS + 1))
    for k, (slot, statement) in enumerate(zip(slots, chain(example_vars, example_value))):
        lines.insert(slot + k, statement)
    example = ("Example:\n" + "\n".join(lines) + "\nQuestion: " + VT_QUESTION.format(value=example_value)
               + "\nAnswer: " + VT_ANSWER.format(n=N_HOPS + 1, value=example_value, names=" ".join(example_vars)))
    example_chunk = [(example, _count(tokenizer, [example])[0])]

    question = VT_QUESTION.format(value=value)
    noise_unit = ("\n" + NOISE, _count(tokenizer, ["\n" + NOISE])[0])
    statements = ["\n" + s for s in chain(real_vars, value)]
    needle_units = list(zip(statements, _count(tokenizer, statements)))
    budget = (tokens - _overhead(tokenizer, question) - example_chunk[0][1]
              - sum(n for _, n in needle_units))
    body = [noise_unit] * max(1, budget // noise_unit[1] + 1)
    chunks = [example_chunk] + _pack(body, chunk_tokens)
    if len(chunks) < 2:
        raise QcfuseError(f"--tokens {tokens} is too small for variable tracking")
    _insert(rng, chunks, needle_units, first=1, ordered=True)
    chunks[0] = [(example, example_chunk[0][1], True)]      # never trimmed
    return chunks, question, real_vars, statements, 1


def generate_sample(task: str, index: int, tokenizer, tokens: int = DEFAULT_TOKENS, seed: int = 0,
                    chunk_tokens: int = DEFAULT_CHUNK_TOKENS, haystack_dir: str | Path | None = None) -> dict:
    """One sample as a dict in the jsonl schema `qcfuse data ruler` writes."""
    if task not in TASKS:
        raise QcfuseError(f"unknown RULER task '{task}' (choose from: {', '.join(TASKS)})")
    if chunk_tokens < 32:
        raise QcfuseError("--chunk_tokens must be at least 32")
    rng = random.Random(f"ruler-{task}-{seed}-{tokens}-{chunk_tokens}-{index}")
    if task == "vt":
        chunks, question, answers, needles, first = _vt_sample(rng, tokenizer, tokens, chunk_tokens)
    else:
        hay = Path(haystack_dir) if haystack_dir else default_haystack_dir()
        chunks, question, answers, needles, first = _haystack_sample(rng, tokenizer, task, tokens, chunk_tokens, hay)
    n_tokens = _trim_to(tokenizer, chunks, question, tokens, first)
    documents = _texts(chunks)
    needle_chunks = [next(c for c, doc in enumerate(documents) if n.strip() in doc) for n in needles]
    return {
        "_id": f"ruler_{task}-s{seed}-t{tokens}-c{chunk_tokens}-{index}",
        "task": task, "input": question, "documents": documents, "answers": answers,
        "needles": [n.strip() for n in needles], "needle_chunks": needle_chunks,
        "prompt_tokens": n_tokens, "tokens": tokens, "chunk_tokens": chunk_tokens, "seed": seed, "index": index,
    }


def generate(task: str, n: int, tokenizer, tokens: int = DEFAULT_TOKENS, seed: int = 0,
             chunk_tokens: int = DEFAULT_CHUNK_TOKENS, haystack_dir: str | Path | None = None,
             progress: bool = False) -> list[dict]:
    from tqdm import tqdm
    if n < 1:
        raise QcfuseError("--n must be at least 1")
    return [generate_sample(task, i, tokenizer, tokens, seed, chunk_tokens, haystack_dir)
            for i in tqdm(range(n), desc=f"generating ruler_{task}", unit="sample", disable=not progress)]


def write_jsonl(samples: list[dict], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(s) + "\n" for s in samples))
    tmp.replace(out)
    return out
