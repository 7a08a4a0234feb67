"""Integer matmul for W8A8 (int8 activations x int8 weights, int32 sums), beside its reference.

- `quantize_per_token(x)`: symmetric int8 codes per row, scale = max|row| / 127 (dynamic: computed
  for every input); `quantize_per_tensor(x, scale)`: one static scale from calibration, codes
  clamped to [-127, 127] (an input larger than the calibrated range saturates).
- `int8_mm(a, b_t)`: (M, K) int8 x (N, K) int8 -> (M, N) int32 through `torch._int_mm` (on the
  CPU in torch 2.13 it takes every M, K, N, including M = 1 and odd K; CUDA needs M > 16 and K, N
  multiples of 8), falling back to `int8_mm_reference` where it refuses the shape or does not
  exist. The weight is passed transposed as a view: measured faster on this CPU than a
  contiguous (K, N) copy at M >= 16 (benchmarks/w8a8.py).
- `int8_mm_reference`: the same sums in float64, exact (|sum| <= 127 * 127 * K < 2**53).

Both paths give identical int32 results (tests/kernels/test_int8.py); the float output is
acc * (activation scale) * (weight scale) in float32.
"""

from __future__ import annotations

import torch

from memfit.kernels.cpu import buffer

QMAX = 127


def _into(name: str, shape, dtype: torch.dtype, reuse: bool, device) -> torch.Tensor:
    """An (M, N) buffer: this thread's kept one when reuse (memfit.kernels.cpu.buffer)."""
    return buffer(name, shape[0] * shape[1], dtype, reuse, device).view(shape)


def quantize_per_token(x2: torch.Tensor, reuse: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> ((M, K) int8 codes, (M, 1) float32 scales), one scale per row. The row's
    largest magnitude from its extremes (no |x| tensor); x times the float32 factor promotes to
    float32 in the product itself (no float copy of a 16-bit x): the same values as converting
    first, with two full-size passes fewer (benchmarks/RESULTS.md, session 36)."""
    lo, hi = torch.aminmax(x2, dim=-1, keepdim=True)
    absmax = torch.maximum(hi, -lo).float().clamp_(min=1e-8)  # (M, 1)
    return _codes(x2, QMAX / absmax, reuse), absmax / QMAX


def quantize_per_tensor(x2: torch.Tensor, scale: torch.Tensor, reuse: bool = False
                        ) -> torch.Tensor:
    """(M, K) float and a () or (1,) float32 scale -> (M, K) int8 codes (saturating)."""
    return _codes(x2, (1.0 / scale.float()).reshape(1, 1), reuse)  # (1, 1): promotes 16-bit x


def _codes(x2: torch.Tensor, factor: torch.Tensor, reuse: bool) -> torch.Tensor:
    """round(x * factor) clamped to +-QMAX as int8, the product in float32 (reuse: in this
    thread's kept buffers, valid until the next call on it)."""
    t = torch.mul(x2, factor, out=_into("w8a8_t", x2.shape, torch.float32, reuse, x2.device))
    t.round_().clamp_(-QMAX, QMAX)
    return _into("w8a8_q", x2.shape, torch.int8, reuse, x2.device).copy_(t)


def int8_mm_reference(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 x (N, K) int8 -> (M, N) int32, exact, in float64."""
    return (a.double() @ b_t.double().t()).to(torch.int32)


def int8_mm(a: torch.Tensor, b_t: torch.Tensor, out: torch.Tensor | None = None
            ) -> torch.Tensor:
    """(M, K) int8 x (N, K) int8 -> (M, N) int32 through torch._int_mm where it accepts the shape
    (into `out`, an (M, N) int32 tensor, when given)."""
    fast = getattr(torch, "_int_mm", None)
    if fast is not None and a.shape[0] > 0:
        try:
            return fast(a, b_t.t()) if out is None else fast(a, b_t.t(), out=out)
        except RuntimeError:  # a shape/device this build refuses: the exact reference instead
            pass
    return int8_mm_reference(a, b_t)


def w8a8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
                mm=int8_mm) -> torch.Tensor:
    """(..., K) float -> (..., N) in x's dtype: x quantized per token (or per tensor with the
    static `input_scale`), times the (N, K) int8 weight with (N,) scales, plus bias."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    # on the CPU without autograd the temporaries live in the thread's kept buffers (memfit's
    # loaders map each large tensor afresh, so fresh ones fault their pages in every call)
    reuse = x2.device.type == "cpu" and not torch.is_grad_enabled() and mm is int8_mm
    if input_scale is None:
        xq, sx = quantize_per_token(x2, reuse)
    else:
        sx = input_scale.float().reshape(1, 1)
        xq = quantize_per_tensor(x2, sx, reuse)
    mn = (x2.shape[0], w_q.shape[0])
    acc = (mm(xq, w_q, out=_into("w8a8_acc", mn, torch.int32, True, x2.device)) if reuse
           else mm(xq, w_q))  # (a user's mm need not take out=)
    y = torch.mul(acc, sx, out=_into("w8a8_y", mn, torch.float32, reuse and x.dtype !=
                                     torch.float32, x2.device))  # float32; returned if float32
    y.mul_(w_scale.float().reshape(1, -1))
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], w_q.shape[0])
