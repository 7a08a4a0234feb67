"""Helpers for the parallel tests: run a worker script under torchrun (gloo, CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def torchrun(nproc: int, script: str, *args, timeout: int = 240) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node nproc script args` with this checkout importable."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", script, *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          check=False)


def run_json(nproc: int, script: str, out: Path, *args, timeout: int = 240) -> dict:
    proc = torchrun(nproc, script, out, *args, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(name="run_json", scope="session")
def _run_json_fixture():
    return run_json


@pytest.fixture(name="torchrun", scope="session")
def _torchrun_fixture():
    return torchrun
