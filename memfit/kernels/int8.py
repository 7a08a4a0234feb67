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

QMAX = 127


def quantize_per_token(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> ((M, K) int8 codes, (M, 1) float32 scales), one scale per row. The row's
    largest magnitude from its extremes (no |x| tensor); x times the float32 factor promotes to
    float32 in the product itself (no float copy of a 16-bit x): the same values as converting
    first, with two full-size passes fewer (benchmarks/RESULTS.md, session 36)."""
    lo, hi = torch.aminmax(x2, dim=-1, keepdim=True)
    absmax = torch.maximum(hi, -lo).float().clamp_(min=1e-8)  # (M, 1)
    t = torch.mul(x2, QMAX / absmax)  # float32, rounded and clamped in place
    return t.round_().clamp_(-QMAX, QMAX).to(torch.int8), absmax / QMAX


def quantize_per_tensor(x2: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(M, K) float and a () or (1,) float32 scale -> (M, K) int8 codes (saturating)."""
    t = torch.mul(x2, (1.0 / scale.float()).reshape(1, 1))  # (1, 1): promotes 16-bit x
    return t.round_().clamp_(-QMAX, QMAX).to(torch.int8)


def int8_mm_reference(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 x (N, K) int8 -> (M, N) int32, exact, in float64."""
    return (a.double() @ b_t.double().t()).to(torch.int32)


def int8_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 x (N, K) int8 -> (M, N) int32 through torch._int_mm where it accepts the shape."""
    fast = getattr(torch, "_int_mm", None)
    if fast is not None and a.shape[0] > 0:
        try:
            return fast(a, b_t.t())
        except RuntimeError:  # a shape/device this build refuses: the exact reference instead
            pass
    return int8_mm_reference(a, b_t)


def w8a8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
                mm=int8_mm) -> torch.Tensor:
    """(..., K) float -> (..., N) in x's dtype: x quantized per token (or per tensor with the
    static `input_scale`), times the (N, K) int8 weight with (N,) scales, plus bias."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if input_scale is None:
        xq, sx = quantize_per_token(x2)
    else:
        sx = input_scale.float().reshape(1, 1)
        xq = quantize_per_tensor(x2, sx)
    y = torch.mul(mm(xq, w_q), sx).mul_(w_scale.float().reshape(1, -1))  # (M, N) float32
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], w_q.shape[0])
