"""Decode attention over the packed 4-bit KV cache with every tile in registers: one warp per
program, a 64-token tile per step, keys and values multiplied on `mma.sync` straight from their
packed words (the PTX and its fragment mapping: memfit.kernels.kv_mma_ptx).

Why: memfit.kernels.triton_kv's tile (tl.dot on 16-row padded query blocks, codes converted and
written to shared memory for the tensor cores) compiled to ~5.8 SASS instructions a code and ran
at ~1.1 TB/s (0.94x bf16 SDPA at 32k, benchmarks/RESULTS.md). Here the query heads are the mma's
n = 8 columns (no 16-row padding), the codes become float16 by one LOP3 per pair in the mma's
own register layout, P never leaves registers (movmatrix), and the loop touches no shared
memory (820 SASS instructions a 64-token tile for the warp, ~2980 before; sm_90 build).

Takes: 4-bit codes, head_dim 128, 1..8 query heads per KV head, power-of-two key groups >= 64
(a tile lies in one key group), value groups of 128 or 64 channels (memfit.kvcache's
`int4-g128`, `int4-g64`; with 64, each token's value words are first transposed across the 4
lanes that hold them, so that an m-tile's channels lie in one group); `ineligibility` says why
not. GPU only (inline PTX): on the CPU
and under TRITON_INTERPRET memfit.kernels.triton_kv takes every cache. Output: the normalized
parts and base-2 log-sum-exp of each split, merged with the dense window by
memfit.kernels.kv_merge.

Measured (benchmarks/kv_attention.py, one H200, Triton 3.6, RESULTS.md session 14; 32 query / 8
KV heads, batch 1): 32k context, int4-g128 whole call 22.1-22.2 µs vs bf16 SDPA 37.7-37.9
(1.70-1.71x; this kernel alone 16.0 µs, 2.25 TB/s; the previous kernel's call 38.5), 3.72x less
KV memory; int4-g64 24.8 µs (1.53x, 3.52x less); 8k 11.4 / 11.9 vs 15.6 µs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from memfit.kernels import kv_mma_ptx as ptx
from memfit.kernels import mma_ptx
from memfit.kernels.kv_merge import _packed_count, _split_bases, split_plan

LOG2E = 1.4426950408889634
TILE = 64
# programs (one warp each) per multiprocessor; L2 prefetch of the tile this many ahead (0: none;
# 1-2 measured no faster, RESULTS.md session 14)
TUNE = {"per_sm": 8, "prefetch": 0}
ENABLED = os.environ.get("MEMFIT_KV_MMA", "1") != "0"  # MEMFIT_KV_MMA=0: the previous kernel


def ineligibility(bits: int, head_dim: int, group: int, gv: int, gq: int) -> str | None:
    """Why this kernel cannot take the cache (None when it can)."""
    if bits != 4:
        return f"{bits}-bit codes (this kernel reads 4-bit)"
    if head_dim != 128:
        return f"head_dim {head_dim} (this kernel reads 128)"
    if not 1 <= gq <= 8:
        return f"{gq} query heads per KV head (this kernel takes 1 to 8)"
    if group < TILE or group & (group - 1):
        return f"key group {group} is not a power of two >= {TILE}"
    if gv not in (64, 128):
        return f"value group {gv} (this kernel takes 64 or 128)"
    return None


@triton.jit
def _half(w, BF16: tl.constexpr):
    """The low 16 bits of int32 w as a float16/bfloat16 number, in float32."""
    if BF16:
        return (w << 16).to(tl.float32, bitcast=True)
    return (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _kv_mma(qw_ptr, kw_ptr, ksw_ptr, kmw_ptr, vw_ptr, vs_ptr, vm_ptr, o_ptr, l_ptr, T, TPS, HKV,
            NSPLIT, qk_scale, s_qb, s_qh, s_kb, s_kh, s_kt, s_sb, s_sh, s_sg, s_vb, s_vh, s_vt,
            s_wb, s_wh, G: tl.constexpr, GROUP: tl.constexpr, NG: tl.constexpr, BF16: tl.constexpr,
            KEYS: tl.constexpr, VALUES: tl.constexpr, EPI: tl.constexpr, PRO: tl.constexpr,
            C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr, C4: tl.constexpr,
            PF: tl.constexpr, pos_ptr=None, RES: tl.constexpr = 0):
    """Split pid_s (TPS tokens, whole 64-token tiles) of kv head pid_bh: normalized partial
    output (B, Hq, NSPLIT, 128) float32 and base-2 log-sum-exp (B, Hq, NSPLIT). Every tensor
    the asm takes is a (64, 16) int32 tile loaded in 16-byte vectors, or index arithmetic, so
    Triton lays them all out as the fragments need (checked by mma_ptx.check_layout). RES: a
    static cache's store at position pos (device), T its capacity (kv_merge._packed_count)."""
    T = _packed_count(T, pos_ptr, RES, GROUP)
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    r = tl.arange(0, 64)[:, None]  # row = token of the tile
    cc = tl.arange(0, 16)[None, :]
    g = r % 8
    i = r // 8
    j = cc // 4
    e = cc % 4
    # query pairs of head g, channels 32j + 2m, 32j + 2m + 1 (the odd one divided by 16), word
    # m = 4i + e < 16 of the lane's range (16-bit q read as 32-bit words)
    qok = (g < G) & (i < 4)
    qw = tl.load(qw_ptr + b * s_qb + (h * G + g) * s_qh + 16 * j + 4 * i + e, mask=qok, other=0)
    qa = _half(qw, BF16) * qk_scale
    qb = _half(qw >> 16, BF16) * (qk_scale / 16)
    lo = qa.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    qh = lo | (qb.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16)
    zero = tl.zeros((64, 16), tl.float32)
    st = tl.where((i == 0) & (e < 2), float("-inf"), zero)  # slots 0, 1: m = -inf; l, L = 0
    acc = zero
    t0, t1, kbase, vbase, sb, wb = _split_bases(kw_ptr, vw_ptr, b, h, pid_s, T, TPS, s_kb, s_kh,
                                                 s_sb, s_sh, s_vb, s_vh, s_wb, s_wh)
    # key scale words 0..15 of lane j's channels in elements 0..15, minima in 16..31
    kp_off = sb + 16 * j + 4 * (i % 4) + e
    kp_lo = i < 4
    # the asm takes byte addresses as int64 tiles (Triton 3.6 refuses pointer and float
    # operands in one asm call)
    zp = tl.zeros((64, 16), tl.int64)
    vsa = (vs_ptr + wb).to(tl.int64) + zp
    vma = (vm_ptr + wb).to(tl.int64) + zp
    st = tl.inline_asm_elementwise(PRO, C4, [st, vsa + 2 * NG * t0, vma + 2 * NG * t0],
                                   dtype=tl.float32, is_pure=True, pack=32)
    for tb in range(t0, t1, 64):
        rt = tb + r
        kw = tl.load(kbase + rt * s_kt + cc)
        kg = (tb // GROUP) * s_sg
        kp = tl.where(kp_lo, tl.load(ksw_ptr + kp_off + kg), tl.load(kmw_ptr + kp_off + kg))
        tn = tl.minimum(tb + 64, t1 - 64)  # the next tile (the last one reloads itself)
        if PF:  # the L2 asked for the tile after next (PF tiles ahead)
            ta = tl.minimum(tb + 64 * PF, t1 - 64)
            kpf = (kbase + ta * s_kt).to(tl.int64) + zp
            vpf = (vbase + ta * s_vt).to(tl.int64) + zp
            st, pb = tl.inline_asm_elementwise(
                KEYS, C1, [st, kw, qh, kp, vsa + 2 * NG * tn, vma + 2 * NG * tn, kpf, vpf],
                dtype=(tl.float32, tl.int32), is_pure=True, pack=32)
        else:
            st, pb = tl.inline_asm_elementwise(
                KEYS, C1, [st, kw, qh, kp, vsa + 2 * NG * tn, vma + 2 * NG * tn],
                dtype=(tl.float32, tl.int32), is_pure=True, pack=32)
        vw = tl.load(vbase + rt * s_vt + cc)
        acc, st = tl.inline_asm_elementwise(VALUES, C2, [acc, st, vw, pb],
                                            dtype=(tl.float32, tl.float32), is_pure=True,
                                            pack=32)
    y, z = tl.inline_asm_elementwise(EPI, C3, [acc, st], dtype=(tl.float32, tl.float32),
                                     is_pure=True, pack=32)
    # element (row 8i + g, column 4j + c) holds head 2j + c % 2 and, one value group a token,
    # channel 32(g // 2) + 8(i // 2) + 4(g % 2) + 2(i % 2) + c // 2; two (the value words
    # transposed across the lane quad), channel 32(i // 2) + 4g + 2(i % 2) + c // 2
    # (kv_mma_ptx: value m-tile i)
    head = 2 * j + e % 2
    if NG == 1:
        ch = 32 * (g // 2) + 8 * (i // 2) + 4 * (g % 2) + 2 * (i % 2) + e // 2
    else:
        ch = 32 * (i // 2) + 4 * g + 2 * (i % 2) + e // 2
    row = (b * HKV * G + h * G + head + 0 * r) * NSPLIT + pid_s  # (+ 0 r: the tile's shape)
    ok = head < G
    tl.store(o_ptr + row * 128 + ch, y, mask=ok)
    tl.store(l_ptr + row, z, mask=ok & (g == 0) & (i == 0) & (e < 2))


# per value groups a token (1: int4-g128, 2: int4-g64): keys, values, epilogue, prologue asm
ASM = {ng: (ptx.keys_asm(ng=ng), ptx.values_asm(ng), ptx.epi_asm(ng), ptx.prologue_asm(ng))
       for ng in (1, 2)}
CONS = (ptx.constraints(2, 4, 2), ptx.constraints(2, 4), ptx.constraints(2, 2),
        ptx.constraints(1, 1, 2))
KEYS_PF = ({ng: ptx.keys_asm(prefetch=True, ng=ng) for ng in (1, 2)},
           ptx.constraints(2, 4, 4))


def _words(x: torch.Tensor) -> torch.Tensor:
    """A contiguous uint8/float16 tensor viewed as int32 words along its last axis."""
    return x.contiguous().view(torch.int32)


def packed_parts(q: torch.Tensor, store, group: int, scaling: float,
                 splits: int | None = None, dyn: tuple | None = None):
    """(out (B, Hq, S, 128) float32 normalized per split, lse (B, Hq, S) base 2) of q (B, Hq,
    128) over the packed tokens of `store` ([codes, scale, min] of keys, then values, as
    memfit.kvcache holds them). dyn = (pos, residual): a static cache's store, as many tokens
    packed as at position pos (memfit.kernels.kv_static)."""
    kq, ks, km, vq, vs, vm = store
    b, hq, d = q.shape
    _, hkv, t, _ = kq.shape
    gv = d // vs.shape[-1]
    why = ineligibility(4 if kq.shape[-1] * 2 == d else 0, d, group, gv, hq // hkv)
    if why is not None:
        raise ValueError(f"triton_kv_mma cannot take this cache: {why}")
    if t % TILE or t % group:
        raise ValueError(f"{t} packed tokens are not whole key groups of {group}")
    if q.dtype not in (torch.bfloat16, torch.float16):
        q = q.to(torch.bfloat16)
    qw = _words(q)
    kw, vw, ksw, kmw = _words(kq), _words(vq), _words(ks), _words(km)
    vs, vm = vs.contiguous(), vm.contiguous()
    tps, n = split_plan(t, b, hkv, TILE, TUNE["per_sm"], q, splits)
    pf = TUNE["prefetch"]
    ng = d // gv
    asm = ASM[ng]
    out = torch.empty(b, hq, n, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, n, dtype=torch.float32, device=q.device)
    k = _kv_mma[(b * hkv, n)](
        qw, kw, ksw, kmw, vw, vs, vm, out, lse, t, tps, hkv, n, scaling * LOG2E, qw.stride(0),
        qw.stride(1), kw.stride(0), kw.stride(1), kw.stride(2), ksw.stride(0), ksw.stride(1),
        ksw.stride(2), vw.stride(0), vw.stride(1), vw.stride(2), vs.stride(0), vs.stride(1),
        G=hq // hkv, GROUP=group, NG=ng, BF16=q.dtype == torch.bfloat16,
        KEYS=KEYS_PF[0][ng] if pf else asm[0], VALUES=asm[1], EPI=asm[2], PRO=asm[3],
        C1=KEYS_PF[1] if pf else CONS[0], C2=CONS[1], C3=CONS[2], C4=CONS[3], PF=pf,
        num_warps=1, num_stages=1,
        **({} if dyn is None else dict(pos_ptr=dyn[0], RES=dyn[1])))
    mma_ptx.check_layout(k)
    return out, lse
