"""Programmatic dependent launch (PDL, Hopper and later) for memfit's decode kernels.

Why: a batch-1 decode step is ~300 dependent launches of a few µs each; between two of them the
GPU drains one grid, then starts the next, which then waits for its first weight loads (~4-5 µs
of fixed cost per GEMV, measured; benchmarks/RESULTS.md). With PDL the next kernel is launched
while the current one runs: it may load what no earlier kernel writes (weights) and then waits
(`griddepcontrol.wait`) until the previous grid has finished and its writes are visible.

Rules every kernel launched with `launch_kw()` keeps (a race otherwise):
- before `wait(PDL)` it reads only constant inputs (weights, scales, zero points) and writes
  nothing (outputs and temporaries may alias memory an earlier kernel still reads or writes);
- `wait(PDL)` also signals dependents (`griddepcontrol.launch_dependents`), so the next kernel
  starts early only once this one has passed its own wait: a chain never runs ahead by more
  than one kernel.
A kernel launched without PDL (cuBLAS, torch ops) is ordered the usual way on both sides.

`ENABLED`: on for CUDA when this Triton has the instructions and a probe kernel launched with
them ran (MEMFIT_PDL=0 turns it off, benchmarks toggle it for same-run A/B); off under
TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _HAVE = True
except ImportError:  # an older Triton: PDL stays off
    _HAVE = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ENABLED: bool | None = None if (_HAVE and not INTERPRET and os.environ.get("MEMFIT_PDL", "1") != "0") else False


@triton.jit
def wait(PDL: tl.constexpr):
    """Wait for the previous grid (and let the next one launch) when launched with PDL."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _probe(x_ptr, PDL: tl.constexpr):
    wait(PDL)
    tl.store(x_ptr, tl.load(x_ptr) + 1)


def enabled() -> bool:
    """Whether kernels launch with PDL now (probed once on the current CUDA device)."""
    global ENABLED
    if ENABLED is None:
        import torch
        if torch.cuda.is_current_stream_capturing():
            return False  # no probe inside a capture (decided at the next eager launch)
        try:
            x = torch.zeros(1, dtype=torch.int32, device="cuda")
            _probe[(1,)](x, PDL=True, launch_pdl=True)
            _probe[(1,)](x, PDL=True, launch_pdl=True)
            ENABLED = int(x.item()) == 2
        except Exception:  # noqa: BLE001 (any failure: run without PDL)
            ENABLED = False
    return ENABLED


def launch_kw() -> dict:
    """Extra launch arguments: {'PDL': flag, 'launch_pdl': flag} (PDL is the kernels' constexpr)."""
    on = enabled()
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}
