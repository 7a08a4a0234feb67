"""What replaces a linear: the per-module step of `compress_`, for every kind of spec.

- `Quant` -> `QuantLinear` (RTN, HQQ, GPTQ on the integer grid); with `act_bits: 8` ->
  `W8A8Linear` (the same 8-bit per-channel grid, activations quantized to int8 at run time);
- `Prune` -> `SparseLinear` (magnitude, Wanda, SparseGPT; unstructured in a bitmask, 2:4 in the
  2:4 layout; other N:M patterns in a bitmask);
- `LowRank` -> `LowRankLinear` (SVD, activation-whitened SVD, randomized SVD).
- `Compose(Prune, Quant)` -> `SparseLinear` over a `SparseIntWeight`: the pruner fixes the mask,
  then RTN quantizes the kept values or GPTQ quantizes them while compensating the pruned ones
  (masked sweep); SparseGPT + GPTQ is SparseGPT's joint sweep.
- `Compose(LowRank, Quant)` -> `LowRankLinear` whose two factors are `QuantLinear`s: B (r, in)
  quantized against the layer's Hessian H, then A (out, r) against B̂ H B̂ᵀ, the Hessian of
  its real input B̂x, so A's rounding compensates B's.

`METHODS` is the one literal dict from config type to pure function (memfit.configs says what
statistic each type needs). Quantizers
treat output rows independently given the input statistic, so linears sharing one input are
stacked and quantized in one call; pruning (SparseGPT picks masks across rows) and factorization
run per module.
"""

from __future__ import annotations

import torch

from memfit.algos.gptq import gptq
from memfit.algos.hqq import hqq
from memfit.algos.lowrank import randomized_svd_factors, rank_for_energy, rank_for_params, \
    spectrum, svd_factors, whitened_svd_factors
from memfit.algos.prune import magnitude_mask, wanda_mask
from memfit.algos.rtn import rtn
from memfit.algos.sparsegpt import sparsegpt
from memfit.errors import UserError
from memfit.formats import grid
from memfit.formats.intq import PackedIntWeight
from memfit.formats.embedding import QuantEmbedding
from memfit.formats.grid import IntFormat
from memfit.formats.quant_linear import QuantLinear
from memfit.formats.lowrank import LowRankLinear
from memfit.formats.sparse import BitmaskWeight, Sparse24Weight, SparseIntWeight, SparseLinear
from memfit.formats.w8a8 import W8A8Linear
from memfit.configs import (GPTQ, HQQ, RTN, SVD, LowRank, Magnitude, Needs, Prune, Quant,
                            RandomizedSVD, SparseGPT, Wanda, WhitenedSVD)
from memfit.recipe import Compose

def _gptq(w, q: GPTQ, s, mask=None):
    return gptq(w, s.hessian, q.format, block_size=q.block_size, damp=q.damp,
                act_order=q.act_order, clip=q.clip, mask=mask)


# The one dispatch table, keyed by config type: quantizers -> QuantResult, pruners -> the pruned
# dense weight (out, in), factorizers (with a rank) -> factors A (out, r), B (r, in).
METHODS = {
    RTN: lambda w, q, s: rtn(w, q.format, clip=q.clip),
    HQQ: lambda w, q, s: hqq(w, q.format, iters=q.iters),
    GPTQ: _gptq,
    Magnitude: lambda w, p, s: w * magnitude_mask(w, p.sparsity, p.pattern),
    Wanda: lambda w, p, s: w * wanda_mask(w, s.norms, p.sparsity, p.pattern),
    SparseGPT: lambda w, p, s: sparsegpt(w, s.hessian, sparsity=p.sparsity, nm=p.pattern,
                                         block_size=p.block_size, damp=p.damp)[0],
    SVD: lambda w, lr, s, rank: svd_factors(w, rank),
    WhitenedSVD: lambda w, lr, s, rank: whitened_svd_factors(w, s.hessian, rank, damp=lr.damp),
    RandomizedSVD: lambda w, lr, s, rank: randomized_svd_factors(w, rank, seed=0),
}
_ORDER = (Needs.NOTHING, Needs.NORMS, Needs.HESSIAN)


def needs(spec) -> Needs:
    """The statistic a spec reads; a composed spec gets the stronger of its parts' (the
    Hessian's diagonal also gives the input norms: HessianStat.norms)."""
    if isinstance(spec, Compose):
        return max(needs(spec.first), needs(spec.quant), key=_ORDER.index)
    return spec.needs


def weight_2d(mod: torch.nn.Module) -> torch.Tensor:
    """A linear's weight as (out, in) float32 (GPT-2's Conv1D stores it transposed)."""
    w = mod.weight if isinstance(mod, torch.nn.Linear) else mod.weight.t()
    return w.detach().float()


def _bias(mod):
    return None if mod.bias is None else mod.bias.detach()


def _quantize(mods: list, spec: Quant, stat) -> tuple[list, float | None]:
    ws = [weight_2d(m) for m in mods]
    res = METHODS[type(spec)](torch.cat(ws), spec, stat)
    fmt, out = spec.format, []
    rows = [w.shape[0] for w in ws]
    for mod, w, codes, scale, zero in zip(mods, ws, res.codes.split(rows), res.scale.split(rows),
                                          res.zero.split(rows)):
        packed = PackedIntWeight.from_codes(codes, scale, None if fmt.symmetric else zero, fmt)
        if spec.act_bits:  # W8A8: the same 8-bit grid, multiplied in int8
            out.append(W8A8Linear.from_packed(packed, _bias(mod), static=spec.act_static,
                                              dtype=mod.weight.dtype))
            continue
        ql = QuantLinear(w.shape[1], w.shape[0], fmt, mod.bias is not None,
                         device=mod.weight.device, dtype=mod.weight.dtype)
        ql.load_packed(packed, bias=_bias(mod))
        out.append(ql)
    return out, res.error


def _prune(mod, spec: Prune, stat) -> SparseLinear:
    w = METHODS[type(spec)](weight_2d(mod), spec, stat).to(mod.weight.dtype)
    layout = Sparse24Weight if spec.pattern == (2, 4) else BitmaskWeight
    return SparseLinear(layout.from_dense(w), _bias(mod))


def _rank(w: torch.Tensor, spec: LowRank, stat) -> int:
    out, k = w.shape
    if spec.rank is not None:
        if spec.rank > min(out, k):
            raise UserError(f"lowrank rank={spec.rank} is larger than a {out}x{k} matrix allows "
                            f"({min(out, k)}); lower it, or use keep/energy for a per-matrix rank")
        return spec.rank
    if spec.energy is not None:
        H = stat.hessian if isinstance(spec, WhitenedSVD) else None
        return rank_for_energy(spectrum(w, H, getattr(spec, "damp", 0.01)), spec.energy)
    return rank_for_params(out, k, spec.keep)


def _factorize(mod, spec: LowRank, stat) -> LowRankLinear:
    w = weight_2d(mod)
    rank = _rank(w, spec, stat)
    a, b = METHODS[type(spec)](w, spec, stat, rank)
    m = LowRankLinear.from_factors(a.to(mod.weight.dtype), b.to(mod.weight.dtype), _bias(mod))
    return m.to(mod.weight.device)


def _prune_quant(mod, spec: Compose, stat) -> SparseLinear:
    p, q = spec.first, spec.quant
    fmt, w = q.format, weight_2d(mod)
    if isinstance(p, SparseGPT) and isinstance(q, GPTQ):
        r = sparsegpt(w, stat.hessian, sparsity=p.sparsity, nm=p.pattern, block_size=p.block_size,
                      damp=p.damp, fmt=fmt)
        w_hat, scale, zero = r.weight.float(), r.scale, r.zero
    else:
        pruned = METHODS[type(p)](w, p, stat)
        keep = pruned != 0
        if isinstance(q, GPTQ):  # from the unpruned weight: the sweep compensates the pruning too
            res = _gptq(w, q, stat, mask=keep)
        else:
            res = METHODS[type(q)](pruned, q, stat)
        scale, zero = res.scale, res.zero
        w_hat = grid.dequantize(res.codes, scale, zero, fmt) * keep
    layout = "2:4" if p.pattern == (2, 4) else "bitmask"
    weight = SparseIntWeight.from_dense(w_hat, scale, None if fmt.symmetric else zero, fmt, layout)
    return SparseLinear(weight, _bias(mod))


class _Hessian:
    def __init__(self, h):
        self.hessian = h


def _linear(w: torch.Tensor, bias, like: torch.nn.Module) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None,
                          dtype=like.weight.dtype, device=like.weight.device)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _factorize_quant(mod, spec: Compose, stat) -> LowRankLinear:
    lr, q = spec.first, spec.quant
    w = weight_2d(mod)
    out, k = w.shape
    rank = _rank(w, lr, stat)
    g = q.format.group_size
    if g:  # the up factor's input width is the rank: make it whole groups
        rank = min(max(g, round(rank / g) * g), min(out, k) // g * g or g)
    a, b = METHODS[type(lr)](w, lr, stat, rank)
    (down,), _ = _quantize([_linear(b, None, mod)], q, stat)
    up_stat = None
    if q.needs_data:
        b_hat = down.dequantize()
        up_stat = _Hessian(b_hat @ stat.hessian @ b_hat.T)
    (up,), _ = _quantize([_linear(a, _bias(mod), mod)], q, up_stat)
    m = LowRankLinear(k, out, rank, bias=mod.bias is not None, dtype=mod.weight.dtype,
                      device=mod.weight.device)
    m.down, m.up = down, up
    return m


def replace_group(mods: list, spec, stat) -> tuple[list, float | None]:
    """New modules for `mods` (linears sharing one input) under `spec`; (modules, error)."""
    if isinstance(spec, Quant):
        return _quantize(mods, spec, stat)
    if isinstance(spec, Compose):
        build = _prune_quant if isinstance(spec.first, Prune) else _factorize_quant
    else:
        build = _prune if isinstance(spec, Prune) else _factorize
    return [build(m, spec, stat) for m in mods], None


def quantize_embeddings_(model: torch.nn.Module, embeddings: IntFormat | None,
                         head: IntFormat | None) -> dict:
    """Store the input embeddings and/or the output head on the integer grid (RTN, min-max),
    in place. When the model ties them and both get the same format, the head is a QuantLinear
    over the embedding's own packed buffers: still one tensor. Otherwise a quantized side stops
    being tied (save writes `tie_word_embeddings: false`). -> {"embeddings": bytes, "head": bytes}."""
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out is not None and getattr(out, "weight", None) is emb.weight
    report = {}
    if embeddings is not None:
        w = emb.weight.detach()
        res = rtn(w, embeddings)
        packed = PackedIntWeight.from_codes(res.codes, res.scale,
                                            None if embeddings.symmetric else res.zero, embeddings)
        qe = QuantEmbedding.from_packed(packed, emb)
        model.set_input_embeddings(qe)
        report["embeddings"] = qe.nbytes()
    if head is not None and out is not None:
        if tied and embeddings == head:
            ql = QuantLinear(qe.embedding_dim, qe.num_embeddings, head, bias=False,
                             device=qe.qdata.device, dtype=qe.dtype)
            for name in list(ql._buffers):
                if name in qe._buffers:
                    ql._buffers[name] = qe._buffers[name]  # the same tensors: tied
        else:
            (ql,), _ = _quantize([out], RTN(format=head), None)
        model.set_output_embeddings(ql)
        report["head"] = ql.nbytes()
    return report
