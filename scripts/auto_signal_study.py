"""Issue 20, part 2 (b): is there a per-request signal that says where recompute lowers KL most?

Ratio auto's margin rule spends where the first token is unsure; (b) asks for a lower mean KL than fixed ratios at
the same mean share, which needs a signal of where KL is high. This fuses each calibration sample at a few grid
ratios with QCFuse's scores and logs, per pass, what a rule could read without full prefill: the margin, the
entropy of the fused first-token distribution, and its shift from plain reuse's (KL(fused || reuse); reuse's
logits come beside a first pass anyway where the reuse check is on), beside the KL to full prefill that they
should predict. That KL, and whether the first token is kept, are in the calibration log of the same samples
(no full prefill here); the fused token and margin logged here check that the passes are the same.
scripts/auto_kl_frontier.py --signals replays ladders on each signal against the fixed ratios.

    PYTHONPATH=. .venv/bin/python scripts/auto_signal_study.py --sets "musique_s[80:100],ruler_mv[0:6],ruler_mq[0:6],ruler_vt[0:6]" --log LOG
"""
from __future__ import annotations

import argparse
import json


def run(args) -> None:
    import torch
    from tqdm import tqdm

    from qcfuse.engine import FusionEngine
    from qcfuse.eval.datasets import load_slices, parse_slices
    from qcfuse.fusion import FusionInputs, ReusedKV, make_selector
    from qcfuse.fusion.budget import first_token_margin
    from qcfuse.fusion.probe import top_positions
    from qcfuse.model.loader import load_model
    from qcfuse.profile import _Fixed, kl_first_token

    torch.set_num_threads(1)
    model = load_model(args.model)
    engine = FusionEngine(model)
    samples = load_slices(parse_slices(args.sets), args.data_dir, model=args.model, tokenizer=model.tokenizer,
                          tokens=4096, seed=1, chunk_tokens=512)
    ratios = [float(r) for r in args.ratios.split(",")]
    with open(args.log, "a") as log:
        for sample in tqdm(samples, desc="signals", unit="sample"):
            layout = engine.layout(sample.documents, sample.question)
            reuse = engine.generate_layout(layout, make_selector("reuse"), 1).first_logits
            pieces = [engine._entry(ids)[0] for ids in [layout.prefix, *layout.chunks] if ids]
            scores = make_selector("qcfuse", 0.15).scores(
                FusionInputs(model.transformer, layout, ReusedKV(pieces, len(layout.prefix))))
            tried = []
            for ratio in ratios:
                chosen = top_positions(scores, layout.doc_positions(), int(round(ratio * layout.n_doc_tokens)))
                fused = engine.generate_layout(layout, _Fixed(chosen), 1).first_logits
                logp = fused.float().log_softmax(-1)
                tried.append({"ratio": ratio, "token": int(fused.argmax()),
                              "margin": round(first_token_margin(fused), 6),
                              "entropy": round(float(-(logp.exp() * logp).sum()), 6),
                              "shift": round(kl_first_token(fused, reuse), 6)})
            log.write(json.dumps({"sample": sample.id, "reuse_token": int(reuse.argmax()), "tried": tried}) + "\n")
            log.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sets", required=True)
    ap.add_argument("--ratios", default="0.02,0.05,0.1,0.2")
    ap.add_argument("--data_dir")
    ap.add_argument("--log", required=True)
    run(ap.parse_args())


if __name__ == "__main__":
    main()
