"""Decode attention over the packed KV cache of memfit.kvcache (KIVI-style), without dequantizing
it whole: each program dequantizes one tile of tokens in registers and folds it into an online
softmax (flash-decoding: the tokens are split over programs, a small kernel merges the splits
exactly through their log-sum-exp).

Layout read (as QuantizedKVLayer stores it, contiguous along the token axis):
- keys:   codes (B, Hkv, T, D*bits/8) packed per token along D; scale and minimum (B, Hkv, T/g, D)
          float16, one per (group of g tokens, channel): k = code * scale + min;
- values: codes (B, Hkv, T, D*bits/8); scale and minimum (B, Hkv, T, D/gv) float16, one per
          (token, group of gv channels).
One program takes one kv head of one sequence, its G = Hq/Hkv query heads (GQA, padded to 16 rows
for the tensor cores) and a run of whole BT-token tiles, each inside one key group. The codes are
read as bit planes (4 bits: low nibbles = even channels, high = odd; 2 bits: four planes; 8 bits:
one): one tensor-core dot per plane, each plane's output its own accumulator, stored strided: no
unpack shuffle. On the GPU a code becomes float16 through inline PTX (1024 + c under the
exponent byte, minus 1024: exact, no int-to-float conversion). No tile is multiplied by a scale:
the key scales multiply the query, the value scales multiply p per value group (a 3-D dot with
the group as its batch), and the minima enter through dots with ones; float16 operands (the
scales are stored in float16), float32 sums; the next tile's scales are loaded a tile ahead.

`kv_attention` = the packed splits (one launch) and the merge (one launch), whose programs also
attend over the dense recent window (float32, a few hundred tokens at most). Takes 8/4/2-bit
codes, head_dim a power of two with D*bits/8 >= 16, power-of-two key groups >= 16, value groups
of >= 16 columns per plane that split head_dim into a power of two; `kv_ineligibility` says why
not otherwise, and memfit.kvcache then dequantizes + SDPA (warned once).

Measured (benchmarks/kv_attention.py, one H200, Triton 3.6, 2026-12-01; 32 query / 8 KV heads,
head_dim 128, 32k context, whole call): int4 g128 40.2 µs, g64 41.2 µs vs bf16 SDPA 38.0 µs
(0.94x / 0.92x; 3.72x / 3.52x less KV memory); g32 87.0 µs (a g32 tile is 32 tokens: per-tile
costs dominate), so 4/2-bit caches with key groups < 64 use memfit.kernels.triton_kv_legacy
(59.4 µs at g32 in an earlier run).
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

from memfit.kernels import mma_ptx
from memfit.kernels import triton_kv_mma as kvm
from memfit.kernels.kv_merge import (  # noqa: F401 (re-exported)
    MERGE,
    _packed_count,
    _split_bases,
    combine,
    dense_part,
    merge,
    reference,
    split_plan,
)
from memfit.kernels.sizes import next_pow2

LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter's 16-bit floats: float32


def _asm(bits: int) -> str:
    """PTX: one 32-bit register of 4 packed bytes -> each plane's 4 codes as float16 (2
    registers a plane): mask the plane's bits, one byte permute per 2 codes puts each code under
    the exponent byte 0x64 (1024 + c), one packed subtraction of 1024 (exact)."""
    src = f"${2 * max(1, 8 // bits) if bits < 8 else 2}"  # read first: it may share a register
    lines = ["{", ".reg .b32 t, o, w;", f"mov.b32 w, {src};", "mov.b32 o, 0x64006400;"]
    for i in range(8 // bits if bits < 8 else 1):
        if bits < 8:
            lines.append(f"shr.b32 t, w, {i * bits};")
            lines.append(f"and.b32 t, t, {hex((2**bits - 1) * 0x01010101)};")
        else:
            lines.append("mov.b32 t, w;")
        for j, sel in enumerate(("0x5140", "0x5342")):
            lines.append(f"prmt.b32 ${2 * i + j}, t, 0x64646464, {sel};")
            lines.append(f"sub.f16x2 ${2 * i + j}, ${2 * i + j}, o;")
    return "\n".join(lines + ["}"])


ASM = {b: _asm(b) for b in (2, 4, 8)}
CONSTRAINTS = {b: ",".join(["=r"] * 2 * (8 // b if b < 8 else 1) + ["r"]) for b in (2, 4, 8)}


@triton.jit
def _planes(x, BITS: tl.constexpr, MAGIC: tl.constexpr, ASM_S: tl.constexpr,
            CONS: tl.constexpr):
    """Packed bytes x -> its NP planes (plane i: the codes at bits i*BITS of each byte): float16
    (MAGIC: inline PTX, ~1.25 instructions per code, no int-to-float conversion) or float32."""
    if MAGIC:
        if BITS == 8:
            r = tl.inline_asm_elementwise(ASM_S, CONS, [x], dtype=tl.float16, is_pure=True,
                                          pack=4)
        elif BITS == 4:
            r = tl.inline_asm_elementwise(ASM_S, CONS, [x], dtype=(tl.float16, tl.float16),
                                          is_pure=True, pack=4)
        else:
            r = tl.inline_asm_elementwise(ASM_S, CONS, [x], dtype=(tl.float16,) * 4,
                                          is_pure=True, pack=4)
    else:
        c = x.to(tl.int32)
        if BITS == 8:
            r = c.to(tl.float32)
        elif BITS == 4:
            r = (c & 15).to(tl.float32), (c >> 4).to(tl.float32)
        else:
            r = ((c & 3).to(tl.float32), ((c >> 2) & 3).to(tl.float32),
                 ((c >> 4) & 3).to(tl.float32), (c >> 6).to(tl.float32))
    return r


@triton.jit
def _kpar(ks_ptr, km_ptr, soff, rj, NP: tl.constexpr):
    """A key group's scales and minima, per plane (unused planes repeat plane 0)."""
    a0 = tl.load(ks_ptr + soff + NP * rj)
    b0 = tl.load(km_ptr + soff + NP * rj)
    a1, b1, a2, b2, a3, b3 = a0, b0, a0, b0, a0, b0
    if NP > 1:
        a1 = tl.load(ks_ptr + soff + NP * rj + 1)
        b1 = tl.load(km_ptr + soff + NP * rj + 1)
    if NP > 2:
        a2 = tl.load(ks_ptr + soff + NP * rj + 2)
        b2 = tl.load(km_ptr + soff + NP * rj + 2)
        a3 = tl.load(ks_ptr + soff + NP * rj + 3)
        b3 = tl.load(km_ptr + soff + NP * rj + 3)
    return a0, b0, a1, b1, a2, b2, a3, b3


@triton.jit
def _kdot(s, qm, q, kc, ks, km, DT: tl.constexpr):
    """Plane of a key tile (one key group): s += (q * scale) codes^T on tensor cores,
    qm += q * min (the caller adds its row sums through one more dot: no reduction)."""
    ks = ks.to(tl.float32)
    km = km.to(tl.float32)
    return tl.dot((q * ks[None, :]).to(DT), tl.trans(kc.to(DT)), s), qm + q * km[None, :]


@triton.jit
def _vdot(a, alpha, p3, vc, DT: tl.constexpr):
    """Plane of a value tile, per value group (the batch): a * alpha + (p * scale) codes."""
    return a * alpha[None, :, None] + tl.dot(p3, vc.to(DT))


@triton.jit
def _kv_packed(q_ptr, kq_ptr, ks_ptr, km_ptr, vq_ptr, vs_ptr, vm_ptr, o_ptr, l_ptr, T, TPS, HKV,
               NSPLIT, qk_scale, s_qb, s_qh, s_kb, s_kh, s_kt, s_sb, s_sh, s_sg, s_vb, s_vh, s_vt,
               s_wb, s_wh, s_wt, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
               BITS: tl.constexpr, GROUP: tl.constexpr, GV: tl.constexpr, BT: tl.constexpr,
               MAGIC: tl.constexpr, DT: tl.constexpr, ASM_S: tl.constexpr, CONS: tl.constexpr,
               pos_ptr=None, RES: tl.constexpr = 0):
    """Split pid_s (TPS tokens, whole BT-token tiles, BT | GROUP) of kv head pid_bh over the
    packed store: normalized partial output (B, Hq, NSPLIT, D) and base-2 log-sum-exp.

    Planes: NP = 8/BITS (8 bits: one); plane i holds channels NP*j + i. Keys: the tile lies in
    one key group, so s = sum_i (q_i * scale_i) codes_i^T + q . min. Values: one scale and min
    per (token, group of GV channels), so per value group g (the batch of a 3-D dot):
    acc_g += (p * scale_g) codes_g + p . min_g. No tile is ever multiplied by a scale.
    RES: a static cache's store at position pos (device), T its capacity (kv_merge._packed_count)."""
    NP: tl.constexpr = 8 // BITS if BITS < 8 else 1
    W: tl.constexpr = D // NP  # plane width = bytes per token row
    # value groups per token as the kernel splits them: one group of a whole row is split in
    # two (both halves read the same scale) where a half still makes a dot: measured faster
    DG: tl.constexpr = 2 if D // GV == 1 and W >= 32 else D // GV
    GB: tl.constexpr = W // DG  # bytes (= plane columns) per value group
    T = _packed_count(T, pos_ptr, RES, GROUP)
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    rg = tl.arange(0, GP)
    rj = tl.arange(0, W)
    rt0 = tl.arange(0, BT)
    rdg = tl.arange(0, DG)
    rw = (rdg * (D // DG)) // GV  # each group's scale column
    rb = tl.arange(0, GB)
    g_ok = rg < G
    qrow = q_ptr + b * s_qb + (h * G + rg)[:, None] * s_qh
    q0 = tl.load(qrow + (NP * rj)[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
    q0 = q0 * qk_scale
    q1 = q0
    q2 = q0
    q3 = q0
    if NP > 1:
        q1 = tl.load(qrow + (NP * rj + 1)[None, :], mask=g_ok[:, None], other=0.0)
        q1 = q1.to(tl.float32) * qk_scale
    if NP > 2:
        q2 = tl.load(qrow + (NP * rj + 2)[None, :], mask=g_ok[:, None], other=0.0)
        q3 = tl.load(qrow + (NP * rj + 3)[None, :], mask=g_ok[:, None], other=0.0)
        q2 = q2.to(tl.float32) * qk_scale
        q3 = q3.to(tl.float32) * qk_scale
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    mv = tl.zeros((DG, GP, GB), tl.float32)  # sum p . min of each value group, per column
    a0 = tl.zeros((DG, GP, GB), tl.float32)
    a1 = a0
    a2 = a0
    a3 = a0
    t0, t1, kbase, vbase, sb, wb = _split_bases(kq_ptr, vq_ptr, b, h, pid_s, T, TPS, s_kb, s_kh,
                                                 s_sb, s_sh, s_vb, s_vh, s_wb, s_wh)
    # the scales of the next tile are loaded one iteration ahead (the code tiles are pipelined
    # by the compiler; these small loads are not, and their latency serialized every tile)
    c0, d0, c1, d1, c2, d2, c3, d3 = _kpar(ks_ptr, km_ptr, sb + (t0 // GROUP) * s_sg, rj, NP)
    vs = tl.load(vs_ptr + wb + (t0 + rt0)[None, :] * s_wt + rw[:, None])  # (DG, BT)
    vm = tl.load(vm_ptr + wb + (t0 + rt0)[None, :] * s_wt + rw[:, None])
    for tb in range(t0, t1, BT):
        rt = tb + rt0
        tn = tl.minimum(tb + BT, t1 - BT)  # the next tile (the last one reloads itself)
        n0, e0, n1, e1, n2, e2, n3, e3 = _kpar(ks_ptr, km_ptr, sb + (tn // GROUP) * s_sg, rj, NP)
        vsn = tl.load(vs_ptr + wb + (tn + rt0)[None, :] * s_wt + rw[:, None])
        vmn = tl.load(vm_ptr + wb + (tn + rt0)[None, :] * s_wt + rw[:, None])
        kp = tl.load(kbase + rt[:, None] * s_kt + rj[None, :])  # (BT, W) bytes
        vp = tl.load(vbase + rt[None, :, None] * s_vt + (rdg * GB)[:, None, None]
                     + rb[None, None, :])  # (DG, BT, GB) bytes: value group g's columns
        s = tl.zeros((GP, BT), tl.float32)
        qm = tl.zeros((GP, W), tl.float32)
        if NP == 1:
            s, qm = _kdot(s, qm, q0, _planes(kp, BITS, MAGIC, ASM_S, CONS), c0, d0, DT)
        elif NP == 2:
            k0, k1 = _planes(kp, BITS, MAGIC, ASM_S, CONS)
            s, qm = _kdot(s, qm, q0, k0, c0, d0, DT)
            s, qm = _kdot(s, qm, q1, k1, c1, d1, DT)
        else:
            k0, k1, k2, k3 = _planes(kp, BITS, MAGIC, ASM_S, CONS)
            s, qm = _kdot(s, qm, q0, k0, c0, d0, DT)
            s, qm = _kdot(s, qm, q1, k1, c1, d1, DT)
            s, qm = _kdot(s, qm, q2, k2, c2, d2, DT)
            s, qm = _kdot(s, qm, q3, k3, c3, d3, DT)
        s = tl.dot(qm.to(DT), tl.full((W, BT), 1.0, DT), s)  # + q . min on every column
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p3 = (p[None, :, :] * vs.to(tl.float32)[:, None, :]).to(DT)  # (DG, GP, BT)
        p4 = (p[None, :, :] * vm.to(tl.float32)[:, None, :]).to(DT)  # sum_t p min_g, a column:
        mv = _vdot(mv, alpha, p4, tl.full((DG, BT, GB), 1.0, DT), DT)  # a dot, no reduction
        if NP == 1:
            a0 = _vdot(a0, alpha, p3, _planes(vp, BITS, MAGIC, ASM_S, CONS), DT)
        elif NP == 2:
            v0, v1 = _planes(vp, BITS, MAGIC, ASM_S, CONS)
            a0 = _vdot(a0, alpha, p3, v0, DT)
            a1 = _vdot(a1, alpha, p3, v1, DT)
        else:
            v0, v1, v2, v3 = _planes(vp, BITS, MAGIC, ASM_S, CONS)
            a0 = _vdot(a0, alpha, p3, v0, DT)
            a1 = _vdot(a1, alpha, p3, v1, DT)
            a2 = _vdot(a2, alpha, p3, v2, DT)
            a3 = _vdot(a3, alpha, p3, v3, DT)
        m_i = m_new
        c0, d0, c1, d1, c2, d2, c3, d3 = n0, e0, n1, e1, n2, e2, n3, e3
        vs = vsn
        vm = vmn
    inv = (1.0 / l_i)[None, :, None]  # every split holds >= 1 tile; padded rows score 0
    mvb = mv
    row = (b * HKV * G + h * G + rg) * NSPLIT + pid_s  # (B, Hq, S) flattened
    optr = o_ptr + row[None, :, None] * D + (NP * (rdg[:, None, None] * GB + rb[None, None, :]))
    ok = g_ok[None, :, None]
    tl.store(optr, (a0 + mvb) * inv, mask=ok)
    if NP > 1:
        tl.store(optr + 1, (a1 + mvb) * inv, mask=ok)
    if NP > 2:
        tl.store(optr + 2, (a2 + mvb) * inv, mask=ok)
        tl.store(optr + 3, (a3 + mvb) * inv, mask=ok)
    tl.store(l_ptr + row, m_i + tl.log2(l_i), mask=g_ok)


def _new_ineligibility(bits: int, head_dim: int, group: int, gv: int) -> str | None:
    """Why this module's kernel cannot take the cache (None when it can)."""
    if bits not in (2, 4, 8):
        return f"{bits}-bit KV codes"
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two >= 16"
    if bits < 8 and head_dim * bits < 128:  # a plane is D * bits / 8 wide: a dot needs >= 16
        return f"{bits}-bit codes with head_dim {head_dim} < {128 // bits}"
    if group < 16 or group & (group - 1):  # a tile lies in one key group: >= 16 tokens
        return f"key group {group} is not a power of two >= 16"
    gb = gv * bits // 8 if bits < 8 else gv  # a value group's columns in a plane: a dot's N
    if head_dim % gv or (head_dim // gv) & (head_dim // gv - 1) or gb < 16 or gb & (gb - 1):
        return (f"value group {gv} does not split head_dim {head_dim} into a power of two of "
                f"groups of >= {128 // bits if bits < 8 else 16} channels")
    return None


def uses_new_kernel(bits: int, head_dim: int, group: int, gv: int) -> bool:
    """This module's kernel, or memfit.kernels.triton_kv_legacy's (4/2-bit codes with key groups
    < 64, where a tile of one key group is short: measured slower, see that module)?"""
    from memfit.kernels import triton_kv_legacy as legacy
    if _new_ineligibility(bits, head_dim, group, gv) is not None:
        return False
    return bits == 8 or group >= 64 or legacy.kv_ineligibility(bits, head_dim, group, gv) is not None


def kv_ineligibility(bits: int, head_dim: int, group: int, gv: int) -> str | None:
    """Why neither decode-attention kernel can take the cache (None when one can)."""
    from memfit.kernels import triton_kv_legacy as legacy
    new = _new_ineligibility(bits, head_dim, group, gv)
    old = legacy.kv_ineligibility(bits, head_dim, group, gv)
    return None if new is None or old is None else f"{new}; previous kernel: {old}"


# launch settings: tokens per tile (at most), warps, software-pipeline stages, programs per SM
TUNE = {"tile": 64, "warps": 2, "stages": 3, "per_sm": 4}


def _plan(t: int, b: int, hkv: int, group: int, q, splits: int | None, tile: int):
    """(tile, tokens per split, splits) for t packed tokens (whole key groups)."""
    if t % group:
        raise ValueError(f"{t} packed tokens are not whole key groups of {group}")
    bt = min(tile, group)  # a tile lies in one key group
    return (bt, *split_plan(t, b, hkv, bt, TUNE["per_sm"], q, splits))


def _launch_packed(q, store, out, lse, bits, group, scaling, total, splits=None, tile=None,
                   warps=None, stages=None, dyn=None):
    kq, ks, km, vq, vs, vm = store
    b, hq, d = q.shape
    _, hkv, t, _ = kq.shape
    bt, tps, n = _plan(t, b, hkv, group, q, splits, tile or TUNE["tile"])
    _kv_packed[(b * hkv, n)](
        q, kq, ks, km, vq, vs, vm, out, lse, t, tps, hkv, total, scaling * LOG2E, q.stride(0),
        q.stride(1), kq.stride(0), kq.stride(1), kq.stride(2), ks.stride(0), ks.stride(1),
        ks.stride(2), vq.stride(0), vq.stride(1), vq.stride(2), vs.stride(0), vs.stride(1),
        vs.stride(2), G=hq // hkv, GP=max(16, next_pow2(hq // hkv)), D=d, BITS=bits,
        GROUP=group, GV=d // vs.shape[-1], BT=bt, MAGIC=not INTERPRET,
        DT=tl.float32 if INTERPRET else tl.float16, ASM_S=ASM[bits], CONS=CONSTRAINTS[bits],
        num_warps=warps or TUNE["warps"], num_stages=stages or TUNE["stages"],
        **({} if dyn is None else dict(pos_ptr=dyn[0], RES=dyn[1])))


def n_splits(t: int, b: int, hkv: int, group: int, q, splits=None, tile=None) -> int:
    return _plan(t, b, hkv, group, q, splits, tile or TUNE["tile"])[2]


_MMA_WARNED: set = set()


def _mma_parts(q, store, bits, group, scaling, splits, dyn=None):
    """The packed parts from memfit.kernels.triton_kv_mma where it takes the cache (CUDA, 4-bit,
    head_dim 128, key groups >= 64 of one value group a token), else None."""
    _, hq, d = q.shape
    hkv, t = store[0].shape[1], store[0].shape[2]
    if (not q.is_cuda or INTERPRET or not kvm.ENABLED or t % kvm.TILE
            or kvm.ineligibility(bits, d, group, d // store[4].shape[-1], hq // hkv)):
        return None
    try:
        return kvm.packed_parts(q, store, group, scaling, splits, dyn)
    except mma_ptx.MmaLayoutError as err:  # a compiler that lays the asm out otherwise
        if "layout" not in _MMA_WARNED:
            _MMA_WARNED.add("layout")
            warnings.warn(f"memfit: KV decode attention falls back from the mma kernel: {err}",
                          stacklevel=3)
        return None


def kv_attention(q: torch.Tensor, store, bits: int, group: int, scaling: float,
                 keys: torch.Tensor | None = None, values: torch.Tensor | None = None,
                 splits: int | None = None, **tune) -> torch.Tensor:
    """Attention (B, Hq, D) float32 of q (B, Hq, D) over the packed tokens of `store`
    ([codes, scale, min] of keys then values, as QuantizedKVLayer holds them) followed by the
    dense `keys`/`values` (B, Hkv, t, D), if given: two launches (the packed splits; the merge,
    which also attends over the dense window). `tune`: tile/warps/stages overrides. 4/2-bit caches
    with key groups < 64 go to memfit.kernels.triton_kv_legacy (`uses_new_kernel`)."""
    b, hq, d = q.shape
    if not uses_new_kernel(bits, d, group, d // store[4].shape[-1]):
        from memfit.kernels import triton_kv_legacy as legacy
        return legacy.kv_attention(q, store, bits, group, scaling, keys, values, splits)
    store = [x.contiguous() for x in store]
    q = q.contiguous()
    hkv, t = store[0].shape[1], store[0].shape[2]
    parts = _mma_parts(q, store, bits, group, scaling, splits) if t and not tune else None
    if parts is not None:
        out, lse = parts
        n = out.shape[2]
    else:
        n = n_splits(t, b, hkv, group, q, splits, tune.get("tile")) if t else 0
        out = torch.empty(b, hq, n, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, hq, n, dtype=torch.float32, device=q.device)
        if n:
            _launch_packed(q, store, out, lse, bits, group, scaling, n, splits, **tune)
    if keys is None:
        keys = values = q.new_zeros(b, hkv, 0, d)
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        keys, values = keys.contiguous(), values.contiguous()
    return merge(out, lse, q, keys, values, scaling)


def kv_attention_parts(q: torch.Tensor, kq, ks, km, vq, vs, vm, bits: int, group: int,
                       scaling: float, splits: int | None = None, **tune):
    """The packed tokens' parts alone: (out (B, Hq, S, D) float32 normalized per split, lse
    (B, Hq, S) base 2), for `combine` (tests, and merging other parts)."""
    store = [x.contiguous() for x in (kq, ks, km, vq, vs, vm)]
    q = q.contiguous()
    b, hq, d = q.shape
    n = n_splits(kq.shape[2], b, kq.shape[1], group, q, splits, tune.get("tile"))
    out = torch.empty(b, hq, n, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, n, dtype=torch.float32, device=q.device)
    _launch_packed(q, store, out, lse, bits, group, scaling, n, splits, **tune)
    return out, lse
