"""Make a compressed student trainable without breaking its format ("healing"), and pack it back.

`make_trainable_(model)` freezes every parameter, then swaps each compressed module for a
trainable stand-in (dispatch: the literal dict `TRAINABLE`, keyed by exact module type):

- `QuantLinear` -> `FakeQuantLinear`: a float32 copy of the dequantized weight and the scale, in
  log space around its packed value (`log_scale`: an Adam step is then a relative change of
  about lr, whatever the scale's size; as an absolute parameter a 4-bit scale of ~1e-3 could
  move by lr per step, a large relative change), are parameters, and the zero point when the
  format stores a float zero (integer and symmetric zeros stay fixed). Forward fake-quantizes
  on the module's exact grid: scale/zero are rounded to their stored dtype, codes =
  clamp(round(w / s + z), 0, qmax) are recomputed every step, and round/dtype-rounding pass
  gradients straight through (STE); w_hat = (q - z) * s.
  At the start w_hat equals the packed weight, and `repack()` stores exactly the w_hat of the
  last forward: same format, same bytes, codes chosen against the stored scale/zero.
- `SparseLinear` -> `MaskedSparseLinear`: only the kept values are parameters (float32, the
  stored order); the structural mask (a bool per weight) is fixed, so the 2:4 / bitmask pattern
  holds by construction; `repack()` rebuilds the same layout from the dense result.
- `SparseLinear` with int-quantized kept values -> `FakeQuantSparseLinear`: a FakeQuantLinear
  whose weight is multiplied by the fixed mask; repacks to the same sparse layout and grid.
- `W8A8Linear` -> `FakeQuantW8A8Linear`: a FakeQuantLinear on its 8-bit weight grid whose
  input is rounded to int8 as the module's int8 product rounds it (straight through); repacks
  to a W8A8Linear of the same activation mode and static scale.
- `LowRankLinear`: float factors are unfrozen and trained as is; quantized factors become
  `FakeQuantLinear`s inside it.
- plain `nn.Linear`: its own parameters are unfrozen and trained as is.

Everything else (embeddings, norms) stays frozen: healing recovers what compression lost in the
compressed layers. `repack_(model)` swaps every stand-in back for its packed module and freezes
the model again. The float copy costs 4 bytes per weight while training, the price of
per-step code recomputation; the saved artifact is as small as before.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from memfit.formats import grid
from memfit.formats.grid import IntFormat
from memfit.formats.intq import PackedIntWeight, zeros_float
from memfit.formats.quant_linear import QuantLinear
from memfit.formats.lowrank import LowRankLinear
from memfit.formats.sparse import SparseIntWeight, SparseLinear, keep_mask
from memfit.formats.w8a8 import W8A8Linear
from memfit.kernels.int8 import QMAX


_MIN_SCALE = 2.0 ** -20  # exactly representable in float16 (subnormal), bfloat16 and float32


def _ste(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Value of `y`, gradient of `x` (straight-through estimator)."""
    return x + (y - x).detach()


class FakeQuantLinear(nn.Module):
    """Trainable stand-in for a `QuantLinear`: float weight + scale (+ float zero), STE forward."""

    def __init__(self, q: QuantLinear):
        super().__init__()
        packed = q.packed()
        self._setup(packed.dequantize(torch.float32), packed.scale, packed.zeros(), q.fmt, q.bias)

    def _setup(self, weight, scale, zeros, fmt: IntFormat, bias) -> None:
        """weight (out, in) float on the grid; scale as stored; zeros (out, n_groups) float32."""
        self.fmt = fmt
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.float().clone())  # (out, in)
        # the scale trains in log space around its packed value (module docstring)
        self.register_buffer("scale0", scale.float().clone())  # (out, n_groups)
        self.log_scale = nn.Parameter(torch.zeros_like(self.scale0))
        zero = zeros.float().clone()
        if not fmt.symmetric and fmt.zero_point == "float":
            self.zero = nn.Parameter(zero)
        else:
            self.register_buffer("zero", zero)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.act_dtype = bias.dtype if bias is not None else torch.float32

    @property
    def scale(self) -> torch.Tensor:
        """(out, n_groups) float32: the packed scale times exp(log_scale) (exactly it at start)."""
        return self.scale0 * self.log_scale.exp()

    def _grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero as the packed format will store them, with straight-through gradients."""
        dtype = self.fmt.torch_scale_dtype
        positive = self.scale.clamp_min(_MIN_SCALE)  # a scale that underflowed to 0
        scale = _ste(positive, positive.to(dtype).float())
        zero = self.zero
        if isinstance(zero, nn.Parameter):
            zero = _ste(zero, zero.to(dtype).float())
        return scale, zero

    def fake_weight(self) -> torch.Tensor:
        """(out, in) float32 weight on the grid: (clamp(round(w / s + z)) - z) * s."""
        g, _ = self.fmt.groups(self.in_features)
        scale, zero = self._grid()
        s = grid.expand_groups(scale, self.in_features, g)  # (out, in)
        z = grid.expand_groups(zero, self.in_features, g)
        x = self.weight / s + z
        q = _ste(x, x.round()).clamp(0, self.fmt.qmax)
        return (q - z) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.fake_weight().to(x.dtype), bias)

    @torch.no_grad()
    def repack(self) -> QuantLinear:
        """A `QuantLinear` of the same format holding exactly the current fake-quantized weight."""
        scale, zero = self._grid()
        codes = grid.quantize(self.weight, scale, zero, self.fmt)  # (out, in) uint8
        stored_zero = None if self.fmt.symmetric else zero
        packed = PackedIntWeight.from_codes(codes, scale, stored_zero, self.fmt)
        q = QuantLinear(self.in_features, self.out_features, self.fmt, self.bias is not None,
                        device=self.weight.device, dtype=self.act_dtype)
        q.load_packed(packed, self.bias)
        return q

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


class MaskedSparseLinear(nn.Module):
    """Trainable stand-in for a `SparseLinear`: the kept values train, the pattern is fixed."""

    def __init__(self, m: SparseLinear):
        super().__init__()
        fmt = m.weight_format()
        self.layout, self.fmt_cls = m.layout, type(fmt)
        self.in_features, self.out_features = m.in_features, m.out_features
        # every stored slot (a kept position, even one holding 0) marked True; row-major order
        # of the mask is the stored order of `values` in both layouts
        ones = replace(fmt, values=torch.ones_like(fmt.values))
        self.register_buffer("mask", ones.to_dense() != 0)  # (out, in) bool
        self.values = nn.Parameter(fmt.values.detach().float().flatten().clone())  # (kept,)
        self.register_buffer("bias", None if m.bias is None else m.bias.detach().clone())
        self.value_dtype = fmt.values.dtype

    def dense_weight(self) -> torch.Tensor:
        zeros = torch.zeros(self.mask.shape, dtype=self.values.dtype, device=self.values.device)
        return zeros.masked_scatter(self.mask, self.values)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dense_weight().to(x.dtype), bias)

    @torch.no_grad()
    def repack(self) -> SparseLinear:
        dense = self.dense_weight().to(self.value_dtype)
        return SparseLinear(self.fmt_cls.from_dense(dense), self.bias)


class FakeQuantSparseLinear(FakeQuantLinear):
    """Trainable stand-in for a `SparseLinear` with int-quantized kept values: FakeQuantLinear's
    STE grid times the fixed mask (pruned weights get no gradient and stay 0)."""

    def __init__(self, m: SparseLinear):
        nn.Module.__init__(self)
        fmt = m.weight_format()
        self.layout = m.layout
        self.register_buffer("mask", keep_mask(m.layout, fmt.pattern, fmt.shape))
        zeros = zeros_float(fmt.zero, fmt.fmt, *fmt.scale.shape, fmt.scale.device)
        self._setup(fmt.to_dense(), fmt.scale, zeros, fmt.fmt, m.bias)

    def fake_weight(self) -> torch.Tensor:
        return super().fake_weight() * self.mask

    @torch.no_grad()
    def repack(self) -> SparseLinear:
        scale, zero = self._grid()
        w_hat = self.fake_weight()
        stored_zero = None if self.fmt.symmetric else zero
        return SparseLinear(SparseIntWeight.from_dense(w_hat, scale, stored_zero, self.fmt,
                                                       self.layout), self.bias)


class FakeQuantW8A8Linear(FakeQuantLinear):
    """Trainable stand-in for a `W8A8Linear`: FakeQuantLinear's STE grid for its 8-bit weights
    (the same grid as a QuantLinear's), and its activations rounded as the int8 product rounds
    them (per token by max|x| / 127, or by the fixed calibrated scale), straight through."""

    def __init__(self, m: W8A8Linear):
        nn.Module.__init__(self)
        self.static = m.static
        self.register_buffer("input_scale", None if m.input_scale is None
                             else m.input_scale.detach().clone())
        zeros = zeros_float(None, m.fmt, m.out_features, 1, m.scale.device)
        self._setup(m.dequantize(torch.float32), m.scale, zeros, m.fmt, m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is None:  # per token, as memfit.kernels.int8.quantize_per_token
            sx = x.detach().abs().amax(-1, keepdim=True).float().clamp_min(1e-8) / QMAX
        else:
            sx = self.input_scale.float()
        xf = x.float()
        x_hat = _ste(xf, (xf / sx).round().clamp(-QMAX, QMAX) * sx)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x_hat, self.fake_weight(), bias).to(x.dtype)

    @torch.no_grad()
    def repack(self) -> W8A8Linear:
        q = super().repack()
        w = W8A8Linear.from_packed(q.packed(), self.bias, static=self.static,
                                   dtype=self.act_dtype)
        if self.static:
            w.input_scale.copy_(self.input_scale)
        return w


def _sparse(m: SparseLinear) -> nn.Module:
    return MaskedSparseLinear(m) if m.fmt is None else FakeQuantSparseLinear(m)


def _unfreeze(m: nn.Module) -> nn.Module:
    m.requires_grad_(True)
    return m


def _lowrank(m: LowRankLinear) -> LowRankLinear:
    for name in ("down", "up"):
        child = getattr(m, name)
        setattr(m, name, FakeQuantLinear(child) if isinstance(child, QuantLinear) else _unfreeze(child))
    return m


# exact module type -> function returning its trainable form (the module itself when it trains as is)
TRAINABLE = {
    QuantLinear: FakeQuantLinear,
    SparseLinear: _sparse,
    LowRankLinear: _lowrank,
    W8A8Linear: FakeQuantW8A8Linear,
    nn.Linear: _unfreeze,
}
_STAND_INS = (FakeQuantLinear, MaskedSparseLinear)  # FakeQuantSparseLinear is a FakeQuantLinear


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)


def make_trainable_(model: nn.Module, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Freeze `model`, then make each compressed/linear module trainable; return their names.

    `skip`: module names (or name suffixes, e.g. "lm_head") left frozen."""
    model.requires_grad_(False)
    names = []
    for name, m in list(model.named_modules()):
        make = TRAINABLE.get(type(m))
        skipped = any(name == s or name.endswith("." + s) for s in skip)
        if make is None or skipped or any(name.startswith(n + ".") for n in names):
            continue  # also skips the two nn.Linear inside an already handled LowRankLinear
        new = make(m)
        if new is not m:
            _swap(model, name, new)
        names.append(name)
    return names


def repack_(model: nn.Module) -> int:
    """Swap every trainable stand-in back for its packed module; freeze the model. -> count."""
    stand_ins = [(n, m) for n, m in model.named_modules() if isinstance(m, _STAND_INS)]
    for name, m in stand_ins:
        _swap(model, name, m.repack())
    model.requires_grad_(False)
    return len(stand_ins)
