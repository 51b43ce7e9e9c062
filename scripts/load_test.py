"""Load test of a running `qcfuse serve`: N concurrent clients for a while, then p50/p99 latency and counts.

    qcfuse serve --port 8000 &
    python scripts/load_test.py --url http://127.0.0.1:8000 --clients 32 --duration 60
"""
from __future__ import annotations

import argparse
import asyncio
import sys

from qcfuse.serve.loadgen import run_load


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    p.add_argument("--max_tokens", type=int, default=4)
    p.add_argument("--streaming_clients", type=int, default=0, help="how many of the clients stream (SSE)")
    p.add_argument("--method", help="fusion method per request (default: the server's)")
    p.add_argument("--ratio", type=float, help="recompute ratio per request (default: the server's)")
    p.add_argument("--model", help="model name to send (default: none, the server's only model)")
    args = p.parse_args()
    report = asyncio.run(run_load(args.url, args.clients, args.duration, args.max_tokens, args.streaming_clients,
                                  args.method, args.ratio, args.model))
    print(f"requests {report.sent}  ok {report.ok}  errors {report.errors}  lost {report.lost}")
    print(f"latency p50 {report.percentile(50):.3f} s  p99 {report.percentile(99):.3f} s  "
          f"throughput {report.ok / report.duration_s:.2f} req/s over {report.duration_s:.1f} s, "
          f"{report.clients} clients")
    for sample in report.error_samples:
        print(f"  error: {sample}")
    return 0 if report.errors == 0 and report.lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
