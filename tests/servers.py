"""Local servers for the tests: a free loopback port; Redis, the shared loopback one (.ci/run starts it) when it
answers, else a private one."""
import contextlib
import shutil
import socket
import subprocess
import time

import pytest
import redis


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
