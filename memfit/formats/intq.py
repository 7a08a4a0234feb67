"""`PackedIntWeight`: the stored bytes of one group-wise integer weight (see `grid.py` for the math).

Fields (fixed names, shared with `QuantLinear` buffers and the safetensors files):

- `qdata`  uint8 (out, ceil(in * bits / 8)): the codes, packed per row by `packing.pack`;
- `scale`  (out, n_groups) in `fmt.scale_dtype`;
- `zero`   zero_point="int": uint8 (out, ceil(n_groups * bits / 8)), integer zeros packed at `bits`;
           zero_point="float": (out, n_groups) in `fmt.scale_dtype`; symmetric: None (z = 2**(bits-1));
- `shape`  (out, in) of the dense weight;  `fmt` the `IntFormat`.

Every constraint is checked at construction, so a `PackedIntWeight` that exists is consistent.
`from_codes` refuses scales/zeros that its storage dtype would change (use `grid.round_params`
first): the stored artifact must reproduce exactly the weights the algorithm chose.
`nbytes` is the sum of the stored tensors' bytes and equals `format_nbytes(fmt, out, in)`.
"""

from __future__ import annotations

import torch

from memfit.errors import UserError
from memfit.formats import grid
from memfit.formats.grid import IntFormat
from memfit.kernels.packing import pack, packed_width, unpack
from memfit.kernels.weights import IntWeight


def field_specs(fmt: IntFormat, out_features: int, in_features: int) -> dict:
    """{name: (shape, dtype)} of every stored tensor of this format (zero absent when symmetric)."""
    _, n_groups = fmt.groups(in_features)
    specs = {
        "qdata": ((out_features, packed_width(in_features, fmt.bits)), torch.uint8),
        "scale": ((out_features, n_groups), fmt.torch_scale_dtype),
    }
    if not fmt.symmetric:
        if fmt.zero_point == "int":
            specs["zero"] = ((out_features, packed_width(n_groups, fmt.bits)), torch.uint8)
        else:
            specs["zero"] = ((out_features, n_groups), fmt.torch_scale_dtype)
    return specs


def format_nbytes(fmt: IntFormat, out_features: int, in_features: int) -> int:
    """Stored bytes of an (out, in) weight in `fmt`: packed codes + scales + stored zeros."""
    total = 0
    for shape, dtype in field_specs(fmt, out_features, in_features).values():
        total += shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()
    return total


class PackedIntWeight:
    """Packed group-wise integer weight; construct with `from_codes` or `from_tensors`."""

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 shape: tuple[int, int], fmt: IntFormat):
        if not isinstance(fmt, IntFormat):
            raise UserError(f"fmt must be an IntFormat, got {type(fmt).__name__}")
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2 or min(shape) < 1:
            raise UserError(f"shape must be (out, in) with positive sizes, got {shape}")
        given = {"qdata": qdata, "scale": scale, "zero": zero}
        specs = field_specs(fmt, *shape)
        if fmt.symmetric and zero is not None:
            raise UserError("a symmetric format stores no zero point; pass zero=None")
        for name, (want_shape, want_dtype) in specs.items():
            t = given[name]
            if t is None:
                raise UserError(f"{name} is missing; {fmt} stores it with shape {want_shape}")
            if tuple(t.shape) != want_shape or t.dtype != want_dtype:
                raise UserError(
                    f"{name} has shape {tuple(t.shape)} and dtype {t.dtype}, but a {shape} weight "
                    f"in {fmt} needs shape {want_shape} and dtype {want_dtype}")
        devices = {t.device for t in given.values() if t is not None}
        if len(devices) > 1:
            raise UserError(f"qdata/scale/zero are on different devices {devices}; move them together")
        self.qdata, self.scale, self.zero = qdata, scale, zero
        self.shape, self.fmt = shape, fmt

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   fmt: IntFormat) -> "PackedIntWeight":
        """Pack an algorithm's output: codes (out, in) uint8, scale/zero (out, n_groups) float."""
        if codes.dim() != 2 or codes.dtype != torch.uint8:
            raise UserError(f"codes must be (out, in) uint8, got {codes.dtype} {tuple(codes.shape)}")
        out, k = codes.shape
        _, n_groups = fmt.groups(k)
        if tuple(scale.shape) != (out, n_groups):
            raise UserError(f"scale has shape {tuple(scale.shape)}; expected {(out, n_groups)}")
        stored_scale = _exact_cast(scale, fmt.torch_scale_dtype, "scale")
        if not torch.isfinite(stored_scale).all():
            raise UserError("scale has inf/nan entries; fix the quantizer's scale search")
        stored_zero = _store_zero(zero, fmt, (out, n_groups))
        return cls(pack(codes, fmt.bits), stored_scale, stored_zero, (out, k), fmt)

    @classmethod
    def from_tensors(cls, d: dict[str, torch.Tensor], fmt: IntFormat,
                     shape: tuple[int, int]) -> "PackedIntWeight":
        """Rebuild from `tensors()` output (e.g. read back from safetensors)."""
        unknown = set(d) - {"qdata", "scale", "zero"}
        if unknown:
            raise UserError(f"unexpected tensors {sorted(unknown)} for a packed int weight")
        return cls(d.get("qdata"), d.get("scale"), d.get("zero"), shape, fmt)

    # --- views --------------------------------------------------------------------------------

    @property
    def n_groups(self) -> int:
        return self.fmt.groups(self.shape[1])[1]

    @property
    def group_size(self) -> int:
        return self.fmt.groups(self.shape[1])[0]

    def codes(self) -> torch.Tensor:
        """(out, in) uint8 codes."""
        return unpack(self.qdata, self.fmt.bits, self.shape[1])

    def zeros(self) -> torch.Tensor:
        """(out, n_groups) float32 zero points (constant 2**(bits-1) when symmetric)."""
        return zeros_float(self.zero, self.fmt, self.shape[0], self.n_groups, self.scale.device)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out, in) dense weight (q - z) * s, computed in float32 then cast to `dtype`."""
        return grid.dequantize(self.codes(), self.scale.float(), self.zeros(), self.fmt, dtype)

    def kernel_weight(self) -> IntWeight:
        """The plain-tensor view memfit.kernels reads (no checks: this object was checked)."""
        return kernel_weight(self.qdata, self.scale, self.zero, self.shape, self.fmt)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by field name (no zero when symmetric)."""
        d = {"qdata": self.qdata, "scale": self.scale}
        if self.zero is not None:
            d["zero"] = self.zero
        return d

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def __repr__(self) -> str:
        return f"PackedIntWeight(shape={self.shape}, fmt={self.fmt}, nbytes={self.nbytes})"


def kernel_weight(qdata, scale, zero, shape: tuple[int, int], fmt: IntFormat,
                  tile_rows: int = 0, bits: int = 0) -> IntWeight:
    """An `IntWeight` from stored fields of `fmt` (no validation: callers hold checked tensors);
    tile_rows > 0: the fields hold memfit.kernels.weights.tile's layout (the decode loop's);
    bits > 0: codes of that width instead of the format's (the decode loop's widened 3-bit
    weights, memfit.kernels.weights.widen)."""
    zero_point = "sym" if fmt.symmetric else fmt.zero_point
    return IntWeight(qdata, scale, zero, tuple(shape), bits or fmt.bits, fmt.groups(shape[1])[0],
                     zero_point, tile_rows)


def apply_keeping_dtypes(module, fn, names: tuple[str, ...], parent_apply) -> None:
    """`nn.Module._apply` for a module whose buffers `names` have a dtype that belongs to its
    format (scale, zero): `fn` may move them to another device but never cast them."""
    order = list(module._buffers)
    fixed = {n: module._buffers.pop(n) for n in names if module._buffers.get(n) is not None}
    try:
        parent_apply(fn)
    finally:
        for n, t in fixed.items():
            moved = fn(t)
            if moved.dtype != t.dtype:  # a dtype cast: move the device only
                moved = t.to(device=moved.device)
            module._buffers[n] = moved
        buffers = {n: module._buffers[n] for n in order}  # keep the state-dict key order
        module._buffers.clear()
        module._buffers.update(buffers)


def zeros_float(zero: torch.Tensor | None, fmt: IntFormat, out: int, n_groups: int,
                device: torch.device) -> torch.Tensor:
    """Stored zero field -> (out, n_groups) float32 zero points."""
    if fmt.symmetric:
        return torch.full((out, n_groups), float(2 ** (fmt.bits - 1)), device=device)
    if fmt.zero_point == "int":
        return unpack(zero, fmt.bits, n_groups).float()
    return zero.float()


def _exact_cast(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    stored = t.to(dtype)
    if not torch.equal(stored.float(), t.float()):
        err = (stored.float() - t.float()).abs().max().item()
        raise UserError(
            f"{name} is not exactly representable in {dtype} (max change {err:.3g}); the codes "
            f"were chosen against other values. Round with memfit.formats.grid.round_params "
            f"before quantizing")
    return stored.contiguous()


def _store_zero(zero: torch.Tensor | None, fmt: IntFormat, shape: tuple[int, int]):
    if fmt.symmetric:
        half = float(2 ** (fmt.bits - 1))
        if zero is not None and not bool((zero.float() == half).all()):
            raise UserError(f"a symmetric {fmt.bits}-bit format has zero = {half:g} everywhere; "
                            "got other values (quantize with a symmetric format or pass None)")
        return None
    if zero is None or tuple(zero.shape) != shape:
        got = None if zero is None else tuple(zero.shape)
        raise UserError(f"zero must have shape {shape} for an asymmetric format, got {got}")
    if fmt.zero_point == "float":
        return _exact_cast(zero, fmt.torch_scale_dtype, "zero")
    z = zero.float()
    if not bool(((z == z.round()) & (z >= 0) & (z <= fmt.qmax)).all()):
        raise UserError(f"integer zero points must be whole numbers in [0, {fmt.qmax}]; "
                        "round them (grid.minmax_params does) or use zero_point='float'")
    return pack(z.to(torch.uint8), fmt.bits)
