"""The GPU-only code paths build for Hopper (sm_90) on any machine, CI's CPU included: Triton
compiles them ahead of time with its bundled ptxas, no GPU needed (tests/kernels/sm90_build.py,
in a process of its own: the CPU tests run Triton's interpreter, which cannot compile). The
interpreter never sees these kernels' inline PTX (the mma decode kernel's chains, its asm
epilogue and parameter loads, the KV kernel's code-to-float16 planes), so a PTX typo, an operand
numbering slip or a Triton that lays the mma operands out otherwise shows here, not first on a
GPU. The compiled mma kernels must also pass the layout check `run_mma` makes on the GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_gpu_only_kernel_paths_build_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-m", "tests.kernels.sm90_build"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=900)
    if r.returncode and "ptxas" in r.stderr.lower():
        pytest.skip(f"no usable ptxas on this machine: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    bad = {k: v for k, v in out.items() if v != "ok"}
    print(f"{len(out)} kernels built for sm_90, {len(bad)} failed")
    assert len(out) >= 40 and not bad, bad
