"""Storage formats for pruned weights, and their nn.Module shell (low-rank: formats/lowrank.py).

- `BitmaskWeight`: any sparsity pattern. `values` holds the non-zeros in row-major order, and
  `bitmask` one bit per weight (bit b of byte i is weight 8i+b of the flattened matrix, so
  little-endian within a byte; padding bits are 0). At 50% in fp16: 1 + 1/8 bytes per weight,
  0.5625× dense.
- `Sparse24Weight`: the 2:4 layout sparse tensor cores read. Every group of 4 consecutive inputs
  keeps exactly 2 slots: `values` (out, in/2) and `indices`, the 2-bit positions (0..3) of each
  slot inside its group, packed 4 per byte (slot 4i+b in bits 2b..2b+1 of byte i, row-major).
  In a group the two positions are strictly increasing; a group with fewer than 2 non-zeros
  fills its free slots with the lowest unused positions and value 0, so the encoding of a
  matrix is unique. fp16: 0.5625× dense, like the bitmask at 50%, but with a fixed layout.
- `SparseIntWeight`: either layout whose kept values are integer codes on a group-wise grid
  (pruning composed with quantization). `qdata` packs the kept codes, row-major, as one bit
  stream at `fmt.bits` bits each (memfit.kernels.packing's layout for a single row); `scale` and
  `zero` are the grid of the *dense* columns, stored exactly as `PackedIntWeight` stores them
  (so groups mean the same thing with and without sparsity). A weight is (q - z)·s at a kept
  position and 0 elsewhere. 50% + int4 g64 with fp16 scales: 1 (mask) + 2 (codes) + 0.31
  bits per weight, 0.77× dense int4 g64 (4.31); 2:4 + int4 costs the same.
- `SparseLinear` holds any of these formats as buffers. Its forward multiplies through the dense
  rows rebuilt a tile at a time (memfit.formats.sparse_rows; bounded temporaries), or, for 2:4
  with 16-bit float values on CUDA, through cuSPARSELt: memory saved at rest, not compute.

Round trips are exact in value: `to_dense(from_dense(w))` equals `w` elementwise (a −0.0 is a
zero and comes back as +0.0). `nbytes` counts the stored tensors, not the shape metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from memfit import kernels
from memfit.errors import UserError
from memfit.formats import grid
from memfit.formats.grid import IntFormat
from memfit.formats.intq import (PackedIntWeight, apply_keeping_dtypes, field_specs,
                                 kernel_weight)
from memfit.formats.sparse_rows import (dense_rows, kernel_layout, pack_2bit, pack_bits,
                                        row_offsets, unpack_2bit, unpack_bits)
from memfit.kernels import cpu
from memfit.kernels.packing import pack, packed_width

TILE_WEIGHTS = 1 << 20  # weights rebuilt dense per tile in SparseLinear's forward (whole rows)



@dataclass(frozen=True)
class BitmaskWeight:
    values: torch.Tensor   # (nnz,) non-zeros, row-major
    bitmask: torch.Tensor  # (ceil(out*in/8),) uint8
    shape: tuple[int, int]

    def __post_init__(self):
        object.__setattr__(self, "shape", _check_shape(self.shape))
        n = self.shape[0] * self.shape[1]
        if self.values.dim() != 1:
            raise UserError(f"BitmaskWeight.values must be 1-D, got {tuple(self.values.shape)}")
        if self.bitmask.dtype != torch.uint8 or tuple(self.bitmask.shape) != (-(-n // 8),):
            raise UserError(f"BitmaskWeight.bitmask must be uint8 of shape ({-(-n // 8)},) for "
                            f"shape {self.shape}, got {self.bitmask.dtype} "
                            f"{tuple(self.bitmask.shape)}")
        bits = unpack_bits(self.bitmask, self.bitmask.numel() * 8)
        if bits[n:].any():
            raise UserError("BitmaskWeight.bitmask has padding bits set past the last weight")
        if int(bits.sum()) != self.values.numel():
            raise UserError(f"BitmaskWeight.bitmask marks {int(bits.sum())} non-zeros but values "
                            f"holds {self.values.numel()}")

    @classmethod
    def from_dense(cls, w: torch.Tensor) -> "BitmaskWeight":
        _check_shape(tuple(w.shape))
        keep = (w != 0).flatten()
        return cls(values=w.flatten()[keep].clone(), bitmask=pack_bits(keep), shape=tuple(w.shape))

    def to_dense(self) -> torch.Tensor:
        return dense_rows("bitmask", None, self.shape, self.tensors(), 0, self.shape[0])

    @property
    def nbytes(self) -> int:
        return _nbytes(self.values) + _nbytes(self.bitmask)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "bitmask": self.bitmask,
                "shape": torch.tensor(self.shape, dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "BitmaskWeight":
        return cls(values=t["values"], bitmask=t["bitmask"], shape=tuple(t["shape"].tolist()))


@dataclass(frozen=True)
class Sparse24Weight:
    values: torch.Tensor   # (out, in/2)
    indices: torch.Tensor  # (ceil(out*in/8),) uint8, 2-bit positions packed 4 per byte
    shape: tuple[int, int]

    def __post_init__(self):
        object.__setattr__(self, "shape", _check_shape(self.shape))
        out, k = self.shape
        if k % 4:
            raise UserError(f"2:4 sparsity needs the input width to be a multiple of 4, got {k}")
        if tuple(self.values.shape) != (out, k // 2):
            raise UserError(f"Sparse24Weight.values must have shape {(out, k // 2)}, "
                            f"got {tuple(self.values.shape)}")
        n_bytes = -(-out * k // 8)
        if self.indices.dtype != torch.uint8 or tuple(self.indices.shape) != (n_bytes,):
            raise UserError(f"Sparse24Weight.indices must be uint8 of shape ({n_bytes},), got "
                            f"{self.indices.dtype} {tuple(self.indices.shape)}")
        pos = unpack_2bit(self.indices, out * k // 2).view(out, k // 4, 2)
        if not (pos[..., 0] < pos[..., 1]).all():
            raise UserError("Sparse24Weight.indices must hold two strictly increasing positions "
                            "per group of 4; rebuild it with Sparse24Weight.from_dense")

    @classmethod
    def from_dense(cls, w: torch.Tensor) -> "Sparse24Weight":
        out, k = _check_shape(tuple(w.shape))
        if k % 4:
            raise UserError(f"2:4 sparsity needs the input width to be a multiple of 4, got {k}")
        groups = w.reshape(out, k // 4, 4)  # (out, in/4, 4)
        nz = groups != 0
        per_group = nz.sum(-1)
        if (per_group > 2).any():
            r, g = (per_group > 2).nonzero()[0].tolist()
            raise UserError(f"weight is not 2:4 sparse: row {r}, inputs {4 * g}..{4 * g + 3} hold "
                            f"{int(per_group[r, g])} non-zeros; prune with nm=(2, 4) first")
        # rank positions: non-zeros first, then zeros, each by position; take the first two
        key = (~nz).to(torch.int64) * 4 + torch.arange(4, device=w.device)
        pos = torch.sort(torch.topk(key, 2, dim=-1, largest=False).indices, dim=-1).values
        values = torch.gather(groups, -1, pos).reshape(out, k // 2)
        return cls(values=values.clone(), indices=pack_2bit(pos.flatten().to(torch.uint8)),
                   shape=(out, k))

    def to_dense(self) -> torch.Tensor:
        return dense_rows("2:4", None, self.shape, self.tensors(), 0, self.shape[0])

    @property
    def nbytes(self) -> int:
        return _nbytes(self.values) + _nbytes(self.indices)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "indices": self.indices,
                "shape": torch.tensor(self.shape, dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "Sparse24Weight":
        return cls(values=t["values"], indices=t["indices"], shape=tuple(t["shape"].tolist()))


_FORMATS = {"bitmask": BitmaskWeight, "2:4": Sparse24Weight}
_PATTERN = {"bitmask": "bitmask", "2:4": "indices"}  # layout -> name of its structure tensor


@dataclass(frozen=True)
class SparseIntWeight:
    layout: str                # "bitmask" | "2:4"
    pattern: torch.Tensor      # the layout's bitmask or 2:4 indices (as in the float formats)
    qdata: torch.Tensor        # (ceil(kept * bits / 8),) uint8: kept codes, row-major
    scale: torch.Tensor        # (out, n_groups) over the dense columns, fmt.scale_dtype
    zero: torch.Tensor | None  # as PackedIntWeight stores it; None when symmetric
    shape: tuple[int, int]
    fmt: IntFormat

    def __post_init__(self):
        object.__setattr__(self, "shape", _check_shape(self.shape))
        if self.layout not in _FORMATS:
            raise UserError(f"sparse layout {self.layout!r} is unknown; use one of {sorted(_FORMATS)}")
        keep = keep_mask(self.layout, self.pattern, self.shape)  # checks the pattern tensor
        want = packed_width(int(keep.sum()), self.fmt.bits)
        if self.qdata.dtype != torch.uint8 or tuple(self.qdata.shape) != (want,):
            raise UserError(f"SparseIntWeight.qdata must be uint8 of shape ({want},) for "
                            f"{int(keep.sum())} kept {self.fmt.bits}-bit codes, got "
                            f"{self.qdata.dtype} {tuple(self.qdata.shape)}")
        specs = field_specs(self.fmt, *self.shape)
        for name in ("scale", "zero"):
            t, spec = getattr(self, name), specs.get(name)
            if (t is None) != (spec is None) or (t is not None and (
                    tuple(t.shape) != spec[0] or t.dtype != spec[1])):
                got = None if t is None else (t.dtype, tuple(t.shape))
                raise UserError(f"SparseIntWeight.{name} must be {spec} for a {self.shape} "
                                f"weight in {self.fmt}, got {got}")

    @classmethod
    def from_dense(cls, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   fmt: IntFormat, layout: str) -> "SparseIntWeight":
        """Store `w` (out, in), whose non-zeros lie on the grid (scale, zero) (out, n_groups).

        The structure is `w`'s non-zeros (for 2:4, completed to two slots per group as in
        Sparse24Weight); codes are recomputed from `w` and must reproduce it exactly, so a
        weight that is not on the grid is refused rather than silently moved."""
        out, k = _check_shape(tuple(w.shape))
        packed = PackedIntWeight.from_codes(torch.zeros(out, k, dtype=torch.uint8, device=w.device),
                                            scale, zero, fmt)  # exact-dtype checks of scale/zero
        if layout == "2:4":
            pattern = Sparse24Weight.from_dense(w).indices
        elif layout == "bitmask":
            pattern = pack_bits((w != 0).flatten())
        else:
            raise UserError(f"sparse layout {layout!r} is unknown; use one of {sorted(_FORMATS)}")
        keep = keep_mask(layout, pattern, (out, k))
        s, z = packed.scale.float(), packed.zeros()
        codes = grid.quantize(w.float(), s, z, fmt)
        if not torch.equal(grid.dequantize(codes, s, z, fmt) * keep, w.float()):
            raise UserError("the kept weights are not on the given grid (or a free 2:4 slot "
                            "cannot hold 0 on it): quantize the pruned weight with these scales "
                            "and an integer or symmetric zero point first")
        qdata = pack(codes[keep].reshape(1, -1), fmt.bits)[0]
        return cls(layout, pattern, qdata, packed.scale, packed.zero, (out, k), fmt)

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dense_rows(self.layout, self.fmt, self.shape, self.tensors(), 0,
                          self.shape[0]).to(dtype)

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(t) for n, t in self.tensors().items() if n != "shape")

    def tensors(self) -> dict[str, torch.Tensor]:
        d = {_PATTERN[self.layout]: self.pattern, "qdata": self.qdata, "scale": self.scale}
        if self.zero is not None:
            d["zero"] = self.zero
        return {**d, "shape": torch.tensor(self.shape, dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], layout: str, fmt: IntFormat) -> "SparseIntWeight":
        return cls(layout, t[_PATTERN[layout]], t["qdata"], t["scale"], t.get("zero"),
                   tuple(t["shape"].tolist()), fmt)


class SparseLinear(nn.Module):
    """A linear layer whose weight is stored in a sparse format (buffers named by its fields).
    `layout` is "bitmask" or "2:4"; `fmt` is the IntFormat of the kept values, or None when they
    are stored as floats."""

    def __init__(self, weight: BitmaskWeight | Sparse24Weight | SparseIntWeight,
                 bias: torch.Tensor | None = None):
        super().__init__()
        if isinstance(weight, SparseIntWeight):
            self.layout, self.fmt = weight.layout, weight.fmt
        else:
            self.layout = next(k for k, c in _FORMATS.items() if isinstance(weight, c))
            self.fmt = None
        self.out_features, self.in_features = weight.shape
        for name, t in weight.tensors().items():
            self.register_buffer(name, t)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def empty(cls, layout: str, fmt: IntFormat | None, out_features: int, in_features: int,
              shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], device="meta") -> "SparseLinear":
        """A shell with empty buffers of the given {name: (shape, dtype)}, e.g. on the meta
        device for loading; construction checks run when `weight_format()` is called."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.layout, m.fmt, m.out_features, m.in_features = layout, fmt, out_features, in_features
        for name, (shape, dtype) in shapes.items():
            m.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))
        if "bias" not in shapes:
            m.register_buffer("bias", None)
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, layout: str = "bitmask") -> "SparseLinear":
        if layout not in _FORMATS:
            raise UserError(f"sparse layout {layout!r} is unknown; use one of {sorted(_FORMATS)}")
        return cls(_FORMATS[layout].from_dense(linear.weight.detach()), linear.bias)

    def _stored(self) -> dict[str, torch.Tensor]:
        return {n: b for n, b in self._buffers.items() if n != "bias" and b is not None}

    def weight_format(self) -> BitmaskWeight | Sparse24Weight | SparseIntWeight:
        """The stored format object (runs the construction checks)."""
        if self.fmt is not None:
            return SparseIntWeight.from_tensors(self._stored(), self.layout, self.fmt)
        return _FORMATS[self.layout].from_tensors(self._stored())

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(out, in) dense weight; `dtype` None keeps the stored one (float32 for int values)."""
        w = self._rows(0, self.out_features)
        return w if dtype is None else w.to(dtype)

    def _rows(self, r0: int, r1: int, reuse: bool = False) -> torch.Tensor:
        offsets = self.row_offsets() if self.layout == "bitmask" else None  # counted once
        return dense_rows(self.layout, self.fmt, (self.out_features, self.in_features),
                          self._stored(), r0, r1, offsets, reuse)

    def row_offsets(self) -> torch.Tensor:
        """(out + 1,) kept weights before each row of a bitmask (counted once, then cached)."""
        off = self.__dict__.get("_row_off")
        if off is None:
            off = row_offsets(self.bitmask, (self.out_features, self.in_features),
                              self._tile_rows())
            self.__dict__["_row_off"] = off
        return off

    def _tile_rows(self) -> int:
        return max(1, TILE_WEIGHTS // self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 2:4 with float values on CUDA in 16 bits, no autograd: cuSPARSELt's semi-structured
        # matmul over a compressed copy built once (a cache the size of the stored format,
        # `cache_nbytes`). Otherwise the dense weight is rebuilt per call, TILE_WEIGHTS weights
        # (whole rows) at a time, each tile handed to the kernel dispatch (memfit.formats.
        # sparse_rows): memory saved at rest, and per call no more than a tile's temporaries.
        if (self.layout == "2:4" and self.fmt is None and x.is_cuda and not torch.is_grad_enabled()
                and x.dtype in (torch.float16, torch.bfloat16)):
            w24 = self._semi_structured(x.dtype)
            if w24 is not None:
                b = None if self.bias is None else self.bias.to(x.dtype)
                return torch.nn.functional.linear(x, w24, b)
        # On the CPU without autograd a tile is rebuilt in this thread's kept buffers
        # (sparse_rows.dense_rows(reuse=True)) and multiplied at once: no fresh pages a call.
        reuse = x.device.type == "cpu" and not torch.is_grad_enabled()
        if reuse and self.fmt is not None and cpu.kernel_rows(x.dtype, x.numel() // x.shape[-1]):
            layout = self._cpu_layout()  # decode: the dense codes' kernel layout, as QuantLinear
            if layout is not None:
                y = cpu.kernel_linear(x.reshape(-1, self.in_features).to(torch.bfloat16), layout,
                                      self.bias)
                return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        rows = self._tile_rows()
        if rows >= self.out_features:
            return kernels.linear(x, self._rows(0, self.out_features, reuse), self.bias)
        out = []
        for r0 in range(0, self.out_features, rows):  # one tile's temporaries at a time
            r1 = min(r0 + rows, self.out_features)
            b = None if self.bias is None else self.bias[r0:r1]
            out.append(kernels.linear(x, self._rows(r0, r1, reuse), b))
        return torch.cat(out, dim=-1)

    keep_layout = True  # as QuantLinear.keep_layout (rebuilt each call: 3x the tiled path)

    def kernel_view(self):
        """The IntWeight fields of this weight's dense codes, codes absent (what the CPU kernel
        layout is judged and priced from), or None: float values, or float zeros (no code
        holds such a zero, so a dropped place could not be written as one)."""
        if self.fmt is None or self.fmt.zero_point == "float":
            return None
        return kernel_weight(None, self.scale, getattr(self, "zero", None),
                             (self.out_features, self.in_features), self.fmt)

    def _cpu_layout(self):
        """torch's CPU kernel layout of this weight's dense codes (sparse_rows.kernel_layout),
        built on the first decode-sized CPU forward and kept (`cache_nbytes`), or None."""
        if not self.keep_layout:
            return None
        if "_cpu" not in self.__dict__:
            view = self.kernel_view()
            offsets = self.row_offsets() if self.layout == "bitmask" else None
            self.__dict__["_cpu"] = None if view is None else kernel_layout(
                view, self.layout, self.fmt, self._stored(), offsets)
        return self.__dict__["_cpu"]

    def _semi_structured(self, dtype: torch.dtype):
        """The cuSPARSELt copy of this 2:4 weight in `dtype`, built on first use (None when torch
        cannot take the shape; then the dense path runs, warned once)."""
        cache = self.__dict__.get("_w24")
        if cache is None or cache[0] != dtype:
            try:
                from torch.sparse import to_sparse_semi_structured
                cache = (dtype, to_sparse_semi_structured(self.dequantize(dtype)))
            except (RuntimeError, ValueError) as e:
                import warnings
                warnings.warn(f"memfit: no semi-structured 2:4 kernel for {self.out_features}x"
                              f"{self.in_features} ({e}); using the dense path", stacklevel=3)
                cache = (dtype, None)
            self.__dict__["_w24"] = cache
        return cache[1]

    def cache_nbytes(self) -> int:
        """Extra bytes of the cuSPARSELt copy (0 until the first 2:4 forward on CUDA) and of the
        CPU kernel layout (0 until the first decode-sized CPU forward)."""
        cpu_layout = self.__dict__.get("_cpu")
        total = 0 if cpu_layout is None else cpu_layout.nbytes
        cache = self.__dict__.get("_w24")
        if not cache or cache[1] is None:
            return total
        w = cache[1]
        parts = (getattr(w, "packed", None), getattr(w, "meta", None))
        return total + sum(t.numel() * t.element_size() for t in parts if t is not None)

    def nbytes(self) -> int:
        """Stored weight bytes (the format's tensors; bias excluded)."""
        return self.weight_format().nbytes

    def describe(self) -> dict:
        return {"layout": self.layout, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None,
                "fmt": None if self.fmt is None else self.fmt.to_dict(),
                "shapes": {n: list(b.shape) for n, b in self._stored().items()}}

    def _drop_cache(self) -> None:
        for cached in ("_w24", "_cpu"):
            self.__dict__.pop(cached, None)

    def _apply(self, fn, recurse=True):
        # int-quantized values: scale/zero dtypes belong to the format; float values do follow
        # model.to(dtype) (a float16 copy of a pruned model stores its values in float16)
        apply_keeping_dtypes(self, fn, ("scale", "zero"), lambda f: super(SparseLinear, self)._apply(f, recurse))
        self._drop_cache()
        self.__dict__.pop("_row_off", None)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._drop_cache()
        self.__dict__.pop("_row_off", None)

    def extra_repr(self) -> str:
        q = "" if self.fmt is None else f", int{self.fmt.bits} group {self.fmt.group_size or 'channel'}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"layout={self.layout}{q}")


def keep_mask(layout: str, pattern: torch.Tensor, shape) -> torch.Tensor:
    """(out, in) bool: True at every stored slot of the layout's structure tensor (checked)."""
    out, k = shape
    if layout == "bitmask":
        n = out * k
        if pattern.dtype != torch.uint8 or tuple(pattern.shape) != (-(-n // 8),):
            raise UserError(f"bitmask must be uint8 of shape ({-(-n // 8)},) for shape {shape}, "
                            f"got {pattern.dtype} {tuple(pattern.shape)}")
        bits = unpack_bits(pattern, pattern.numel() * 8)
        if bits[n:].any():
            raise UserError("bitmask has padding bits set past the last weight")
        return bits[:n].view(out, k)
    ones = Sparse24Weight(torch.ones(out, k // 2, device=pattern.device), pattern, shape)
    return ones.to_dense() != 0


def _check_shape(shape) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or min(shape) < 1:
        raise UserError(f"a sparse weight must be 2-D (out, in) and non-empty, got shape {shape}")
    return shape


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
