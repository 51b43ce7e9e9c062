"""Needle recall per selector: share of a planted fact's tokens each method recomputes.

    .venv/bin/python scripts/needle_recall.py     # writes results/selectors/needle.md
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from needle import QUESTION, needle_documents, needle_positions  # noqa: E402
from qcfuse import FusionEngine, load_model, make_selector  # noqa: E402

METHODS = ["cacheblend", "epic", "fuserag", "prophetkv", "qcfuse"]
RATIOS = [0.05, 0.1, 0.15, 0.3]


def main() -> int:
    model = load_model("smollm2-135m", quiet=True)
    engine = FusionEngine(model)
    docs = needle_documents()
    layout = engine.layout(docs, QUESTION)
    engine.prepare(docs)
    needle = needle_positions(model.tokenizer, layout)
    lines = [f"# Needle recall (SmolLM2-135M; {len(docs)} chunks, {layout.n_doc_tokens} document tokens, "
             f"needle of {len(needle)} tokens mid-chunk 4)", "",
             "Command: `.venv/bin/python scripts/needle_recall.py`", "",
             "| method | " + " | ".join(f"ratio {r:g}" for r in RATIOS) + " |",
             "|---|" + "---|" * len(RATIOS)]
    for method in METHODS:
        cells = []
        for ratio in RATIOS:
            gen = engine.generate_layout(layout, make_selector(method, ratio), max_new_tokens=1)
            cells.append(f"{len(set(gen.recomputed.tolist()) & needle) / len(needle):.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    out = Path("results/selectors/needle.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
