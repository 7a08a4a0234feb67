"""Ahead-of-time builds of memfit's GPU-only kernel paths for Hopper (sm_90), run by
tests/kernels/test_sm90_compile.py in a process of its own (Triton's interpreter, which the CPU
tests switch on, cannot compile). Prints one JSON object: case -> "ok" or the error.

    python -m tests.kernels.sm90_build
"""

import itertools
import json
import multiprocessing
import os
import re
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from memfit.kernels import (
    fragments,
    mma_ptx,
    triton_bytes,
    triton_dequant,
    triton_kv,
    triton_kv_mma,
    triton_mma,
    triton_moe,
    triton_prefill,
    triton_widen,
    triton_words,
)

SM90 = GPUTarget("cuda", 90, 32)
DT = {"f16": "fp16", "bf16": "bf16", "f32": "fp32"}


def build(fn, sig: dict, const: dict, warps: int = 4, stages: int = 1):
    """Compile `fn` for sm_90; pointers, strides and N as the launcher specializes them
    (16-aligned), so the layouts are the ones a GPU launch gets."""
    sig = dict(sig) | {k: "constexpr" for k in const}
    names = list(sig)
    aligned = [n for n in names if n.endswith("_ptr") or n.startswith("stride") or n == "N"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                          target=SM90, options={"num_warps": warps, "num_stages": stages})


def mma_kernel(mt: int, nsub: int, zmode: int, sdt: str, f16: bool, rb: int, epi: bool,
               bn: int = 128, warps: int = 4, unroll: int = 1, reps: int = 1, prefetch: int = 1,
               wide: bool = False, routed: int = 0):
    xdt = "fp16" if f16 else "bf16"
    sig = {"x_ptr": f"*{xdt}", "q_ptr": "*i32", "s_ptr": f"*{DT[sdt]}",
           "z_ptr": "*u8" if zmode else f"*{DT[sdt]}", "b_ptr": f"*{xdt}", "y_ptr": f"*{xdt}",
           "p_ptr": "*fp32", "c_ptr": "*i32", "zx_ptr": "*i32", "M": "i32", "N": "i32",
           "ITERS": "i32", "STEPS": "i32", "stride_xm": "i32", "stride_qn": "i32",
           "stride_sn": "i32", "stride_zn": "i32", "stride_ps": "i32", "ids_ptr": "*i32",
           "t_ptr": "*i64", "X_DIV": "i32"}
    group = 128 // nsub if mt == 1 else 128
    const = triton_mma.constants(mt, group, zmode, sdt, f16, bn, 2, unroll, rb, epi, reps,
                                 False, True, prefetch, False, wide) | {"PDL": False,
                                                                        "ROUTED": int(routed)}
    return build(triton_mma._mma_gemv, sig, const, warps)


SHAPES = [(256, 8, 1), (64, 4, 2), (64, 4, 4), (64, 4, 1)]  # bn, warps, unroll
CASES = (
    # the asm epilogue: every group split, zero-point kind, scale dtype and layout
    [(1, nsub, zmode, sdt, f16, rb, True)
     for nsub, zmode, sdt, f16, rb in itertools.product((1, 2, 4), (0, 1), ("f16", "bf16", "f32"),
                                                        (False, True), (0, 64))
     if (sdt, f16) in (("f16", False), ("bf16", True), ("f32", False)) or nsub == 2]
    # the Triton epilogue: M = 1, one and two token sets of the activations loaded in the asm
    + [(mt, nsub, 1, "f16", f16, rb, False) for mt, nsub in ((1, 1), (1, 2), (8, 1), (16, 1))
       for f16, rb in ((False, 0), (True, 64))])


def check_mma(mt, nsub, zmode, sdt, f16, rb, epi, bn=128, warps=4, unroll=1, reps=1,
              prefetch=1, wide=False, routed=0):
    k = mma_kernel(mt, nsub, zmode, sdt, f16, rb, epi, bn, warps, unroll, reps, prefetch, wide,
                   routed)
    ptx = k.asm["ptx"]
    if routed:  # an expert's codes at a loaded offset still load as 16-byte vectors
        plain = mma_kernel(mt, nsub, zmode, sdt, f16, rb, epi, bn, warps, unroll, reps,
                           prefetch, wide).asm["ptx"]
        vec = lambda p: len(re.findall(r"ld\.global[.\w]*\.v4\.b32", p))
        assert vec(ptx) == vec(plain) > 0, ("routed vector loads", vec(ptx), vec(plain))
    # wide: the two scales of a tile (groups of 64, stored layout) in one 32-bit load
    assert ("ld.global.nc.b32 h," in ptx) == (wide and epi and nsub == 2 and not rb), "wide"
    assert ptx.count("mma.sync.aligned.m16n8k16") >= (8 if mt < 16 else 16), "mma count"
    fold = mt == 1 and nsub == 1 and prefetch == 2 and unroll == 1 and not epi
    # FOLD (triton_mma._constants): the tile is folded into the accumulator in the asm
    assert ("fma.rn.f32 u," in ptx) == (epi or fold), "the asm fold"
    if epi:  # the scales come from the asm's own loads, a tile ahead: no layout conversion
        assert any(f"ld.global.nc.{t}" in ptx for t in ("b16", "u16", "b32")), "param loads"
        loop = k.asm["ttgir"].split("scf.for")[1].split("scf.yield")[0]
        assert "convert_layout" not in loop, "a layout conversion in the EPI loop"
    mma_ptx.LAYOUT_OK.pop(id(k), None)
    mma_ptx.check_layout(k)  # raises MmaLayoutError otherwise


@triton.jit
def _planes_probe(x_ptr, o_ptr, BITS: tl.constexpr, ASM_S: tl.constexpr, CONS: tl.constexpr):
    r = tl.arange(0, 128)
    x = tl.load(x_ptr + r)
    NP: tl.constexpr = 8 // BITS if BITS < 8 else 1
    if NP == 1:
        tl.store(o_ptr + r, triton_kv._planes(x, BITS, True, ASM_S, CONS))
    elif NP == 2:
        a, b = triton_kv._planes(x, BITS, True, ASM_S, CONS)
        tl.store(o_ptr + r, a + b)
    else:
        a, b, c, d = triton_kv._planes(x, BITS, True, ASM_S, CONS)
        tl.store(o_ptr + r, a + b + c + d)


def check_planes(bits):
    k = build(_planes_probe, {"x_ptr": "*u8", "o_ptr": "*fp16"},
              {"BITS": bits, "ASM_S": triton_kv.ASM[bits], "CONS": triton_kv.CONSTRAINTS[bits]})
    assert "prmt.b32" in k.asm["ptx"] and "sub.f16x2" in k.asm["ptx"], "planes asm"


def check_words_dot(bm, bn_warps, sk):
    bn, warps = bn_warps
    """The word-dot kernel as the chooser launches it (M <= 16): it builds, within the 227 KB of
    shared memory a Hopper block may take."""
    sig = {"x_ptr": "*bf16", "q_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "b_ptr": "*bf16",
           "y_ptr": "*bf16", "p_ptr": "*fp32", "c_ptr": "*i32", "M": "i32", "N": "i32",
           "NW": "i32", "NG": "i32", "ITERS": "i32", "stride_xm": "i32", "stride_qn": "i32",
           "stride_sn": "i32", "stride_zn": "i32", "stride_ym": "i32", "stride_ps": "i32"}
    const = dict(GROUP=128, BITS=4, ZMODE=1, HAS_BIAS=False, IEEE=False, BM=bm, BN=bn, T=1, WG=16,
                 SPLIT_K=sk, SHIFT=False)
    sig = dict(sig) | {k: "constexpr" for k in const}
    names = list(sig)
    aligned = [n for n in names if n.endswith("_ptr") or n.startswith("stride") or n == "N"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    k = triton.compile(ASTSource(fn=triton_words._words_dot, signature=sig, constexprs=const,
                                 attrs=attrs), target=SM90,
                       options={"num_warps": warps, "num_stages": 3})
    assert k.metadata.shared <= 232448, f"{k.metadata.shared} bytes of shared memory"


def check_kv_mma(gq: int, stages: int, bf16: bool = True, pf: int = 0, ng: int = 1,
                 res: int = 0):
    """The register-only KV attention kernel as packed_parts launches it: it builds, its asm
    operands have the fragments' layout, no layout conversion in its loop. res: the static
    cache's variant (packed count read from the position, memfit.kernels.kv_static)."""
    sig = {n: "*i32" for n in ("qw_ptr", "kw_ptr", "ksw_ptr", "kmw_ptr", "vw_ptr")}
    sig |= {"vs_ptr": "*fp16", "vm_ptr": "*fp16", "o_ptr": "*fp32", "l_ptr": "*fp32"}
    sig |= {n: "i32" for n in ("T", "TPS", "HKV", "NSPLIT")} | {"qk_scale": "fp32"}
    sig |= {n: "i32" for n in ("s_qb", "s_qh", "s_kb", "s_kh", "s_kt", "s_sb", "s_sh", "s_sg",
                               "s_vb", "s_vh", "s_vt", "s_wb", "s_wh")}
    k = triton_kv_mma
    asm = k.ASM[ng]
    const = {"G": gq, "GROUP": 128, "NG": ng, "BF16": bf16,
             "KEYS": k.KEYS_PF[0][ng] if pf else asm[0], "VALUES": asm[1], "EPI": asm[2],
             "PRO": asm[3], "C1": k.KEYS_PF[1] if pf else k.CONS[0], "C2": k.CONS[1],
             "C3": k.CONS[2], "C4": k.CONS[3], "PF": pf}
    sig = dict(sig) | {n: "constexpr" for n in const}
    if res:  # the trailing arguments, in order
        sig["pos_ptr"] = "*i64"
    else:
        const["pos_ptr"] = None
        sig["pos_ptr"] = "constexpr"
    const["RES"] = res
    sig["RES"] = "constexpr"
    names = list(sig)
    aligned = [n for n in names if n.endswith("_ptr") and n not in const] + [
        "s_qb", "s_qh", "s_kb", "s_kh", "s_kt", "s_sb", "s_sh", "s_sg", "s_vb", "s_vh", "s_vt",
        "s_wb", "s_wh", "TPS"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    kern = triton.compile(ASTSource(fn=k._kv_mma, signature=sig, constexprs=const, attrs=attrs),
                          target=SM90, options={"num_warps": 1, "num_stages": stages})
    p = kern.asm["ptx"]
    assert p.count("mma.sync.aligned.m16n8k16") >= 84, "mma count"
    assert "movmatrix.sync.aligned.m8n8.trans.b16" in p, "movmatrix"
    loop = kern.asm["ttgir"].split("scf.for")[1].split("scf.yield")[0]
    assert "convert_layout" not in loop, "a layout conversion in the loop"
    mma_ptx.LAYOUT_OK.pop(id(kern), None)
    mma_ptx.check_layout(kern)
    return kern


def check_tile(dq: int, pf: int, f16: bool, rb: int, bn: int = 64, warps: int = 4, sk: int = 1,
               pair: bool = False, pdl: bool = False, group: int = 128, bm: int = 64,
               ragged: bool = False):
    """The tile kernel with the weight as the wgmma A operand and its PTX unpacks (DQ 1: bytes
    doubled; DQ 3 / 5: words straight into the fragments, 32- / 128-code order; DQ 5 at BN 64 /
    4 warps and BN 128 / 8 warps without a shared-memory conversion in the K loop, also with
    two tiles a step, PAIR, and with 256 tokens a tile, prefill):
    it builds, and DQ 3 leaves no byte unpacking (PRMT) between its asm and the wgmma at the
    shapes where Triton keeps the fragment layout (BN 256, 8 warps)."""
    xdt = "fp16" if f16 else "bf16"
    sig = {"x_ptr": f"*{xdt}", "q_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*u8",
           "b_ptr": "*fp16", "y_ptr": f"*{xdt}", "M": "i32", "N": "i32", "K": "i32", "NB": "i32",
           "ITERS": "i32", "stride_xm": "i32", "stride_qn": "i32", "stride_sn": "i32",
           "stride_zn": "i32", "stride_ym": "i32", "p_ptr": "*fp32", "c_ptr": "*i32",
           "stride_ps": "i32"}
    const = dict(GROUP=group, BITS=4, ZMODE=1, HAS_BIAS=False, ATOMIC=False, IEEE=False, BM=bm,
                 BN=bn, BK=128, SPLIT_K=sk, FIX=int(sk > 1), MAGIC=0x6400 if f16 else 0x4300,
                 BASE=1024 if f16 else 128, WA=1, RB=rb, PF=pf, DQ=dq, EVEN=2, PAIR=int(pair),
                 PDL=pdl, RAGGED=int(ragged), W3=0)
    sig = dict(sig) | {k: "constexpr" for k in const}
    names = list(sig)
    aligned = [n for n in names if n.endswith("_ptr") or n.startswith("stride")
               or n in ("N", "K", "NB")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    k = triton.compile(ASTSource(fn=triton_bytes._int_mm, signature=sig, constexprs=const,
                                 attrs=attrs), target=SM90,
                       options={"num_warps": warps, "num_stages": 3})
    p = k.asm["ptx"]
    assert "wgmma.mma_async" in p, "no wgmma"
    assert ("griddepcontrol.wait" in p) == pdl
    assert ("lop3.b32" in p) and (dq < 3 or ("fma.rn.f16x2" if f16 else "fma.rn.bf16x2") in p)
    if dq == 3 and bn == 256:
        assert p.count("prmt.b32") <= 16, f"{p.count('prmt.b32')} byte permutes"
    if dq == 5:  # the load layout is the wgmma's: no shared-memory conversion in the K loop
        from benchmarks.sass_loop import loop_ops
        ops = loop_ops(k.asm["cubin"], "HGMMA")
        assert not ops.get("STS") and not ops.get("LDSM"), f"conversion in the loop: {ops}"


def check_tile3(bm: int, bn: int, sk: int, w3: int = 0):
    """The tile kernel on 3-bit codes (x as the dot's A operand, magic-number dequantize of the
    codes `_codes3` unpacks from 3-byte blocks, read as bytes or W3 words), split K by atomics
    or not."""
    sig = {"x_ptr": "*bf16", "q_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*u8",
           "b_ptr": "*fp16", "y_ptr": "*fp32" if sk > 1 else "*bf16", "M": "i32", "N": "i32",
           "K": "i32", "NB": "i32", "ITERS": "i32", "stride_xm": "i32", "stride_qn": "i32",
           "stride_sn": "i32", "stride_zn": "i32", "stride_ym": "i32", "p_ptr": "*fp32",
           "c_ptr": "*i32", "stride_ps": "i32"}
    const = dict(GROUP=128, BITS=3, ZMODE=1, HAS_BIAS=False, ATOMIC=sk > 1, IEEE=False, BM=bm,
                 BN=bn, BK=128, SPLIT_K=sk, MAGIC=0x4300, BASE=128, WA=0, RB=0, PF=0, DQ=0,
                 EVEN=1, FIX=0, PAIR=0, PDL=False, RAGGED=0, W3=w3)
    k = build(triton_bytes._int_mm, sig, const)
    assert "mma" in k.asm["ptx"], "no tensor-core instruction"


def check_perm(span: int):
    """The activations' gather into the fragment order, launched with PDL."""
    k = build(fragments._perm_cols, {"x_ptr": "*bf16", "y_ptr": "*bf16", "K": "i32",
                                        "stride_xm": "i32"},
              {"SPAN": span, "BLOCK": 1024, "PDL": True})
    assert "griddepcontrol.wait" in k.asm["ptx"]


def check_moe(bits: int, zmode: int, dot: bool, rb: int, bias: bool = False):
    """The routed mixture-of-experts GEMV (memfit.kernels.triton_moe): tensor-core or (4-bit,
    few rows) multiply-add forms, dense experts (bits 16)."""
    q = "*bf16" if bits == 16 else "*u8"
    sig = {"x_ptr": "*bf16", "ids_ptr": "*i32", "qo_ptr": "*i64", "so_ptr": "*i64",
           "zo_ptr": "*i64", "bo_ptr": "*i64", "q_ptr": q, "s_ptr": "*fp16",
           "z_ptr": "*u8" if zmode == 1 else "*fp16", "b_ptr": "*bf16", "y_ptr": "*fp32",
           "R": "i32", "N": "i32", "K": "i32", "stride_xr": "i32", "stride_qn": "i32",
           "stride_sn": "i32", "stride_zn": "i32", "stride_ys": "i32", "stride_yr": "i32"}
    const = {"KT_PER": 8, "BITS": bits, "G": 128, "ZMODE": zmode, "HAS_BIAS": bias,
             "PREC": "tf32", "BN": triton_moe.BN_ROWS, "BK": 128, "RB": rb, "DOT": dot}
    build(triton_moe._moe_gemv, sig, const, triton_moe.WARPS)


def check_moe_grouped(bits: int, zmode: int, bias: bool = False, bm: int = 64,
                      join: bool = False):
    """The grouped (prefill) mixture-of-experts kernel: packed or dense (bits 16) experts."""
    q = "*bf16" if bits == 16 else "*u8"
    sig = {"x_ptr": "*bf16", "order_ptr": "*i32", "cnt_ptr": "*i32", "qo_ptr": "*i64",
           "so_ptr": "*i64", "zo_ptr": "*i64", "bo_ptr": "*i64", "q_ptr": q, "s_ptr": "*fp16",
           "z_ptr": "*u8" if zmode == 1 else "*fp16", "b_ptr": "*bf16", "y_ptr": "*bf16",
           "N": "i32", "K": "i32", "E": "i32", "X_DIV": "i32", "stride_xr": "i32",
           "stride_qn": "i32", "stride_sn": "i32", "stride_zn": "i32", "stride_yr": "i32"}
    const = {"BITS": bits, "G": 128, "ZMODE": zmode, "HAS_BIAS": bias, "PREC": "tf32",
             "EP2": 16, "BM": bm, "BN": triton_moe.GROUP_BN, "BK": 64, "JOIN": join}
    k = build(triton_moe._moe_grouped, sig, const, triton_moe.GROUP_WARPS)
    assert "mma" in k.asm["ptx"], "no tensor-core instruction"


def check_dequant(bits: int, zmode: int, w3: int = 0):
    """The one-pass dequantize kernel (dequantize + cuBLAS), 3 bits included (codes read as
    3-byte blocks, bytes or W3 words; zero points from two bytes where they cross one)."""
    sig = {"q_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*u8" if zmode == 1 else "*fp16",
           "w_ptr": "*bf16", "N": "i32", "K": "i32", "NB": "i32", "stride_qn": "i32",
           "stride_sn": "i32", "stride_zn": "i32"}
    const = {"GROUP": 64, "BITS": bits, "ZMODE": zmode, "BN": 32, "BK": 64, "RB": 0, "W3": w3}
    k = build(triton_dequant._dequant, sig, const)
    assert "st.global" in k.asm["ptx"]


def check_gemv(bits: int, bm: int, bn: int, atomic: bool, w3: int = 0):
    """The byte GEMV (decode sizes off the mma kernel), 3 bits included (3-byte blocks of 8
    codes, bytes or W3 words)."""
    sig = {"x_ptr": "*bf16", "q_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*u8", "b_ptr": "*bf16",
           "y_ptr": "*fp32" if atomic else "*bf16", "M": "i32", "N": "i32", "K": "i32",
           "NB": "i32", "ITERS": "i32", "stride_xm": "i32", "stride_qn": "i32",
           "stride_sn": "i32", "stride_zn": "i32", "stride_ym": "i32"}
    const = {"GROUP": 128, "BITS": bits, "ZMODE": 1, "HAS_BIAS": False, "ATOMIC": atomic,
             "BM": bm, "BN": bn, "BK": 64, "SPLIT_K": 4 if atomic else 1, "W3": w3}
    k = build(triton_bytes._int_gemv, sig, const)
    assert ("atom.global" in k.asm["ptx"]) == atomic, "split-K sums by atomics"


def check_widen(sym: bool, zb: int):
    """3-bit codes widened to 4-bit words per call (32-code chunks as three 32-bit loads;
    ZB > 0: the zero points too, byte loads)."""
    sig = {"q_ptr": "*u8", "z_ptr": "*u8", "o_ptr": "*i32", "oz_ptr": "*u8", "N": "i32",
           "K": "i32", "G": "i32", "NZ": "i32", "stride_qn": "i32", "stride_zn": "i32"}
    const = {"SYM": sym, "BN": triton_widen.ROWS, "BK": triton_widen.COLS, "ZB": zb}
    ptx = build(triton_widen._widen3, sig, const).asm["ptx"]
    assert "ld.global.b32" in ptx and "st.global" in ptx, "the codes read as 32-bit words"
    assert ("ld.global.b8" in ptx) == (zb > 0), "zero points read only where asked"


def check_tma(rb: int, group: int, zm: int, bm: int = 256, bias: bool = False,
              nfast: bool = False):
    """The descriptor tile kernel (memfit.kernels.triton_prefill): activations and code words
    through bulk tensor copies (TMA) into the 3-stage pipeline, the dot on wgmma."""
    sig = {"x_ptr": "*bf16", "q_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*u8" if zm else "*fp16",
           "b_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
           "stride_qn": "i32", "stride_sn": "i32", "stride_zn": "i32", "NPROG": "i32"}
    const = {"GROUP": group, "ZMODE": zm, "HAS_BIAS": bias, "RB": rb, "BM": bm, "BN": 128,
             "ASM": True, "NFAST": nfast}
    ptx = build(triton_prefill._tma_mm, sig, const, 8, 3).asm["ptx"]
    assert ptx.count("cp.async.bulk.tensor") >= 2, "activations and codes through TMA"
    assert "wgmma.mma_async" in ptx, "the dot on wgmma"
    assert "cp.async.cg" not in ptx, "no pointer-load pipeline beside the descriptors"


def _checks() -> dict:
    """case name -> (check function, its arguments)."""
    checks = {f"mma{c}": (check_mma, c) for c in CASES}
    checks |= {f"mma_shape{s}": (check_mma, (1, 1, 1, "f16", False, 64, False) + s)
               for s in SHAPES}
    checks |= {f"mma_shared{c}": (check_mma, (c[0], 1, 1, "f16", c[1], c[2], False) + c[3:])
               for c in [(16, False, 0, 128, 4, 1, 4), (8, True, 64, 64, 4, 1, 2),
                         (16, False, 64, 256, 8, 1, 4), (16, True, 0, 256, 4, 1, 4),
                         (8, False, 0, 64, 4, 2, 2), (32, False, 0, 128, 4, 1, 4),
                         (32, True, 64, 64, 4, 1, 2), (32, False, 64, 256, 8, 1, 4)]}
    checks |= {f"mma_two_in_flight{c}": (check_mma, c[:7] + (c[7], c[8], 1, 1, 2))
               for c in [(1, 1, 1, "bf16", True, 64, False, 256, 8),
                         (1, 2, 1, "f16", False, 64, True, 128, 4),
                         (1, 1, 0, "f16", False, 0, True, 128, 4)]}
    checks |= {f"mma_rows_paired{c}": (check_mma, c[:7] + (c[7], c[8], 1, c[9], c[10]))
               for c in [(1, 1, 1, "bf16", True, 64, False, 256, 8, 4, 2),
                         (1, 2, 1, "f16", False, 0, False, 128, 4, 4, 1),
                         (1, 4, 0, "f16", False, 64, False, 64, 4, 2, 1),
                         (1, 1, 1, "f32", False, 0, False, 128, 4, 2, 2),
                         (1, 2, 1, "f16", False, 64, True, 256, 8, 4, 1),
                         (1, 4, 0, "bf16", True, 0, True, 128, 4, 2, 2),
                         (1, 1, 1, "f16", False, 64, True, 128, 4, 4, 1)]}
    checks |= {f"mma_wide{c}": (check_mma, c[:7] + (128, 4, 1, c[7], 2, True))
               for c in [(1, 2, 1, "bf16", True, 0, True, 2), (1, 2, 0, "f16", False, 0, True, 1),
                         (1, 2, 1, "bf16", True, 64, True, 2), (1, 1, 1, "bf16", True, 0, True, 2)]}
    # memfit.kernels.triton_moe.moe_mma: a mixture of experts' routed rows, M = 1 a program
    checks |= {f"mma_routed{c}": (check_mma, c[:7] + (c[7], c[8], 1, c[9], 2, False, c[10]))
               for c in [(1, 1, 1, "bf16", True, 0, False, 128, 4, 4, 2),
                         (1, 2, 1, "bf16", True, 0, True, 128, 4, 4, 2),
                         (1, 1, 0, "f16", False, 0, True, 256, 8, 2, 1)]}
    checks |= {f"kv_planes{b}": (check_planes, (b,)) for b in (2, 4, 8)}
    checks |= {f"kv_mma{c}": (check_kv_mma, c) for c in ((4, 3), (8, 2), (1, 3, False),
                                                          (4, 1, True, 2), (4, 1, True, 0, 2),
                                                          (8, 1, False, 0, 2),
                                                          (4, 1, True, 0, 2, 128))}
    checks |= {f"tile{c}": (check_tile, c)
               for c in ((1, 1, False, 0), (1, 1, True, 64), (3, 1, False, 0), (3, 0, False, 0),
                         (3, 1, True, 64), (3, 1, False, 0, 256, 8), (3, 1, False, 0, 64, 4, 2),
                         (3, 1, False, 64, 128, 4, 2), (5, 1, False, 0), (5, 1, True, 64),
                         (5, 1, False, 0, 64, 4, 2), (5, 1, False, 0, 128, 8),
                         (5, 1, True, 64, 128, 8), (5, 1, False, 0, 128, 8, 1, True),
                         (5, 1, True, 64, 64, 4, 2, True), (5, 1, False, 0, 128, 8, 1, True, True),
                         (5, 1, False, 0, 128, 8, 1, True, False, 64),
                         (5, 1, True, 64, 64, 4, 2, False, False, 64),
                         (5, 1, False, 0, 128, 8, 1, False, False, 128, 256),
                         (5, 1, True, 64, 64, 4, 4, False, False, 64, 128),
                         # a split that does not divide the row's tiles (RAGGED), M = 16
                         (5, 1, False, 0, 64, 4, 4, False, False, 128, 16, True),
                         (5, 1, False, 64, 64, 4, 4, True, True, 64, 16, True))}
    checks |= {f"perm{s}": (check_perm, (s,)) for s in (32, 128)}
    checks |= {f"tile3{c}": (check_tile3, c) for c in ((16, 64, 4), (64, 128, 1), (16, 16, 4, 1),
                                                         (64, 128, 1, 1))}
    checks |= {f"dequant{c}": (check_dequant, c) for c in ((3, 1), (3, 0), (3, 2), (4, 1),
                                                           (3, 1, 1), (3, 2, 1))}
    checks |= {f"widen{c}": (check_widen, c) for c in ((False, 16), (True, 0))}
    checks |= {f"tma{c}": (check_tma, c) for c in ((0, 128, 1), (64, 128, 1, 128, True),
                                                     (0, 64, 0), (64, 64, 1),
                                                     (0, 128, 1, 256, False, True),
                                                     (64, 64, 1, 256, True, True))}
    checks |= {f"gemv{c}": (check_gemv, c) for c in ((3, 1, 64, True), (3, 8, 32, True),
                                                       (3, 2, 32, False), (4, 1, 64, True),
                                                       (3, 1, 8, True, 1), (3, 8, 16, True, 1))}
    checks |= {f"moe{c}": (check_moe, c)
               for c in ((4, 1, False, 2), (4, 1, False, 4, True), (4, 0, True, 16),
                         (4, 2, True, 64), (8, 1, True, 16), (16, 0, True, 16, True))}
    checks |= {f"moe_grouped{c}": (check_moe_grouped, c)
               for c in ((4, 1), (4, 0, True, 16), (4, 2), (8, 1, False, 32), (16, 0, True),
                         (4, 1, False, 64, True))}
    checks |= {f"words_dot{c}": (check_words_dot, c)
               for c in itertools.product((16,), ((128, 4),), (4, 8))}
    return checks


def _run(name: str) -> tuple[str, str]:
    fn, args = _checks()[name]
    try:
        fn(*args)
        return name, "ok"
    except Exception as e:  # noqa: BLE001 (reported per case)
        return name, f"{type(e).__name__}: {str(e)[:400]}"


def main() -> None:
    """Every case, on as many processes as there are CPU cores (the builds are independent)."""
    names = list(_checks())
    workers = min(len(names), len(os.sched_getaffinity(0)))
    if workers > 1:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(workers) as pool:
            out = dict(pool.imap_unordered(_run, names))
    else:
        out = dict(map(_run, names))
    json.dump({n: out[n] for n in names}, sys.stdout)


if __name__ == "__main__":
    main()
