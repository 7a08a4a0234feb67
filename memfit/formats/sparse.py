"""Storage formats for pruned and factorised weights, and their nn.Module shells.

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
- `SparseLinear` holds either format as buffers and, for now, rebuilds the dense weight in
  forward (a sparse matmul kernel is a later issue): it saves memory at rest, not compute.
- `LowRankLinear`: y = A (B x) + bias with A (out, r), B (r, in) as two thin nn.Linear layers,
  trainable for healing.

Round trips are exact in value: `to_dense(from_dense(w))` equals `w` elementwise (a −0.0 is a
zero and comes back as +0.0). `nbytes` counts the stored tensors, not the shape metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memfit.errors import UserError
from memfit.formats.packing import pack, unpack

_BIT_WEIGHTS = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)


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
        return _bitmask_dense(self.values, self.bitmask, self.shape)

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
        return _sparse24_dense(self.values, self.indices, self.shape)

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


class SparseLinear(nn.Module):
    """A linear layer whose weight is stored in a sparse format (buffers named by its fields)."""

    def __init__(self, weight: BitmaskWeight | Sparse24Weight, bias: torch.Tensor | None = None):
        super().__init__()
        self.layout = next(k for k, c in _FORMATS.items() if isinstance(weight, c))
        self.out_features, self.in_features = weight.shape
        for name, t in weight.tensors().items():
            self.register_buffer(name, t)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, layout: str = "bitmask") -> "SparseLinear":
        if layout not in _FORMATS:
            raise UserError(f"sparse layout {layout!r} is unknown; use one of {sorted(_FORMATS)}")
        return cls(_FORMATS[layout].from_dense(linear.weight.detach()), linear.bias)

    def weight_format(self) -> BitmaskWeight | Sparse24Weight:
        """The stored format object (runs the construction checks)."""
        cls = _FORMATS[self.layout]
        names = ("values", "bitmask" if cls is BitmaskWeight else "indices", "shape")
        return cls.from_tensors({n: getattr(self, n) for n in names})

    def dense_weight(self) -> torch.Tensor:
        if self.layout == "bitmask":
            return _bitmask_dense(self.values, self.bitmask, (self.out_features, self.in_features))
        return _sparse24_dense(self.values, self.indices, (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Reference path: rebuild the dense weight, then a dense matmul. A real sparse kernel
        # (2:4 sparse tensor cores, or a bitmask SpMM) is a later issue.
        w = self.dense_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    @property
    def nbytes(self) -> int:
        b = 0 if self.bias is None else _nbytes(self.bias)
        return self.weight_format().nbytes + b

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout}"


class LowRankLinear(nn.Module):
    """y = A (B x) + bias: `down` holds B (r, in), `up` holds A (out, r) and the bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise UserError(f"rank={rank} is invalid for a {out_features}x{in_features} layer; "
                            f"use [1, {min(in_features, out_features)}]")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor,
                     bias: torch.Tensor | None = None) -> "LowRankLinear":
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[0]:
            raise UserError(f"factors do not chain: A {tuple(A.shape)} must be (out, r) and "
                            f"B {tuple(B.shape)} must be (r, in)")
        if bias is not None and tuple(bias.shape) != (A.shape[0],):
            raise UserError(f"bias has shape {tuple(bias.shape)}, expected ({A.shape[0]},)")
        m = cls(B.shape[1], A.shape[0], A.shape[1], bias=bias is not None, dtype=A.dtype,
                device=A.device)
        with torch.no_grad():
            m.up.weight.copy_(A)
            m.down.weight.copy_(B.to(A.dtype))
            if bias is not None:
                m.up.bias.copy_(bias.to(A.dtype))
        return m

    @property
    def A(self) -> torch.Tensor:
        return self.up.weight

    @property
    def B(self) -> torch.Tensor:
        return self.down.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(p) for p in self.parameters())


# ----- bit packing: 1-bit masks here; 2-bit indices through memfit.formats.packing -----

def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """1-D bool -> uint8, 8 per byte, element 8i+b in bit b of byte i; tail padded with 0."""
    n = bits.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=bits.device)
    padded[:n] = bits.to(torch.uint8)
    return (padded.view(-1, 8) * _BIT_WEIGHTS.to(bits.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_bits: the first `n` bits as a 1-D bool tensor."""
    bits = (packed.unsqueeze(1) & _BIT_WEIGHTS.to(packed.device)) != 0  # (bytes, 8)
    return bits.flatten()[:n]


def pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """1-D uint8 codes in [0, 3] -> uint8, 4 per byte, code 4i+b in bits 2b..2b+1 of byte i
    (memfit.formats.packing's layout for one row)."""
    return pack(codes.reshape(1, -1).to(torch.uint8), 2)[0]


def unpack_2bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_2bit: the first `n` codes as 1-D int64."""
    return unpack(packed.reshape(1, -1), 2, n)[0].to(torch.int64)


def _bitmask_dense(values, bitmask, shape) -> torch.Tensor:
    n = shape[0] * shape[1]
    keep = unpack_bits(bitmask, n)
    dense = torch.zeros(n, dtype=values.dtype, device=values.device)
    dense[keep] = values
    return dense.view(shape)


def _sparse24_dense(values, indices, shape) -> torch.Tensor:
    out, k = shape
    pos = unpack_2bit(indices, out * k // 2).view(out, k // 4, 2)
    dense = torch.zeros(out, k // 4, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, pos, values.view(out, k // 4, 2))
    return dense.view(out, k)


def _check_shape(shape) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or min(shape) < 1:
        raise UserError(f"a sparse weight must be 2-D (out, in) and non-empty, got shape {shape}")
    return shape


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
