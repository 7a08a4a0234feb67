"""Slicing one linear layer for tensor parallelism, for every weight format memfit stores.

`shard_colwise(m, start, end)` keeps output rows [start, end); `shard_rowwise(m, start, end)`
keeps input columns [start, end) and returns the bias apart (a row-parallel layer adds it once,
after the all-reduce). Both return a new module of the same kind, so the kernels that run the
layer on one device run the shard unchanged.

- nn.Linear: a slice of the weight (and bias).
- QuantLinear: codes, scales and zero points are sliced along the same axis. Colwise is a slice
  of rows of every stored tensor (each row is packed independently). Rowwise must cut at a
  quantization-group boundary (a group's scale cannot be shared by two ranks): the codes are
  unpacked, sliced and packed again, and scales/zeros keep the groups [start/g, ceil(end/g)).
  A per-channel format (group_size None) has one group per row, which every column slice keeps.
- LowRankLinear (A (out, r) @ B (r, in)): colwise slices A's rows and replicates B; rowwise
  slices B's columns and replicates A (A(B_0 x_0 + B_1 x_1) = A B_0 x_0 + A B_1 x_1). A quantized
  factor is sliced by the QuantLinear rule.
- SparseLinear with float values (bitmask or 2:4): the dense weight is rebuilt, sliced and
  encoded again in the same layout (exact; a 2:4 rowwise cut must fall on a multiple of 4).
  Sparse layouts with integer values are refused: re-encoding them needs the grid slice too
  and is not written yet.
Anything else is refused with the module's type name.
"""

from __future__ import annotations

import torch
from torch import nn

from memfit.errors import UserError
from memfit.formats.intq import PackedIntWeight
from memfit.formats.lowrank import LowRankLinear
from memfit.formats.quant_linear import QuantLinear
from memfit.formats.sparse import BitmaskWeight, Sparse24Weight, SparseLinear
from memfit.kernels.packing import pack, unpack


def group_size(m: nn.Module) -> int:
    """Input columns a rowwise cut of `m` must align to (1 for float weights)."""
    if isinstance(m, QuantLinear):
        return m.fmt.group_size or 1  # per-channel: any column slice keeps the row's one group
    if isinstance(m, LowRankLinear):
        return group_size(m.down)
    if isinstance(m, SparseLinear):
        return 4 if m.layout == "2:4" else 1
    return 1


def shard_colwise(m: nn.Module, start: int, end: int) -> nn.Module:
    """A copy of `m` holding output rows [start, end)."""
    _check_range(m, "out_features", start, end)
    if isinstance(m, QuantLinear):
        p = m.packed()
        zero = None if p.zero is None else p.zero[start:end]
        shard = PackedIntWeight(p.qdata[start:end].clone(), p.scale[start:end].clone(),
                                None if zero is None else zero.clone(), (end - start, p.shape[1]),
                                p.fmt)
        return _quant_linear(m, shard, None if m.bias is None else m.bias[start:end])
    if isinstance(m, LowRankLinear):
        up = shard_colwise(m.up, start, end)
        return _low_rank(m, _copy(m.down), up, end - start, m.in_features)
    if isinstance(m, SparseLinear):
        bias = None if m.bias is None else m.bias[start:end]
        return _sparse(m, m.dequantize()[start:end], bias)
    if type(m) is nn.Linear:
        new = nn.Linear(m.in_features, end - start, bias=m.bias is not None,
                        device=m.weight.device, dtype=m.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(m.weight[start:end])
            if m.bias is not None:
                new.bias.copy_(m.bias[start:end])
        return new.requires_grad_(m.weight.requires_grad)
    raise _unsupported(m)


def shard_rowwise(m: nn.Module, start: int, end: int) -> tuple[nn.Module, torch.Tensor | None]:
    """(a copy of `m` holding input columns [start, end) and no bias, `m`'s bias)."""
    _check_range(m, "in_features", start, end)
    g = group_size(m)
    if start % g or (end % g and end != m.in_features):
        raise UserError(
            f"a {type(m).__name__} with groups of {g} input columns cannot be split at columns "
            f"[{start}, {end}): a tensor-parallel cut must fall on a group boundary. Use a "
            f"--tp that splits at multiples of {g}, or a model quantized with smaller groups")
    bias = _bias_of(m)
    if isinstance(m, QuantLinear):
        return _quant_linear(m, _slice_columns(m.packed(), start, end), None), bias
    if isinstance(m, LowRankLinear):
        down, _ = shard_rowwise(m.down, start, end)
        up = _copy(m.up)
        up.bias = None  # a parameter (nn.Linear) or a buffer (QuantLinear): None drops it
        return _low_rank(m, down, up, m.out_features, end - start), bias
    if isinstance(m, SparseLinear):
        return _sparse(m, m.dequantize()[:, start:end], None), bias
    if type(m) is nn.Linear:
        new = nn.Linear(end - start, m.out_features, bias=False, device=m.weight.device,
                        dtype=m.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(m.weight[:, start:end])
        return new.requires_grad_(m.weight.requires_grad), bias
    raise _unsupported(m)


def _slice_columns(p: PackedIntWeight, start: int, end: int) -> PackedIntWeight:
    """Columns [start, end) of a packed weight; the caller checked the group alignment."""
    fmt, (out, k) = p.fmt, p.shape
    g, n_groups = fmt.groups(k)
    g0, g1 = (0, 1) if fmt.group_size is None else (start // g, -(-end // g))
    qdata = pack(p.codes()[:, start:end].contiguous(), fmt.bits)  # (out, packed(end - start))
    scale = p.scale[:, g0:g1].clone()
    zero = None
    if p.zero is not None and fmt.zero_point == "int":
        zero = pack(unpack(p.zero, fmt.bits, n_groups)[:, g0:g1].contiguous(), fmt.bits)
    elif p.zero is not None:
        zero = p.zero[:, g0:g1].clone()
    return PackedIntWeight(qdata, scale, zero, (out, end - start), fmt)


def _quant_linear(m: QuantLinear, p: PackedIntWeight, bias: torch.Tensor | None) -> QuantLinear:
    dtype = m.bias.dtype if m.bias is not None else torch.float32
    new = QuantLinear(p.shape[1], p.shape[0], p.fmt, bias is not None, device=p.qdata.device,
                      dtype=dtype)
    new.load_packed(p, bias)
    return new


def _low_rank(m: LowRankLinear, down: nn.Module, up: nn.Module, out_f: int, in_f: int):
    new = LowRankLinear.__new__(LowRankLinear)
    nn.Module.__init__(new)
    new.in_features, new.out_features, new.rank = in_f, out_f, m.rank
    new.down, new.up = down, up
    return new


def _sparse(m: SparseLinear, dense: torch.Tensor, bias: torch.Tensor | None) -> SparseLinear:
    if m.fmt is not None:
        raise UserError(f"tensor parallelism over a SparseLinear with {m.fmt.bits}-bit values "
                        f"({m.layout}) is not supported yet; shard the float-valued sparse model "
                        "or the dense-quantized one")
    cls = BitmaskWeight if m.layout == "bitmask" else Sparse24Weight
    return SparseLinear(cls.from_dense(dense.contiguous()), bias)


def _bias_of(m: nn.Module) -> torch.Tensor | None:
    b = m.up.bias if isinstance(m, LowRankLinear) else getattr(m, "bias", None)
    return None if b is None else b.detach().clone()


def _copy(m: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(m)


def _check_range(m: nn.Module, attr: str, start: int, end: int) -> None:
    n = getattr(m, attr, None)
    assert n is not None and 0 <= start < end <= n, (type(m).__name__, attr, n, start, end)


def _unsupported(m: nn.Module) -> UserError:
    return UserError(f"tensor parallelism cannot split a {type(m).__name__}; supported: nn.Linear, "
                     "QuantLinear, LowRankLinear and float-valued SparseLinear")
