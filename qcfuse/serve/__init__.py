"""`qcfuse serve`: an OpenAI-compatible server (chat and text completions) whose documents become reusable
KV-cache chunks."""
from __future__ import annotations

import socket

from ..errors import QcfuseError
from .app import create_app

__all__ = ["create_app", "check_port_free", "run_server"]


def check_port_free(host: str, port: int) -> None:
    """Fail with one line before the model loads, rather than with uvicorn's exit after it."""
    if not 0 < port < 65536:
        raise QcfuseError(f"--port must be within 1..65535, got {port}")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise QcfuseError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def run_server(engine, model_name: str, host: str, port: int, log_level: str = "info", **app_options) -> None:
    """Serve until interrupted; `app_options` go to create_app (method, ratio, max_queue, api_key, ...)."""
    import uvicorn
    app = create_app(engine, model_name, **app_options)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
