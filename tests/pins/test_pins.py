"""Bit-for-bit pins: the artifact (every stored tensor) and the perplexity of a tiny model after
each method family. A refactor that claims to change no numbers must leave these equal.

The pins were recorded on one CPU capability and torch version (stored beside them). Float
summation order can differ on another CPU or torch build, so there the test checks the
perplexity to 1e-4 relative instead of the bytes, and says so.
"""

import hashlib
import json
import platform
from pathlib import Path

import pytest
import torch

from memfit.api import compress_
from memfit.eval.lm import evaluate_lm
from memfit.models import load_model

PINS = Path(__file__).with_name("pins.json")
RECIPES = ("w4g64", "w3g64-gptq", "w4g64-hqq", "wanda-50", "sparsegpt-50", "wanda-2of4",
           "wsvd-80", "sparsegpt-2of4-w4g64", "wanda-50-w4g64", "wsvd-80-w8")


def _digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        v = v.detach().contiguous().cpu()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def _machine() -> dict:
    """What the bytes depend on: the CPU (its LAPACK paths differ between vendors and models
    with the same vector capability: SparseGPT's and whitened SVD's factorizations) and torch."""
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), None) if Path("/proc/cpuinfo").exists() else None
    return {"cpu": torch.backends.cpu.get_cpu_capability(), "model": model or platform.processor(),
            "torch": torch.__version__}


def run_pin(model_dir, recipe: str) -> dict:
    g = torch.Generator().manual_seed
    calib = torch.randint(0, 30522, (16, 64), generator=g(1))
    held = torch.randint(0, 30522, (4, 64), generator=g(2))
    m = load_model(str(model_dir)).model
    compress_(m, recipe, calib, progress=False)
    return {"sha256": _digest(m), "nll": evaluate_lm(m, held, progress=False)["nll"]}


@pytest.mark.parametrize("recipe", RECIPES)
def test_pinned_artifact_and_perplexity(tiny_llama_dir, recipe):
    pins = json.loads(PINS.read_text())
    got, want = run_pin(tiny_llama_dir, recipe), pins["results"][recipe]
    if pins["machine"] == _machine():
        assert got["sha256"] == want["sha256"], f"{recipe}: stored bytes changed"
        assert got["nll"] == want["nll"], f"{recipe}: nll {got['nll']!r} != {want['nll']!r}"
    else:  # another CPU/torch: float sums may round differently
        assert got["nll"] == pytest.approx(want["nll"], rel=1e-4), recipe


if __name__ == "__main__":  # python tests/pins/test_pins.py DIR: (re)record the pins
    import sys
    res = {r: run_pin(sys.argv[1], r) for r in RECIPES}
    PINS.write_text(json.dumps({"machine": _machine(), "results": res}, indent=1) + "\n")
