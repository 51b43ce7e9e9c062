"""`qcfuse eval`: one method at one ratio over a dataset, resumable, with fidelity to full prefill.

Per sample, in this order:
1. fit the window: a prompt longer than the model's window (minus `max_new_tokens`) loses whole passages from
   the middle out (LongBench's middle truncation, at passage granularity; the row lists `dropped_passages`);
   a sample that still does not fit (one huge passage) is skipped with a counted warning;
2. the full-prefill reference (answer token ids, first-token log-probs, TTFT), computed once per prompt and
   kept under `{ref_dir}/{hash}.pt` (hash of model fingerprint, prompt token ids and max_new_tokens), so other
   methods, ratios and output files reuse it; `fullcomp` rows are the reference itself;
3. any chunk cache still missing is prepared (untimed; with a --cache_dir all were prepared up front, before
   the first sample; without one, chunk caches live in memory only and are prepared per sample), then the method
   runs once: TTFT is the engine's `ttft_s` (tokenized prompt to first-token logits, including cache
   loading and selection), after one `engine.warmup()`, the same way for every method.
Rows are appended to the output jsonl as they come; a rerun skips the ids already there.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import QcfuseError
from .datasets import MAX_NEW_TOKENS, METRIC, Sample, load_dataset
from .metrics import f1_score, fidelity, first_token_logprobs, rouge_l, string_match_all

RATIO_FREE = ("fullcomp", "reuse")          # methods whose ratio means nothing: run once, ratio recorded as null
CONFIG_KEYS = ("dataset", "method", "ratio", "model", "max_new_tokens", "options")
SCORE = {"qa_f1": f1_score, "string_match_all": string_match_all}


@dataclass
class EvalConfig:
    dataset: str
    method: str
    ratio: float | str | None = 0.15     # a share, or "auto:TARGET"
    size: int | None = None
    first: int = 0                     # skip this many samples (one run split over processes, e.g.)
    data_dir: str | None = None
    cache_dir: str | None = None
    out: str | None = None
    ref_dir: str | None = None
    model: str = "smollm2-135m"
    dtype: str = "float32"
    max_new_tokens: int | None = None
    options: dict = field(default_factory=dict)
    tokens: int | None = None          # RULER generated on the fly: prompt length, seed, chunk size
    seed: int = 0
    chunk_tokens: int | None = None
    progress: bool = True

    def resolved(self) -> "EvalConfig":
        from ..fusion import make_selector
        if self.method in RATIO_FREE:
            self.ratio = None
        elif self.ratio is None:
            raise QcfuseError(f"method '{self.method}' needs a --ratio")
        make_selector(self.method, 0.0 if self.ratio is None else self.ratio, **self.options)   # unknown method, bad ratio
        self.max_new_tokens = self.max_new_tokens or MAX_NEW_TOKENS.get(self.dataset, 32)
        if self.max_new_tokens < 1:
            raise QcfuseError("--max_new_tokens must be at least 1")
        if self.out is None:
            self.out = str(Path("results") / f"{self.dataset}_{run_name(self.method, self.ratio)}.jsonl")
        if self.ref_dir is None:
            self.ref_dir = str(Path(self.cache_dir) / "refs" if self.cache_dir else Path(self.out).parent / "refs")
        return self

    def row_config(self) -> dict:
        return {"dataset": self.dataset, "method": self.method, "ratio": self.ratio, "model": self.model,
                "max_new_tokens": self.max_new_tokens, "options": self.options}


def run_name(method: str, ratio: float | str | None) -> str:
    from ..fusion.budget import ratio_label
    return method if ratio is None else f"{method}_r{ratio_label(ratio)}"


def open_engine(model: str = "smollm2-135m", cache_dir: str | None = None, dtype: str = "float32"):
    import torch

    from ..cache import open_store
    from ..engine import FusionEngine
    from ..model.loader import load_model
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    return FusionEngine(load_model(model, dtype=getattr(torch, dtype), quiet=True), store=open_store(cache_dir))


def load_samples(cfg: EvalConfig, tokenizer=None) -> list[Sample]:
    return load_dataset(cfg.dataset, cfg.data_dir, cfg.size, first=cfg.first, model=cfg.model, tokenizer=tokenizer,
                        tokens=cfg.tokens, seed=cfg.seed, chunk_tokens=cfg.chunk_tokens, progress=cfg.progress)


# -- results file -------------------------------------------------------------------------------------------
def read_rows(path: Path, config: dict | None = None) -> list[dict]:
    """Rows of a results file. A torn last line (an interrupted run) is cut off; rows of another
    configuration mean the file belongs to another run."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    rows, offset = [], 0
    lines = data.split(b"\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            offset += len(line) + 1
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if n == len(lines):            # the last line, never finished: drop it so appends stay valid
                print(f"qcfuse: warning: {path}: dropping an unfinished last line", file=sys.stderr)
                with path.open("r+b") as f:
                    f.truncate(offset)
                break
            raise QcfuseError(f"{path}:{n}: malformed JSON line in the results file") from None
        if config is not None:
            theirs = {k: row.get(k) for k in CONFIG_KEYS}
            if theirs != config:
                raise QcfuseError(f"{path} holds results of another run ({_describe(theirs)}), not "
                                  f"{_describe(config)}: choose another --out")
        rows.append(row)
        offset += len(line) + 1
    return rows


def _describe(config: dict) -> str:
    return ", ".join(f"{k}={config.get(k)}" for k in CONFIG_KEYS if config.get(k) not in (None, {}))


# -- full-prefill references --------------------------------------------------------------------------------
def ref_key(engine, layout, max_new_tokens: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(engine.model.fingerprint.encode())
    h.update(layout.ids.numpy().tobytes())
    h.update(str(max_new_tokens).encode())
    return h.hexdigest()


def full_reference(engine, layout, max_new_tokens: int, ref_dir: Path) -> tuple[dict, bool]:
    """The full-prefill reference of a prompt, from `ref_dir` or computed now (and stored). Returns (ref, computed)."""
    import torch

    from ..fusion import make_selector
    path = ref_dir / f"{ref_key(engine, layout, max_new_tokens)}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True), False
        except Exception as exc:      # a torn or foreign file: recompute it
            print(f"qcfuse: warning: unreadable reference {path} ({exc}); recomputing", file=sys.stderr)
    gen = engine.generate_layout(layout, make_selector("fullcomp"), max_new_tokens)
    ref = {"answer": gen.answer, "token_ids": list(gen.token_ids), "first_logprobs": first_token_logprobs(gen.first_logits),
           "ttft_s": gen.stats["ttft_s"], "stats": {k: v for k, v in gen.stats.items() if isinstance(v, (int, float, str))}}
    ref_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(ref, tmp)
    os.replace(tmp, path)
    return ref, True


# -- window fitting ------------------------------------------------------------------------------------------
def fit_window(engine, sample: Sample, max_new_tokens: int):
    """(documents, layout, dropped passage indices) that fit the model's window, or None when none can."""
    window = engine.model.transformer.max_positions
    layout = engine.layout(sample.documents, sample.question)
    excess = layout.n_tokens + max_new_tokens - window
    if excess <= 0:
        return sample.documents, layout, []
    n = len(sample.documents)
    centre = (n - 1) / 2
    dropped = []
    for i in sorted(range(n), key=lambda i: (abs(i - centre), i)):     # middle out, like LongBench truncation
        if excess <= 0 or len(dropped) == n - 1:
            break
        dropped.append(i)
        excess -= len(layout.chunks[i])
    if excess > 0:
        return None
    docs = [d for i, d in enumerate(sample.documents) if i not in dropped]
    return docs, engine.layout(docs, sample.question), sorted(dropped)


# -- the run -------------------------------------------------------------------------------------------------
def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def rows_by_id(path: Path, config: dict | None = None) -> dict[str, dict]:
    """A results file's rows keyed by sample id (`read_rows`)."""
    return {r["id"]: r for r in read_rows(path, config)}


def spent_share(row: dict) -> float | None:
    """The share of the document a request recomputed over all its passes (rows from before ratio auto's
    margin rule have one pass: their recomputed tokens); None when the row does not say."""
    if row.get("recomputed_total_share") is not None:
        return row["recomputed_total_share"]
    if row.get("recomputed_tokens") is not None and row.get("context_tokens"):
        return row["recomputed_tokens"] / row["context_tokens"]
    return None


def summarize(rows: list[dict]) -> dict:
    out = {"n": len(rows)}
    for key in ("score", "score_full", "rougeL", "same_answer", "top1", "kl", "ttft_s", "ttft_full_s",
                "selection_s", "recomputed_tokens", "context_tokens"):
        out[key] = _mean(rows, key)
    shares = [share for share in map(spent_share, rows) if share is not None]
    out["share"] = sum(shares) / len(shares) if shares else None     # mean recomputed share, every pass counted
    out["passes"] = _mean(rows, "passes")
    out["reuse_checked"] = _mean(rows, "reuse_checked")           # share of requests that ran auto's reuse check
    out["rel_score"] = out["score"] / out["score_full"] if out["score_full"] else None
    out["speedup"] = out["ttft_full_s"] / out["ttft_s"] if out["ttft_s"] else None
    return out


def format_summary(cfg: EvalConfig, s: dict) -> str:
    if not s["n"]:
        return f"{cfg.dataset} {run_name(cfg.method, cfg.ratio)}: no results"
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    num = lambda x, f=".3f": "-" if x is None else format(x, f)
    return (f"{cfg.dataset} {run_name(cfg.method, cfg.ratio)} over {s['n']} samples: "
            f"score {num(s['score'])} (full prefill {num(s['score_full'])}, relative {num(s['rel_score'])}), "
            f"ROUGE-L {num(s['rougeL'])}; same answer {pct(s['same_answer'])}, top-1 {pct(s['top1'])}, "
            f"KL {num(s['kl'], '.4f')}; TTFT {num(1000 * s['ttft_s'], '.0f')} ms vs full "
            f"{num(1000 * s['ttft_full_s'], '.0f')} ms (speedup {num(s['speedup'], '.2f')}x), "
            f"selection {num(1000 * s['selection_s'], '.0f')} ms")


def run_eval(cfg: EvalConfig, engine=None, samples: list[Sample] | None = None, log=print) -> dict:
    """Evaluate; returns the summary over this run's samples (previous rows included)."""
    import torch
    from tqdm import tqdm

    from ..fusion import make_selector
    cfg.resolved()
    out = Path(cfg.out)
    config = cfg.row_config()
    done = rows_by_id(out, config)
    if samples is None:
        samples = load_samples(cfg, tokenizer=engine.model.tokenizer if engine is not None else None)
    todo = [s for s in samples if s.id not in done]
    if len({s.id for s in samples}) != len(samples):
        raise QcfuseError(f"{cfg.dataset}: duplicate sample ids")
    metric = METRIC[cfg.dataset]
    score_fn = SCORE[metric]
    skipped = 0
    if todo:
        out.parent.mkdir(parents=True, exist_ok=True)
        if engine is None:
            engine = open_engine(cfg.model, cfg.cache_dir, cfg.dtype)
        engine.warmup()
        fitted = []
        for s in todo:
            fit = fit_window(engine, s, cfg.max_new_tokens)
            if fit is None:
                skipped += 1
            else:
                fitted.append((s, *fit))
        if skipped:
            log(f"qcfuse: warning: skipped {skipped} sample(s) that do not fit the model's window even with "
                "one passage")
        selector = make_selector(cfg.method, cfg.ratio or 0.0, **cfg.options)
        if selector.uses_cache and cfg.cache_dir:     # persistent: prepare everything first (memory only: per sample)
            t0 = time.perf_counter()
            prepared = sum(engine.prepare(docs) for _, docs, _, _ in
                           tqdm(fitted, desc="preparing chunk caches", unit="sample", disable=not cfg.progress))
            if prepared:
                log(f"prepared {prepared} chunk caches in {time.perf_counter() - t0:.1f} s")
        ref_dir = Path(cfg.ref_dir)
        rows_now = [done[s.id] for s in samples if s.id in done]
        bar = tqdm(fitted, desc=f"{cfg.dataset} {run_name(cfg.method, cfg.ratio)}", unit="sample",
                   disable=not cfg.progress)
        with out.open("a") as sink:
            for sample, docs, layout, dropped in bar:
                ref, _ = full_reference(engine, layout, cfg.max_new_tokens, ref_dir)
                if cfg.method == "fullcomp":
                    answer, token_ids, logits, stats = (ref["answer"], ref["token_ids"], ref["first_logprobs"],
                                                        ref["stats"])
                else:
                    if selector.uses_cache:
                        engine.prepare(docs)        # anything evicted since the up-front pass (untimed)
                    gen = engine.generate_layout(layout, make_selector(cfg.method, cfg.ratio or 0.0, **cfg.options),
                                                 cfg.max_new_tokens)
                    answer, token_ids, logits, stats = gen.answer, gen.token_ids, gen.first_logits, gen.stats
                row = {"id": sample.id, **config, "metric": metric,
                       "prediction": answer, "gold": sample.answers,
                       "score": score_fn(answer, sample.answers), "rougeL": rouge_l(answer, sample.answers),
                       "prediction_full": ref["answer"], "score_full": score_fn(ref["answer"], sample.answers),
                       **fidelity(ref["token_ids"], ref["first_logprobs"], token_ids, logits),
                       "ttft_s": stats["ttft_s"], "ttft_full_s": ref["ttft_s"],
                       "selection_s": stats.get("selection_s", 0.0),
                       "recomputed_tokens": stats.get("recomputed_tokens"),
                       "recomputed_share": stats.get("recomputed_share"),
                       "recomputed_total_share": stats.get("recomputed_total_share"),
                       "passes": stats.get("passes"), "auto_rule": stats.get("auto_rule"),
                       "reuse_checked": stats.get("reuse_checked"),
                       "context_tokens": stats.get("context_tokens"), "prompt_tokens": stats.get("prompt_tokens"),
                       "cache_hits": stats.get("cache_hits"), "cache_misses": stats.get("cache_misses"),
                       "cache_corrupt": stats.get("cache_corrupt"),
                       "hits_by_tier": stats.get("hits_by_tier"), "bytes_loaded": stats.get("bytes_loaded"),
                       "decode_s": stats.get("decode_s"), "new_tokens": stats.get("new_tokens"),
                       "dropped_passages": dropped, "threads": torch.get_num_threads()}
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                rows_now.append(row)
                bar.set_postfix(score=f"{_mean(rows_now, 'score'):.3f}", top1=f"{_mean(rows_now, 'top1'):.2f}")
    rows = read_rows(out) if out.is_file() else []
    ids = {s.id for s in samples}
    summary = summarize([r for r in rows if r["id"] in ids])
    summary.update(new=len(todo) - skipped, skipped=skipped, out=str(out))
    log(format_summary(cfg, summary) + ("" if todo else " (nothing new to run)"))
    return summary
