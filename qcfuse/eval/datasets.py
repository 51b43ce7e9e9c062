"""Evaluation sets as samples: (id, documents, question, answers). Each document is one chunk.

- LongBench `hotpotqa`, `2wikimqa`, `musique`: `{data_dir}/{name}.jsonl` in LongBench's schema (`input` is the
  question, `context` the passages, `answers`, `_id`); the context splits into one chunk per `Passage k:` block
  (a line starting `Passage <k>:`); any text before the first block is a chunk of its own.
- `musique_s`: `{data_dir}/musique_s.json` (default data dir: `../shared/data` next to the repository, or
  $QCFUSE_DATA_DIR): a JSON list of `{"ctxs": [{"title", "text"}], "question", "answers"}`; each passage
  ("title\\ntext") is one chunk.
- RULER `ruler_mv`, `ruler_mq`, `ruler_vt`: `{data_dir}/{name}.jsonl` as written by `qcfuse data ruler`, or,
  without a data dir, generated on the fly (seeded, see `ruler.py`).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import QcfuseError

LONGBENCH = ("hotpotqa", "2wikimqa", "musique")
RULER = {"ruler_mv": "mv", "ruler_mq": "mq", "ruler_vt": "vt"}
DATASETS = (*LONGBENCH, "musique_s", *RULER)
# the score each set reports: LongBench QA F1 for QA sets, RULER string-match-all for the synthetic ones
METRIC = {**{name: "qa_f1" for name in (*LONGBENCH, "musique_s")}, **{name: "string_match_all" for name in RULER}}
# LongBench generates 32 tokens for these QA sets; RULER's answers list 4-5 numbers or names
MAX_NEW_TOKENS = {**{name: 32 for name in (*LONGBENCH, "musique_s")}, "ruler_mv": 64, "ruler_mq": 64, "ruler_vt": 48}
_PASSAGE = re.compile(r"^(?=Passage \d+:)", re.MULTILINE)


@dataclass
class Sample:
    id: str
    documents: list[str]
    question: str
    answers: list[str]
    meta: dict = field(default_factory=dict)


def default_data_dir() -> Path:
    env = os.environ.get("QCFUSE_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"


def split_passages(context: str) -> list[str]:
    """LongBench context to chunks: one per `Passage k:` block."""
    return [part.strip() for part in _PASSAGE.split(context) if part.strip()]


def load_dataset(name: str, data_dir: str | Path | None = None, size: int | None = None, *, model: str = "smollm2-135m",
                 tokenizer=None, tokens: int | None = None, seed: int = 0, chunk_tokens: int | None = None,
                 progress: bool = False, first: int = 0) -> list[Sample]:
    """`size` samples of a set (all if None) from sample `first` on. RULER sets without a data dir are generated
    with the model's tokenizer (`tokens`, `seed`, `chunk_tokens`)."""
    if name not in DATASETS:
        raise QcfuseError(f"unknown dataset '{name}' (choose from: {', '.join(DATASETS)})")
    if size is not None and size < 1:
        raise QcfuseError("--size must be at least 1")
    if first < 0:
        raise QcfuseError("--first must be at least 0")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise QcfuseError(f"data directory not found: {data_dir}")
    if name in RULER and data_dir is None:
        from . import ruler
        tok = tokenizer if tokenizer is not None else ruler.load_tokenizer(model)
        records = ruler.generate(RULER[name], first + (size or 100), tok, tokens or ruler.DEFAULT_TOKENS, seed,
                                 chunk_tokens or ruler.DEFAULT_CHUNK_TOKENS, progress=progress)
        return [_ruler_sample(r, f"generated {name}", i + 1) for i, r in enumerate(records)][first:]
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if name == "musique_s":
        samples = _musique_s(root / "musique_s.json")
    else:
        path = root / f"{name}.jsonl"
        if not path.is_file():
            hint = (" (write one with `qcfuse data ruler --task "
                    f"{RULER[name]} --out {path}`, or leave out --data_dir to generate it on the fly)") if name in RULER else ""
            raise QcfuseError(f"{name}: file not found: {path}{hint}")
        rows = _jsonl(path)
        samples = ([_ruler_sample(r, path, line) for line, r in rows] if name in RULER
                   else [_longbench_sample(r, path, line, name) for line, r in rows])
    if not samples:
        raise QcfuseError(f"{name}: no samples in {root}")
    if first >= len(samples):
        raise QcfuseError(f"--first {first}: {name} has {len(samples)} samples")
    return samples[first:first + size] if size else samples[first:]


def parse_slices(spec: str) -> list[tuple[str, int, int]]:
    """ "NAME[A:B],..." (e.g. a calibration split "musique_s[90:100],ruler_mv[0:4]") as (name, A, B) triples."""
    slices = []
    for item in (t.strip() for t in str(spec).split(",") if t.strip()):
        found = re.fullmatch(r"([a-z0-9_]+)\[(\d+):(\d+)\]", item)
        if not found or int(found[2]) >= int(found[3]):
            raise QcfuseError(f"bad sample set '{item}': expected NAME[A:B] with A < B, e.g. musique_s[90:100]")
        slices.append((found[1], int(found[2]), int(found[3])))
    if not slices:
        raise QcfuseError("no sample sets given: expected NAME[A:B],..., e.g. musique_s[90:100]")
    return slices


def load_slices(slices: list[tuple[str, int, int]], data_dir: str | Path | None = None, **options) -> list[Sample]:
    """Samples A to B-1 of each (name, A, B), in order; `options` go to load_dataset."""
    samples = []
    for name, a, b in slices:
        samples += load_dataset(name, data_dir, b, **options)[a:b]
    return samples


def _jsonl(path: Path) -> list[tuple[int, dict]]:
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise QcfuseError(f"cannot read {path}: {exc}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise QcfuseError(f"{path}:{n}: malformed JSON line ({exc})") from None
        if not isinstance(row, dict):
            raise QcfuseError(f"{path}:{n}: expected a JSON object per line")
        out.append((n, row))
    return out


def _need(row: dict, key: str, kind, where: str):
    value = row.get(key)
    if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
        what = "a list of strings" if kind is list else "a string"
        raise QcfuseError(f"{where}: field '{key}' missing or not {what}")
    return value


def _longbench_sample(row: dict, path: Path, line: int, name: str) -> Sample:
    where = f"{path}:{line}"
    question = _need(row, "input", str, where)
    context = _need(row, "context", str, where)
    answers = _need(row, "answers", list, where)
    documents = split_passages(context)
    if not documents:
        raise QcfuseError(f"{where}: empty context")
    sid = str(row.get("_id") or f"{name}-{line}")
    return Sample(sid, documents, question, answers, {"length": row.get("length")})


def _ruler_sample(row: dict, path, line: int) -> Sample:
    where = f"{path}:{line}"
    documents = _need(row, "documents", list, where)
    if not documents:
        raise QcfuseError(f"{where}: no documents")
    meta = {k: row[k] for k in ("task", "needle_chunks", "prompt_tokens") if k in row}
    return Sample(str(row.get("_id") or f"line-{line}"), documents, _need(row, "input", str, where),
                  _need(row, "answers", list, where), meta)


def _musique_s(path: Path) -> list[Sample]:
    if not path.is_file():
        raise QcfuseError(f"musique_s: file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise QcfuseError(f"{path}: malformed JSON ({exc})") from None
    if not isinstance(data, list):
        raise QcfuseError(f"{path}: expected a JSON list of samples")
    out = []
    for i, item in enumerate(data):
        where = f"{path}: sample {i}"
        if not isinstance(item, dict) or not isinstance(item.get("ctxs"), list) or not item["ctxs"]:
            raise QcfuseError(f"{where}: field 'ctxs' missing or empty")
        try:
            documents = [f"{c['title']}\n{c['text']}".strip() for c in item["ctxs"]]
        except (KeyError, TypeError):
            raise QcfuseError(f"{where}: every ctx needs 'title' and 'text'") from None
        out.append(Sample(f"musique_s-{i}", documents, _need(item, "question", str, where),
                          _need(item, "answers", list, where)))
    return out
