"""The previous decode-attention kernel over the packed KV cache (unchanged from before the gpu10d
session), kept for small key groups: each program unpacks a 64-token tile (join/reshape of the
code planes), dequantizes it in registers (int -> float32 -> bfloat16, scales broadcast per key
group) and runs two bfloat16 dots; the dense recent window is one more split of the same kernel;
a merge kernel combines the splits (three launches per layer).

memfit.kernels.triton_kv sends int4/int2 caches with key groups < 64 here: its own kernel keeps a
tile inside one key group, so a group-32 cache runs 32-token tiles, measured slower there (H200,
32k context, whole call: 87.0 µs in the gpu10d session against 59.4 µs for this kernel in the
gpu10b session, same benchmark, another run); int8 and key groups >= 64 go to the new kernel.

Takes 8/4/2-bit codes, head_dim a power of two >= 16 (>= 32 below 8 bits: 4- and 2-bit codes
with head_dim 16 gave wrong sums on an H200 under Triton 3.6, cause not established), g a divisor
of the 64-token tile; `kv_ineligibility` says why not otherwise.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from memfit.kernels.sizes import cdiv, next_pow2
from memfit.kernels.triton_dequant import _unpack_tile

LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter's bfloat16 is raw bits


@triton.jit
def _kv_split(q_ptr, kq_ptr, ks_ptr, km_ptr, vq_ptr, vs_ptr, vm_ptr, o_ptr, l_ptr, T, TPS, HKV,
              NSPLIT, S0, qk_scale, s_qb, s_qh, s_kb, s_kh, s_kt, s_sb, s_sh, s_sg, s_vb, s_vh,
              s_vt, s_wb, s_wh, s_wt, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
              BITS: tl.constexpr, GROUP: tl.constexpr, GV: tl.constexpr, BT: tl.constexpr,
              DT: tl.constexpr, DENSE: tl.constexpr):
    """Split pid_s of kv head pid_bh: normalized partial output and base-2 log-sum-exp, stored as
    split S0 + pid_s of NSPLIT. DENSE: kq/vq are plain (B, Hkv, T, D) states (the recent window)."""
    PER: tl.constexpr = 8 // BITS
    DP: tl.constexpr = D // PER
    NGT: tl.constexpr = BT // GROUP  # key groups per tile
    DG: tl.constexpr = D // GV  # value channel groups
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    rg = tl.arange(0, GP)
    rd = tl.arange(0, D)
    g_ok = rg < G
    q = tl.load(q_ptr + b * s_qb + (h * G + rg)[:, None] * s_qh + rd[None, :], mask=g_ok[:, None],
                other=0.0).to(tl.float32)
    q = (q * qk_scale).to(DT)  # (GP, D), scaled by softmax scale * log2 e
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)
    t0 = pid_s * TPS
    t1 = tl.minimum(t0 + TPS, T)
    kbase = kq_ptr + b * s_kb + h * s_kh
    vbase = vq_ptr + b * s_vb + h * s_vh
    for tb in range(t0, t1, BT):
        rt = tb + tl.arange(0, BT)
        t_ok = rt < t1
        if DENSE:
            k = tl.load(kbase + rt[:, None] * s_kt + rd[None, :], mask=t_ok[:, None],
                        other=0.0).to(DT)
        else:
            rp = tl.arange(0, DP)
            kp = tl.load(kbase + rt[:, None] * s_kt + rp[None, :], mask=t_ok[:, None], other=0)
            kc = _unpack_tile(kp, BITS, BT, D).to(tl.float32)  # (BT, D) codes
            rk = tb // GROUP + tl.arange(0, NGT)  # the tile's key groups: one row of scales each
            sg = b * s_sb + h * s_sh + rk[:, None] * s_sg + rd[None, :]
            sok = (rk * GROUP < t1)[:, None]
            ks = tl.load(ks_ptr + sg, mask=sok, other=0.0).to(tl.float32)  # (NGT, D)
            km = tl.load(km_ptr + sg, mask=sok, other=0.0).to(tl.float32)
            ks = tl.reshape(tl.broadcast_to(ks[:, None, :], (NGT, GROUP, D)), (BT, D))
            km = tl.reshape(tl.broadcast_to(km[:, None, :], (NGT, GROUP, D)), (BT, D))
            k = (kc * ks + km).to(DT)
        s = tl.dot(q, tl.trans(k))  # (GP, BT) base-2 logits
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DENSE:
            v = tl.load(vbase + rt[:, None] * s_vt + rd[None, :], mask=t_ok[:, None],
                        other=0.0).to(DT)
        else:
            vp = tl.load(vbase + rt[:, None] * s_vt + rp[None, :], mask=t_ok[:, None], other=0)
            vc = _unpack_tile(vp, BITS, BT, D).to(tl.float32)
            rj = tl.arange(0, DG)
            vo = b * s_wb + h * s_wh + rt[:, None] * s_wt + rj[None, :]  # (BT, DG)
            vs = tl.load(vs_ptr + vo, mask=t_ok[:, None], other=0.0).to(tl.float32)
            vm = tl.load(vm_ptr + vo, mask=t_ok[:, None], other=0.0).to(tl.float32)
            vs = tl.reshape(tl.broadcast_to(vs[:, :, None], (BT, DG, GV)), (BT, D))
            vm = tl.reshape(tl.broadcast_to(vm[:, :, None], (BT, DG, GV)), (BT, D))
            v = (vc * vs + vm).to(DT)
        acc = acc * alpha[:, None] + tl.dot(p.to(DT), v)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    row = (b * HKV * G + h * G + rg) * NSPLIT + S0 + pid_s  # (B, Hq, S) flattened
    tl.store(o_ptr + row[:, None] * D + rd[None, :], out, mask=g_ok[:, None])
    tl.store(l_ptr + row, lse, mask=g_ok)


@triton.jit
def _kv_combine(o_ptr, l_ptr, y_ptr, S, SP: tl.constexpr, D: tl.constexpr):
    """y[r] = the exact merge of the S normalized parts of row r (one (batch, query head))."""
    r = tl.program_id(0)
    rs = tl.arange(0, SP)
    rd = tl.arange(0, D)
    lse = tl.load(l_ptr + r * S + rs, mask=rs < S, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, axis=0))
    w = w / tl.sum(w, axis=0)
    o = tl.load(o_ptr + (r * S + rs)[:, None] * D + rd[None, :], mask=(rs < S)[:, None], other=0.0)
    tl.store(y_ptr + r * D + rd, tl.sum(o * w[:, None], axis=0))


def kv_ineligibility(bits: int, head_dim: int, group: int, gv: int) -> str | None:
    if bits not in (2, 4, 8):
        return f"{bits}-bit KV codes"
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two >= 16"
    if bits < 8 and head_dim < 32:  # measured wrong on an H200 (Triton 3.6): 4/2-bit, head_dim 16
        return f"{bits}-bit codes with head_dim {head_dim} < 32"
    if 64 % group or group > 64:
        return f"key group {group} does not divide a 64-token tile"
    if head_dim % gv or (head_dim // gv) & (head_dim // gv - 1):
        return f"value group {gv} does not divide head_dim {head_dim} into a power of two"
    return None


def _launch(q, ks, km, vs, vm, kq, vq, out, lse, t, tps, splits, s0, total, bits, group, gv,
            scaling, dense):
    b, hq, d = q.shape
    hkv = kq.shape[1]
    g = hq // hkv
    _kv_split[(b * hkv, splits)](
        q, kq, ks, km, vq, vs, vm, out, lse, t, tps, hkv, total, s0, scaling * LOG2E,
        q.stride(0), q.stride(1), kq.stride(0), kq.stride(1), kq.stride(2), ks.stride(0),
        ks.stride(1), ks.stride(2), vq.stride(0), vq.stride(1), vq.stride(2), vs.stride(0),
        vs.stride(1), vs.stride(2), G=g, GP=max(16, next_pow2(g)), D=d, BITS=bits,
        GROUP=group, GV=gv, BT=64, DT=tl.float32 if INTERPRET else tl.bfloat16, DENSE=dense,
        num_warps=4)


def kv_attention(q: torch.Tensor, store, bits: int, group: int, scaling: float,
                 keys: torch.Tensor | None = None, values: torch.Tensor | None = None,
                 splits: int | None = None) -> torch.Tensor:
    """Attention (B, Hq, D) float32 of q (B, Hq, D) over the packed tokens of `store`
    ([codes, scale, min] of keys then values, as QuantizedKVLayer holds them) followed by the
    dense `keys`/`values` (B, Hkv, t, D), if given: three launches (the packed splits, the dense
    window as one more split, the merge)."""
    kq, ks, km, vq, vs, vm = (x.contiguous() for x in store)
    b, hq, d = q.shape
    _, hkv, t, _ = kq.shape
    gv = d // vs.shape[-1]
    if splits is None:  # ~4 programs per multiprocessor, whole 64-token tiles per split
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        splits = max(1, min(cdiv(t, 64), cdiv(4 * sms, b * hkv)))
    tps = cdiv(cdiv(t, splits), 64) * 64
    splits = cdiv(t, tps)
    extra = 1 if keys is not None else 0
    total = splits + extra
    q = q.contiguous()
    out = torch.empty(b, hq, total, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, total, dtype=torch.float32, device=q.device)
    _launch(q, ks, km, vs, vm, kq, vq, out, lse, t, tps, splits, 0, total, bits, group, gv,
            scaling, False)
    if extra:
        keys, values = keys.contiguous(), values.contiguous()
        tr = keys.shape[2]
        _launch(q, ks, km, vs, vm, keys, values, out, lse, tr, cdiv(tr, 64) * 64, 1,
                splits, total, bits, group, gv, scaling, True)
    y = torch.empty(b, hq, d, dtype=torch.float32, device=q.device)
    _kv_combine[(b * hq,)](out, lse, y, total, SP=next_pow2(total), D=d,
                           num_warps=4)
    return y
