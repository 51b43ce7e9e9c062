"""`qcfuse bench`: time to first token (TTFT) of transformers full prefill, qcfuse full prefill and fused
prefill per method and ratio, measured side by side in one run (the fused runs in interleaved rounds), with
the reused KV streamed layer by layer from GPU memory, pinned host memory, or disk.

Speed does not depend on weight values, so the shipped configs (real 8B shapes) get random weights; `--model`
benchmarks a real model instead. Prompts are random token ids laid out like a RAG prompt: a short system
prefix, chunks of `chunk_tokens`, and a question suffix. Chunk caches are prepared before timing (offline
work); every fused TTFT counts selection, waiting for layers and compute.

The run also checks itself, at its shortest length: qcfuse full prefill and recompute-everything fusion are
judged against a float32 forward of the same weights beside transformers' own forward (qcfuse.check.
precision_check). On CUDA it counts the host syncs of one fused request and of one full prefill.
"""
from __future__ import annotations

import datetime
import functools
import json
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from ..errors import QcfuseError
from ..fusion import graphs
from ..fusion.fuse import synchronize
from ..fusion.qcfuse import default_critical_layers
from ..model import attention as attention_mod
from ..model.attention import KERNELS, default_kernel

CONFIG_DIR = Path(__file__).parent / "configs"
PREFIX_TOKENS = 32          # system prompt
SUFFIX_TOKENS = 64          # question and answer cue
KV_SOURCES = ("gpu", "host", "disk")
DEFAULT_METHODS = ("reuse", "cacheblend", "epic", "prophetkv", "fuserag", "qcfuse")


@dataclass
class BenchConfig:
    device: str = "cpu"
    config: str | None = None            # shipped config name or path (random weights) ...
    model: str | None = None             # ... or a real model (alias, HF directory, .gguf)
    dtype: str = "float32"
    tokens: list[int] = field(default_factory=lambda: [4096])
    ratios: list[float] = field(default_factory=lambda: [0.05, 0.15, 0.3])
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    kv_source: str = "host"
    chunk_tokens: int = 512
    repeats: int = 1
    warmup: int = 0
    seed: int = 0
    cache_dir: str | None = None         # disk source: where the chunk caches go (default: a temporary dir)
    check: bool = True
    attention: str | None = None         # kernel for scattered rows (flex, blocked); None: the device's default
    profile: str | None = None           # "METHOD@RATIO": profile one such request at every length
    critical_layers: list[int] | None = None   # QCFuse's layers as a profile gives them (random weights: none)


# -- configs and models ------------------------------------------------------------------------------------
def config_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(name: str) -> tuple[str, dict]:
    """A shipped config by name, or a transformers config .json by path: (name, config dict)."""
    path = Path(name).expanduser()
    if not (path.suffix == ".json" and path.is_file()):
        path = CONFIG_DIR / f"{name}.json"
        if not path.is_file():
            raise QcfuseError(f"unknown config '{name}' (shipped: {', '.join(config_names())}; or the path of a "
                              "transformers config .json)")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise QcfuseError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise QcfuseError(f"{path}: expected a transformers config with a 'model_type'")
    return path.stem, {k: v for k, v in config.items() if not k.startswith("_")}


class _FixedIdsTokenizer:
    """Random weights have no tokenizer; QCFuse's offline probe only needs some fixed ids for its text."""
    eos_token_id = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, text: str, add_special_tokens: bool = True):
        return SimpleNamespace(input_ids=[1 + b % (self.vocab_size - 1) for b in text.encode()])


def random_model(name: str, config: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """A transformers model of `config`'s shape with random weights, built directly on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from ..model.loader import LoadedModel
    from ..model.transformer import Transformer
    hf_logging.set_verbosity_error()
    try:
        cfg = AutoConfig.for_model(**config)
    except (ValueError, KeyError, TypeError) as exc:
        raise QcfuseError(f"config '{name}': {exc}") from None
    torch.manual_seed(seed)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return LoadedModel(f"random:{name}", Transformer(hf), _FixedIdsTokenizer(cfg.vocab_size),
                       _fingerprint=f"random:{name}:{seed}:{dtype}")


def random_layout(n_tokens: int, vocab_size: int, chunk_tokens: int, seed: int):
    """A RAG-shaped prompt of random ids: prefix, chunks of `chunk_tokens` (the last may be shorter), suffix."""
    from ..prompt import PromptLayout
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (n_tokens,), generator=g).tolist()
    body = ids[PREFIX_TOKENS:n_tokens - SUFFIX_TOKENS]
    chunks = [body[i:i + chunk_tokens] for i in range(0, len(body), chunk_tokens)]
    return PromptLayout(ids[:PREFIX_TOKENS], chunks, ids[n_tokens - SUFFIX_TOKENS:], question=(0, SUFFIX_TOKENS))


def _store(cfg: BenchConfig, tmp: str):
    from ..cache.store import MemoryTier, TieredStore
    unbounded = 1 << 50
    if cfg.kv_source == "gpu":
        return TieredStore([MemoryTier(unbounded, device=cfg.device)])
    if cfg.kv_source == "host":
        return TieredStore([MemoryTier(unbounded, device="cpu", pin=cfg.device.startswith("cuda"))])
    from ..cache.disk import DiskTier
    return TieredStore([DiskTier(cfg.cache_dir or tmp, unbounded)])      # no memory tier: every read hits disk


# -- timing ------------------------------------------------------------------------------------------------
@torch.inference_mode()
def _hf_prefill(hf, ids: torch.Tensor) -> torch.Tensor:
    return hf(input_ids=ids[None], logits_to_keep=1).logits[0, -1].float()


def _measure(fn, device, repeats: int, warmup: int):
    """(median seconds, results of the timed calls)"""
    for _ in range(warmup):
        fn()
    times, outs = [], []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        outs.append(out)
    return statistics.median(times), outs


def _validate(cfg: BenchConfig, window: int) -> None:
    from ..fusion import make_selector
    if cfg.kv_source not in KV_SOURCES:
        raise QcfuseError(f"--kv-source must be one of {', '.join(KV_SOURCES)}")
    if cfg.kv_source == "gpu" and not cfg.device.startswith("cuda"):
        raise QcfuseError("--kv-source gpu needs --device cuda (on the CPU, 'host' is memory)")
    if cfg.repeats < 1 or cfg.warmup < 0:
        raise QcfuseError("--repeats must be at least 1 and --warmup at least 0")
    if cfg.profile is not None:
        _parse_profile(cfg.profile)
    if cfg.attention is not None and cfg.attention not in KERNELS:
        raise QcfuseError(f"--attention must be one of {', '.join(KERNELS)}")
    if cfg.chunk_tokens < 1:
        raise QcfuseError("--chunk_tokens must be at least 1")
    least = PREFIX_TOKENS + SUFFIX_TOKENS + 1
    for n in cfg.tokens:
        if n < least:
            raise QcfuseError(f"--tokens {n}: at least {least} (prefix {PREFIX_TOKENS} + suffix {SUFFIX_TOKENS} + 1)")
        if n + 1 > window:
            raise QcfuseError(f"--tokens {n} does not fit the model's window of {window} tokens")
    for m in cfg.methods:
        for r in cfg.ratios:
            selector = make_selector(m, r)               # unknown method, bad ratio: a clear error
            if not selector.uses_cache:
                raise QcfuseError(f"--methods: '{m}' is not a fusion method (full prefill is always measured)")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


# -- the run -----------------------------------------------------------------------------------------------
def run_bench(cfg: BenchConfig, log=print, progress: bool = True) -> dict:
    """Measure every context length; returns the record (also what --json prints)."""
    from tqdm import tqdm

    from ..check import precision_check
    from ..engine import FusionEngine
    from ..fusion import make_selector

    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise QcfuseError("--device cuda: no CUDA GPU is available here (use --device cpu)")
    device = torch.device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    if cfg.model:
        from ..model.loader import load_model
        loaded = load_model(cfg.model, dtype=dtype, quiet=True)
        loaded.hf.to(device)
        loaded.transformer.device = device
        name, weights = cfg.model, "real"
    else:
        name, config = load_config(cfg.config or "smollm2-135m")
        loaded = random_model(name, config, str(device), dtype, cfg.seed)
        weights = "random"
    model = loaded.transformer
    _validate(cfg, model.max_positions)
    if cfg.critical_layers:
        if any(not 0 <= layer < model.n_layers for layer in cfg.critical_layers):
            raise QcfuseError(f"--critical_layers {cfg.critical_layers}: outside 0..{model.n_layers - 1}")
        model.critical_layers = sorted(set(cfg.critical_layers))  # stored by the offline pass, used online
    vocab = loaded.hf.config.vocab_size

    if cfg.attention:
        model.scattered_kernel = cfg.attention
    record = {"device": device_name(device), "device_type": device.type, "config": name, "weights": weights,
              "dtype": cfg.dtype, "kv_source": cfg.kv_source, "chunk_tokens": cfg.chunk_tokens,
              "repeats": cfg.repeats, "warmup": cfg.warmup,
              "attention": cfg.attention or default_kernel(device),
              "critical_layers": default_critical_layers(model),
              "versions": {"torch": torch.__version__, "transformers": _version("transformers"),
                           "python": platform.python_version(), "qcfuse": _version("qcfuse")},
              "command": None,     # the CLI fills it in
              "time": datetime.datetime.now().isoformat(timespec="seconds"), "results": []}

    with tempfile.TemporaryDirectory(prefix="qcfuse-bench-") as tmp:
        _warm_up(loaded, _store(cfg, tmp), vocab, min(cfg.tokens))
        for n_tokens in cfg.tokens:
            layout = random_layout(n_tokens, vocab, cfg.chunk_tokens, cfg.seed + n_tokens)
            engine = FusionEngine(loaded, store=_store(cfg, tmp))
            ids = layout.ids.to(device)
            res = {"tokens": n_tokens, "chunks": len(layout.chunks), "fused": []}

            t_hf, _ = _measure(lambda: _hf_prefill(loaded.hf, ids), device, cfg.repeats, cfg.warmup)
            res["transformers_ms"] = 1000 * t_hf
            full = make_selector("fullcomp")
            t_full, _ = _measure(lambda: engine.prefill(layout, full, 1), device, cfg.repeats, cfg.warmup)
            res["qcfuse_full_ms"] = 1000 * t_full

            t0 = time.perf_counter()
            engine.prepare_layout(layout, progress=progress)
            res["prepare_s"] = time.perf_counter() - t0
            if cfg.check and n_tokens == min(cfg.tokens):
                res["check"] = precision_check(engine, layout)

            runs = [(m, r) for m in cfg.methods for r in ([None] if m == "reuse" else cfg.ratios)]

            def fused(method, ratio):
                synchronize(device)
                _, stats = engine.prefill(layout, make_selector(method, ratio or 0.0), 1)
                synchronize(device)
                return stats
            with tqdm(total=len(runs) * (cfg.warmup + cfg.repeats), desc=f"{n_tokens} tokens", unit="run",
                      disable=not progress, leave=False) as bar:
                timed_by_run = interleaved({run: functools.partial(fused, *run) for run in runs}, cfg.repeats,
                                           cfg.warmup, bar)
            for method, ratio in runs:
                timed = timed_by_run[(method, ratio)]
                ttft = statistics.median([s["ttft_s"] for s in timed])
                sel = statistics.median([s["selection_s"] for s in timed])
                wait = statistics.median([s["io_wait_s"] for s in timed])
                res["fused"].append({
                    "method": method, "ratio": ratio, "ttft_ms": 1000 * ttft, "selection_ms": 1000 * sel,
                    "load_wait_ms": 1000 * wait, "compute_ms": 1000 * max(0.0, ttft - sel - wait),
                    "recomputed_tokens": timed[-1]["recomputed_tokens"], "bytes_loaded": timed[-1]["bytes_loaded"],
                    "speedup_vs_transformers": t_hf / ttft, "speedup_vs_qcfuse_full": t_full / ttft,
                })
            res["dispatches"] = {"qcfuse full prefill": count_dispatches(lambda: engine.prefill(layout, full, 1),
                                                                        device)}
            for method, ratio in runs:
                name = method if ratio is None else f"{method} {ratio:g}"
                res["dispatches"][name] = count_dispatches(
                    lambda: engine.prefill(layout, make_selector(method, ratio or 0.0), 1), device)
            if device.type == "cuda":
                res["syncs"] = {"qcfuse full prefill": count_syncs(lambda: engine.prefill(layout, full, 1))}
                for method in ("epic", "qcfuse"):         # one fused request each, at the ratio nearest 0.15
                    ratios = [r for m, r in runs if m == method]
                    if ratios:
                        ratio = min(ratios, key=lambda r: abs(r - 0.15))
                        res["syncs"][f"{method} {ratio:g}"] = count_syncs(
                            lambda: engine.prefill(layout, make_selector(method, ratio), 1))
            if cfg.profile:
                method, ratio = _parse_profile(cfg.profile)
                res["profile"] = profile_request(engine, layout, make_selector(method, ratio), device)
            res["attention_kernels"] = _kernels_used(model, layout)
            if attention_mod.FLEX_ERRORS:
                record["flex_errors"] = list(attention_mod.FLEX_ERRORS)
            res["question_graphs"] = graphs.stats(model)       # QCFuse's question pass: eager / capture / replay
            if graphs.FAILURES:
                record["graph_errors"] = list(graphs.FAILURES)
            record["results"].append(res)
            log(format_result(res, record))
            engine.store.clear()
    return record


def interleaved(calls: dict, repeats: int, warmup: int = 0, progress=None) -> dict:
    """Each call's results over `repeats` rounds. Each round makes every call once, in an order that rotates
    round by round, so that drift (clocks, caches, a busy neighbour) spreads over all of them instead of
    landing on whichever ran last. Each call's warm-up calls come first. progress: a tqdm bar, or None."""
    tick = progress.update if progress is not None else (lambda: None)
    keys = list(calls)
    for key in keys:
        for _ in range(warmup):
            calls[key]()
            tick()
    timed = {key: [] for key in keys}
    for round_ in range(repeats):
        shift = round_ % len(keys)
        for key in keys[shift:] + keys[:shift]:
            timed[key].append(calls[key]())
            tick()
    return timed


def _warm_up(loaded, store, vocab: int, n_tokens: int) -> None:
    """One-time kernel set-up (cuBLAS handles, FlexAttention's compile for scattered rows) stays out of every
    measurement: a short full prefill, and fused requests of two different row counts."""
    from ..engine import FusionEngine
    from ..fusion import make_selector
    device = loaded.transformer.device
    _hf_prefill(loaded.hf, torch.randint(3, vocab, (64,), device=device))
    engine = FusionEngine(loaded, store=store)
    layout = random_layout(min(n_tokens, 1000), vocab, 256, seed=12345)
    for selector in (make_selector("fullcomp"), make_selector("epic", 0.3), make_selector("qcfuse", 0.15)):
        engine.prefill(layout, selector, 1)
    synchronize(device)
    store.clear()


def _parse_profile(spec: str) -> tuple[str, float]:
    from ..fusion import make_selector
    method, _, ratio = spec.partition("@")
    try:
        ratio_f = float(ratio) if ratio else 0.15
    except ValueError:
        raise QcfuseError(f"--profile expects METHOD@RATIO (e.g. qcfuse@0.15), got '{spec}'") from None
    make_selector(method, ratio_f)                       # unknown method or bad ratio: a clear error
    return method, ratio_f


def profile_request(engine, layout, selector, device: torch.device, rows: int = 25) -> dict:
    """One request under torch.profiler: the operators that take the most device (or CPU) time."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    engine.prefill(layout, selector, 1)                    # warm
    synchronize(device)
    with profile(activities=activities) as prof:
        engine.prefill(layout, selector, 1)
        synchronize(device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return {"request": f"{selector.name} {selector.ratio:g}",
            "table": prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60)}


LAUNCH_EVENTS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaMemcpyAsync", "cudaMemsetAsync")


def count_dispatches(fn, device: torch.device) -> dict:
    """Host work of one request, by count: operators the host dispatched (top-level aten calls, every thread,
    loader included) and, on CUDA, kernel launches and copies queued. Where the GPU waits for the host,
    these counts are what to cut; the profiler sees compiled regions too, unlike a dispatch mode."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()                                                   # warm
    synchronize(device)
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    events = prof.events()
    ops = sum(1 for e in events if e.name.startswith("aten::")
              and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
    counts = {"host_ops": ops}
    if device.type == "cuda":
        counts["launches"] = sum(1 for e in events if e.name.startswith(LAUNCH_EVENTS))
    return counts


def _kernels_used(model, layout) -> dict:
    """Which kernel the seam picks for full prefill and for scattered rows, per attention window."""
    windows = {layer.window for layer in model.spec.layers}
    full = model.plan(range(layout.n_tokens), layout.n_tokens)
    some = model.plan(torch.cat([layout.doc_positions()[::7], layout.suffix_positions()]), layout.n_tokens)
    for plan in (full, some):
        for window in windows:
            plan.kernel_for(window)
    return {"full prefill": full.kernels, "scattered rows": some.kernels}


def count_syncs(fn) -> dict:
    """Run fn once with CUDA's sync debug mode on: how many operations made the host wait for the GPU, and
    where (file:line of the Python frame that asked). The fuse loop itself should ask for none."""
    import warnings
    from collections import Counter
    synchronize(torch.device("cuda"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                    if "synchroniz" in str(w.message).lower())
    return {"count": sum(sites.values()), "sites": dict(sites.most_common())}


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def format_result(res: dict, record: dict) -> str:
    from ..check import format_precision
    lines = [f"{res['tokens']} tokens ({res['chunks']} chunks of {record['chunk_tokens']}, prefix {PREFIX_TOKENS}, "
             f"suffix {SUFFIX_TOKENS}) on {record['device']}, {record['dtype']}, {record['weights']} weights of "
             f"{record['config']}, KV from {record['kv_source']}"
             + (f", QCFuse's critical layers {record['critical_layers']}"
                if any(f["method"] == "qcfuse" for f in res["fused"]) else ""),
             f"  transformers full prefill (SDPA)  {res['transformers_ms']:9.1f} ms",
             f"  qcfuse full prefill               {res['qcfuse_full_ms']:9.1f} ms   "
             f"({res['transformers_ms'] / res['qcfuse_full_ms']:.2f}x)"]
    if "check" in res:
        lines.append("  " + format_precision(res["check"]))
    if "syncs" in res:
        lines.append("  host syncs per request: " + ", ".join(f"{k} {v['count']}" for k, v in res["syncs"].items()))
    if "dispatches" in res:
        lines.append("  host operators per request: " + ", ".join(
            f"{k} {v['host_ops']}" + (f" ({v['launches']} launches)" if "launches" in v else "")
            for k, v in res["dispatches"].items()))
    if "attention_kernels" in res:
        kinds = res["attention_kernels"]
        lines.append(f"  attention kernels (per window): full prefill {kinds['full prefill']}, "
                     f"scattered rows {kinds['scattered rows']}")
    if record.get("flex_errors"):
        lines.append(f"  FlexAttention was given up: {record['flex_errors'][0].splitlines()[0][:300]}")
    if res.get("question_graphs"):
        lines.append("  QCFuse's question pass as a CUDA graph, so far: " + ", ".join(
            f"{how} {n}" for how, n in res["question_graphs"].items()))
    if record.get("graph_errors"):
        lines.append(f"  CUDA graphs were given up: {record['graph_errors'][0].splitlines()[0][:300]}")
    lines.append(f"  {'method':<11}{'ratio':>6}{'TTFT ms':>10}{'select':>9}{'wait':>8}{'compute':>9}"
                 f"{'sel %':>7}{'vs HF':>8}{'vs full':>9}")
    for f in res["fused"]:
        ratio = "-" if f["ratio"] is None else f"{f['ratio']:g}"
        share = 100 * f["selection_ms"] / f["ttft_ms"] if f["ttft_ms"] else 0.0
        lines.append(f"  {f['method']:<11}{ratio:>6}{f['ttft_ms']:10.1f}{f['selection_ms']:9.1f}"
                     f"{f['load_wait_ms']:8.1f}{f['compute_ms']:9.1f}{share:6.1f}%"
                     f"{f['speedup_vs_transformers']:7.2f}x{f['speedup_vs_qcfuse_full']:8.2f}x")
    return "\n".join(lines)


def save_record(record: dict, out_dir: str | Path) -> Path:
    """results/bench/{config}_{device}_{kv}_{time}.json, plus the printed tables (.md) and a plot (.png)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in record["device"].split(" (")[0]).strip("-").lower()
    stem = f"{record['config']}_{slug}_{record['kv_source']}_{record['time'].replace(':', '')}"
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    md = [f"# qcfuse bench: {record['config']} on {record['device']}", "",
          f"torch {record['versions']['torch']}, transformers {record['versions']['transformers']}, "
          f"{record['dtype']}, {record['weights']} weights, KV from {record['kv_source']}, median of "
          f"{record['repeats']} (warm-up {record['warmup']}), {record['time']}", ""]
    if record.get("command"):
        md += ["```", record["command"], "```", ""]
    md += ["```", *(format_result(r, record) for r in record["results"]), "```", ""]
    for r in record["results"]:
        if "profile" in r:
            md += [f"## Profile: {r['profile']['request']} at {r['tokens']} tokens", "", "```", r["profile"]["table"],
                   "```", ""]
        if "syncs" in r:
            md += [f"## Host syncs at {r['tokens']} tokens (CUDA sync debug mode, one request each)", ""]
            md += [f"- {name}: {v['count']} ({', '.join(f'{site} x{n}' for site, n in v['sites'].items()) or 'none'})"
                   for name, v in r["syncs"].items()] + [""]
    path.with_suffix(".md").write_text("\n".join(md))
    plot_record(record, path.with_suffix(".png"))
    return path


def plot_record(record: dict, path: Path) -> None:
    """One panel per context length: every run's TTFT as a bar split into selection / load wait / compute,
    against transformers' full prefill (dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = record["results"]
    n_runs = max(len(r["fused"]) for r in results) + 1
    fig, axes = plt.subplots(len(results), 1, figsize=(9, 0.32 * n_runs * len(results) + 1.2), squeeze=False)
    parts = [("selection_ms", "selection", "tab:orange"), ("load_wait_ms", "load wait", "tab:red"),
             ("compute_ms", "compute", "tab:blue")]
    for ax, res in zip(axes[:, 0], results):
        labels = ["qcfuse full prefill"] + [f["method"] + ("" if f["ratio"] is None else f" {f['ratio']:g}")
                                            for f in res["fused"]]
        y = list(range(len(labels)))[::-1]
        ax.barh(y[0], res["qcfuse_full_ms"], color="tab:gray")
        left = [0.0] * len(res["fused"])
        for key, name, color in parts:
            values = [f[key] for f in res["fused"]]
            ax.barh(y[1:], values, left=left, color=color, label=name)
            left = [a + b for a, b in zip(left, values)]
        for yy, f in zip(y[1:], res["fused"]):
            ax.annotate(f"{f['speedup_vs_transformers']:.1f}x", (f["ttft_ms"], yy), xytext=(3, -3),
                        textcoords="offset points", fontsize=7)
        ax.axvline(res["transformers_ms"], color="black", linestyle="--", label="transformers full prefill")
        ax.set_yticks(y, labels, fontsize=8)
        ax.set_xlabel("TTFT (ms)")
        ax.set_title(f"{res['tokens']} tokens", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{record['config']} on {record['device']}, {record['dtype']}, KV from {record['kv_source']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
