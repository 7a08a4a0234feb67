"""The fragment order of the tile kernel's word unpack (`Config.dq` 2 and 4 of
memfit.kernels.triton_int, `_int_mm` of memfit.kernels.triton_bytes) and the activations'
matching permutation.

The unpack turns each 32-bit word of 4-bit codes into 16-bit weights with one shift and one LOP3
per code pair, which pairs code i with code i + 4 of the word; the codes land in the order the
wgmma A-operand fragments hold them, so no data crosses lanes and nothing goes through shared
memory. The dot's sum is the same if the activations' columns are permuted the same way: that is
`perm_x`, one gather launch a call (`_perm_cols`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memfit.kernels import pdl, replay
from memfit.kernels.sizes import cdiv, next_pow2


def _word_asm(ty: str, magic: int, one: int) -> str:
    """PTX of `_word_codes` for one 16-bit type: pair i = (w >> 4i) & 0x000F000F | magic, plus
    $9 (= -(BASE + z), exact), times $10, split into outputs 2i and 2i + 1. Both steps are
    packed FMAs (x * 1 + $9, then x * $10 - 0: the same roundings as a subtract and a
    multiply), which sm_80 has for bfloat16 too (its add / sub / mul need sm_90)."""
    lines = []
    for i in range(4):
        src = "$8"
        if i:
            lines.append(f"shr.u32 t, $8, {4 * i};")
            src = "t"
        lines += [f"lop3.b32 p, {src}, 0x000F000F, {magic}, 0xEA;",
                  f"fma.rn.{ty} p, p, one, $9;", f"fma.rn.{ty} p, p, $10, nz;",
                  f"mov.b32 {{${2 * i}, ${2 * i + 1}}}, p;"]
    return (f"{{ .reg .b32 p, t, one, nz; mov.b32 one, {one}; mov.b32 nz, 0x80008000; "
            + " ".join(lines) + " }")


WORD_ASM_BF16 = tl.constexpr(_word_asm("bf16x2", 0x43004300, 0x3F803F80))
WORD_ASM_F16 = tl.constexpr(_word_asm("f16x2", 0x64006400, 0x3C003C00))


@triton.jit
def _word_codes(qw, zz, ss, F16: tl.constexpr):
    """One 32-bit word of 4-bit codes c0..c7 -> eight 16-bit weights (c - z) * s in the order
    c0 c4 c1 c5 c2 c6 c3 c7: per pair one SHF and one LOP3 ((w >> 4i) & 0x000F000F | magic =
    (BASE + c_i, BASE + c_{i+4}), exact), one packed add of -(BASE + z) (exact) and one packed
    multiply by s (the one rounding); zz and ss hold -(BASE + z) and s in both halves. GPU only."""
    return tl.inline_asm_elementwise(WORD_ASM_F16 if F16 else WORD_ASM_BF16,
                                     "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [qw, zz, ss],
                                     dtype=(tl.int16,) * 8, is_pure=True, pack=1)


@triton.jit
def _code(qw, i: tl.constexpr, z, s, dtype: tl.constexpr):
    """Code i of each word of qw (BN, W), dequantized with zero points z and scales s
    ((BN, 1) or (BN, W))."""
    c = ((qw >> (4 * i)) & 15).to(tl.float32)
    return ((c - z) * s).to(dtype)


@triton.jit
def _by_word(a, a1, W: tl.constexpr, GW: tl.constexpr):
    """(BN,) per-row values -> (BN, 1), or with GW > 0 (a tile of two groups) (BN, W): words
    below GW take a, the rest a1."""
    if GW:
        return tl.where((tl.arange(0, W) < GW)[None, :], a[:, None], a1[:, None])
    else:
        return a[:, None]


@triton.jit
def _both_halves(v, dtype: tl.constexpr):
    """float32 v -> int32 holding v in `dtype` (16 bits) in both halves (a packed operand)."""
    return (v.to(dtype).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) * 0x10001


@triton.jit
def _perm_tile(qw, z, s, dtype: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               ASM: tl.constexpr, WIDE: tl.constexpr, z1, s1, GW: tl.constexpr):
    """(BN, BK // 8) words, (BN,) zero points and scales -> (BN, BK) 16-bit weights, the codes
    of each 32-code span in the order the wgmma A-operand fragments hold them: position
    16h + 8i + 2t + j of a span holds code 8t + 4j + 2h + i, so lane t of a quad unpacks its
    own word t into its own registers (no data crosses lanes, no shared-memory round trip);
    the activations are permuted the same way (`perm_x`). GW > 0: the tile spans two groups,
    words from GW on take z1, s1 (a word's codes never cross a group). ASM = 0 (the CPU
    interpreter): the same values and order in plain Triton."""
    W: tl.constexpr = BK // 8
    if ASM:
        F16: tl.constexpr = dtype == tl.float16
        BASE: tl.constexpr = 1024 if F16 else 128
        zz = _by_word(_both_halves(-(z + BASE), dtype), _both_halves(-(z1 + BASE), dtype), W, GW)
        ss = _by_word(_both_halves(s, dtype), _both_halves(s1, dtype), W, GW)
        o0, o1, o2, o3, o4, o5, o6, o7 = _word_codes(qw, zz, ss, F16)
    else:  # output 2i + e is code i + 4e, as the PTX's pairs
        z2 = _by_word(z, z1, W, GW)
        s2 = _by_word(s, s1, W, GW)
        o0 = _code(qw, 0, z2, s2, dtype)
        o1 = _code(qw, 4, z2, s2, dtype)
        o2 = _code(qw, 1, z2, s2, dtype)
        o3 = _code(qw, 5, z2, s2, dtype)
        o4 = _code(qw, 2, z2, s2, dtype)
        o5 = _code(qw, 6, z2, s2, dtype)
        o6 = _code(qw, 3, z2, s2, dtype)
        o7 = _code(qw, 7, z2, s2, dtype)
    # join appends its new axis last: this nesting puts output o_p at position p of the word
    c = tl.join(tl.join(tl.join(o0, o4), tl.join(o2, o6)),
                tl.join(tl.join(o1, o5), tl.join(o3, o7)))  # (BN, BK/8, h, i, j)
    if WIDE and BN == 64:  # BK 128, 4 warps: the order of the codes' own load layout (DQ = 4)
        c = tl.reshape(c, (2, 2, 2, 8, 2, 2, 2, 2, 2, 2, 2))  # rows b5 b4 b3 low, words, h i j
        c = tl.permute(c, (1, 2, 0, 3, 6, 7, 8, 9, 4, 5, 10))  # b4 b3 b5 low, w1 w0 h i w3 w2 j
    elif WIDE:  # BN 128, BK 128, 8 warps: the same, the top row bit the register one
        c = tl.reshape(c, (2, 2, 2, 2, 8, 2, 2, 2, 2, 2, 2, 2))  # b6 b5 b4 b3 low, w3..w0 h i j
        c = tl.permute(c, (1, 2, 3, 0, 4, 7, 8, 9, 10, 5, 6, 11))  # b5 b4 b3 b6 low, ...
    else:
        c = tl.reshape(c, (BN, BK // 32, 4, 2, 2, 2))  # (n, span, t, h, i, j)
        c = tl.permute(c, (0, 1, 3, 4, 2, 5))  # (n, span, h, i, t, j)
    c = tl.reshape(c, (BN, BK))
    if ASM:
        return c.to(dtype, bitcast=True)
    else:
        return c


@triton.jit
def _perm_cols(x_ptr, y_ptr, K, stride_xm, SPAN: tl.constexpr, BLOCK: tl.constexpr,
               PDL: tl.constexpr = False):
    """y[m, p] = x[m, col(p)]: the activations in the fragment unpack's column order
    (`triton_int.perm_x`), one row's BLOCK columns a program. The gather stays inside a span's
    64-256 bytes, so a warp's loads touch the same sectors a plain copy would; the stores are
    contiguous. SPAN 32 (dq 2): position 16h + 8i + 2t + j takes column 8t + 4j + 2h + i;
    SPAN 128 (dq 4): position 64 w1 + 32 w0 + 16 h + 8 i + 4 w3 + 2 w2 + j takes column
    8 (8 w3 + 4 w2 + 2 w1 + w0) + 4 j + 2 h + i. PDL: launched with memfit.kernels.pdl."""
    m = tl.program_id(0)
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    q = p % SPAN
    if SPAN == 32:
        c = 8 * ((q >> 1) & 3) + 4 * (q & 1) + 2 * ((q >> 4) & 1) + ((q >> 3) & 1)
    else:
        c = (64 * ((q >> 2) & 1) + 32 * ((q >> 1) & 1) + 16 * ((q >> 6) & 1)
             + 8 * ((q >> 5) & 1) + 4 * (q & 1) + 2 * ((q >> 4) & 1) + ((q >> 3) & 1))
    ok = p < K
    pdl.wait(PDL)
    v = tl.load(x_ptr + m.to(tl.int64) * stride_xm + (p - q + c), mask=ok)
    tl.store(y_ptr + m.to(tl.int64) * K + p, v, mask=ok)


def perm_x(x2: torch.Tensor, span: int = 32, plan: bool = False):
    """Activations (M, K), K a multiple of `span`, in the fragment unpack's order (`_perm_tile`):
    span 32 (dq 2): position 16h + 8i + 2t + j of each 32 columns takes column 8t + 4j + 2h + i;
    span 128 (dq 4): position 64 w1 + 32 w0 + 16 h + 8 i + 4 w3 + 2 w2 + j of each 128 takes
    column 8 (8 w3 + 4 w2 + 2 w1 + w0) + 4 j + 2 h + i. One gather launch (`_perm_cols`; torch's
    copy of the same permuted view took 4.6-8.0 µs on an H200 at M = 32-128, K = 4096-14336).
    plan: also return a callable doing the same for activations like x2 (contiguous) with the
    launch fixed (memfit.kernels.replay)."""
    m, k = x2.shape
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(m, k, dtype=x2.dtype, device=x2.device)
    block = min(1024, next_pow2(k))
    grid, args = (m, cdiv(k, block)), (x2, y, k, x2.stride(0))
    kw = dict(SPAN=span, BLOCK=block, num_warps=4, **pdl.launch_kw())
    kernel = _perm_cols[grid](*args, **kw)
    if not plan:
        return y
    launch = replay.Launch(_perm_cols, kernel, grid, args, kw, ("x_ptr", "y_ptr"))
    dev, dt = x2.device, x2.dtype

    def call(x2: torch.Tensor) -> torch.Tensor:
        y = torch.empty(m, k, dtype=dt, device=dev)
        launch(x2, y)
        return y
    return y, call


def perm_x_reference(x2: torch.Tensor, span: int = 32) -> torch.Tensor:
    """`perm_x` as a torch view copy (the tests' reference)."""
    m, k = x2.shape
    if span == 32:
        return x2.view(m, k // 32, 4, 2, 2, 2).permute(0, 1, 4, 5, 2, 3).reshape(m, k)
    return (x2.view(m, k // 128, 2, 2, 2, 2, 2, 2, 2).permute(0, 1, 4, 5, 7, 8, 2, 3, 6)
            .reshape(m, k))
