"""Bad rendezvous: every rank stops with one line and exit 2 within the rendezvous wait
(MEMFIT_RENDEZVOUS_TIMEOUT, 30 s by default; 3 s here), never hangs until a collective timeout."""

import os
import socket
import subprocess
import sys
import time

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, **env):
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "memfit", *args], capture_output=True, text=True,
                       check=False,
                       env={**base, "MEMFIT_RENDEZVOUS_TIMEOUT": "3", **env}, timeout=120)
    return p, time.monotonic() - t0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.conftest import save_tiny
    return str(save_tiny(tmp_path_factory.mktemp("world") / "llama"))


@pytest.mark.parametrize("command", ["generate", "train"])
def test_a_rank_whose_peer_never_comes_stops_with_one_line(tiny, command):
    args = [command, tiny, "--max-new-tokens", "2", "--tp", "2"] if command == "generate" else \
        [command, tiny, "--steps", "1", "--seq-len", "16", "--batch-size", "2"]
    p, seconds = _run(args, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()))
    print(p.stderr[-500:], f"{seconds:.1f} s")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "no rendezvous at 127.0.0.1" in p.stderr and "1/2 clients joined" in p.stderr
    assert p.stderr.count("\n") <= 3  # a line, not a traceback
    assert seconds < 30


def test_a_rank_that_cannot_reach_the_master_stops(tiny):
    p, seconds = _run(["generate", tiny, "--max-new-tokens", "2", "--tp", "2"], WORLD_SIZE="2",
                      RANK="1", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()))
    print(p.stderr[-500:], f"{seconds:.1f} s")
    assert p.returncode == 2 and "no rendezvous at 127.0.0.1" in p.stderr
    assert seconds < 30


def test_world_size_without_the_rest_of_torchruns_variables(tiny):
    p, _ = _run(["generate", tiny, "--max-new-tokens", "2", "--tp", "2"], WORLD_SIZE="2")
    assert p.returncode == 2
    assert "RANK, MASTER_ADDR, MASTER_PORT are not" in p.stderr
