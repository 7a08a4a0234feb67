"""`QuantLinear`: an nn.Module shell around a `PackedIntWeight`, a drop-in for nn.Linear.

Buffers (the `PackedIntWeight` field names, so a state dict is the safetensors file):
`qdata`, `scale`, `zero` (absent when symmetric) and optional `bias`. All are buffers, not
parameters: the packed weight is not trained; `bias` is kept in the layer's activation dtype.

Choices:
- The constructor allocates empty buffers of the right shapes/dtypes, so a model can be built on
  the meta device and filled by `load_state_dict(..., assign=True)` or `to_empty` + load.
- `model.to(dtype)` never casts `scale`/`zero`: their dtype is part of the format and a cast
  would change the weights. Device moves apply to them as usual; `bias` follows the dtype.
- The packed-module protocol (shared with SparseLinear, LowRankLinear, QuantEmbedding):
  `nbytes()` stored weight bytes (format tensors, bias excluded), `dequantize(dtype)` the dense
  (out, in) weight, `describe()` the JSON description memfit.io.save writes.
- forward: one call to `memfit.kernels.linear`, which picks the path by device, dtype and
  layout. The buffers were checked when they were loaded (`load_packed`, or a state dict that
  `packed()` checks on demand); forward hands the kernels a plain view and checks nothing. The
  kernels' prepared layout is cached on first use (plain attribute, never saved, rebuilt after a
  move or a state-dict load) and reported by `cache_nbytes()`.
"""

from __future__ import annotations

import torch
from torch import nn

from memfit.errors import UserError
from memfit.formats.grid import IntFormat
from memfit.formats.intq import PackedIntWeight, apply_keeping_dtypes, field_specs, kernel_weight
from memfit import kernels

_FIXED_DTYPE = ("qdata", "scale", "zero")


class QuantLinear(nn.Module):
    """y = x @ dequantize(W).T + b with W stored packed in an `IntFormat`."""

    tile_rows = 0  # > 0 only inside memfit.fastdecode's decode loop (buffers tiled in place)
    held_bits = 0  # > 0 only there too: 3-bit codes held widened to 4 bits (weights.widen)

    def __init__(self, in_features: int, out_features: int, fmt: IntFormat, bias: bool,
                 device=None, dtype: torch.dtype = torch.float16):
        super().__init__()
        if not isinstance(fmt, IntFormat):
            raise UserError(f"fmt must be an IntFormat, got {type(fmt).__name__}")
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        for name, (shape, dt) in field_specs(fmt, out_features, in_features).items():
            self.register_buffer(name, torch.empty(shape, dtype=dt, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self._cpu_cache = None
        self._cache_ready = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, codes: torch.Tensor, scale: torch.Tensor,
                    zero: torch.Tensor | None, fmt: IntFormat) -> "QuantLinear":
        """Build from an nn.Linear and an algorithm's codes/scale/zero for its weight."""
        if tuple(codes.shape) != tuple(linear.weight.shape):
            raise UserError(f"codes have shape {tuple(codes.shape)} but the linear's weight is "
                            f"{tuple(linear.weight.shape)}; quantize this layer's own weight")
        packed = PackedIntWeight.from_codes(codes, scale, zero, fmt)
        has_bias = linear.bias is not None
        dtype = linear.bias.dtype if has_bias else linear.weight.dtype
        m = cls(linear.in_features, linear.out_features, fmt, has_bias,
                device=packed.qdata.device, dtype=dtype)
        m.load_packed(packed, None if not has_bias else linear.bias.detach())
        return m

    def load_packed(self, packed: PackedIntWeight, bias: torch.Tensor | None = None) -> None:
        """Copy a packed weight (and bias) into this layer's buffers."""
        if packed.shape != (self.out_features, self.in_features) or packed.fmt != self.fmt:
            raise UserError(f"packed weight {packed.shape} {packed.fmt} does not match layer "
                            f"{(self.out_features, self.in_features)} {self.fmt}")
        with torch.no_grad():
            for name, t in packed.tensors().items():
                getattr(self, name).copy_(t)
            if bias is not None:
                self.bias.copy_(bias)
        self._drop_cache()

    def packed(self) -> PackedIntWeight:
        """The buffers as a `PackedIntWeight` (shared storage, checked)."""
        return PackedIntWeight(self.qdata, self.scale, getattr(self, "zero", None),
                               (self.out_features, self.in_features), self.fmt)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out, in) dense weight of `dtype`."""
        return self.packed().dequantize(dtype)

    def describe(self) -> dict:
        return {"fmt": self.fmt.to_dict(), "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None}

    def kernel_weight(self):
        """The plain view memfit.kernels reads (no checks)."""
        return kernel_weight(self.qdata, self.scale, getattr(self, "zero", None),
                             (self.out_features, self.in_features), self.fmt, self.tile_rows,
                             self.held_bits)

    def hold(self, w) -> None:
        """Point the buffers at an IntWeight's tensors of this layer, in the layout it says
        (`w.tile_rows`, `w.bits`: memfit.fastdecode's decode loop tiles or widens them in place,
        then puts them back)."""
        self.qdata, self.scale = w.qdata, w.scale
        if w.zero is not None:
            self.zero = w.zero
        self.tile_rows = w.tile_rows
        self.held_bits = 0 if w.bits == self.fmt.bits else w.bits
        self._drop_cache()  # a kernel layout prepared from the other layout is stale

    # False: never prepare a kernel layout (a module whose weights are offloaded between calls,
    # memfit.parallel.place: the layout would outlive them, and rebuilding it every call cost
    # 5.5x the tiled path's time at 4096 x 4096)
    keep_layout = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.kernel_weight()
        if not self._cache_ready:
            self._cpu_cache = kernels.prepare(w) if self.keep_layout else None
            self._cache_ready = True
        return kernels.linear(x, w, self.bias, self._cpu_cache)

    def _drop_cache(self) -> None:
        self._cpu_cache = None
        self._cache_ready = False

    def nbytes(self) -> int:
        """Bytes of the stored format (qdata + scale + zero), bias excluded."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size()
                   for n in field_specs(self.fmt, self.out_features, self.in_features))

    def cache_nbytes(self) -> int:
        """Extra bytes held by the prepared CPU kernel layout (0 until the first CPU forward)."""
        return 0 if self._cpu_cache is None else self._cpu_cache.nbytes

    def bits_per_weight(self) -> float:
        return 8 * self.nbytes() / (self.out_features * self.in_features)

    def extra_repr(self) -> str:
        g = "channel" if self.fmt.group_size is None else self.fmt.group_size
        kind = "sym" if self.fmt.symmetric else f"asym/{self.fmt.zero_point} zero"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.fmt.bits}, group={g}, {kind}, scale={self.fmt.scale_dtype}, "
                f"bias={self.bias is not None}, bpw={self.bits_per_weight():.3f}")

    # --- keep the format's dtypes through .to()/.half(); forget the cache on any move ------------

    def _apply(self, fn, recurse=True):
        apply_keeping_dtypes(self, fn, _FIXED_DTYPE, lambda f: super(QuantLinear, self)._apply(f, recurse))
        self._drop_cache()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._drop_cache()
