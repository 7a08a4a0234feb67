"""`W8A8Linear`: int8 weights per output channel and int8 activations, multiplied in int8.

Buffers (fixed names, the safetensors fields): `qdata` int8 (out, in), the symmetric codes
q - 128 of memfit's 8-bit per-channel grid (`IntFormat(bits=8, group_size=None,
symmetric=True)`, so the weights are exactly a `QuantLinear`'s of that format); `scale` (out, 1)
in the format's scale dtype; `input_scale` float32 (1,), only when activations use one static
per-tensor scale from calibration; optional `bias` in the activation dtype.

Activations are quantized at run time: per token (each row its own max|x| / 127; the default,
"dynamic") or per tensor with the calibrated `input_scale` ("static": cheaper, saturates inputs
beyond the calibrated range). The product runs in int8 with int32 sums (memfit.kernels.int8:
`torch._int_mm` on the CPU, its exact float64 reference where that refuses a shape), then
y = acc * s_x * s_w + b in float32, cast to the activation dtype. SmoothQuant (memfit.smoothquant)
moves activation outliers into the weights before this module is built; it changes nothing here.

Protocol shared with the other packed modules: `nbytes()`, `dequantize(dtype)`, `describe()`.
`model.to(dtype)` never casts `scale`/`input_scale` (their dtype is part of the format).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from memfit.errors import UserError
from memfit.formats.grid import IntFormat
from memfit.formats.intq import PackedIntWeight, apply_keeping_dtypes
from memfit.kernels.int8 import w8a8_linear

W8_FORMAT = IntFormat(bits=8, group_size=None, symmetric=True)
_FIXED_DTYPE = ("qdata", "scale", "input_scale")


def check_w8_format(fmt: IntFormat) -> None:
    if (fmt.bits, fmt.group_size, fmt.symmetric) != (8, None, True):
        raise UserError(f"W8A8 needs 8-bit symmetric per-channel weights (bits: 8, group_size: "
                        f"null, symmetric: true), got {fmt}")


class W8A8Linear(nn.Module):
    """y = dequant(quant(x)) @ dequant(W).T + b, computed as an int8 x int8 matmul."""

    def __init__(self, in_features: int, out_features: int, fmt: IntFormat = W8_FORMAT, *,
                 bias: bool, static: bool = False, device=None, dtype=torch.float32):
        super().__init__()
        check_w8_format(fmt)
        self.in_features, self.out_features, self.fmt, self.static = \
            in_features, out_features, fmt, static
        self.register_buffer("qdata", torch.empty(out_features, in_features, dtype=torch.int8,
                                                  device=device))
        self.register_buffer("scale", torch.empty(out_features, 1, dtype=fmt.torch_scale_dtype,
                                                  device=device))
        if static:
            self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=device))
        else:
            self.input_scale = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_packed(cls, packed: PackedIntWeight, bias: torch.Tensor | None, *,
                    static: bool = False, dtype=torch.float32) -> W8A8Linear:
        """From a packed 8-bit symmetric per-channel weight (a quantizer's output)."""
        check_w8_format(packed.fmt)
        out, k = packed.shape
        m = cls(k, out, packed.fmt, bias=bias is not None, static=static,
                device=packed.qdata.device, dtype=dtype if bias is None else bias.dtype)
        with torch.no_grad():
            m.qdata.copy_((packed.codes().to(torch.int16) - 128).to(torch.int8))
            m.scale.copy_(packed.scale)
            if bias is not None:
                m.bias.copy_(bias)
        return m

    def set_input_scale(self, absmax: float) -> None:
        """The static activation scale from calibration: absmax / 127."""
        if not self.static:
            raise UserError("this W8A8 layer quantizes activations per token; it has no static "
                            "input scale")
        if not (absmax > 0 and math.isfinite(absmax)):
            raise UserError(f"the calibrated activation max {absmax} is not positive; check "
                            "the calibration data")
        with torch.no_grad():
            self.input_scale.fill_(absmax / 127)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out, in) dense weight q * s of `dtype` (the activation rounding is not in it)."""
        return (self.qdata.float() * self.scale.float()).to(dtype)

    def describe(self) -> dict:
        return {"fmt": self.fmt.to_dict(), "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None,
                "static": self.static}

    def nbytes(self) -> int:
        """Stored bytes: int8 codes, scales and the static input scale; bias excluded."""
        return sum(t.numel() * t.element_size() for t in (self.qdata, self.scale, self.input_scale)
                   if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w8a8_linear(x, self.qdata, self.scale, self.bias, self.input_scale)

    def extra_repr(self) -> str:
        acts = "static per-tensor" if self.static else "dynamic per-token"
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 weights "
                f"per channel, int8 activations {acts}, bias={self.bias is not None}")

    def _apply(self, fn, recurse=True):
        apply_keeping_dtypes(self, fn, _FIXED_DTYPE, lambda f: super(W8A8Linear, self)._apply(f, recurse))
        return self
