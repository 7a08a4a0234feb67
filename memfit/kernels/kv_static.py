"""Kernels of memfit's static quantized KV cache (memfit.kvstatic, where the design is): the
flush that quantizes the group leaving the ring of dense tokens (a no-op at most steps), and
decode attention over the packed store and the ring with the packed count read from the
position tensor, so no host value enters a decode step. The codes, scales and minima are bit for
bit those of memfit.kvcache's `_quantize` (IEEE division, round half to even)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memfit.kernels import pdl


@triton.jit
def _round_even(y):
    """Round half to even (torch.round), exactly: the fraction y - floor(y) is exact."""
    f = tl.floor(y)
    r = y - f
    up = (r > 0.5) | ((r == 0.5) & (f - 2.0 * tl.floor(f * 0.5) == 1.0))
    return tl.where(up, f + 1.0, f)


@triton.jit
def _pack(c, R: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """(R, D) float32 codes -> (R, D * BITS / 8) uint8 (memfit.kernels.packing's layout)."""
    ci = c.to(tl.int32)
    if BITS == 4:
        lo, hi = tl.split(tl.reshape(ci, (R, D // 2, 2)))
        ci = lo | (hi << 4)
    return ci.to(tl.uint8)


@triton.jit
def flush_group(pos_ptr, kr_ptr, vr_ptr, kq_ptr, ks_ptr, km_ptr, vq_ptr, vs_ptr, vm_ptr, b, h,
                HKV, W, CAP, RES: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                GV: tl.constexpr, BITS: tl.constexpr):
    """If the token at pos brought the dense count to RES + GROUP: quantize dense group j
    (tokens j * GROUP ...) of kv head (b, h) from the rings (B, HKV, W, D) into the store
    (memfit.kvcache's six tensors, contiguous, CAP tokens); else nothing. Also called by
    memfit.kernels.triton_rope's kernel (the decode step's flush without a launch)."""
    n = tl.load(pos_ptr).to(tl.int32) + 1
    if (n > RES) & ((n - RES) % GROUP == 0):
        QMAX: tl.constexpr = 2 ** BITS - 1
        NB: tl.constexpr = D * BITS // 8
        NV: tl.constexpr = D // GV
        bh = b * HKV + h
        j = (n - RES) // GROUP - 1
        t = j * GROUP + tl.arange(0, GROUP)
        rd = tl.arange(0, D)
        rb = tl.arange(0, NB)
        ring = (bh * W + t % W)[:, None] * D + rd[None, :]
        k = tl.load(kr_ptr + ring).to(tl.float32)  # (GROUP, D): one scale per channel
        lo = tl.min(k, axis=0)
        scale = tl.maximum(tl.math.div_rn(tl.max(k, axis=0) - lo, QMAX * 1.0), 2.0 ** -14)
        scale = scale.to(tl.float16)
        low = lo.to(tl.float16)
        y = tl.math.div_rn(k - low.to(tl.float32)[None, :], scale.to(tl.float32)[None, :])
        c = tl.minimum(tl.maximum(_round_even(y), 0.0), QMAX * 1.0)
        codes = (bh * CAP + t)[:, None] * NB + rb[None, :]
        tl.store(kq_ptr + codes, _pack(c, GROUP, D, BITS))
        kpar = (bh * (CAP // GROUP) + j) * D + rd
        tl.store(ks_ptr + kpar, scale)
        tl.store(km_ptr + kpar, low)
        v = tl.reshape(tl.load(vr_ptr + ring).to(tl.float32), (GROUP, NV, GV))
        lo = tl.min(v, axis=2)  # (GROUP, D / GV): one scale per token and channel group
        scale = tl.maximum(tl.math.div_rn(tl.max(v, axis=2) - lo, QMAX * 1.0), 2.0 ** -14)
        scale = scale.to(tl.float16)
        low = lo.to(tl.float16)
        y = tl.math.div_rn(v - low.to(tl.float32)[:, :, None], scale.to(tl.float32)[:, :, None])
        c = tl.reshape(tl.minimum(tl.maximum(_round_even(y), 0.0), QMAX * 1.0), (GROUP, D))
        tl.store(vq_ptr + codes, _pack(c, GROUP, D, BITS))
        vpar = (bh * CAP + t)[:, None] * NV + tl.arange(0, NV)[None, :]
        tl.store(vs_ptr + vpar, scale)
        tl.store(vm_ptr + vpar, low)


@triton.jit
def _kv_flush(pos_ptr, kr_ptr, vr_ptr, kq_ptr, ks_ptr, km_ptr, vq_ptr, vs_ptr, vm_ptr, HKV, W,
              CAP, RES: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, GV: tl.constexpr,
              BITS: tl.constexpr, PDL: tl.constexpr = False):
    """`flush_group` for kv head pid, as a launch of its own."""
    pdl.wait(PDL)
    pid = tl.program_id(0)
    flush_group(pos_ptr, kr_ptr, vr_ptr, kq_ptr, ks_ptr, km_ptr, vq_ptr, vs_ptr, vm_ptr,
                pid // HKV, pid % HKV, HKV, W, CAP, RES, GROUP, D, GV, BITS)


def flush(pos: torch.Tensor, kr: torch.Tensor, vr: torch.Tensor, store, bits: int, group: int,
          residual: int) -> None:
    """After the step at pos (1,) wrote its token into the rings kr/vr (B, Hkv, W, D): quantize
    the group leaving them into `store` (memfit.kvcache's six tensors at capacity, contiguous),
    when one does."""
    b, h, w, d = kr.shape
    _kv_flush[(b * h,)](pos, kr, vr, *store, h, w, store[0].shape[2], RES=residual, GROUP=group,
                        D=d, GV=d // store[4].shape[-1], BITS=bits, num_warps=4,
                        **pdl.launch_kw())


def attention(q: torch.Tensor, store, kr: torch.Tensor, vr: torch.Tensor, pos: torch.Tensor,
              bits: int, group: int, residual: int, scaling: float,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, Hq, D) attention (float32 sums, written as `dtype`) of q (B, Hq, D) over a static
    cache at position pos: the packed splits (triton_kv_mma's kernel where it takes the cache,
    else triton_kv's), planned for the store's capacity, each reading how many tokens are packed
    from pos; then the merge with the ring (kv_merge)."""
    from memfit.kernels import triton_kv
    from memfit.kernels.kv_merge import merge
    b, hq, d = q.shape
    q = q.contiguous()
    cap = store[0].shape[2]
    dyn = (pos, residual)
    parts = triton_kv._mma_parts(q, store, bits, group, scaling, None, dyn=dyn) if cap else None
    if parts is None:
        n = triton_kv.n_splits(cap, b, kr.shape[1], group, q) if cap else 0
        out = torch.empty(b, hq, n, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, hq, n, dtype=torch.float32, device=q.device)
        if n:
            triton_kv._launch_packed(q, store, out, lse, bits, group, scaling, n, dyn=dyn)
        parts = (out, lse)
    return merge(*parts, q, kr, vr, scaling, ring=(pos, residual, group), dtype=dtype)
