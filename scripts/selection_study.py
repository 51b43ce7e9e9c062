"""Which QCFuse scoring is most faithful to full prefill? Variants against ProphetKV on a calibration split.

    .venv/bin/python scripts/selection_study.py        # --sets "musique_s[90:100],ruler_mv[0:5],ruler_mq[0:5]" --seed 1

The split must stay out of what results/eval reports: musique_s 90-99 and RULER generated with seed 1 (the
reports use seed 0). Every variant runs at every ratio on the same samples, first token only (fidelity: KL and
top-1 agreement with full prefill). Rows go to a jsonl as they are made (resumable; two processes can split
the sets between them); `--report` rebuilds the markdown table with paired counts against ProphetKV.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "prophetkv": ("prophetkv", {}),
    "qcfuse": ("qcfuse", {}),
    "qcfuse head_norm": ("qcfuse", {"head_norm": True}),
    "qcfuse last row": ("qcfuse", {"query_rows": "last"}),
    "qcfuse question rows": ("qcfuse", {"query_rows": "question"}),
    "qcfuse layers 3-9": ("qcfuse", {"critical_layers": [3, 4, 5, 6, 7, 8, 9]}),
    "qcfuse layers 3-9 head_norm": ("qcfuse", {"critical_layers": [3, 4, 5, 6, 7, 8, 9], "head_norm": True}),
    "qcfuse layers 1-12": ("qcfuse", {"critical_layers": list(range(1, 13))}),
    "qcfuse narrow 1.5": ("qcfuse", {"narrow": 1.5}),
    "qcfuse layers 5 6 7 15 25": ("qcfuse", {"critical_layers": [5, 6, 7, 15, 25]}),
    "qcfuse layers 3 5 7 10 14 18 22 26": ("qcfuse", {"critical_layers": [3, 5, 7, 10, 14, 18, 22, 26]}),
    # on top of the eight layers that ship (the rows above used 5, 6, 7 as "qcfuse")
    "qcfuse 8 layers last row": ("qcfuse", {"critical_layers": [3, 5, 7, 10, 14, 18, 22, 26], "query_rows": "last"}),
    "qcfuse 8 layers head_norm": ("qcfuse", {"critical_layers": [3, 5, 7, 10, 14, 18, 22, 26], "head_norm": True}),
    "qcfuse 10 layers 2..28": ("qcfuse", {"critical_layers": [2, 3, 5, 7, 10, 14, 18, 22, 26, 28]}),
    "qcfuse 8 layers suffix+last": ("qcfuse", {"critical_layers": [3, 5, 7, 10, 14, 18, 22, 26],
                                              "query_rows": "suffix+last"}),
    # diagnostics (stop 31): is the musique_s gap the compressed view or the number of layers?
    "qcfuse 8 layers full view": ("qcfuse", {"critical_layers": [3, 5, 7, 10, 14, 18, 22, 26], "anchor_ratio": 1.0}),
    "qcfuse all layers": ("qcfuse", {"critical_layers": list(range(30))}),
    "qcfuse 8 layers value weight": ("qcfuse", {"critical_layers": [3, 5, 7, 10, 14, 18, 22, 26],
                                               "value_weight": True}),
}
RATIOS = [0.1, 0.15, 0.3]
SETS = "musique_s[90:100],ruler_mv[0:5],ruler_mq[0:5]"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default=SETS)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--variants", default="", help="comma-separated subset of the variant names")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/selectors/study.jsonl")
    ap.add_argument("--report", action="store_true", help="only rebuild the table from the jsonl")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.report:
        run(args, out)
    table = report(out, args)
    out.with_suffix(".md").write_text(table)
    print(table)
    return 0


def run(args, out: Path) -> None:
    import torch
    from tqdm import tqdm

    from qcfuse import FusionEngine, load_model, make_selector
    from qcfuse.eval.datasets import load_slices, parse_slices
    from qcfuse.profile import kl_first_token

    torch.set_num_threads(args.threads)
    names = [v.strip() for v in args.variants.split(",") if v.strip()] or list(VARIANTS)
    done = set()
    if out.exists():
        done = {(r["sample"], r["variant"], r["ratio"]) for r in map(json.loads, out.read_text().splitlines())}
    slices = parse_slices(args.sets)
    model = load_model(args.model, quiet=True)
    engine = FusionEngine(model)
    samples = load_slices(slices, model=args.model, tokenizer=model.tokenizer, tokens=4096,
                          seed=args.seed, chunk_tokens=512)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as sink:
        for sample in tqdm(samples, desc="samples", unit="sample"):
            todo = [(v, r) for v in names for r in RATIOS if (sample.id, v, r) not in done]
            if not todo:
                continue
            layout = engine.layout(sample.documents, sample.question)
            engine.prepare(sample.documents)
            full = engine.generate_layout(layout, make_selector("fullcomp"), 1).first_logits
            for variant, ratio in todo:
                method, options = VARIANTS[variant]
                gen = engine.generate_layout(layout, make_selector(method, ratio, **options), 1)
                sink.write(json.dumps({"sample": sample.id, "model": args.model, "variant": variant, "ratio": ratio,
                                       "top1": int(gen.first_logits.argmax()) == int(full.argmax()),
                                       "kl": kl_first_token(full, gen.first_logits),
                                       "selection_s": gen.stats["selection_s"]}) + "\n")
                sink.flush()
            engine.store.clear()


def report(out: Path, args) -> str:
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    by = defaultdict(dict)
    for r in rows:
        by[(r["variant"], r["ratio"])][r["sample"]] = r
    lines = [f"# QCFuse scoring variants against ProphetKV ({args.model}, calibration split)", "",
             f"Command: `.venv/bin/python scripts/selection_study.py --sets \"{SETS}\" --seed 1` (here run as "
             "two processes, each with part of the sets; `--variants` picks a subset, `--report` rebuilds this "
             "table). The split is musique_s 90-99 and RULER MV/MQ generated with seed 1 (4,096 tokens, 512-token "
             "chunks): ratio auto's calibration split plus one more RULER sample of each task. The RULER samples are not in results/eval (seed 0); "
             "musique_s 90-99 are among its 100, so a variant adopted from here would have to be reported "
             "without them. Variants with a smaller n were stopped early, when they trailed on the samples they "
             "had.", "",
             "Paired on the samples both have: `lower KL` counts the samples where the variant's first-token KL "
             "is below ProphetKV's at the same ratio. Per dataset the mean KL is shown as musique / MV / MQ.", "",
             "| variant | ratio | n | top-1 agrees | mean KL | KL by set | lower KL than ProphetKV | selection ms |",
             "|---|---|---|---|---|---|---|---|"]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    for variant in VARIANTS:
        for ratio in RATIOS:
            mine, ref = by.get((variant, ratio), {}), by.get(("prophetkv", ratio), {})
            ids = sorted(set(mine) & set(ref)) if variant != "prophetkv" else sorted(mine)
            if not ids:
                continue
            kl = [mine[i]["kl"] for i in ids]
            per_set = " / ".join(f"{mean([mine[i]['kl'] for i in ids if i.startswith(p)]):.4f}"
                                 for p in ("musique", "ruler_mv", "ruler_mq"))
            lower = f"{sum(mine[i]['kl'] < ref[i]['kl'] for i in ids)} of {len(ids)}" if variant != "prophetkv" else ""
            lines.append(f"| {variant} | {ratio:g} | {len(ids)} | {mean([mine[i]['top1'] for i in ids]):.0%} | "
                         f"{mean(kl):.4f} | {per_set} | {lower} | {1000 * mean([mine[i]['selection_s'] for i in ids]):.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
