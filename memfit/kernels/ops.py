"""memfit's CUDA int linear as a torch custom op, so that torch.compile sees one opaque call
(its Triton launch, kernel choice and fallback stay eager Python) instead of tracing into it.
No `from __future__ import annotations` here: the op's schema is read from real annotations."""

from typing import Optional

import torch

from memfit.kernels.reference import linear_reference
from memfit.kernels.weights import IntWeight


@torch.library.custom_op("memfit::int_linear", mutates_args=())
def int_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
               zero: Optional[torch.Tensor], bias: Optional[torch.Tensor], out_features: int,
               in_features: int, bits: int, group_size: int, zero_point: str,
               tile_rows: int = 0) -> torch.Tensor:
    """memfit.kernels.triton_int.triton_linear (the reference where it cannot take the layout)."""
    from memfit.kernels import on_device, triton_int
    w = IntWeight(qdata, scale, zero, (out_features, in_features), bits, group_size, zero_point,
                  tile_rows)
    with on_device(x):
        y = triton_int.triton_linear(x, w, bias)
    return linear_reference(x, w, bias) if y is None else y


@int_linear.register_fake
def _(x, qdata, scale, zero, bias, out_features, in_features, bits, group_size, zero_point,
      tile_rows=0):
    return x.new_empty(*x.shape[:-1], out_features)


def call(x: torch.Tensor, w: IntWeight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return int_linear(x, w.qdata, w.scale, w.zero, bias, w.shape[0], w.shape[1], w.bits,
                      w.group_size, w.zero_point, w.tile_rows)
