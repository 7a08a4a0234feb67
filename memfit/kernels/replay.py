"""Eager packed-linear calls with their launches fixed: a call's host work cut to what changes.

Why: an eager (no CUDA graph) decode step is bound by the host, and a packed linear's call did
far more host work than a dense one. Timed per call on an H200 machine's host (1024x4096 int4
g128, M = 1, `benchmarks/host_launch.py`, benchmarks/RESULTS.md session 29): F.linear bf16 18 µs;
QuantLinear 62 µs, of which memfit's checks, kernel choice and argument building ~30 and
Triton's launch path (binding, specialization, cache look-up) ~16 above the compiled kernel's
own launcher (~10). So a layer's first call for an activation shape (M, dtype, device) runs as
before and keeps a plan: the chosen launch shape and each Triton launch's compiled kernel with
every argument fixed except the per-call tensors (activations, output, split-K partials and
counters), and tries it once (`_tried`: a Triton whose launcher takes other arguments leaves
the ordinary path in place, warned once). Later calls with the same shape allocate the outputs
and call the compiled kernels' launchers directly.

Plans are made per activation shape for M <= 128 rows (decode batches), at most 64 shapes a
layer; past 128 rows (a prefill, whose length varies) one plan serves each M bucket (powers of
two, as the kernel choice): the choice fixed and, for dequantize + cuBLAS, the dequantize
kernel's launch (an eager prefill is bound by the host too: `benchmarks/prefill.py`). A plan
holds for exactly the arguments it was built with: the weight's tensors (checked by identity on
every call; a layer that swaps them gets a new plan), M (or its bucket), K, dtype, device and
16-byte aligned contiguous activations (the alignment Triton specialized the kernel for;
anything else takes the ordinary path). Launch hooks (Triton's profiler hooks) send a call
through the compiled kernel's own runner, which calls them. Used by `memfit.kernels.linear` for
CUDA weights outside torch.compile; what it runs is what the ordinary path runs (tests check the
outputs are identical).
"""

from __future__ import annotations

import inspect
import os
import warnings

import torch

from memfit.kernels.sizes import next_pow2

# MEMFIT_LAUNCH_PLANS=0: every eager call takes the ordinary path (benchmarks A/B it)
ENABLED = os.environ.get("MEMFIT_LAUNCH_PLANS", "1") != "0"
MAX_M = 128  # decode batches: a plan per shape; past it, a plan per M bucket
MAX_SHAPES = 64  # a layer's plans kept at once (then dropped and built again)


class Launch:
    """One compiled Triton kernel launched again with the arguments of a recorded launch,
    those named in `swap` replaced per call (in that order)."""

    def __init__(self, fn, kernel, grid: tuple, args: tuple, kw: dict, swap: tuple[str, ...]):
        sig = inspect.signature(fn.fn)
        bound = sig.bind(*args, **{k: v for k, v in kw.items() if k in sig.parameters})
        bound.apply_defaults()
        names = list(bound.arguments)
        self.args = list(bound.arguments.values())
        self.slots = [names.index(s) for s in swap]
        for i in self.slots:
            self.args[i] = None  # the recorded call's tensors are not kept alive
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.kernel = kernel
        self.run = kernel.run  # the launcher (made on the recorded launch)
        from triton import knobs
        from triton.runtime import driver
        self.hooks = knobs.runtime
        self.driver = driver.active
        self.device = self.driver.get_current_device()

    def __call__(self, *tensors) -> None:
        args = self.args.copy()
        for i, t in zip(self.slots, tensors):
            args[i] = t
        stream = self.driver.get_current_stream(self.device)
        enter = self.hooks.launch_enter_hook
        if enter is not None and getattr(enter, "calls", True):  # hooks: Triton's own runner
            self.kernel[self.grid](*args, stream=stream)
            return
        g, k = self.grid, self.kernel
        self.run(g[0], g[1], g[2], stream, k.function, k.packed_metadata, None, None, None, *args)


class Plans:
    """A layer's plans by activation shape (`memfit.kernels.prepare` makes one per CUDA layer;
    dropped with the layer's cache on a move). `run` returns None when no plan applies."""

    nbytes = 0  # holds no weight bytes of its own

    def __init__(self):
        self.by_shape: dict = {}
        self.tensors: tuple = ()

    def run(self, x: torch.Tensor, w, bias, build) -> torch.Tensor | None:
        """The layer's output for x through its plan for x's shape (made by `build(x2, w,
        bias)` -> (y, plan or None) on the first call: memfit.kernels.triton_int.plan), or
        None: the caller takes the ordinary path."""
        if not self._same(w, bias):  # new weight tensors: the old plans are stale
            self.by_shape.clear()
            self.tensors = (w.qdata, w.scale, w.zero, bias)
        x2 = x.view(-1, x.shape[-1]) if x.is_contiguous() and x.data_ptr() % 16 == 0 else None
        if x2 is None or x2.shape[0] == 0:
            return None  # activations no plan takes: the ordinary path
        m = x2.shape[0]  # past MAX_M (a prefill) one plan serves an M bucket: `build` says so
        key = (x.shape, x.dtype) if m <= MAX_M else (next_pow2(m), x.shape[-1], x.dtype)
        plan = self.by_shape.get(key)
        if plan:
            y = plan(x2)
        elif plan is None and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            if len(self.by_shape) >= MAX_SHAPES:
                self.by_shape.clear()
            y, plan = build(x2, w, bias)
            self.by_shape[key] = _tried(plan, x2) or False
        else:
            return None  # no plan for this layout, or none is built during a capture
        return None if y is None else y.view(*x.shape[:-1], w.shape[0])

    def __reduce__(self):  # a copy or a pickle of the layer starts without plans (closures
        return (Plans, ())  # over compiled kernels: neither copyable nor picklable)

    def _same(self, w, bias) -> bool:
        t = self.tensors
        return bool(t) and w.qdata is t[0] and w.scale is t[1] and w.zero is t[2] and bias is t[3]


def _tried(plan, x2: torch.Tensor):
    """`plan` if one trial call of it runs (its output dropped), else None, warned once: a
    Triton whose compiled-kernel launcher takes other arguments than 3.6-3.9's (the ones a
    plan passes) leaves eager calls on the ordinary path instead of failing them."""
    if plan:
        try:
            plan(x2)
        except Exception as e:  # noqa: BLE001 (any failure: the ordinary path still works)
            if not _WARNED:
                _WARNED.append(e)
                warnings.warn(f"memfit: launch plans are off ({type(e).__name__}: "
                              f"{str(e)[:160]}); eager calls take Triton's launch path",
                              stacklevel=4)
            return None
    return plan


_WARNED: list = []
