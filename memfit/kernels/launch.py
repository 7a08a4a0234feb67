"""Launching a Triton kernel again without Triton's per-call binding, for eager mode.

`kernel[grid](*args, **kw)` binds and specializes every argument in Python before each launch;
for `_int_mm`'s ~45 parameters that cost 50-90 µs of host time a call on an H200 machine
(Triton 3.6), 3-6x cuBLAS's whole call, so an eager prefill of a packed 8B-shaped model was
bound by the host, not the GPU (benchmarks/RESULTS.md, session 20). `launch` keeps the compiled
kernel of the first launch under a key holding everything Triton specializes on (each tensor's
dtype and 16-byte alignment, each integer's being 1, a multiple of 16 or past 32 bits, the other
arguments' values, the keyword arguments, the current device) and later hands the arguments
straight to that kernel's launcher. Inside a CUDA graph capture it is the same launch. Off with
MEMFIT_FAST_LAUNCH=0, under the interpreter, and while Triton's launch hooks are set (profilers).
"""

from __future__ import annotations

import inspect
import os

import torch
import triton
from triton.runtime import driver

try:
    from triton import knobs
except ImportError:  # Triton before 3.3: never the fast path
    knobs = None

ENABLED = (os.environ.get("MEMFIT_FAST_LAUNCH", "1") != "0"
           and os.environ.get("TRITON_INTERPRET") != "1" and knobs is not None)
_KERNELS: dict = {}


def cdiv(a: int, b: int) -> int:
    """Host-side ceil division: `triton.cdiv` is a constexpr function in recent Tritons and
    costs ~4 µs a call from Python (this CPU, Triton 3.9), a few of them a launch."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Host-side `triton.next_power_of_2` (same cost note as `cdiv`)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _spec(a, _tensor=torch.Tensor):
    t = type(a)
    if t is int:  # Triton: 1 a constant, multiples of 16 marked, past 32 bits a 64-bit type
        return (a == 1) + 2 * (a % 16 == 0) + 4 * (not -(2**31) <= a < 2**31)
    if t is not bool and isinstance(a, _tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    return a


def launch(fn: triton.runtime.JITFunction, grid: tuple, *args, **kw):
    """`fn[grid](*args, **kw)`; from the second call with the same specialization, the compiled
    kernel's own launcher (args: the kernel's leading parameters, positional; kw: the rest of
    its parameters and Triton's launch options)."""
    if not ENABLED or knobs.runtime.launch_enter_hook or knobs.runtime.launch_exit_hook:
        return fn[grid](*args, **kw)
    dev = driver.active.get_current_device()
    key = (fn, dev, tuple(kw.items()), tuple(map(_spec, args)))
    hit = _KERNELS.get(key)
    if hit is None:
        kernel = fn[grid](*args, **kw)
        if kernel is not None:
            rest = list(inspect.signature(fn.fn).parameters.values())[len(args):]
            tail = [kw.get(p.name, p.default) for p in rest]
            _KERNELS[key] = kernel, tail
        return kernel
    kernel, tail = hit
    g = tuple(grid) + (1, 1)
    kernel.run(g[0], g[1], g[2], driver.active.get_current_stream(dev), kernel.function,
               kernel.packed_metadata, None, None, None, *args, *tail)
    return kernel
