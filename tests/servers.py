"""Real servers for the tests, on free loopback ports: `qcfuse serve` (the CLI, in a subprocess, with the real
default model), Redis (the shared loopback one that .ci/run starts when it answers, else a private one) and a
private redis-server."""
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

MODEL = "smollm2-135m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(port: int) -> subprocess.Popen:
    if not shutil.which("redis-server"):
        pytest.fail("redis-server is not installed (apt-get install redis-server); .ci/run installs it")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return proc
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail("could not start redis-server")


@contextlib.contextmanager
def redis_for_tests(url: str):
    """`url` when a server answers there; otherwise a private server for the duration, on a free port."""
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        yield url
    except redis.exceptions.ConnectionError:
        port = free_port()
        proc = start_redis(port)
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.kill()


def serve(tmp_path_factory, *extra, env: dict | None = None, key: str | None = None):
    """Generator: yields the base URL of a running `qcfuse serve ...extra`, stops it when resumed, and fails if its
    log holds a traceback. `key` is sent to /health while waiting for it (servers that guard every route)."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "qcfuse", "serve", "--model", MODEL, "--port", str(port),
                                 "--log_level", "warning", *extra], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + 240
    while True:
        if proc.poll() is not None:
            pytest.fail(f"qcfuse serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2, headers=headers).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"qcfuse serve did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.25)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def metric(url: str, name: str, headers: dict | None = None, **labels) -> float:
    """A sample of /metrics, summed over the labels not given (0.0 when absent)."""
    text = httpx.get(f"{url}/metrics", headers=headers).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))
