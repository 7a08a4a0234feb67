#!/usr/bin/env bash
# Create the *peer* environment for llm-compressor (vLLM project). Not a memfit
# dependency: memfit never imports it; only benchmarks/peers/llmc_run.py runs in it.
# Idempotent: re-running on a complete env only verifies the imports (seconds).
# Fresh install: ~3 minutes (torch 2.13.0 CPU wheel comes from the local wheel dir).
set -euo pipefail
VENV="${PEER_VENV:-/work/venv-peer}"
PY="${PYTHON:-python3}"

# Pinned set that is known to work together (llmcompressor 0.14.0.1 requires
# torch>=2.10,<=2.14.0, transformers>=5.15,<=5.17, compressed-tensors==0.19.0).
PKGS=(
  "torch==2.13.0"
  "llmcompressor==0.14.0.1"
  "compressed-tensors==0.19.0"
  "transformers==5.17.0"
  gguf accelerate safetensors psutil
)

check() {
  "$VENV/bin/python" - <<'PY' 2>/dev/null
import torch, transformers, compressed_tensors, llmcompressor, gguf, accelerate, safetensors, psutil
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert llmcompressor.__version__ == "0.14.0.1", llmcompressor.__version__
assert transformers.__version__ == "5.17.0", transformers.__version__
print("peer env OK:", "torch", torch.__version__, "| llmcompressor", llmcompressor.__version__,
      "| compressed-tensors", compressed_tensors.__version__, "| transformers", transformers.__version__)
PY
}

if [ -x "$VENV/bin/python" ] && check; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# torch pinned in the same command, so pip never resolves an (multi-GB CUDA) torch.
"$VENV/bin/pip" install --disable-pip-version-check "${PKGS[@]}"
check
