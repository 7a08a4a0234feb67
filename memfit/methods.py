"""What replaces a linear: the per-module step of `compress_`, for every kind of spec.

- `Quant` -> `QuantLinear` (RTN, HQQ, GPTQ on the integer grid);
- `Prune` -> `SparseLinear` (magnitude, Wanda, SparseGPT; unstructured in a bitmask, 2:4 in the
  2:4 layout; other N:M patterns in a bitmask);
- `LowRank` -> `LowRankLinear` (SVD, activation-whitened SVD, randomized SVD).

Each family is a literal dict from method name to (statistic it needs, pure function). Quantizers
treat output rows independently given the input statistic, so linears sharing one input are
stacked and quantized in one call; pruning (SparseGPT picks masks across rows) and factorization
run per module.
"""

from __future__ import annotations

import torch

from memfit.algos.gptq import gptq
from memfit.algos.hqq import hqq
from memfit.algos.lowrank import randomized_svd_factors, rank_for_params, svd_factors, \
    whitened_svd_factors
from memfit.algos.prune import magnitude_mask, wanda_mask
from memfit.algos.rtn import rtn
from memfit.algos.sparsegpt import sparsegpt
from memfit.formats.intq import PackedIntWeight
from memfit.formats.quant_linear import QuantLinear
from memfit.formats.sparse import BitmaskWeight, LowRankLinear, Sparse24Weight, SparseLinear
from memfit.recipe import LowRank, Prune, Quant

QUANTIZERS = {
    "rtn": (None, lambda w, q, s: rtn(w, q.format, clip=q.clip)),
    "hqq": (None, lambda w, q, s: hqq(w, q.format, iters=q.iters)),
    "gptq": ("hessian", lambda w, q, s: gptq(w, s.hessian, q.format, block_size=q.block_size,
                                            damp=q.damp, act_order=q.act_order, clip=q.clip)),
}
# -> pruned dense weight (out, in)
PRUNERS = {
    "magnitude": (None, lambda w, p, s: w * magnitude_mask(w, p.sparsity, p.pattern)),
    "wanda": ("norms", lambda w, p, s: w * wanda_mask(w, s.norms, p.sparsity, p.pattern)),
    "sparsegpt": ("hessian", lambda w, p, s: sparsegpt(w, s.hessian, sparsity=p.sparsity,
                                                       nm=p.pattern, block_size=p.block_size,
                                                       damp=p.damp)[0]),
}
# -> factors A (out, r), B (r, in)
FACTORIZERS = {
    "svd": (None, lambda w, r, lr, s: svd_factors(w, r)),
    "wsvd": ("hessian", lambda w, r, lr, s: whitened_svd_factors(w, s.hessian, r, damp=lr.damp)),
    "rsvd": (None, lambda w, r, lr, s: randomized_svd_factors(w, r, seed=0)),
}


def stat_needed(spec) -> str | None:
    table = {Quant: (QUANTIZERS, "algo"), Prune: (PRUNERS, "method"),
             LowRank: (FACTORIZERS, "method")}[type(spec)]
    return table[0][getattr(spec, table[1])][0]


def weight_2d(mod: torch.nn.Module) -> torch.Tensor:
    """A linear's weight as (out, in) float32 (GPT-2's Conv1D stores it transposed)."""
    w = mod.weight if isinstance(mod, torch.nn.Linear) else mod.weight.t()
    return w.detach().float()


def _bias(mod):
    return None if mod.bias is None else mod.bias.detach()


def _quantize(mods: list, spec: Quant, stat) -> tuple[list, float | None]:
    ws = [weight_2d(m) for m in mods]
    res = QUANTIZERS[spec.algo][1](torch.cat(ws), spec, stat)
    fmt, out = spec.format, []
    rows = [w.shape[0] for w in ws]
    for mod, w, codes, scale, zero in zip(mods, ws, res.codes.split(rows), res.scale.split(rows),
                                          res.zero.split(rows)):
        ql = QuantLinear(w.shape[1], w.shape[0], fmt, mod.bias is not None,
                         device=mod.weight.device, dtype=mod.weight.dtype)
        ql.load_packed(PackedIntWeight.from_codes(codes, scale, None if fmt.symmetric else zero, fmt),
                       bias=_bias(mod))
        out.append(ql)
    return out, res.error


def _prune(mod, spec: Prune, stat) -> SparseLinear:
    w = PRUNERS[spec.method][1](weight_2d(mod), spec, stat).to(mod.weight.dtype)
    layout = Sparse24Weight if spec.pattern == (2, 4) else BitmaskWeight
    return SparseLinear(layout.from_dense(w), _bias(mod))


def _factorize(mod, spec: LowRank, stat) -> LowRankLinear:
    w = weight_2d(mod)
    rank = rank_for_params(w.shape[0], w.shape[1], spec.keep)
    a, b = FACTORIZERS[spec.method][1](w, rank, spec, stat)
    m = LowRankLinear.from_factors(a.to(mod.weight.dtype), b.to(mod.weight.dtype), _bias(mod))
    return m.to(mod.weight.device)


def replace_group(mods: list, spec, stat) -> tuple[list, float | None]:
    """New modules for `mods` (linears sharing one input) under `spec`; (modules, error)."""
    if isinstance(spec, Quant):
        return _quantize(mods, spec, stat)
    build = _prune if isinstance(spec, Prune) else _factorize
    return [build(m, spec, stat) for m in mods], None
