"""Fidelity of every selector to full prefill on musique_s, written as a markdown report.

    .venv/bin/python scripts/selector_report.py --samples 30

Per sample: full prefill once (reference answer and first-token distribution), then every method at every
ratio through the engine with all chunk caches prepared. Records go to a jsonl as they are made, so an
interrupted run resumes where it stopped; the markdown table is rebuilt from the records at the end.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

METHODS = ["reuse", "cacheblend", "epic", "fuserag", "prophetkv", "qcfuse"]
RATIOS = [0.05, 0.1, 0.15, 0.3]
CALIBRATION_SAMPLES = 8      # musique_s samples 0..7 were used by `qcfuse profile` for the shipped profile


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/musique_s.json"))
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--max_new_tokens", type=int, default=8)
    ap.add_argument("--out", default="results/selectors")
    ap.add_argument("--report_only", action="store_true", help="rebuild report.md from the records, run nothing")
    args = ap.parse_args()
    if args.report_only:
        write_report(Path(args.out) / "records.jsonl", Path(args.out) / "report.md", args)
        return 0

    from qcfuse import FusionEngine, load_model, make_selector
    from qcfuse.eval.metrics import f1_score as f1
    from qcfuse.profile import kl_first_token

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records_path = out / "records.jsonl"
    done = set()
    if records_path.exists():
        for line in records_path.read_text().splitlines():
            r = json.loads(line)
            done.add((r["sample"], r["method"], r["ratio"]))
    data = json.loads(Path(args.data).read_text())[: args.samples]
    model = load_model("smollm2-135m", quiet=True)
    engine = FusionEngine(model)
    engine.warmup()
    grid = [(m, r) for m in METHODS for r in ([0.0] if m == "reuse" else RATIOS)]
    with records_path.open("a") as sink:
        for i, item in enumerate(tqdm(data, desc="samples", unit="sample")):
            todo = [(m, r) for m, r in grid if (i, m, r) not in done]
            if not todo:
                continue
            docs = [f"{c['title']}\n{c['text']}" for c in item["ctxs"]]
            layout = engine.layout(docs, item["question"])
            engine.prepare(docs)
            full = engine.generate_layout(layout, make_selector("fullcomp"), args.max_new_tokens)
            for method, ratio in todo:
                gen = engine.generate_layout(layout, make_selector(method, ratio), args.max_new_tokens)
                rec = {
                    "sample": i, "method": method, "ratio": ratio, "tokens": layout.n_tokens,
                    "same_answer": gen.token_ids == full.token_ids,
                    "top1": int(gen.first_logits.argmax()) == int(full.first_logits.argmax()),
                    "kl": kl_first_token(full.first_logits, gen.first_logits),
                    "f1": f1(gen.answer, item["answers"]), "f1_full": f1(full.answer, item["answers"]),
                    "selection_s": gen.stats["selection_s"], "ttft_s": gen.stats["ttft_s"],
                    "ttft_full_s": full.stats["ttft_s"],
                }
                sink.write(json.dumps(rec) + "\n")
                sink.flush()
            # a sample's chunks are not reused by later samples: keep memory flat
            engine.store.clear()
    write_report(records_path, out / "report.md", args)
    return 0


def write_report(records_path: Path, report_path: Path, args) -> None:
    rows = [json.loads(line) for line in records_path.read_text().splitlines()]
    n = len({r["sample"] for r in rows})
    lines = [f"# Selector fidelity on musique_s (SmolLM2-135M, fp32, 2-core CPU, {n} samples)", "",
             f"Command: `.venv/bin/python scripts/selector_report.py --samples {args.samples}` (resumes from "
             "records.jsonl; `--report_only` rebuilds these tables).", "",
             "Fidelity is measured against full prefill of the same prompt: same greedy answer (8 tokens), "
             "same first token, KL(full || fused) of the first-token distribution. TTFT includes selection; "
             "F1 is word F1 against the gold answers, with full prefill's F1 in brackets.", "",
             "## All samples", ""]
    lines += _table(rows)
    held_out = [r for r in rows if r["sample"] >= CALIBRATION_SAMPLES]
    lines += ["", f"## Held out from QCFuse's layer profiling (samples {CALIBRATION_SAMPLES}+, "
              f"{len({r['sample'] for r in held_out})} samples)", "",
              f"`qcfuse profile` chose the critical layers on samples 0-{CALIBRATION_SAMPLES - 1} "
              "(first 4 passages each), so this table leaves them out.", ""]
    lines += _table(held_out)
    findings = report_path.parent / "findings.md"      # hand-written conclusions, kept when tables are rebuilt
    if findings.exists():
        lines += ["", findings.read_text().rstrip()]
    report_path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _table(rows: list[dict]) -> list[str]:
    groups = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["ratio"])].append(r)
    lines = ["| method | ratio | same answer | top-1 agrees | mean KL | selection ms | TTFT ms | full TTFT ms | F1 (full F1) |",
             "|---|---|---|---|---|---|---|---|---|"]
    mean = lambda xs: sum(xs) / len(xs)
    for method in METHODS:
        for ratio in ([0.0] if method == "reuse" else RATIOS):
            g = groups.get((method, ratio))
            if not g:
                continue
            lines.append(
                f"| {method} | {ratio:g} | {mean([r['same_answer'] for r in g]):.0%} | {mean([r['top1'] for r in g]):.0%} "
                f"| {mean([r['kl'] for r in g]):.4f} | {1000 * mean([r['selection_s'] for r in g]):.0f} "
                f"| {1000 * mean([r['ttft_s'] for r in g]):.0f} | {1000 * mean([r['ttft_full_s'] for r in g]):.0f} "
                f"| {mean([r['f1'] for r in g]):.3f} ({mean([r['f1_full'] for r in g]):.3f}) |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
