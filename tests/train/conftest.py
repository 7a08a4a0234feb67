"""Helpers of the training tests: a tiny random Llama folder and a torchrun launcher."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def train_llama_dir(tiny_llama_dir):
    """tests/conftest.py's tiny Llama folder: 2 blocks, hidden 64, intermediate 128, vocab 30522
    (the embedded encoder's tokenizer), random weights."""
    return tiny_llama_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, script: str, *args: str, timeout: int = 120) -> None:
    """Run tests/train/`script` under torchrun with gloo; fail with its output if it fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", str(HERE / script), *args]
    p = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]


def run_workers(nproc: int, model, prefix: Path, runs: list[dict]) -> list[dict]:
    """train_to under torchrun for each run; -> every rank's {name: report}."""
    torchrun(nproc, "worker.py", str(model), str(prefix), json.dumps(runs))
    return [json.loads(Path(f"{prefix}.rank{r}.json").read_text()) for r in range(nproc)]
