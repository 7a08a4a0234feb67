"""Run benchmarks/peers/llmc_run.py (llm-compressor) in its own Python, for the benchmark scripts.

The peer lives in another environment (benchmarks/peers/SETUP.md), so the scripts call it as a
subprocess and read the JSON report it writes; its dense output is under `work/peer/dense`.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_llmc(peer_python: str, model: str, calib_file: Path, work: Path, peer_args: list[str],
             device: str = "cpu", what: str = "") -> tuple[Path, dict]:
    """-> (the peer's output folder, its report); RuntimeError with its stderr when it fails."""
    out, report = work / "peer", work / "peer.json"
    cmd = [peer_python, str(HERE / "llmc_run.py"), "--model", model, "--calib", str(calib_file),
           "--out", str(out), "--report", str(report), *peer_args]
    if device != "cpu":
        cmd += ["--device", device]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"llm-compressor failed{' on ' + what if what else ''}: "
                           f"{res.stderr[-3000:]}")
    return out, json.loads(report.read_text())
