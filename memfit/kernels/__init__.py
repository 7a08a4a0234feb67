"""Kernels: matmuls over packed weights, chosen in one place.

`linear(x, weight, bias, cache)` is the only entry the modules call (memfit.formats). It looks at
the weight's kind, the device and the activation dtype and picks a path:

- a dense tensor (what sparse layouts rebuild today): F.linear in the activation dtype;
- an `IntWeight` on the CPU without autograd: memfit.kernels.cpu (torch's bfloat16 int4/int8
  kernels where they are exact and fast, else tiled dequantize + float32 GEMM);
- an `IntWeight` on CUDA without autograd: memfit.kernels.triton_int (fused dequantize-matmul
  for 8/4/2-bit layouts, 3-bit through its byte kernels, dequantize + cuBLAS or the codes
  widened to 4 bits for the call (triton_widen), choosing per shape among the
  tensor-core decode kernel of triton_mma, the word kernels of triton_words, the
  long-prefill tile kernel of triton_prefill (loads through tensor descriptors) and its own;
  Triton is imported on the first
  CUDA call only), the reference for layouts it cannot take (warned once);
  Under torch.compile the same call goes through the custom op `memfit::int_linear`
  (memfit.kernels.ops), which the compiler does not trace into;
- an `IntWeight` anywhere else (activations that need gradients, other devices): the float32
  reference.

Triton launches on the current CUDA device, not on its arguments' (a layer that accelerate placed
on cuda:1, `--place cuda:0=...,cuda:1=...`, runs while cuda:0 is current): `on_device(x)` makes
x's GPU current around every Triton path here and in the modules that launch their own
(memfit.kvcache, memfit.moe).

`prepare(weight)` builds a path's one-time state (the CPU kernels' repacked weight; on CUDA
the layer's launch plans, which cut an eager call's host work: memfit.kernels.replay); modules
cache it and drop it on a move. Kernels take tensors and integers only: nothing here imports
memfit.formats.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from memfit.kernels import cpu, replay
from memfit.kernels.reference import linear_reference
from memfit.kernels.weights import IntWeight, dequantize

__all__ = ["IntWeight", "dequantize", "linear", "on_device", "prepare"]


def on_device(t: torch.Tensor):
    """A context making t's CUDA device the current one for the Triton launches inside it (they
    go to the current device, whatever device their tensors are on); nothing to do when it
    already is (on one GPU, always) or off CUDA."""
    d = t.device
    if d.type != "cuda" or d.index is None or d.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(d)


def prepare(weight: IntWeight):
    """The prepared layout of `weight` for its device's fast path (CUDA: the layer's launch
    plans, memfit.kernels.replay), or None."""
    if weight.qdata.device.type == "cuda":  # (a torch.compile trace takes the custom op)
        return replay.Plans() if replay.ENABLED and not torch.compiler.is_compiling() else None
    if weight.tile_rows or weight.qdata.device.type != "cpu":
        return None
    return cpu.prepare_cpu(weight)


def linear(x: torch.Tensor, weight: IntWeight | torch.Tensor, bias: torch.Tensor | None = None,
           cache=None) -> torch.Tensor:
    """(..., in) -> (..., out) for a packed or dense weight (see the module docstring)."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    if weight.tile_rows and x.device.type != "cuda":
        return linear_reference(x, weight, bias)  # the decode loop's GPU layout (untiled there)
    if x.device.type == "cpu" and not needs_grad:
        return cpu.cpu_linear(x, weight, bias, cache)
    if x.device.type == "cuda" and not needs_grad and torch.compiler.is_compiling():
        from memfit.kernels import ops  # one opaque custom op inside a compiled graph
        return ops.call(x, weight, bias)
    fast = _triton() if x.device.type == "cuda" and not needs_grad else None
    if fast is not None:
        with on_device(x):
            if isinstance(cache, replay.Plans):
                y = cache.run(x, weight, bias, fast.plan)
                if y is not None:
                    return y
            y = fast.triton_linear(x, weight, bias)
        if y is not None:
            return y
    return linear_reference(x, weight, bias)


@functools.cache
def _triton():
    """memfit.kernels.triton_int, imported once on first use (None without Triton)."""
    try:
        from memfit.kernels import triton_int
    except ImportError:
        return None
    return triton_int
