"""The slow, obviously right matmul for packed integer weights: unpack, dequantize, F.linear.

Semantics every fast path must reproduce: the weight is exactly (q - z) * s computed in float32
(scales and zeros are stored in 16- or 32-bit floats, so float32 holds them and the product of a
small integer with them without loss), the product is accumulated in float32, and the result is
cast to the activation dtype once at the end. This is also the differentiable path (autograd flows
to the activations through F.linear) and the path on devices without a fast kernel.
It materialises the whole dense float32 weight; use it to check kernels, not to run large models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memfit.kernels.weights import IntWeight, dequantize


def linear_reference(x: torch.Tensor, w: IntWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(..., in) activations -> (..., out): F.linear(x, dequantize(w), bias) in float32."""
    weight = dequantize(w)  # (out, in)
    b = None if bias is None else bias.float()
    return F.linear(x.float(), weight, b).to(x.dtype)
