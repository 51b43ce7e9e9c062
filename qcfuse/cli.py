"""qcfuse command line. User mistakes end in one line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    from .errors import QcfuseError
    try:
        return args.func(args) or 0
    except QcfuseError as exc:
        print(f"qcfuse: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("qcfuse: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcfuse", description="Query-aware KV-cache fusion for RAG.")
    sub = p.add_subparsers(metavar="COMMAND")

    g = sub.add_parser("generate", help="answer a question over documents with a fused KV cache")
    _model_args(g)
    g.add_argument("--document", "-d", action="append", required=True, metavar="FILE",
                   help="a text file; one chunk per file, repeat for several (order is kept)")
    g.add_argument("--question", "-q", required=True)
    g.add_argument("--method", default="reuse", help="fullcomp, reuse, cacheblend, epic, ... (default: reuse)")
    g.add_argument("--ratio", type=float, default=0.15, help="share of document tokens recomputed (default 0.15)")
    g.add_argument("--max_new_tokens", type=int, default=32)
    g.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. --opt anchor_ratio=0.1 --opt critical_layers=12,20,25 "
                        "--opt reduction=max --opt check_layer=1")
    g.add_argument("--compare", action="store_true",
                   help="also run full prefill and report the speedup and whether the answers agree")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    g.set_defaults(func=_generate)

    f = sub.add_parser("fetch", help="fetch and convert a model once, so later runs load it in seconds")
    _model_args(f)
    f.set_defaults(func=_fetch)

    pr = sub.add_parser("profile", help="find a model's critical layers for QCFuse on a calibration set")
    _model_args(pr)
    pr.add_argument("--data", required=True, help="calibration set in musique_s JSON format")
    pr.add_argument("--samples", type=int, default=8)
    pr.add_argument("--passages", type=int, default=4, help="passages per sample (shorter = faster)")
    pr.add_argument("--ratio", type=float, default=0.15)
    pr.add_argument("--n_critical", type=int, default=3)
    pr.add_argument("--out", help="where to write the profile (default: stored with the model)")
    pr.set_defaults(func=_profile)

    c = sub.add_parser("check", help="numeric self-check of the engine against transformers on a model")
    _model_args(c)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_check)
    return p


def _model_args(p: argparse.ArgumentParser) -> None:
    from .model.loader import DEFAULT_MODEL
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"built-in alias ({DEFAULT_MODEL}), a local HF model directory, or a .gguf file")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")


def _load(args):
    import torch

    from .model.loader import load_model
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    return load_model(args.model, dtype=getattr(torch, args.dtype), quiet=getattr(args, "json", False))


def _read_documents(paths: list[str]) -> list[str]:
    from .errors import QcfuseError
    docs = []
    for path in paths:
        f = Path(path)
        if not f.is_file():
            raise QcfuseError(f"document not found: {path}")
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise QcfuseError(f"document is not UTF-8 text: {path}") from None
        if not text.strip():
            raise QcfuseError(f"document is empty: {path}")
        docs.append(text)
    return docs


def _options(pairs: list[str]) -> dict:
    """KEY=VALUE strings to typed selector options (ints, floats, comma lists, strings)."""
    from .errors import QcfuseError

    def typed(text: str):
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
        return text

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise QcfuseError(f"--opt expects KEY=VALUE, got '{pair}'")
        out[key] = [typed(v) for v in value.split(",")] if "," in value else typed(value)
    return out


def _generate(args) -> int:
    from .engine import FusionEngine
    from .errors import QcfuseError
    from .fusion import make_selector

    docs = _read_documents(args.document)
    selector = make_selector(args.method, args.ratio, **_options(args.opt))   # fail before loading the model
    if args.max_new_tokens < 1:
        raise QcfuseError("--max_new_tokens must be at least 1")
    t0 = time.perf_counter()
    model = _load(args)
    load_s = time.perf_counter() - t0
    engine = FusionEngine(model)
    layout = engine.layout(docs, args.question)
    engine.check_fits(layout, args.max_new_tokens)

    t0 = time.perf_counter()
    prepared = engine.prepare(docs, progress=not args.json) if selector.uses_cache else 0    # the offline step, timed apart
    prepare_s = time.perf_counter() - t0
    engine.warmup()
    result = engine.generate_layout(layout, selector, args.max_new_tokens)
    out = {"answer": result.answer, **result.stats, "model": args.model, "load_s": load_s,
           "prepared_chunks": prepared, "prepare_s": prepare_s}
    if args.compare:
        full = engine.generate_layout(layout, make_selector("fullcomp"), args.max_new_tokens)
        out["fullcomp_answer"] = full.answer
        out["fullcomp_ttft_s"] = full.stats["ttft_s"]
        out["speedup"] = full.stats["ttft_s"] / result.stats["ttft_s"]
        out["same_answer"] = full.token_ids == result.token_ids
        out["first_token_agrees"] = int(full.first_logits.argmax()) == int(result.first_logits.argmax())
    if args.json:
        print(json.dumps(out))
        return 0
    print(result.answer)
    print(f"\n  method {out['method']} (ratio {out['ratio']:.2f}): recomputed {out['recomputed_tokens']} of "
          f"{out['context_tokens']} document tokens (+{out['suffix_tokens']} suffix tokens)")
    print(f"  TTFT {out['ttft_s'] * 1000:.1f} ms, of which selection {out['selection_s'] * 1000:.1f} ms; "
          f"decode {out['new_tokens']} tokens in {out['decode_s']:.2f} s")
    print(f"  chunk cache: {out['cache_hits']} hits, {out['cache_misses']} misses "
          f"({prepared} chunks prepared offline in {prepare_s:.2f} s); model loaded in {load_s:.1f} s")
    if args.compare:
        print(f"  full prefill: TTFT {out['fullcomp_ttft_s'] * 1000:.1f} ms -> speedup {out['speedup']:.2f}x; "
              f"same answer: {'yes' if out['same_answer'] else 'no'}; "
              f"first token agrees: {'yes' if out['first_token_agrees'] else 'no'}")
        if not out["same_answer"]:
            print(f"  full prefill answer: {full.answer}")
    return 0


def _fetch(args) -> int:
    from .model.loader import resolve_model_dir
    print(f"{args.model}: ready in {resolve_model_dir(args.model)}")
    return 0


def _profile(args) -> int:
    from .engine import FusionEngine
    from .profile import PROFILE_FILE, musique_samples, profile_model
    samples = musique_samples(args.data, args.samples, args.passages)
    model = _load(args)
    result = profile_model(FusionEngine(model), samples, args.ratio, args.n_critical)
    out = Path(args.out) if args.out else model.directory / PROFILE_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, **result}, indent=1))
    print("layer  mean KL")
    for layer, kl in enumerate(result["mean_kl_per_layer"]):
        print(f"{layer:5d}  {kl:.5f}{'  <- critical' if layer in result['critical_layers'] else ''}")
    print(f"critical layers {result['critical_layers']} written to {out}")
    return 0


def _check(args) -> int:
    from .check import run_checks
    model = _load(args)
    results = run_checks(model)
    ok = all(r["passed"] for r in results)
    if args.json:
        print(json.dumps({"model": args.model, "passed": ok, "checks": results}))
    else:
        for r in results:
            print(f"  [{'PASS' if r['passed'] else 'FAIL'}] {r['name']}: {r['detail']}")
        print(f"{'all checks passed' if ok else 'SOME CHECKS FAILED'} for {args.model}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
