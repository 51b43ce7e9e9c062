"""Which part of QCFuse costs fidelity against ProphetKV? Ablations on held-out musique_s samples.

    .venv/bin/python scripts/qcfuse_ablation.py --first 8 --samples 12

Variants change one QCFuse knob at a time: the compressed (anchor) view vs the full view, the anchor share,
the score reduction, and the number of critical layers. ProphetKV (full view, all layers) is the reference.
Records go to a jsonl as they are made (resumable); the markdown table is rebuilt at the end.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

VARIANTS = {
    "qcfuse (defaults: anchors 10%, layers 5,6,7, mean)": ("qcfuse", {}),
    "qcfuse, full view (anchors 100%)": ("qcfuse", {"anchor_ratio": 1.0}),
    "qcfuse, anchors 20%": ("qcfuse", {"anchor_ratio": 0.2}),
    "qcfuse, max over layers": ("qcfuse", {"reduction": "max"}),
    "qcfuse, layers 3-9": ("qcfuse", {"critical_layers": [3, 4, 5, 6, 7, 8, 9]}),
    "qcfuse, spans (smooth=1)": ("qcfuse", {"smooth": 1}),
    "qcfuse, spans (smooth=2)": ("qcfuse", {"smooth": 2}),
    "qcfuse, chunk heads first (chunk_heads=4)": ("qcfuse", {"chunk_heads": 4}),
    "prophetkv (full view, all layers)": ("prophetkv", {}),
}
RATIOS = [0.05, 0.15]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/musique_s.json"))
    ap.add_argument("--first", type=int, default=8, help="first sample (0-7 were used for profiling)")
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--out", default="results/selectors")
    args = ap.parse_args()

    from qcfuse import FusionEngine, load_model, make_selector
    from qcfuse.profile import kl_first_token

    out = Path(args.out)
    records_path = out / "ablation.jsonl"
    done = set()
    if records_path.exists():
        done = {(r["sample"], r["variant"], r["ratio"]) for r in map(json.loads, records_path.read_text().splitlines())}
    data = json.loads(Path(args.data).read_text())
    engine = FusionEngine(load_model("smollm2-135m", quiet=True))
    engine.warmup()
    with records_path.open("a") as sink:
        for i in tqdm(range(args.first, args.first + args.samples), desc="samples", unit="sample"):
            todo = [(v, r) for v in VARIANTS for r in RATIOS if (i, v, r) not in done]
            if not todo:
                continue
            item = data[i]
            docs = [f"{c['title']}\n{c['text']}" for c in item["ctxs"]]
            layout = engine.layout(docs, item["question"])
            engine.prepare(docs)
            full = engine.generate_layout(layout, make_selector("fullcomp"), 8)
            for variant, ratio in todo:
                method, options = VARIANTS[variant]
                gen = engine.generate_layout(layout, make_selector(method, ratio, **options), 8)
                sink.write(json.dumps({
                    "sample": i, "variant": variant, "ratio": ratio,
                    "same_answer": gen.token_ids == full.token_ids,
                    "top1": int(gen.first_logits.argmax()) == int(full.first_logits.argmax()),
                    "kl": kl_first_token(full.first_logits, gen.first_logits),
                    "selection_s": gen.stats["selection_s"]}) + "\n")
                sink.flush()
            engine.store.clear()
    rows = [json.loads(line) for line in records_path.read_text().splitlines()]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["variant"], r["ratio"])].append(r)
    n = len({r["sample"] for r in rows})
    lines = [f"# QCFuse ablations (musique_s held-out samples, up to {n})", "",
             f"Command: `.venv/bin/python scripts/qcfuse_ablation.py --first {args.first} --samples {args.samples}`", "",
             "Rows may cover different samples (the n column): compare a variant with the defaults on the same "
             "samples via ablation.jsonl. `--samples 0` rebuilds this table without running anything.", "",
             "| variant | ratio | n | same answer | top-1 agrees | mean KL | selection ms |",
             "|---|---|---|---|---|---|---|"]
    mean = lambda xs: sum(xs) / len(xs)
    for variant in VARIANTS:
        for ratio in RATIOS:
            g = groups.get((variant, ratio))
            if g:
                lines.append(f"| {variant} | {ratio:g} | {len(g)} | {mean([r['same_answer'] for r in g]):.0%} | "
                             f"{mean([r['top1'] for r in g]):.0%} | {mean([r['kl'] for r in g]):.4f} | "
                             f"{1000 * mean([r['selection_s'] for r in g]):.0f} |")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
