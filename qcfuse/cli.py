"""qcfuse command line. User mistakes end in one line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
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
    _method_args(g, "fusion method")
    g.add_argument("--max_new_tokens", type=int, default=32)
    g.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. --opt anchor_ratio=0.1 --opt critical_layers=12,20,25 "
                        "--opt reduction=max --opt check_layer=1")
    g.add_argument("--compare", action="store_true",
                   help="also run full prefill and report the speedup and whether the answers agree")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    _sampling_args(g)
    _store_args(g)
    g.set_defaults(func=_generate)

    f = sub.add_parser("fetch", help="fetch and convert a model once, so later runs load it in seconds")
    _model_args(f)
    f.set_defaults(func=_fetch)

    pr = sub.add_parser("profile", help="find a model's critical layers for QCFuse on a calibration set")
    _model_args(pr)
    pr.add_argument("--data", required=True, help="calibration set in musique_s JSON format")
    pr.add_argument("--samples", type=int, default=8)
    pr.add_argument("--first", type=int, default=0,
                    help="index of the first sample used (keep the profiled samples out of what you report)")
    pr.add_argument("--passages", type=int, default=4, help="passages per sample (shorter = faster)")
    pr.add_argument("--ratio", type=float, default=0.15)
    pr.add_argument("--n_critical", type=int, default=3)
    pr.add_argument("--out", help="where to write the profile (default: stored with the model)")
    pr.set_defaults(func=_profile)

    ca = sub.add_parser("calibrate", help="calibrate ratio auto for a model: per fidelity target, the margin rule's "
                                          "ladder and threshold and the mass rule's attention share, measured on "
                                          "a calibration set")
    _model_args(ca)
    ca.add_argument("--sets", metavar="NAME[A:B],...",
                    help="calibration samples, e.g. musique_s[90:100],ruler_mv[0:4] (keep them out of what you report)")
    ca.add_argument("--from_logs", metavar="FILE,...",
                    help="fit from the --log files of earlier runs instead of fusing again (e.g. runs split over "
                         "processes)")
    ca.add_argument("--methods", default="qcfuse", help="query-aware methods to calibrate (default: qcfuse)")
    ca.add_argument("--seed", type=int, default=1, help="seed of generated RULER samples (reports use 0)")
    ca.add_argument("--tokens", type=int, default=4096, help="length of generated RULER samples")
    ca.add_argument("--chunk_tokens", type=int, default=512, help="chunk size of generated RULER samples")
    ca.add_argument("--data_dir", help="dataset directory (default: ../shared/data)")
    ca.add_argument("--log", help="also write one JSON line per sample and method (what each needed)")
    ca.add_argument("--pass_cost", type=float,
                    help="what a fused pass costs besides its recompute, as a share of full prefill's time, charged "
                         "per pass when the margin rule's ladders are compared (default: measured from the logged "
                         "passes' times; 0 for logs without times)")
    ca.add_argument("--out", help="profile file to update (default: the one stored with the model)")
    _threads_arg(ca)
    ca.set_defaults(func=_calibrate)

    c = sub.add_parser("check", help="numeric self-check of the engine against transformers on a model")
    _model_args(c)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_check)

    _add_cache_commands(sub)
    _add_eval_commands(sub)
    _add_serve_command(sub)
    _add_bench_command(sub)
    return p


def _model_args(p: argparse.ArgumentParser) -> None:
    from .model.loader import DEFAULT_MODEL
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"built-in alias ({DEFAULT_MODEL}), a local HF model directory, or a .gguf file")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")


def _method_args(p: argparse.ArgumentParser, what: str) -> None:
    from .fusion import DEFAULT_METHOD, DEFAULT_RATIO, SELECTORS
    p.add_argument("--method", default=DEFAULT_METHOD,
                   help=f"{what}: {', '.join(sorted(SELECTORS))} (default: {DEFAULT_METHOD})")
    p.add_argument("--ratio", default=str(DEFAULT_RATIO),
                   help=f"share of document tokens recomputed (default: {DEFAULT_RATIO}), or 'auto': per request, "
                        "the least recompute that keeps full prefill's first token: fuse a small share, recompute "
                        "more while the first token is unsure (query-aware methods; see --target)")
    p.add_argument("--target", type=float, help="--ratio auto: the calibrated first-token agreement to aim for "
                                                "(default 0.99); bound it with --opt max_ratio=0.5; --opt "
                                                "auto_rule=mass for the one-pass attention-share rule; --opt "
                                                "reuse_check=false skips the margin rule's reuse check")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    """The sampling options of OpenAI's API, under the same names (qcfuse/sampling.py)."""
    s = p.add_argument_group("sampling (as in OpenAI's API; default: greedy)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), up to 2")
    s.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens "
                                                            "whose probability reaches this (default 1)")
    s.add_argument("--seed", type=int, help="seed of the sampler: same seed, same answer")
    s.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop before this text (repeat, up to 4); it is not part of the answer")
    s.add_argument("--presence_penalty", type=float, default=0.0, help="-2..2 (default 0)")
    s.add_argument("--frequency_penalty", type=float, default=0.0, help="-2..2 (default 0)")
    s.add_argument("--logit_bias", action="append", default=[], metavar="TOKEN_ID=BIAS",
                   help="add BIAS (-100..100) to a token's logit (repeat)")
    s.add_argument("--logprobs", action="store_true", help="report each answer token's log-probability")
    s.add_argument("--top_logprobs", type=int, default=0, help="with --logprobs: the N most likely tokens at "
                                                               "each step too (0..20)")
    s.add_argument("--n", type=int, default=1, help="number of answers (1..8; one prefill for all)")


def _sampling(args):
    from .errors import QcfuseError
    from .sampling import SamplingParams
    bias = {}
    for pair in args.logit_bias:
        token, _, value = pair.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise QcfuseError(f"--logit_bias expects TOKEN_ID=BIAS, got '{pair}'") from None
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=tuple(args.stop),
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          logit_bias=bias, logprobs=args.logprobs, top_logprobs=args.top_logprobs, n=args.n)


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
    """KEY=VALUE strings to typed selector options (booleans, ints, floats, comma lists, strings)."""
    from .errors import QcfuseError

    def typed(text: str):
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
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
    from .fusion.budget import ratio_spec
    selector = make_selector(args.method, ratio_spec(args.ratio, args.target), **_options(args.opt))   # fail early
    sampling = _sampling(args)
    if args.max_new_tokens < 1:
        raise QcfuseError("--max_new_tokens must be at least 1")
    store = _open_store(args)
    t0 = time.perf_counter()
    model = _load(args)
    load_s = time.perf_counter() - t0
    engine = FusionEngine(model, store=store)
    layout = engine.layout(docs, args.question)
    engine.check_fits(layout, args.max_new_tokens)

    t0 = time.perf_counter()
    prepared = engine.prepare(docs, progress=not args.json) if selector.uses_cache else 0    # the offline step, timed apart
    prepare_s = time.perf_counter() - t0
    engine.warmup()
    result = engine.generate_layout(layout, selector, args.max_new_tokens, sampling=sampling)
    out = {"answer": result.answer, "finish_reason": result.finish_reason, **result.stats, "model": args.model,
           "load_s": load_s, "prepared_chunks": prepared, "prepare_s": prepare_s}
    if sampling.logprobs:
        out["logprobs"] = [_logprob_json(lp) for lp in result.logprobs]
    if sampling.n > 1:
        out["choices"] = [{"answer": c.text, "finish_reason": c.finish_reason,
                           **({"logprobs": [_logprob_json(lp) for lp in c.logprobs]} if sampling.logprobs else {})}
                          for c in result.choices]
    if args.compare:
        full = engine.generate_layout(layout, make_selector("fullcomp"), args.max_new_tokens, sampling=sampling)
        out["fullcomp_answer"] = full.answer
        out["fullcomp_ttft_s"] = full.stats["ttft_s"]
        out["speedup"] = full.stats["ttft_s"] / result.stats["ttft_s"]
        out["same_answer"] = full.token_ids == result.token_ids
        out["first_token_agrees"] = int(full.first_logits.argmax()) == int(result.first_logits.argmax())
    if args.json:
        print(json.dumps(out))
        return 0
    if sampling.n > 1:
        for i, choice in enumerate(result.choices):
            print(f"[{i + 1}] {choice.text}")
    else:
        print(result.answer)
    if sampling.logprobs:
        print("\n  logprobs: " + ", ".join(f"{lp.token!r} {lp.logprob:.3f}" for lp in result.logprobs))
    ratio = f"{out['ratio']:.2f}" if isinstance(out["ratio"], float) else (
        f"{out['ratio']}, chose {out['recomputed_share']:.3f}" + (f" after {out['passes']} passes (all together "
        f"{out['recomputed_total_share']:.3f})" if out.get("passes", 1) > 1 else "")
        + (", its first pass checked against plain reuse" if out.get("reuse_checked") else ""))
    print(f"\n  method {out['method']} (ratio {ratio}): recomputed {out['recomputed_tokens']} of "
          f"{out['context_tokens']} document tokens (+{out['suffix_tokens']} suffix tokens)")
    print(f"  TTFT {out['ttft_s'] * 1000:.1f} ms, of which selection {out['selection_s'] * 1000:.1f} ms; "
          f"decode {out['new_tokens']} tokens in {out['decode_s']:.2f} s")
    tiers = ", ".join(f"{n} {t}" for t, n in out["hits_by_tier"].items()) or "none"
    corrupt = f", {out['cache_corrupt']} of them broken entries, dropped" if out["cache_corrupt"] else ""
    print(f"  chunk cache: {out['cache_hits']} hits (by tier: {tiers}), {out['cache_misses']} misses{corrupt} "
          f"({prepared} chunks prepared offline in {prepare_s:.2f} s); {out['bytes_loaded'] / 1e6:.1f} MB loaded, "
          f"{out['io_wait_s'] * 1000:.1f} ms waiting on I/O; model loaded in {load_s:.1f} s")
    if args.compare:
        print(f"  full prefill: TTFT {out['fullcomp_ttft_s'] * 1000:.1f} ms -> speedup {out['speedup']:.2f}x; "
              f"same answer: {'yes' if out['same_answer'] else 'no'}; "
              f"first token agrees: {'yes' if out['first_token_agrees'] else 'no'}")
        if not out["same_answer"]:
            print(f"  full prefill answer: {full.answer}")
    return 0


def _calibrate(args) -> int:
    from .engine import FusionEngine
    from .errors import QcfuseError
    from .eval.datasets import load_slices, parse_slices
    from .eval.sweep import parse_list
    from .fusion import SELECTORS
    from .profile import calibrate_auto

    methods = parse_list(args.methods, "methods")
    for m in methods:
        if m not in SELECTORS or not SELECTORS[m].query_aware:
            raise QcfuseError(f"cannot calibrate '{m}': ratio auto needs a query-aware method "
                              f"({', '.join(n for n, c in sorted(SELECTORS.items()) if c.query_aware)})")
    if args.pass_cost is not None and not 0.0 <= args.pass_cost <= 1.0:       # NaN fails here too
        raise QcfuseError(f"--pass_cost is a share of full prefill's time, within [0, 1]; got {args.pass_cost:g}")
    if bool(args.sets) == bool(args.from_logs):
        raise QcfuseError("give either --sets (calibration samples to run) or --from_logs (rows of earlier runs)")
    if args.from_logs:
        return _refit(args, methods)
    slices = parse_slices(args.sets)                      # a bad --sets fails here, before the model loads
    _set_threads(args)
    model = _load(args)
    samples = load_slices(slices, args.data_dir, model=args.model, tokenizer=model.tokenizer, tokens=args.tokens,
                          seed=args.seed, chunk_tokens=args.chunk_tokens)
    log = open(args.log, "a") if args.log else None
    try:
        result = calibrate_auto(FusionEngine(model), samples, methods, pass_cost=args.pass_cost,
                                on_sample=lambda row: log and (log.write(json.dumps(row) + "\n"), log.flush()))
    finally:
        if log:
            log.close()
    _write_calibration(args, model.directory, result["auto"], args.sets, result["seconds"])
    return 0


def _refit(args, methods: list[str]) -> int:
    """`qcfuse calibrate --from_logs`: fit ratio auto from rows logged before (no fusion, a few seconds)."""
    from .errors import QcfuseError
    from .eval.runner import read_rows
    from .eval.sweep import parse_list
    from .profile import fit_auto, scoring_now
    rows = []
    for name in parse_list(args.from_logs, "from_logs"):
        if not Path(name).is_file():
            raise QcfuseError(f"--from_logs: no file {name}")
        rows += [r for r in read_rows(Path(name)) if r.get("method") in methods]
    seen = [r["sample"] for r in rows]
    if len(set(zip(seen, (r["method"] for r in rows)))) != len(rows):
        raise QcfuseError("--from_logs: a sample appears twice for the same method (overlapping runs?)")
    model = _load(args)
    auto = fit_auto(rows, scoring_now(model.transformer, methods), pass_cost=args.pass_cost)
    sets = Counter(re.sub(r"-\d+$", "", sample) for sample in set(seen))
    _write_calibration(args, model.directory, auto, f"logs {args.from_logs}: "
                       + ", ".join(f"{n} of {name}" for name, n in sorted(sets.items())), None)
    return 0


def _write_calibration(args, model_dir: Path, auto: dict, sets: str, seconds: float | None) -> None:
    from .model.profiles import PROFILE_FILE, update_profile
    out = Path(args.out) if args.out else model_dir / PROFILE_FILE
    update_profile(out, {"auto": auto, "auto_sets": sets, "auto_seconds": seconds})     # None: refit from logs
    for method, table in auto.items():
        pairs = ", ".join(f"{t:g} -> {m:.3f}" for t, m in zip(table["targets"], table["mass"]))
        print(f"{method}: attention share per target ({table['samples']} samples): {pairs}")
        if table.get("margin"):
            print(f"{method}: a fused pass costs {table.get('pass_cost', 0.0):.3f} of a full prefill besides its "
                  "recompute (charged per pass when ladders are compared)")
        for step in table.get("margin", []):
            print(f"{method}: margin rule for {step['target']:g}: ladder {step['ladder']}, accept at a margin of "
                  f"{step['min_margin']:.3f}{' and reuse check' if step.get('reuse_check') else ''}; on the "
                  f"calibration set it kept {100 * step['agreement']:.0f}% at a mean share of {step['mean_share']:.3f}"
                  + (f" (cost {step['mean_cost']:.3f} full prefills)" if "mean_cost" in step else ""))
    print(f"written to {out}")


def _logprob_json(lp) -> dict:
    return {"token": lp.token, "token_id": lp.token_id, "logprob": lp.logprob,
            "top_logprobs": [{"token": text, "token_id": i, "logprob": v} for i, text, v in lp.top]}


def _fetch(args) -> int:
    from .model.loader import resolve_model_dir
    print(f"{args.model}: ready in {resolve_model_dir(args.model)}")
    return 0


def _profile(args) -> int:
    from .engine import FusionEngine
    from .model.profiles import PROFILE_FILE, update_profile
    from .profile import musique_samples, profile_model
    samples = musique_samples(args.data, args.samples, args.passages, args.first)
    model = _load(args)
    result = profile_model(FusionEngine(model), samples, args.ratio, args.n_critical)
    result["first_sample"] = args.first
    out = Path(args.out) if args.out else model.directory / PROFILE_FILE
    update_profile(out, {"model": args.model, **result})          # keeps ratio auto's calibration
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


# -- evaluation: qcfuse data ruler / eval / sweep (logic in qcfuse/eval) ---------------------------------------
def _add_eval_commands(sub) -> None:
    d = sub.add_parser("data", help="write evaluation data sets (RULER-style synthetic tasks)")
    dsub = d.add_subparsers(metavar="KIND")
    d.set_defaults(func=lambda args: d.print_help() or EXIT_USAGE)
    r = dsub.add_parser("ruler", help="generate a seeded RULER set: mv, mq (needles in essays) or vt")
    r.add_argument("--task", required=True, choices=["mv", "mq", "vt"])
    r.add_argument("--n", type=int, default=100, help="number of samples (default 100)")
    r.add_argument("--out", required=True, help="jsonl to write, e.g. data/ruler_mv.jsonl")
    r.add_argument("--tokens", type=int, default=7000, help="prompt length in the model's tokens (default 7000)")
    r.add_argument("--chunk_tokens", type=int, default=512, help="tokens per chunk (default 512)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--haystack", help="directory of .txt essays (default: ../shared/data/pg_essays)")
    r.add_argument("--model", "-m", default="smollm2-135m", help="whose tokenizer counts the tokens")
    r.set_defaults(func=_data_ruler)

    for name, helptext in (("eval", "evaluate one method at one ratio on a dataset (resumable jsonl)"),
                           ("sweep", "evaluate a grid of methods x ratios; write table.md and tradeoff.png")):
        e = sub.add_parser(name, help=helptext)
        _model_args(e)
        e.add_argument("--dataset", required=True,
                       help="hotpotqa, 2wikimqa, musique (LongBench jsonl), musique_s, ruler_mv, ruler_mq, ruler_vt")
        e.add_argument("--data_dir", help="directory with the dataset files (default: ../shared/data; RULER "
                                          "without it is generated on the fly)")
        e.add_argument("--size", type=int, help="first N samples (default: all; RULER on the fly: 100)")
        e.add_argument("--first", type=int, default=0, help="skip the first N samples (default 0), e.g. to split "
                                                            "one run over processes")
        e.add_argument("--cache_dir", help="chunk caches and full-prefill references persist here")
        e.add_argument("--max_new_tokens", type=int, help="default: 32 for QA sets, 64/64/48 for ruler_mv/mq/vt")
        e.add_argument("--tokens", type=int, help="RULER on the fly: prompt length (default 7000)")
        e.add_argument("--chunk_tokens", type=int, help="RULER on the fly: tokens per chunk (default 512)")
        e.add_argument("--seed", type=int, default=0, help="RULER on the fly: seed")
        e.add_argument("--quiet", action="store_true", help="no progress bars")
        _threads_arg(e)
        if name == "eval":
            e.add_argument("--baseline", "--method", dest="method", required=True,
                           help="fullcomp, reuse, cacheblend, epic, prophetkv, fuserag, qcfuse")
            e.add_argument("--ratio", default="0.15", help="share of document tokens recomputed, or auto[:TARGET]")
            e.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="a method option")
            e.add_argument("--out", help="results jsonl (default: results/{dataset}_{method}_r{ratio}.jsonl)")
            e.set_defaults(func=_eval)
        else:
            e.add_argument("--methods", required=True, help="comma-separated, e.g. reuse,cacheblend,qcfuse")
            e.add_argument("--ratios", default="0.05,0.1,0.15,0.3,0.5",
                           help="shares, and auto[:TARGET] points for the query-aware methods, e.g. 0.1,0.3,auto:0.9")
            e.add_argument("--out_dir", help="default: results/sweep_{dataset}")
            e.add_argument("--report", action="store_true",
                           help="run nothing: rebuild table.md and tradeoff.png from the results already in "
                                "--out_dir, over the samples every run has finished")
            e.set_defaults(func=_sweep)


def _data_ruler(args) -> int:
    from .eval import ruler
    tokenizer = ruler.load_tokenizer(args.model)
    samples = ruler.generate(args.task, args.n, tokenizer, args.tokens, args.seed, args.chunk_tokens,
                             args.haystack, progress=True)
    out = ruler.write_jsonl(samples, args.out)
    lengths = [s["prompt_tokens"] for s in samples]
    print(f"wrote {len(samples)} ruler_{args.task} samples to {out} (prompt tokens {min(lengths)}-{max(lengths)}, "
          f"{len(samples[0]['documents'])} chunks in the first)")
    return 0


def _threads_arg(p: argparse.ArgumentParser, what: str = "torch intra-op threads") -> None:
    p.add_argument("--threads", type=int, help=f"{what} (default: torch's; 1 avoids oversubscription on shared "
                                               "cores)")


def _set_threads(args) -> None:
    if args.threads is not None:
        import torch

        from .errors import QcfuseError
        if args.threads < 1:
            raise QcfuseError("--threads must be at least 1")
        torch.set_num_threads(args.threads)


def _eval_config(args, **extra):
    from .eval.runner import EvalConfig
    _set_threads(args)
    return EvalConfig(dataset=args.dataset, size=args.size, first=args.first, data_dir=args.data_dir,
                      cache_dir=args.cache_dir, model=args.model, dtype=args.dtype,
                      max_new_tokens=args.max_new_tokens, tokens=args.tokens, seed=args.seed,
                      chunk_tokens=args.chunk_tokens, progress=not args.quiet, **extra)


def _eval(args) -> int:
    from .eval.runner import run_eval
    from .fusion.budget import ratio_spec
    cfg = _eval_config(args, method=args.method, ratio=ratio_spec(args.ratio), options=_options(args.opt),
                       out=args.out)
    run_eval(cfg)
    return 0


def _sweep(args) -> int:
    from .eval.sweep import parse_list, run_sweep
    from .fusion.budget import ratio_spec
    methods = parse_list(args.methods, "methods")
    ratios = parse_list(args.ratios, "ratios", ratio_spec)
    if args.report:
        from .eval.sweep import report_finished
        report_finished(args.out_dir or f"results/sweep_{args.dataset}", args.dataset, methods, ratios)
        return 0
    run_sweep(_eval_config(args, method="fullcomp", ratio=None), methods, ratios,
              args.out_dir or f"results/sweep_{args.dataset}")
    return 0


# -- cache: qcfuse prepare, qcfuse cache stats|clear ---------------------------------------------------------------
def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache_dir", help="keep chunk caches in this directory (survives restarts)")
    p.add_argument("--redis_url", help="share chunk caches through Redis, e.g. redis://localhost:6379/0")
    p.add_argument("--disk_gb", type=float, default=64.0, help="cap of the --cache_dir tier in GB (LRU; default 64)")
    p.add_argument("--memory_gb", type=float, default=4.0,
                   help="cap of the in-process memory tier in GB (LRU; default 4; 0 keeps nothing in memory)")


def _open_store(args):
    import math

    from .cache import open_store
    from .errors import QcfuseError
    if not math.isfinite(args.disk_gb) or args.disk_gb <= 0:
        raise QcfuseError("--disk_gb must be positive")
    if not math.isfinite(args.memory_gb) or args.memory_gb < 0:
        raise QcfuseError("--memory_gb must be 0 or more")
    return open_store(cache_dir=args.cache_dir, redis_url=args.redis_url, disk_bytes=int(args.disk_gb * 1e9),
                      memory_bytes=int(args.memory_gb * 1e9))


def _add_cache_commands(sub) -> None:
    pp = sub.add_parser("prepare", help="precompute chunk caches offline (skips chunks already stored)")
    _model_args(pp)
    pp.add_argument("--documents", required=True, metavar="DIR_OR_FILE",
                    help="a directory of .txt files (one document each), a .jsonl (one document per line: a string, "
                         "{\"text\": ...} or {\"documents\": [...]}), or a musique_s-style .json")
    _store_args(pp)
    pp.set_defaults(func=_prepare)

    c = sub.add_parser("cache", help="inspect or empty the chunk cache tiers")
    csub = c.add_subparsers(metavar="ACTION")
    c.set_defaults(func=lambda args: c.print_help() or EXIT_USAGE)
    for action, helptext in (("stats", "entries and bytes per tier"), ("clear", "delete every entry")):
        a = csub.add_parser(action, help=helptext)
        _store_args(a)
        a.add_argument("--json", action="store_true")
        a.set_defaults(func=_cache, action=action)


def _prepare(args) -> int:
    from .cache.documents import read_document_sets
    from .errors import QcfuseError
    from .engine import FusionEngine
    from tqdm import tqdm
    if not args.cache_dir and not args.redis_url:
        raise QcfuseError("prepare needs --cache_dir and/or --redis_url (a memory-only cache ends with the process)")
    sets = read_document_sets(args.documents)
    store = _open_store(args)
    engine = FusionEngine(_load(args), store=store)
    computed = total = 0
    t0 = time.perf_counter()
    for docs in tqdm(sets, desc="preparing", unit="set", disable=len(sets) < 2):
        computed += engine.prepare(docs, progress=True)
        total += len(docs)
    pieces = total + len(sets)              # each group's prompt prefix is a (shared) cache entry too
    print(f"{total} documents: {computed} caches computed, {pieces - computed} already stored "
          f"(the shared prompt prefix counts as one; {time.perf_counter() - t0:.1f} s)")
    for s in store.stats()[1:]:
        print(f"  {s['tier']}: {s.get('entries', '?')} entries, {s.get('bytes', 0) / 1e6:.1f} MB")
    return 0


def _cache(args) -> int:
    from .errors import QcfuseError
    if not args.cache_dir and not args.redis_url:
        raise QcfuseError("name a tier: --cache_dir and/or --redis_url")
    store = _open_store(args)
    tiers = store.tiers[1:]                       # the memory tier of this process is always empty
    store.tiers = tiers
    if args.action == "clear":
        out = store.clear()
        print(json.dumps(out) if args.json else
              "\n".join(f"{tier}: {n} entries deleted" for tier, n in out.items()))
        return 0
    stats = store.stats()
    if args.json:
        print(json.dumps(stats))
    for s in stats if not args.json else []:
        if s.get("unavailable"):
            print(f"{s['tier']}: unavailable")
            continue
        where = s.get("path") or s.get("url")
        cap = f" of {s['max_bytes'] / 1e9:.1f} GB" if "max_bytes" in s else ""
        print(f"{s['tier']} ({where}): {s['entries']} entries, {s['bytes'] / 1e6:.1f} MB{cap}")
    return 0


# -- serving: qcfuse serve (logic in qcfuse/serve) --------------------------------------------------------------
def _add_serve_command(sub) -> None:
    sv = sub.add_parser("serve", help="OpenAI-compatible server (chat and text completions); documents become "
                                      "cached chunks")
    _model_args(sv)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    _method_args(sv, "fusion method when a request names none")
    _store_args(sv)
    sv.add_argument("--api_key", help="require 'Authorization: Bearer KEY' on every /v1 route (default: the "
                                      "QCFUSE_API_KEY environment variable; neither: no key needed)")
    sv.add_argument("--auth_all_routes", action="store_true", help="require the key on /health and /metrics too")
    sv.add_argument("--max_queue", type=int, default=64,
                    help="requests waiting for the engine before new ones get 429 with Retry-After (default 64)")
    _threads_arg(sv)
    sv.add_argument("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    sv.set_defaults(func=_serve)


def _serve(args) -> int:
    import os

    from .engine import FusionEngine
    from .errors import QcfuseError
    from .fusion import make_selector
    from .fusion.budget import ratio_spec
    from .serve import check_port_free, run_server
    ratio = ratio_spec(args.ratio, args.target)
    make_selector(args.method, ratio)                         # fail before loading the model
    if args.max_queue < 1:
        raise QcfuseError("--max_queue must be at least 1")
    api_key = args.api_key if args.api_key is not None else os.environ.get("QCFUSE_API_KEY")
    if api_key is not None and not api_key.strip():
        raise QcfuseError("--api_key (or QCFUSE_API_KEY) must not be empty")
    if args.auth_all_routes and api_key is None:
        raise QcfuseError("--auth_all_routes needs --api_key (or QCFUSE_API_KEY)")
    _set_threads(args)
    check_port_free(args.host, args.port)
    store = _open_store(args)
    model = _load(args)
    engine = FusionEngine(model, store=store)
    engine.warmup()
    run_server(engine, args.model, args.host, args.port, args.log_level, method=args.method, ratio=ratio,
               max_queue=args.max_queue, api_key=api_key, auth_all_routes=args.auth_all_routes)
    return 0


# -- benchmark: qcfuse bench (logic in qcfuse/bench) -------------------------------------------------------------
def _add_bench_command(sub) -> None:
    b = sub.add_parser("bench", help="TTFT of transformers full prefill, qcfuse full prefill and fused prefill, "
                                     "side by side (random weights in real shapes, or a real model)")
    b.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available, else cpu")
    what = b.add_mutually_exclusive_group()
    what.add_argument("--config", help="shipped shape (qwen3-8b, llama-3.1-8b, smollm2-135m) or a transformers "
                                       "config .json, with random weights (default: qwen3-8b on cuda, "
                                       "smollm2-135m on cpu)")
    what.add_argument("--model", "-m", help="a real model instead (alias, HF directory or .gguf)")
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on cuda, "
                                                                               "float32 on cpu")
    b.add_argument("--tokens", help="context lengths (default: 4096,8192,16384,32768 on cuda, 4096 on cpu)")
    b.add_argument("--ratios", default="0.05,0.15,0.3")
    b.add_argument("--methods", default="reuse,cacheblend,epic,prophetkv,fuserag,qcfuse")
    b.add_argument("--kv-source", "--kv_source", dest="kv_source", default="host", choices=["gpu", "host", "disk"],
                   help="where the reused chunk caches stream from: GPU memory, (pinned) host memory, or disk "
                        "(default: host)")
    b.add_argument("--cache_dir", help="--kv-source disk: directory for the chunk caches (default: a temporary one)")
    b.add_argument("--chunk_tokens", type=int, default=512)
    b.add_argument("--repeats", type=int, help="timed runs per measurement, median reported (default: 3 on cuda, "
                                               "1 on cpu)")
    b.add_argument("--warmup", type=int, help="untimed runs before each measurement (default: 1 on cuda, 0 on cpu)")
    _threads_arg(b, "torch intra-op threads on the CPU")
    b.add_argument("--attention", choices=["flex", "blocked"], help="attention kernel for scattered rows (default: "
                                                                   "flex on cuda, blocked on cpu)")
    b.add_argument("--profile", metavar="METHOD@RATIO", help="also profile one such request at every length "
                                                             "(torch.profiler table in the record's .md)")
    b.add_argument("--critical_layers", help="QCFuse's critical layers, e.g. 4,6,8,12,17,22,26,31 (default: the "
                                             "model's profile; random weights: 3 layers spread over the middle)")
    b.add_argument("--no_check", action="store_true", help="skip the precision check (float32 reference beside "
                                                           "transformers' own forward)")
    b.add_argument("--json", action="store_true", help="print the record as JSON instead of tables")
    b.add_argument("--out", default="results/bench", help="directory for the record (.json and .md); "
                                                          "'-' writes none (default: results/bench)")
    b.set_defaults(func=_bench)


def _bench(args) -> int:
    import torch

    from .bench import BenchConfig, run_bench
    from .bench.run import save_record
    from .eval.sweep import parse_list
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device == "cuda"
    _set_threads(args)
    cfg = BenchConfig(
        device=device, model=args.model, config=None if args.model else (args.config or ("qwen3-8b" if gpu else
                                                                                          "smollm2-135m")),
        dtype=args.dtype or ("bfloat16" if gpu else "float32"),
        tokens=parse_list(args.tokens or ("4096,8192,16384,32768" if gpu else "4096"), "tokens", int),
        ratios=parse_list(args.ratios, "ratios", float), methods=parse_list(args.methods, "methods"),
        kv_source=args.kv_source, chunk_tokens=args.chunk_tokens,
        repeats=args.repeats if args.repeats is not None else (3 if gpu else 1),
        warmup=args.warmup if args.warmup is not None else (1 if gpu else 0),
        cache_dir=args.cache_dir, check=not args.no_check, attention=args.attention,
        profile=args.profile,
        critical_layers=parse_list(args.critical_layers, "critical_layers", int) if args.critical_layers else None)
    record = run_bench(cfg, log=(lambda *_: None) if args.json else print, progress=not args.json)
    record["command"] = "qcfuse " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None
    if args.out != "-":
        path = save_record(record, args.out)
        if not args.json:
            print(f"wrote {path} with {path.with_suffix('.md').name} and {path.with_suffix('.png').name}")
    if args.json:
        print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
