"""Closed-loop load on a running server: N clients, each sending its next request as soon as the last one is
answered, until a deadline. Requests already sent at the deadline are waited for, so every request is accounted
for: answered, failed, or lost (sent but never accounted, which must stay 0). Shared by scripts/load_test.py
and the tests."""
from __future__ import annotations

import asyncio
import contextlib
import math
import random
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

DOCUMENTS = [
    "The orchard on Hill Road grows pears and plums.",
    "Plums are harvested in late August.",
    "Pears follow in September, after the plums.",
    "The orchard was planted in 1962 by the Marsh family.",
    "A cider press stands in the orchard's old barn.",
    "Bees from two hives pollinate the trees each spring.",
]
QUESTIONS = ["What grows on Hill Road?", "When are plums harvested?", "Who planted the orchard?",
             "What is in the barn?"]


@dataclass
class LoadReport:
    clients: int
    duration_s: float
    latencies_s: list[float] = field(default_factory=list)
    sent: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return len(self.latencies_s)

    @property
    def lost(self) -> int:
        return self.sent - self.ok - self.errors

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile of the successful requests' latency (0.0 when there are none)."""
        return percentile(self.latencies_s, q)

    def summary(self) -> str:
        return (f"clients {self.clients}, {self.duration_s:.1f} s: requests {self.sent}, ok {self.ok}, "
                f"errors {self.errors}, lost {self.lost}, throughput {self.ok / self.duration_s:.2f} req/s, "
                f"latency p50 {self.percentile(50):.3f} s, p99 {self.percentile(99):.3f} s")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (0.0 of nothing)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]


def chat_body(rng: random.Random, max_tokens: int, stream: bool, method: str | None = None,
              ratio: float | None = None, model: str | None = None) -> dict:
    """Two or three of the shared documents in a random order: after the first few requests, all cache hits."""
    docs = rng.sample(DOCUMENTS, rng.choice([2, 3]))
    body = {"messages": [{"role": "user", "content": rng.choice(QUESTIONS)}],
            "documents": docs, "max_tokens": max_tokens, "stream": stream}
    fusion = {k: v for k, v in (("method", method), ("ratio", ratio)) if v is not None}
    if fusion:
        body["fusion"] = fusion
    if model is not None:
        body["model"] = model
    return body


async def run_load(base_url: str, clients: int = 32, duration_s: float = 60.0, max_tokens: int = 4,
                   streaming_clients: int = 0, method: str | None = None, ratio: float | None = None,
                   model: str | None = None, request_timeout_s: float = 600.0, seed: int = 0) -> LoadReport:
    report = LoadReport(clients, duration_s)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, timeout=request_timeout_s, limits=limits) as http:
        start = time.perf_counter()
        deadline = start + duration_s

        async def client(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            stream = i < streaming_clients          # the first `streaming_clients` clients read SSE
            while time.perf_counter() < deadline:
                body = chat_body(rng, max_tokens, stream, method, ratio, model)
                report.sent += 1
                t0 = time.perf_counter()
                try:
                    error = await _one_request(http, body, stream)
                except Exception as exc:           # timeouts, resets: an error, never a lost request
                    error = f"{type(exc).__name__}: {exc}"
                if error is None:
                    report.latencies_s.append(time.perf_counter() - t0)
                else:
                    report.errors += 1
                    if len(report.error_samples) < 5:
                        report.error_samples.append(error)

        await asyncio.gather(*(client(i) for i in range(clients)))
        report.duration_s = time.perf_counter() - start
    return report


async def _one_request(http: httpx.AsyncClient, body: dict, stream: bool) -> str | None:
    """None when the answer came back whole, else what went wrong."""
    if not stream:
        r = await http.post("/v1/chat/completions", json=body)
        if r.status_code != 200:
            return f"HTTP {r.status_code}: {r.text[:200]}"
        return None if r.json()["choices"][0]["message"]["content"] is not None else "no content"
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    whole = len(lines) >= 2 and lines[-1] == "data: [DONE]" and '"error"' not in lines[-2]
    return None if whole else f"stream cut short: {lines[-2:]}"


@contextlib.contextmanager
def running_server(cmd: list[str], url: str, log_path: Path, timeout_s: float = 600, **popen):
    """Start a server process (output to `log_path`), wait until `url`/health answers 200, yield the process, and
    stop it afterwards. A server that exits or never answers raises RuntimeError with the end of its log."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **popen)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}:\n{Path(log_path).read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"no answer from {url}/health in {timeout_s:.0f} s:\n"
                                   f"{Path(log_path).read_text()[-3000:]}")
            time.sleep(0.25)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
