"""The merge of memfit's KV decode attention (memfit.kernels.triton_kv, triton_kv_mma): the
split kernels' normalized parts and base-2 log-sum-exp, merged exactly with the attention over
the dense recent window, which the merge computes itself (one launch); the split prologue both
packed kernels share; and the float64/float32 references the tests and benchmarks compare
against."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memfit.kernels import pdl
from memfit.kernels.sizes import cdiv, next_pow2

LOG2E = 1.4426950408889634
# launch settings: channels a program (more programs: the merge is latency-bound), window tokens
# a step, warps; from `wide_rows` rows (batch x query heads) on, `wide_channels` channels a
# program (each program recomputes the window's scores over all channels: with rows enough to
# fill the device, fewer, wider programs win). One H200, 8B shape, int4 cache at 1k context
# (benchmarks/decode_kv.py --merge, RESULTS.md session 16): batch 1 (32 rows) 32 channels
# 366.5 tok/s, 128 356.0; batch 4 1211.1 vs 1273.6; batch 16 3248.3 vs 3624.8 (8k: 2283.5 vs
# 2475.9).
MERGE = {"channels": 32, "tokens": 128, "warps": 8, "wide_rows": 128, "wide_channels": 128}


def split_plan(t: int, b: int, hkv: int, tile: int, per_sm: int, q: torch.Tensor,
               splits: int | None = None) -> tuple[int, int]:
    """(tokens per split, splits) for t packed tokens in whole `tile`-token tiles, ~per_sm
    programs a multiprocessor unless `splits` is given (the packed kernels' grid)."""
    if splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        splits = cdiv(per_sm * sms, b * hkv)
    splits = max(1, min(t // tile, splits))
    tps = cdiv(cdiv(t, splits), tile) * tile
    return tps, cdiv(t, tps)


@triton.jit
def _packed_count(T, pos_ptr, RES: tl.constexpr, GROUP: tl.constexpr):
    """Packed tokens: T, or with RES (a static cache, memfit.kernels.kv_static) those of a
    cache at position pos (device): whole key groups while more than RES tokens are dense."""
    if RES:
        n = tl.load(pos_ptr).to(tl.int32) + 1
        return (tl.maximum(n - RES, 0) // GROUP) * GROUP
    else:
        return T


@triton.jit
def _split_bases(kq_ptr, vq_ptr, b, h, pid_s, T, TPS, s_kb, s_kh, s_sb, s_sh, s_vb, s_vh, s_wb,
                 s_wh):
    """Split pid_s's tokens [t0, t1) and kv head (b, h)'s key/value code bases and offsets of its
    key-group and value-token parameters (the packed kernels' shared prologue)."""
    t0 = pid_s * TPS
    t1 = tl.minimum(t0 + TPS, T)
    return (t0, t1, kq_ptr + b * s_kb + h * s_kh, vq_ptr + b * s_vb + h * s_vh,
            b * s_sb + h * s_sh, b * s_wb + h * s_wh)


@triton.jit
def _kv_combine(o_ptr, l_ptr, y_ptr, q_ptr, k_ptr, v_ptr, S, TR, HQ, HKV, qk_scale, s_qb, s_qh,
                s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, SP: tl.constexpr, D: tl.constexpr,
                BR: tl.constexpr, DB: tl.constexpr, pos_ptr=None, RES: tl.constexpr = 0,
                GROUP: tl.constexpr = 1, RING: tl.constexpr = 0, PDL: tl.constexpr = False):
    """y[r, cb] = the exact merge, for channels cb (DB of them, program axis 1), of the S
    normalized packed parts of row r (one (batch, query head)) and of its attention over the TR
    dense recent tokens (B, Hkv, TR, D), which this program computes itself (float32, BR tokens
    at a time; the scores over all D channels, the values over its DB): no launch of its own.
    Parts of empty splits (lse -inf) count zero. RING (a static cache at position pos, residual
    RES, key groups GROUP): the dense tokens are those past the packed ones, token t in slot
    t % RING of a (B, Hkv, RING, D) ring. PDL: launched with memfit.kernels.pdl."""
    pdl.wait(PDL)
    r = tl.program_id(0)
    cb = tl.program_id(1) * DB
    bb = r // HQ
    h = (r % HQ) // (HQ // HKV)
    rs = tl.arange(0, SP)
    rd = tl.arange(0, D)
    rc = cb + tl.arange(0, DB)
    q = tl.load(q_ptr + bb * s_qb + (r % HQ) * s_qh + rd).to(tl.float32) * qk_scale
    lse = tl.load(l_ptr + r * S + rs, mask=rs < S, other=float("-inf"))  # loaded first: their
    o = tl.load(o_ptr + (r * S + rs)[:, None] * D + rc[None, :], mask=(rs < S)[:, None],
                other=0.0)  # latency overlaps the dense window's
    o = tl.where((lse > float("-inf"))[:, None], o, 0.0)  # an empty split's 0/0
    t0 = 0
    if RING:
        t0 = _packed_count(0, pos_ptr, RES, GROUP)
        TR = tl.load(pos_ptr).to(tl.int32) + 1 - t0
    m_d = tl.full((), float("-inf"), tl.float32)
    l_d = tl.full((), 0.0, tl.float32)
    acc = tl.zeros((DB,), tl.float32)
    for tb in range(0, TR, BR):
        rt = tb + tl.arange(0, BR)
        ok = (rt < TR)[:, None]
        slot = rt
        if RING:
            slot = (t0 + rt) % RING
        k = tl.load(k_ptr + bb * s_kb + h * s_kh + slot[:, None] * s_kt + rd[None, :], mask=ok,
                    other=0.0).to(tl.float32)
        v = tl.load(v_ptr + bb * s_vb + h * s_vh + slot[:, None] * s_vt + rc[None, :], mask=ok,
                    other=0.0).to(tl.float32)
        sc = tl.where(rt < TR, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_d, tl.max(sc, axis=0))
        p = tl.exp2(sc - m_new)
        alpha = tl.exp2(m_d - m_new)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_d = l_d * alpha + tl.sum(p, axis=0)
        m_d = m_new
    lse_d = m_d + tl.log2(l_d)  # -inf when TR == 0
    top = tl.maximum(tl.max(lse, axis=0), lse_d)
    w = tl.exp2(lse - top)
    w_d = tl.exp2(lse_d - top)
    y = tl.sum(o * w[:, None], axis=0) + acc * (w_d / tl.where(l_d > 0, l_d, 1.0))
    tl.store(y_ptr + r * D + rc, y / (tl.sum(w, axis=0) + w_d))


def merge(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, keys: torch.Tensor,
          values: torch.Tensor, scaling: float, ring: tuple | None = None,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, Hq, D) float32: the parts out (B, Hq, S, D) / lse (B, Hq, S) of q (B, Hq, D) merged
    with its attention over the dense keys/values (B, Hkv, t, D) (t may be 0). ring = (pos,
    residual, group): keys/values are a static cache's ring (memfit.kernels.kv_static); dtype:
    the output's (the sums are float32)."""
    b, hq, d = q.shape
    hkv, n = keys.shape[1], out.shape[2]
    y = torch.empty(b, hq, d, dtype=dtype, device=q.device)
    db = min(d, MERGE["channels"] if b * hq < MERGE["wide_rows"] else MERGE["wide_channels"])
    _kv_combine[(b * hq, d // db)](
        out, lse, y, q, keys, values, n, keys.shape[2], hq, hkv, scaling * LOG2E, q.stride(0),
        q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0),
        values.stride(1), values.stride(2), SP=next_pow2(max(n, 1)), D=d,
        BR=MERGE["tokens"], DB=db, num_warps=MERGE["warps"],
        **({} if ring is None else dict(pos_ptr=ring[0], RES=ring[1], GROUP=ring[2],
                                        RING=keys.shape[2], **pdl.launch_kw())))
    return y


def combine(parts) -> torch.Tensor:
    """Exact merge of softmax parts [(out (..., S, D) normalized, lse (..., S) base 2)]:
    (..., D) float32."""
    outs = torch.cat([o for o, _ in parts], dim=-2)  # (..., S_total, D)
    lses = torch.cat([lse for _, lse in parts], dim=-1)  # (..., S_total)
    top = lses.amax(dim=-1, keepdim=True)
    w = torch.exp2(lses - top)
    w = w / w.sum(dim=-1, keepdim=True)
    return (outs * w.unsqueeze(-1)).sum(dim=-2)


def dense_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float):
    """Softmax part of q (B, Hq, D) over dense k, v (B, Hkv, t, D): (out (B, Hq, 1, D),
    lse (B, Hq, 1)) in float32, base-2 lse (for `combine`)."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.float().view(b, hkv, hq // hkv, d)  # (B, Hkv, G, D)
    s = torch.einsum("bhgd,bhtd->bhgt", qg, k.float()) * (scaling * LOG2E)
    top = s.amax(dim=-1, keepdim=True)
    p = torch.exp2(s - top)
    tot = p.sum(dim=-1, keepdim=True)
    out = torch.einsum("bhgt,bhtd->bhgd", p / tot, v.float())
    lse = (top + torch.log2(tot)).squeeze(-1)
    return out.reshape(b, hq, 1, d), lse.reshape(b, hq, 1)


def reference(q, k, v, scaling: float) -> torch.Tensor:
    """float64 attention of q (B, Hq, D) over dense k, v (B, Hkv, T, D): (B, Hq, D)."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.double().view(b, hkv, hq // hkv, d)
    p = torch.softmax(torch.einsum("bhgd,bhtd->bhgt", qg, k.double()) * scaling, dim=-1)
    return torch.einsum("bhgt,bhtd->bhgd", p, v.double()).reshape(b, hq, d)

