"""The integer grid shared by every weight-quantization format and algorithm.

A weight W of shape (out, in) is split along its input dimension into groups of `group_size`
columns (or one group per output row when `group_size is None`). Each (row, group) has a scale s
and a zero point z, and every weight is stored as an unsigned code q in [0, 2**bits - 1]:

    W ≈ (q - z) * s

- asymmetric, integer zero: z is an integer in [0, 2**bits - 1] (packed at `bits` bits);
- asymmetric, float zero (HQQ-style): z is a real number stored in the scale dtype;
- symmetric: z = 2**(bits - 1) for every group, nothing stored.

Ragged rule: when `group_size` does not divide `in`, the last group of each row is shorter
(ceil(in / group_size) groups). Nothing is padded and nothing is counted twice; the scale of the
short group is computed over its real columns only. A group size larger than `in` is an error
(it divides nothing), never a silent switch to per-channel.

Algorithms choose values (scales, zeros, codes) on this grid; formats choose bytes.

`gguf_exact=True` keeps the grid on one that GGUF's block types store exactly (see
memfit.io.gguf_blocks): symmetric formats need nothing more than float16 scales (Q8_0, Q4_0:
w = d * (q - z)); an asymmetric one is stored by GGUF as w = d * q + m with m in float16 too, so
the scale keeps only 11 - bits significant bits, which makes m = -z * s exact in float16 for every
integer zero z < 2**bits (a change of at most 2**-(11 - bits) of the scale, chosen before the codes
like every other rounding here; scales under 2**-(14 + bits), groups of near-zero weights, are
raised to that floor so m stays on float16's grid).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from memfit.errors import UserError

SUPPORTED_BITS = (2, 3, 4, 8)
_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True, kw_only=True)
class IntFormat:
    """Group-wise integer weight format. `group_size=None` means one group per output channel."""

    bits: int = 4
    group_size: int | None = 64
    symmetric: bool = False
    zero_point: str = "int"  # "int" (packed integer) or "float" (HQQ-style real zero)
    scale_dtype: str = "float16"
    gguf_exact: bool = False  # scales GGUF stores exactly (Q8_0/Q4_0/Q4_1), see the module doc

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise UserError(f"bits={self.bits} is not supported; use one of {SUPPORTED_BITS}")
        if self.group_size is not None and (self.group_size < 8 or self.group_size % 8):
            raise UserError(
                f"group_size={self.group_size} is invalid; use a multiple of 8 (e.g. 32, 64, 128) "
                "or null for per-channel")
        if self.zero_point not in ("int", "float"):
            raise UserError(f"zero_point={self.zero_point!r} is invalid; use 'int' or 'float'")
        if self.symmetric and self.zero_point == "float":
            raise UserError("a symmetric format has no zero point; drop zero_point='float'")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise UserError(
                f"scale_dtype={self.scale_dtype!r} is invalid; use one of {sorted(_SCALE_DTYPES)}")
        if not isinstance(self.gguf_exact, bool):
            raise UserError(f"gguf_exact={self.gguf_exact!r} must be true or false")
        if self.gguf_exact and (self.scale_dtype != "float16" or self.zero_point != "int"):
            raise UserError("gguf_exact needs scale_dtype float16 and integer zero points (GGUF "
                            "stores float16 scales and a float16 minimum)")

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return _SCALE_DTYPES[self.scale_dtype]

    def groups(self, in_features: int) -> tuple[int, int]:
        """(group size, number of groups) for a row of `in_features` columns (ragged last group)."""
        g = in_features if self.group_size is None else self.group_size
        if g > in_features:
            raise UserError(
                f"group_size={g} is larger than the input width {in_features}; it divides nothing. "
                "Use a smaller group size or per-channel (group_size: null)")
        return g, -(-in_features // g)

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        """Exact stored bits per weight: codes + scales + stored zero points."""
        _, n_groups = self.groups(in_features)
        sbits = torch.finfo(self.torch_scale_dtype).bits
        zbits = 0 if self.symmetric else (self.bits if self.zero_point == "int" else sbits)
        total = out_features * in_features * self.bits + out_features * n_groups * (sbits + zbits)
        return total / (out_features * in_features)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "IntFormat":
        return cls(**d)


def expand_groups(t: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """(out, n_groups) per-group values -> (out, in) per-column values (ragged last group)."""
    if t.shape[1] * group_size == in_features:
        return t.repeat_interleave(group_size, dim=1)
    idx = torch.arange(in_features, device=t.device) // group_size
    return t[:, idx]


def group_view(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) -> ((out, n_groups, group_size) values, same-shape bool mask of real columns).

    The ragged tail is padded by repeating the row's last column, so min/max are unchanged;
    the mask marks the real columns for statistics that would be skewed by repeats (e.g. sums).
    """
    out, k = w.shape
    n_groups = -(-k // group_size)
    pad = n_groups * group_size - k
    mask = torch.ones(out, n_groups * group_size, dtype=torch.bool, device=w.device)
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out, pad)], dim=1)
        mask[:, k:] = False
    return w.view(out, n_groups, group_size), mask.view(out, n_groups, group_size)


def minmax_params(w: torch.Tensor, fmt: IntFormat, shrink: float | torch.Tensor = 1.0):
    """Scale and zero per (row, group) from the min/max of each group, optionally shrunk.

    `shrink` multiplies the range (1.0 = plain min-max; < 1 clips outliers; a tensor of shape
    (out, n_groups) gives a per-group factor, used by the MSE clipping search).
    Returns (scale, zero), each (out, n_groups) float32; zero is integer-valued for "int" zeros.
    """
    g, _ = fmt.groups(w.shape[1])
    wg, _ = group_view(w.float(), g)
    if isinstance(shrink, torch.Tensor):
        shrink = shrink.unsqueeze(-1)
    wmin = (wg.amin(dim=-1, keepdim=True) * shrink).clamp(max=0).squeeze(-1)
    wmax = (wg.amax(dim=-1, keepdim=True) * shrink).clamp(min=0).squeeze(-1)
    if fmt.symmetric:
        half = 2 ** (fmt.bits - 1)
        absmax = torch.maximum(wmin.abs(), wmax)
        scale = absmax / (half - 1) if fmt.bits > 1 else absmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.full_like(scale, float(half))
        return scale, zero
    scale = (wmax - wmin) / fmt.qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = -wmin / scale
    if fmt.zero_point == "int":
        zero = zero.round().clamp(0, fmt.qmax)
    return scale, zero


def round_params(scale: torch.Tensor, zero: torch.Tensor, fmt: IntFormat):
    """Round scale (and a float zero) to their stored dtypes, so codes are chosen against the
    exact values the artifact will hold. Returns float32 tensors."""
    if fmt.gguf_exact and not fmt.symmetric:
        scale = _short_scale(scale.float(), 11 - fmt.bits)
    scale = scale.to(fmt.torch_scale_dtype).float()
    if not fmt.symmetric and fmt.zero_point == "float":
        zero = zero.to(fmt.torch_scale_dtype).float()
    return scale, zero


def _short_scale(scale: torch.Tensor, keep: int) -> torch.Tensor:
    """Each scale rounded to `keep` significant bits, at least 2**(keep - 25) so its last bit is
    no finer than float16's 2**-24: then z * scale (z < 2**(11 - keep)) is a float16 value."""
    m, e = torch.frexp(scale.clamp(min=2.0 ** (keep - 25)))  # scale = m * 2**e, m in [0.5, 1)
    return torch.ldexp(torch.round(m * 2.0**keep), e - keep)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """(out, in) weights -> (out, in) uint8 codes on the grid given by per-group scale/zero."""
    g, _ = fmt.groups(w.shape[1])
    s = expand_groups(scale, w.shape[1], g)
    z = expand_groups(zero, w.shape[1], g)
    q = torch.round(w.float() / s + z).clamp_(0, fmt.qmax)
    return q.to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: IntFormat,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(out, in) codes + per-group scale/zero -> (out, in) weights of `dtype`."""
    g, _ = fmt.groups(codes.shape[1])
    s = expand_groups(scale.float(), codes.shape[1], g)
    z = expand_groups(zero.float(), codes.shape[1], g)
    return ((codes.float() - z) * s).to(dtype)


def fake_quantize(w: torch.Tensor, fmt: IntFormat, shrink: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Min-max round trip of `w` on `fmt` (what plain RTN would give), float32."""
    scale, zero = round_params(*minmax_params(w, fmt, shrink), fmt)
    return dequantize(quantize(w, scale, zero, fmt), scale, zero, fmt)
