"""Triton kernels for memfit's native decode step (memfit.fastdecode): the small pieces of a
Llama-family layer, one launch each, so that a CUDA-graph step is ~9 launches per layer instead
of the ~30 of transformers' eager modules (measured: those small launches, not the matmuls, were
most of a batch-1 step; benchmarks/RESULTS.md).

- `add_rmsnorm(h, r, w, eps)`: h += r (rounded to h's dtype, the residual stream), then
  y = w * rmsnorm(h) with transformers' rounding (normalised in float32, cast, times w);
  r = None skips the add. One program per row.
- `rope_cache(qkv, pos, cos, sin, kc, vc)` (memfit.kernels.triton_rope): splits the fused q/k/v projection, rotates q and k
  (rotate_half convention, products rounded as transformers' bf16 arithmetic does), writes k and v
  into the static cache at `pos` and returns q as (B, H, T, D). cos/sin are (max_len, D) tables
  in the activation dtype, indexed by position inside the kernel.
- `decode_attention(q, kc, vc, pos)`: one query token per row (T = 1), grouped-query heads read
  once per KV head, keys 0..pos (the position read from device memory, so a captured graph
  needs no host value), online softmax in float32, P rounded to the cache dtype before P @ V.
  One program per (row, KV head, split of the keys) and a merge kernel when the keys are split.
- `rope_attention(qkv, pos, cos, sin, kc, vc, ...)`: the two above in one launch for T = 1 (the
  new token's key and value are written by split 0 and attended from registers, so no program
  reads a slot the launch writes); head_dim >= 32 (tl.dot needs K >= 16 per half).
- `silu_mul(gu)`: (R, 2I) fused gate/up output -> silu(gate) * up, rounded as transformers does.
- `argmax_rows(x)`: greedy ids in two launches, first index among ties like torch.argmax
  (torch's one-block reduction over a 128256-wide row took 35 µs of a 2.7 ms step).

All are launched with programmatic dependent launch where available (memfit.kernels.pdl): each
waits for the previous grid at its start.

Each has a torch reference beside it (`*_ref`); the CPU tests compare them under
TRITON_INTERPRET=1, and memfit.fastdecode uses the references on the CPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from memfit.kernels import pdl
from memfit.kernels.sizes import cdiv, next_pow2
from memfit.kernels.triton_rope import rope_cache, rope_cache_ref  # noqa: F401 (re-exported)


@triton.jit
def _add_rmsnorm(h_ptr, r_ptr, w_ptr, y_ptr, N, eps, HAS_R: tl.constexpr, BLOCK: tl.constexpr,
                 PDL: tl.constexpr):
    pdl.wait(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(h_ptr + row * N + cols, mask=ok, other=0.0)
    if HAS_R:
        x = (x.to(tl.float32) + tl.load(r_ptr + row * N + cols, mask=ok, other=0.0).to(tl.float32))
        x = x.to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * N + cols, x, mask=ok)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N
    n = (xf * tl.rsqrt(var + eps)).to(h_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + cols, (n * w).to(y_ptr.dtype.element_ty), mask=ok)


def add_rmsnorm(h: torch.Tensor, r: torch.Tensor | None, w: torch.Tensor, eps: float) -> torch.Tensor:
    """In place h += r (if r is given); returns rmsnorm(h) * w. h, r: (R, N) contiguous."""
    rows, n = h.shape
    y = torch.empty_like(h)
    _add_rmsnorm[(rows,)](h, h if r is None else r, w, y, n, eps, HAS_R=r is not None,
                          BLOCK=next_pow2(n), num_warps=8, **pdl.launch_kw())
    return y


def add_rmsnorm_ref(h, r, w, eps):
    if r is not None:
        h.add_(r)
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (w * x.to(h.dtype)).to(h.dtype)


@triton.jit
def _decode_attn(q_ptr, kc_ptr, vc_ptr, pos_ptr, o_ptr, m_ptr, l_ptr, H, KVH, L, PER_SPLIT,
                 scale, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BL: tl.constexpr,
                 SPLIT: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)
    bk = tl.program_id(0)  # b * KVH + kv head
    sp = tl.program_id(1)
    b = bk // KVH
    kh = bk % KVH
    n = tl.load(pos_ptr) + 1            # keys 0 .. pos
    g = tl.arange(0, GP)
    dd = tl.arange(0, D)
    qrow = b * H + kh * G + g           # the G query heads of this KV head (T = 1)
    q = tl.load(q_ptr + qrow[:, None] * D + dd[None, :], mask=(g < G)[:, None], other=0.0)
    m_i = tl.full((GP,), -float("inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)
    lo = sp * PER_SPLIT
    hi = tl.minimum(lo + PER_SPLIT, n)
    base = bk * L * D
    for j0 in range(lo, hi, BL):
        j = j0 + tl.arange(0, BL)
        ok = j < hi
        k = tl.load(kc_ptr + base + j[:, None] * D + dd[None, :], mask=ok[:, None], other=0.0)
        if IEEE:  # float32 caches: no TF32 (the same greedy tokens as transformers')
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale                 # (GP, BL) float32
        s = tl.where(ok[None, :], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(vc_ptr + base + j[:, None] * D + dd[None, :], mask=ok[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if SPLIT == 1:
        out = acc / l_i[:, None]
        tl.store(o_ptr + qrow[:, None] * D + dd[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=(g < G)[:, None])
    else:  # partial sums of this split: (SPLIT, B*H, D) float32, m and l (SPLIT, B*H)
        prow = sp * (tl.num_programs(0) // KVH * H) + qrow
        tl.store(o_ptr + prow[:, None] * D + dd[None, :], acc, mask=(g < G)[:, None])
        tl.store(m_ptr + prow, m_i, mask=g < G)
        tl.store(l_ptr + prow, l_i, mask=g < G)


@triton.jit
def _merge(acc_ptr, m_ptr, l_ptr, o_ptr, ROWS, D: tl.constexpr, SPLIT: tl.constexpr,
           PDL: tl.constexpr):
    pdl.wait(PDL)
    row = tl.program_id(0)
    s = tl.arange(0, SPLIT)
    dd = tl.arange(0, D)
    m = tl.load(m_ptr + s * ROWS + row)
    l = tl.load(l_ptr + s * ROWS + row)
    mx = tl.max(m, axis=0)
    wgt = tl.where(l > 0, tl.exp(m - mx), 0.0)                  # empty splits weigh nothing
    acc = tl.load(acc_ptr + (s[:, None] * ROWS + row) * D + dd[None, :])
    out = tl.sum(acc * wgt[:, None], axis=0) / tl.sum(l * wgt, axis=0)
    tl.store(o_ptr + row * D + dd, out.to(o_ptr.dtype.element_ty))


def decode_attention(q, kc, vc, pos, scale: float, split: int = 1) -> torch.Tensor:
    """q (B, H, 1, D), caches (B, KVH, L, D), pos (1,) -> (B, 1, H * D) attention over keys
    0..pos. `split` programs share each KV head's keys (a power of two; 1: no merge launch)."""
    bsz, heads, _, d = q.shape
    kvh, length = kc.shape[1], kc.shape[2]
    g = heads // kvh
    out = torch.empty(bsz, 1, heads * d, dtype=q.dtype, device=q.device)
    bl = 64 if d <= 128 else 32
    per = cdiv(cdiv(length, split), bl) * bl
    gp = max(16, next_pow2(g))
    ieee = q.dtype == torch.float32
    if split == 1:
        _decode_attn[(bsz * kvh, 1)](q, kc, vc, pos, out, out, out, heads, kvh, length, per,
                                     scale, G=g, GP=gp, D=d, BL=bl, SPLIT=1, IEEE=ieee,
                                     num_warps=4, **pdl.launch_kw())
        return out
    rows = bsz * heads
    acc = torch.empty(split, rows, d, dtype=torch.float32, device=q.device)
    m = torch.empty(split, rows, dtype=torch.float32, device=q.device)
    lsum = torch.empty(split, rows, dtype=torch.float32, device=q.device)
    _decode_attn[(bsz * kvh, split)](q, kc, vc, pos, acc, m, lsum, heads, kvh, length, per,
                                     scale, G=g, GP=gp, D=d, BL=bl, SPLIT=split, IEEE=ieee,
                                     num_warps=4, **pdl.launch_kw())
    _merge[(rows,)](acc, m, lsum, out, rows, D=d, SPLIT=split, num_warps=4, **pdl.launch_kw())
    return out


@triton.jit
def _rot(x1, x2, c1, s1, c2, s2):
    """rotate_half rotary of halves x1, x2 with transformers' 16-bit rounding of each product."""
    dt = x1.dtype
    a1 = x1.to(tl.float32)
    a2 = x2.to(tl.float32)
    o1 = ((a1 * c1).to(dt).to(tl.float32) - (a2 * s1).to(dt).to(tl.float32)).to(dt)
    o2 = ((a2 * c2).to(dt).to(tl.float32) + (a1 * s2).to(dt).to(tl.float32)).to(dt)
    return o1, o2


@triton.jit
def _rope_attn(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, o_ptr, m_ptr, l_ptr, H, KVH,
               L, PER_SPLIT, scale, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
               BL: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr):
    """rope_cache + decode_attention for one token per row (T = 1) in one launch: program
    (row, KV head, split) rotates its G query heads itself; split 0 also rotates the new key,
    writes key and value at `pos` and adds the new token from registers, so no program reads a
    cache slot this launch writes (keys 0..pos-1 come from the cache)."""
    pdl.wait(PDL)
    bk = tl.program_id(0)
    sp = tl.program_id(1)
    b = bk // KVH
    kh = bk % KVH
    p = tl.load(pos_ptr)
    HALF: tl.constexpr = D // 2
    g = tl.arange(0, GP)
    i = tl.arange(0, HALF)
    dd = tl.arange(0, D)
    gok = (g < G)[:, None]
    row = qkv_ptr + b * (H + 2 * KVH) * D
    c1 = tl.load(cos_ptr + p * D + i).to(tl.float32)
    c2 = tl.load(cos_ptr + p * D + HALF + i).to(tl.float32)
    s1 = tl.load(sin_ptr + p * D + i).to(tl.float32)
    s2 = tl.load(sin_ptr + p * D + HALF + i).to(tl.float32)
    qh = (kh * G + g)[:, None] * D
    q1, q2 = _rot(tl.load(row + qh + i[None, :], mask=gok, other=0.0),
                  tl.load(row + qh + HALF + i[None, :], mask=gok, other=0.0),
                  c1[None, :], s1[None, :], c2[None, :], s2[None, :])   # (GP, HALF) each
    m_i = tl.full((GP,), -float("inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)
    lo = sp * PER_SPLIT
    hi = tl.minimum(lo + PER_SPLIT, p)  # keys before the new one
    base = bk * L * D
    for j0 in range(lo, hi, BL):
        j = j0 + tl.arange(0, BL)
        ok = j < hi
        kp = kc_ptr + base + j[:, None] * D
        k1 = tl.load(kp + i[None, :], mask=ok[:, None], other=0.0)
        k2 = tl.load(kp + HALF + i[None, :], mask=ok[:, None], other=0.0)
        if IEEE:
            sc = (tl.dot(q1, tl.trans(k1), input_precision="ieee")
                  + tl.dot(q2, tl.trans(k2), input_precision="ieee")) * scale
        else:
            sc = (tl.dot(q1, tl.trans(k1)) + tl.dot(q2, tl.trans(k2))) * scale   # (GP, BL)
        sc = tl.where(ok[None, :], sc, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp(m_i - m_new)
        pr = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        v = tl.load(vc_ptr + base + j[:, None] * D + dd[None, :], mask=ok[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
        m_i = m_new
    if sp == 0:  # the new token: rotate its key, store key and value, attend from registers
        kr = row + (H + kh) * D
        k1n, k2n = _rot(tl.load(kr + i), tl.load(kr + HALF + i), c1, s1, c2, s2)
        vn = tl.load(row + (H + KVH + kh) * D + dd)
        dst = (bk * L + p) * D
        tl.store(kc_ptr + dst + i, k1n)
        tl.store(kc_ptr + dst + HALF + i, k2n)
        tl.store(vc_ptr + dst + dd, vn)
        sn = (tl.sum(q1.to(tl.float32) * k1n.to(tl.float32)[None, :], axis=1)
              + tl.sum(q2.to(tl.float32) * k2n.to(tl.float32)[None, :], axis=1)) * scale
        m_new = tl.maximum(m_i, sn)
        alpha = tl.exp(m_i - m_new)
        pn = tl.exp(sn - m_new)
        l_i = l_i * alpha + pn
        pv = pn.to(vn.dtype).to(tl.float32)
        acc = acc * alpha[:, None] + pv[:, None] * vn.to(tl.float32)[None, :]
        m_i = m_new
    qrow = b * H + kh * G + g
    if SPLIT == 1:
        tl.store(o_ptr + qrow[:, None] * D + dd[None, :], (acc / l_i[:, None]).to(
            o_ptr.dtype.element_ty), mask=gok)
    else:
        prow = sp * (tl.num_programs(0) // KVH * H) + qrow
        tl.store(o_ptr + prow[:, None] * D + dd[None, :], acc, mask=gok)
        tl.store(m_ptr + prow, m_i, mask=g < G)
        tl.store(l_ptr + prow, l_i, mask=g < G)


def rope_attention(qkv, pos, cos, sin, kc, vc, heads: int, scale: float,
                   split: int = 1) -> torch.Tensor:
    """One token per row: rope_cache + decode_attention in one launch (a merge launch too when
    split > 1). qkv (B, (H + 2 KVH) * D), pos (1,) -> (B, 1, H * D); k, v written at pos."""
    bsz, kvh, length, d = kc.shape
    g = heads // kvh
    out = torch.empty(bsz, 1, heads * d, dtype=qkv.dtype, device=qkv.device)
    bl = 64 if d <= 128 else 32
    per = cdiv(cdiv(length, split), bl) * bl
    kw = dict(G=g, GP=max(16, next_pow2(g)), D=d, BL=bl, SPLIT=split,
              IEEE=qkv.dtype == torch.float32, num_warps=4, **pdl.launch_kw())
    if split == 1:
        _rope_attn[(bsz * kvh, 1)](qkv, pos, cos, sin, kc, vc, out, out, out, heads, kvh, length,
                                   per, scale, **kw)
        return out
    rows = bsz * heads
    acc = torch.empty(split, rows, d, dtype=torch.float32, device=qkv.device)
    m = torch.empty(split, rows, dtype=torch.float32, device=qkv.device)
    lsum = torch.empty(split, rows, dtype=torch.float32, device=qkv.device)
    _rope_attn[(bsz * kvh, split)](qkv, pos, cos, sin, kc, vc, acc, m, lsum, heads, kvh, length,
                                   per, scale, **kw)
    _merge[(rows,)](acc, m, lsum, out, rows, D=d, SPLIT=split, num_warps=4, **pdl.launch_kw())
    return out


def attention_ref(q, kc, vc, pos, scale: float) -> torch.Tensor:
    """Any T: q (B, H, T, D) at positions pos (T,) over the cache -> (B, T, H * D)."""
    bsz, heads, t, d = q.shape
    g = heads // kc.shape[1]
    k = kc.repeat_interleave(g, 1)
    v = vc.repeat_interleave(g, 1)
    allowed = torch.arange(kc.shape[2], device=q.device)[None, :] <= pos[:, None]  # (T, L)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    return o.transpose(1, 2).reshape(bsz, t, heads * d)


@triton.jit
def _silu_mul(gu_ptr, o_ptr, N, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)
    row = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < N
    g = tl.load(gu_ptr + row * 2 * N + c, mask=ok, other=0.0)
    u = tl.load(gu_ptr + row * 2 * N + N + c, mask=ok, other=0.0).to(tl.float32)
    gf = g.to(tl.float32)
    a = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(o_ptr + row * N + c, (a * u).to(o_ptr.dtype.element_ty), mask=ok)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """(R, 2I) -> (R, I): silu(gu[:, :I]) * gu[:, I:]."""
    rows, n2 = gu.shape
    n = n2 // 2
    out = torch.empty(rows, n, dtype=gu.dtype, device=gu.device)
    _silu_mul[(rows, cdiv(n, 1024))](gu, out, n, BLOCK=1024, num_warps=4,
                                            **pdl.launch_kw())
    return out


def silu_mul_ref(gu: torch.Tensor) -> torch.Tensor:
    n = gu.shape[-1] // 2
    return torch.nn.functional.silu(gu[:, :n]) * gu[:, n:]


@triton.jit
def _argmax_part(x_ptr, v_ptr, i_ptr, N, CHUNKS, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)
    row = tl.program_id(0)
    c = tl.program_id(1)
    j = c * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * N + j, mask=j < N, other=-float("inf")).to(tl.float32)
    v, i = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(v_ptr + row * CHUNKS + c, v)
    tl.store(i_ptr + row * CHUNKS + c, c * BLOCK + i)


@triton.jit
def _argmax_final(v_ptr, i_ptr, o_ptr, CHUNKS, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    v = tl.load(v_ptr + row * CHUNKS + c, mask=c < CHUNKS, other=-float("inf"))
    _, k = tl.max(v, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(o_ptr + row, tl.load(i_ptr + row * CHUNKS + k).to(tl.int64))


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """(R, N) -> (R,) int64 index of each row's maximum, the first among ties (torch.argmax's
    answer; NaN-free rows assumed), in two launches that fill the chip."""
    rows, n = x.shape
    block = 2048
    chunks = cdiv(n, block)
    v = torch.empty(rows, chunks, dtype=torch.float32, device=x.device)
    i = torch.empty(rows, chunks, dtype=torch.int32, device=x.device)
    out = torch.empty(rows, dtype=torch.long, device=x.device)
    _argmax_part[(rows, chunks)](x, v, i, n, chunks, BLOCK=block, num_warps=4,
                                 **pdl.launch_kw())
    _argmax_final[(rows,)](v, i, out, chunks, BLOCK=next_pow2(chunks), num_warps=4,
                           **pdl.launch_kw())
    return out


def attn_split(length: int, rows: int) -> int:
    """Programs per KV head for `decode_attention`: enough to fill the chip at long contexts."""
    want = max(1, math.ceil(length / 512))
    return min(next_pow2(want), 32) if rows < 132 else 1
