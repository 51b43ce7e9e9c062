"""Reading document collections for `qcfuse prepare`: what users already have on disk."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import QcfuseError


def read_document_sets(path: str) -> list[list[str]]:
    """Groups of documents (a group is what one request would carry; order inside it does not matter for
    caching). A directory of .txt files is one group; each jsonl line or json item is one group."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix == ".txt" and f.is_file())
        docs = [f.read_text(encoding="utf-8", errors="replace") for f in files]
        docs = [d for d in docs if d.strip()]
        if not docs:
            raise QcfuseError(f"no non-empty .txt documents in {path}")
        return [docs]
    if not p.is_file():
        raise QcfuseError(f"documents not found: {path}")
    if p.suffix == ".jsonl":
        sets = []
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    sets.append(_group(json.loads(line), f"{path}:{n}"))
                except json.JSONDecodeError as exc:
                    raise QcfuseError(f"{path}:{n}: not JSON ({exc.msg})") from None
    elif p.suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise QcfuseError(f"{path}: not JSON ({exc.msg})") from None
        if not isinstance(data, list):
            raise QcfuseError(f"{path}: expected a JSON list")
        sets = [_group(item, f"{path}[{i}]") for i, item in enumerate(data)]
    else:
        raise QcfuseError(f"{path}: expected a directory, a .jsonl or a .json file")
    sets = [s for s in sets if s]
    if not sets:
        raise QcfuseError(f"no documents in {path}")
    return sets


def _group(item, where: str) -> list[str]:
    if isinstance(item, str):
        docs = [item]
    elif isinstance(item, dict) and isinstance(item.get("text"), str):
        docs = [item["text"]]
    elif isinstance(item, dict) and isinstance(item.get("documents"), list):
        docs = item["documents"]
    elif isinstance(item, dict) and isinstance(item.get("ctxs"), list):      # musique_s
        docs = [f"{c.get('title', '')}\n{c.get('text', '')}".strip() for c in item["ctxs"] if isinstance(c, dict)]
    else:
        raise QcfuseError(f"{where}: expected a string, {{\"text\": ...}}, {{\"documents\": [...]}} or {{\"ctxs\": [...]}}")
    if not all(isinstance(d, str) for d in docs):
        raise QcfuseError(f"{where}: documents must be strings")
    return [d for d in docs if d.strip()]
