"""Side by side, in one run: the same RAG requests from N concurrent clients through (a) `qcfuse serve` and (b) vLLM's
OpenAI server with the qcfuse KV connector, at the same method and ratio. Reports requests/s, p50/p99 TTFT and
p50/p99 latency for each, one server at a time (they would fight over the same cores).

    bash scripts/setup.sh && bash scripts/setup_vllm.sh
    .venv/bin/python scripts/serving_throughput.py            # --clients 16 --requests_per_client 3 --out FILE

Requests: each client sends its next request when its last one is answered (closed loop), `requests_per_client`
times. Every request is a distinct (documents in an order, question) pair over examples/docs (2 or 3 of them,
~900-1,300 context tokens), streamed, greedy, `max_tokens` tokens at most, stopping at end-of-sequence; so no
request repeats another whole and vLLM's prefix cache can never answer one from an earlier one. Both servers are
warmed up first with every document (chunk caches prepared, uncounted). TTFT is the time to the first streamed
text; latency the time to the last.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import shlex
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from qcfuse import vllm_prompt  # noqa: E402
from qcfuse.model.loader import load_tokenizer, resolve_model_dir  # noqa: E402
from qcfuse.serve.loadgen import percentile, running_server  # noqa: E402

MODEL = "smollm2-135m"
DOCS = {p.stem: p.read_text() for p in sorted((ROOT / "examples" / "docs").glob("*.txt"))}
QUESTIONS = ["In which year was the Great Barrier Reef Marine Park established?", "Who invented the transistor?",
             "What did Marie Curie discover?", "Where is the Great Barrier Reef?",
             "Which prizes did Marie Curie win?", "What replaced vacuum tubes?", "What threatens the reef?",
             "When was the first transistor built?"]


def workload(n: int, seed: int) -> list[tuple[list[str], str]]:
    """n distinct (documents in order, question) requests."""
    names = list(DOCS)
    combos = [(list(order), q) for k in (2, 3) for order in itertools.permutations(names, k) for q in QUESTIONS]
    if n > len(combos):
        raise SystemExit(f"at most {len(combos)} distinct requests over examples/docs; asked for {n}")
    random.Random(seed).shuffle(combos)
    return [([DOCS[d] for d in order], q) for order, q in combos[:n]]


async def closed_loop(bodies: list[tuple[str, dict]], base_url: str, clients: int) -> dict:
    """`clients` workers take the requests in order, one at a time each; TTFT and latency of each request."""
    queue: asyncio.Queue = asyncio.Queue()
    for item in bodies:
        queue.put_nowait(item)
    ttft, latency, errors = [], [], []

    async def client(http: httpx.AsyncClient):
        while not queue.empty():
            path, body = queue.get_nowait()
            t0, first = time.perf_counter(), None
            try:
                async with http.stream("POST", path, json=body) as r:
                    if r.status_code != 200:
                        errors.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                        continue
                    async for line in r.aiter_lines():
                        if first is None and line.startswith("data: {") and _has_text(json.loads(line[6:])):
                            first = time.perf_counter()
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latency.append(time.perf_counter() - t0)
            ttft.append((first or time.perf_counter()) - t0)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, timeout=900, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    return {"requests": len(latency), "errors": len(errors), "error_samples": errors[:3], "wall_s": round(wall, 2),
            "requests_per_s": round(len(latency) / wall, 3),
            "ttft_p50_s": round(percentile(ttft, 50), 3), "ttft_p99_s": round(percentile(ttft, 99), 3),
            "latency_p50_s": round(percentile(latency, 50), 3), "latency_p99_s": round(percentile(latency, 99), 3)}


def _has_text(event: dict) -> bool:
    choice = (event.get("choices") or [{}])[0]
    return bool(choice.get("text") or (choice.get("delta") or {}).get("content"))


def qcfuse_bodies(requests, method, ratio, max_tokens) -> list[tuple[str, dict]]:
    return [("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": q}], "documents": docs,
                                      "fusion": {"method": method, "ratio": ratio}, "max_tokens": max_tokens,
                                      "stream": True}) for docs, q in requests]


def vllm_bodies(requests, method, ratio, max_tokens) -> list[tuple[str, dict]]:
    tokenizer = load_tokenizer(MODEL)
    return [("/v1/completions", {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                                 **vllm_prompt(tokenizer, docs, q, method, ratio).completion_fields()})
            for docs, q in requests]


# the histogram of each server's per-request fusion time (qcfuse serve: the engine's TTFT, i.e. fused prefill
# including selection and the question; vLLM: the connector's fuse-and-write, which runs inside vLLM's step)
FUSE_METRIC = {"qcfuse serve": "qcfuse_ttft_seconds", "vLLM + qcfuse connector": "vllm:qcfuse_fuse_seconds"}


def histogram_totals(url: str, name: str) -> tuple[float, float]:
    """(sum, count) of a Prometheus histogram on the server's /metrics, over all label sets."""
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(f"{url}/metrics", timeout=30).text
    total = {"_sum": 0.0, "_count": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for suffix in total:
                if sample.name == name + suffix:
                    total[suffix] += sample.value
    return total["_sum"], total["_count"]


def run(name: str, cmd: list[str], port: int, log: Path, bodies, warmup, clients: int, env=None) -> dict:
    """Start one server, warm it up, load it, stop it."""
    t0 = time.perf_counter()
    with running_server(cmd, f"http://127.0.0.1:{port}", log, env=env, cwd=ROOT):
        ready_s = time.perf_counter() - t0
        url = f"http://127.0.0.1:{port}"
        asyncio.run(closed_loop(warmup, url, 1))           # every chunk prepared, uncounted
        before = histogram_totals(url, FUSE_METRIC[name])
        result = asyncio.run(closed_loop(bodies, url, clients))
        after = histogram_totals(url, FUSE_METRIC[name])
    fused = after[1] - before[1]
    # fusion runs one request at a time in both servers: 1 / (its mean time) bounds the requests/s either can reach
    result["fuse_s_mean"] = round((after[0] - before[0]) / fused, 3) if fused else None
    result["fusion_bound_requests_per_s"] = round(1 / result["fuse_s_mean"], 3) if result["fuse_s_mean"] else None
    # the 1-minute load average as the run ends: above the core count, other work shared the CPU with this run
    result.update(startup_s=round(ready_s, 1), load_average_1m=round(os.getloadavg()[0], 2))
    print(f"{name}:", json.dumps(result), flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests_per_client", type=int, default=3)
    p.add_argument("--max_tokens", type=int, default=32)
    p.add_argument("--method", default="qcfuse")
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vllm_python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    p.add_argument("--kv_cache_gb", type=int, default=2, help="vLLM's CPU KV cache (VLLM_CPU_KVCACHE_SPACE)")
    p.add_argument("--port", type=int, default=8391)
    p.add_argument("--async_load", action="store_true",
                   help="the connector fuses in a background thread (kv_connector_extra_config async_load)")
    p.add_argument("--logs", default=str(ROOT / "results" / "serving"), help="server logs go here")
    p.add_argument("--out", help="write the results as JSON here too")
    args = p.parse_args()
    if not Path(args.vllm_python).is_file():
        raise SystemExit(f"{args.vllm_python} not found: bash scripts/setup_vllm.sh")
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    requests = workload(args.clients * args.requests_per_client, args.seed)
    warmup = [(list(DOCS.values()), QUESTIONS[0])]           # all three documents once
    fusion = (args.method, args.ratio, args.max_tokens)
    results = {"clients": args.clients, "requests": len(requests), "method": args.method, "ratio": args.ratio,
               "max_tokens": args.max_tokens, "cpu_count": os.cpu_count()}

    results["qcfuse_serve"] = run("qcfuse serve", [sys.executable, "-m", "qcfuse", "serve", "--model", MODEL,
                                                   "--port", str(args.port), "--log_level", "warning",
                                                   "--max_queue", "256"],
                                  args.port, logs / "qcfuse-serve.log", qcfuse_bodies(requests, *fusion),
                                  qcfuse_bodies(warmup, *fusion), args.clients)
    connector = {"kv_connector": "QcfuseConnector", "kv_connector_module_path": "qcfuse.integrations.vllm",
                 "kv_role": "kv_both"}
    if args.async_load:
        connector["kv_connector_extra_config"] = {"async_load": True}
    vllm_cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(resolve_model_dir(MODEL)),
                "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(args.port), "--dtype", "float32",
                "--enforce-eager", "--max-model-len", "4096", "--kv-transfer-config", json.dumps(connector)]
    results["vllm_command"] = shlex.join(vllm_cmd)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gb)}
    results["vllm_connector"] = run("vLLM + qcfuse connector", vllm_cmd, args.port, logs / "vllm-serve.log",
                                    vllm_bodies(requests, *fusion), vllm_bodies(warmup, *fusion), args.clients, env)

    a, b = results["qcfuse_serve"], results["vllm_connector"]
    results["speedup_requests_per_s"] = round(b["requests_per_s"] / a["requests_per_s"], 2)
    print(f"\n{args.clients} clients, {len(requests)} distinct RAG requests, {args.method} @ {args.ratio}, "
          f"max_tokens {args.max_tokens}")
    print(f"{'':28}{'req/s':>8}{'TTFT p50':>10}{'TTFT p99':>10}{'lat p50':>10}{'lat p99':>10}{'errors':>8}")
    for name, r in (("qcfuse serve", a), ("vLLM + qcfuse connector", b)):
        print(f"{name:28}{r['requests_per_s']:>8.2f}{r['ttft_p50_s']:>9.2f}s{r['ttft_p99_s']:>9.2f}s"
              f"{r['latency_p50_s']:>9.2f}s{r['latency_p99_s']:>9.2f}s{r['errors']:>8}")
    print(f"vLLM + connector / qcfuse serve: {results['speedup_requests_per_s']:.2f}x requests/s")
    if b.get("fuse_s_mean") and a.get("fuse_s_mean"):
        results["bound_speedup_requests_per_s"] = round(b["fusion_bound_requests_per_s"] / a["requests_per_s"], 2)
        print(f"fusion per request: qcfuse serve {1000 * a['fuse_s_mean']:.0f} ms, inside vLLM "
              f"{1000 * b['fuse_s_mean']:.0f} ms; with fusion serial, vLLM + connector can reach at most "
              f"{b['fusion_bound_requests_per_s']:.2f} requests/s = {results['bound_speedup_requests_per_s']:.2f}x "
              f"qcfuse serve")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if a["errors"] == 0 and b["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
