"""PTX text for the register-only decode attention over 4-bit KV codes
(memfit.kernels.triton_kv_mma): every tile's arithmetic on `mma.sync.m16n8k16` with float16
operands and float32 sums, the codes turned into float16 by one LOP3 per pair, no shared memory.

One warp takes a 64-token tile; Triton lays the (64, 16) int32 tiles of its asm operands out as
4 lanes x 16-byte vectors along a row, 8 rows per warp (mma_ptx.check_layout refuses any other):
lane (g, j) = (lane // 4, lane % 4) holds rows (tokens) 8i + g, i = 0..7, and 4 words of each.
Element 4i + e of a lane's 32 is row 8i + g, column 4j + e.

Keys (A operand, rows = tokens): the lane's 4 words of a token are its channels 32j..32j+31;
`lop3(w, 0x000F000F, 0x64006400)` = (1024 + c_n, 1024 + c_{n+4}) for nibble n = 0; mask 0x00F000F0
gives nibbles 1, 5 as 1024 + 16c (so the query of odd channels is stored divided by 16); w >> 8
the nibbles 2, 6 and 3, 7. The B operand is the query times the key group's scale per channel
(one HMUL2 per pair, two PRMT per k-step), so S' = sum Qs (1024 + c); a 16-mma chain with
constant A returns K = q . min - 1024 sum Qs per head, and S = S' + K exactly as the codes say.
The scores of m-tile mt are rows 16mt + g, 16mt + 8 + g (tokens), columns 2j, 2j + 1 (query
heads; up to 8, the others zero).

Softmax: per head max over the lane's 8 tokens, then over g by three butterfly shuffles; l and
sum p * min are kept per lane and reduced once at the end. P' = p * value scale (per token and
value group) is packed to float16 pairs and transposed by `movmatrix` into the B operand of
P.V: lane (g, j) then holds tokens 8i + 2j, 8i + 2j + 1 of head g.

Values (A operand = V^T, rows = channels, k = tokens): each value word (lane j: channels
32j..32j+31 of a token, as loaded) is transposed by one `movmatrix` (8x8 of 16-bit = 4 codes):
lane (g, j) gets channels 32(g // 2) + 8e + 4(g % 2) + p (p = 0..3, word e) of tokens 8i + 2j,
8i + 2j + 1, and the same LOP3s make its A registers. Value m-tile 2e + q holds channel
32(g // 2) + 8e + 4(g % 2) + 2q in row g and the next one (x16) in row g + 8, so an m-tile spans
all channels: one value group a token. With two (value groups of 64, `ng = 2`), each token's 4x4
words of a lane quad are first transposed (`quad_transpose`: lane j takes word 4e + j), and
m-tile 2e + q then holds channels 32e + 4g + 2q (+ 1), all in group e // 2, whose P' is its B
operand. The tile's products start from zero and
O_t' = sum P' (1024 + c); L1_t = sum P' from an all-ones mma with the same B; the offset comes
off in float32 once per tile, O = alpha O + (O_t' - 1024 L1_t) / (1 or 16) (the mma's float32
sums truncate: carrying the offset over many tiles cost 2e-2 of relative error over 8k tokens).
At the end O = (O + sum p * min) / l.
"""

from __future__ import annotations

MAGIC = "0x64006400"  # float16 pair (1024, 1024)
LO, HI = "0x000F000F", "0x00F000F0"
# state slots (elements of the carried (64, 16) float32 tensor): m, l, L2 = sum p * min, per
# head 2j (A) and 2j + 1 (B), the lane's partial sums of l and L2 until the end
M_A, M_B, L_A, L_B, L2_A, L2_B = 0, 1, 2, 3, 12, 13


VS, VM = 16, 24  # state slots of the value scales / minima of the lane's 8 tokens


def param_loads(ps: int, pm: int, dst: int, ng: int = 1) -> list[str]:
    """PTX loading the value scale and minimum of tokens 8i + g (g = lane / 4) from the tile's
    pointers $ps, $pm into state slots $(dst + 16 + i), $(dst + 24 + i): one value group as
    float32; two (ng = 2) as their float16 pair."""
    if ng == 2:
        out = ["{", ".reg .b32 ln;", ".reg .b64 a, b, off;", "mov.u32 ln, %laneid;",
               "shr.u32 ln, ln, 2;", "mul.wide.u32 off, ln, 4;", f"add.s64 a, ${ps}, off;",
               f"add.s64 b, ${pm}, off;"]
        for i in range(8):
            out += [f"ld.global.nc.b32 ${dst + VS + i}, [a + {32 * i}];",
                    f"ld.global.nc.b32 ${dst + VM + i}, [b + {32 * i}];"]
        return out + ["}"]
    out = ["{", ".reg .b32 ln;", ".reg .b64 a, b, off;", ".reg .b16 hs, hm;",
           "mov.u32 ln, %laneid;", "shr.u32 ln, ln, 2;", "mul.wide.u32 off, ln, 2;",
           f"add.s64 a, ${ps}, off;", f"add.s64 b, ${pm}, off;"]
    for i in range(8):
        out += [f"ld.global.nc.b16 hs, [a + {16 * i}];", f"ld.global.nc.b16 hm, [b + {16 * i}];",
                f"cvt.f32.f16 ${dst + VS + i}, hs;", f"cvt.f32.f16 ${dst + VM + i}, hm;"]
    return out + ["}"]


def prologue_asm(ng: int = 1) -> str:
    """The first tile's value scales and minima into the state (slots 16..31); other slots
    copied. Outputs: state $0..31. Inputs: state $32.., pointers $64, $96."""
    keep = [f"mov.b32 ${s}, ${32 + s};" for s in range(16)]
    return "\n".join(["{"] + keep + param_loads(64, 96, 0, ng) + ["}"])


def l2_slots(g: int) -> tuple[int, int]:
    """State slots of sum p * min of value group g (heads 2j, 2j + 1)."""
    return L2_A + 2 * g, L2_B + 2 * g


def quad_transpose(w: list[str]) -> list[str]:
    """PTX: the 4x4 words of a lane quad transposed in place (lane j's word e <-> lane e's word
    j): off-diagonal 2x2 blocks swapped across lanes j ^ 2, then each block transposed across
    j ^ 1; predicates q1 (lane bit 1), q0 (bit 0) set by the caller."""
    out = []
    for pred, m, pairs in (("q1", 2, ((0, 2), (1, 3))), ("q0", 1, ((0, 1), (2, 3)))):
        for lo, hi in pairs:  # send hi from the low side, lo from the high side
            out += [f"selp.b32 sx, {w[lo]}, {w[hi]}, {pred};",
                    f"shfl.sync.bfly.b32 sx, sx, {m}, 0x1f, 0xffffffff;",
                    f"selp.b32 {w[lo]}, sx, {w[lo]}, {pred};",
                    f"selp.b32 {w[hi]}, {w[hi]}, sx, {pred};"]
    return out


def _mma(d: list[str], a: list[str], b: list[str], c: list[str] | None = None) -> str:
    return (f"mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {{{', '.join(d)}}}, "
            f"{{{', '.join(a)}}}, {{{', '.join(b)}}}, {{{', '.join(c or d)}}};")


def _conv(src: str, dst: str) -> list[str]:
    """A word's 8 codes as 4 float16 pairs dst0..dst3: nibbles (0, 4), (1, 5) x16, (2, 6),
    (3, 7) x16 (each (1024 + c) or (1024 + 16c), exact)."""
    return [f"lop3.b32 {dst}0, {src}, {LO}, {MAGIC}, 0xEA;",
            f"lop3.b32 {dst}1, {src}, {HI}, {MAGIC}, 0xEA;",
            f"shr.u32 sh, {src}, 8;",
            f"lop3.b32 {dst}2, sh, {LO}, {MAGIC}, 0xEA;",
            f"lop3.b32 {dst}3, sh, {HI}, {MAGIC}, 0xEA;"]


def _bfly(x: str, op: str) -> list[str]:
    """x = op over the 8 lanes of equal j (lane bits 2-4)."""
    out = []
    for m in (4, 8, 16):
        out += [f"shfl.sync.bfly.b32 sx, {x}, {m}, 0x1f, 0xffffffff;", f"{op}.f32 {x}, {x}, sx;"]
    return out


def l2_prefetch(pk: int, pv: int) -> list[str]:
    """PTX asking the L2 for a 4 KB tile of key words at $pk and of value words at $pv: one
    128-byte line a lane each (their loads a tile later then wait on the L2, not on memory)."""
    return ["{", ".reg .b32 ln;", ".reg .b64 a, off;", "mov.u32 ln, %laneid;",
            "mul.wide.u32 off, ln, 128;", f"add.s64 a, ${pk}, off;", "prefetch.global.L2 [a];",
            f"add.s64 a, ${pv}, off;", "prefetch.global.L2 [a];", "}"]


def keys_asm(prefetch: bool = False, ng: int = 1) -> str:
    """Phase 1 of a tile: scores, online-softmax update, P' as P.V's B operand.
    Outputs: state $0..31, PB $32..63 (PB[i] = B register of token set i; PB[30], PB[31] =
    alpha of heads 2j, 2j + 1). Inputs: state $64.. (its slots 16..31: this
    tile's value scales and minima, token 8i + g at 16 + i and 24 + i, float32), key words
    $96.., QH $128.. (query pairs, words 0..15), KP $160.. (key scale words 0..15, minima
    16..31), the next tile's value-scale and minimum pointers $192, $224 (loaded here, into the
    output state's slots 16..31); `prefetch`: the tile after next's key and value word
    pointers $256, $288 (`l2_prefetch`)."""
    S, O = 64, 0
    KW, QH, KP = 96, 128, 160
    out = ["{", ".reg .b32 qs<16>, qm<16>, bq<16>, x<4>, y<4>, sh, sx, one16, neg, pr;",
           ".reg .f32 s<16>, k<4>, ta, tb, ua, ub, ka, kb, ma, mb, oa, ob, u, w;",
           "mov.b32 one16, 0x4C003C00;", "mov.b32 neg, 0xE400E400;"]
    out += param_loads(S + 128, S + 160, O, ng)
    if prefetch:
        out += l2_prefetch(S + 192, S + 224)
    for m in range(16):
        out += [f"mul.rn.f16x2 qs{m}, ${QH + m}, ${KP + m};",
                f"mul.rn.f16x2 qm{m}, ${QH + m}, ${KP + 16 + m};"]
    out += [f"mov.f32 k{c}, 0f00000000;" for c in range(4)]
    kk = [f"k{c}" for c in range(4)]
    for s in range(8):  # K = q . min - 1024 sum Qs (rows all equal; columns = heads)
        out.append(_mma(kk, ["one16"] * 4, [f"qm{2 * s}", f"qm{2 * s + 1}"]))
        out.append(_mma(kk, ["neg"] * 4, [f"qs{2 * s}", f"qs{2 * s + 1}"]))
    for w in range(4):
        for h in range(2):
            m = 4 * w + h
            out += [f"prmt.b32 bq{4 * w + 2 * h}, qs{m}, qs{m + 2}, 0x5410;",
                    f"prmt.b32 bq{4 * w + 2 * h + 1}, qs{m}, qs{m + 2}, 0x7632;"]
    out += [f"mov.f32 s{c}, 0f00000000;" for c in range(16)]
    for mt in range(4):
        acc = [f"s{4 * mt + c}" for c in range(4)]
        for w in range(4):
            out += _conv(f"${KW + 8 * mt + w}", "x") + _conv(f"${KW + 8 * mt + 4 + w}", "y")
            for h in range(2):
                s = 2 * w + h
                out.append(_mma(acc, [f"x{2 * h}", f"y{2 * h}", f"x{2 * h + 1}", f"y{2 * h + 1}"],
                                [f"bq{2 * s}", f"bq{2 * s + 1}"]))
    # softmax: head A = columns 2j (s 4mt, 4mt + 2), head B = 2j + 1 (s 4mt + 1, 4mt + 3)
    out += ["mov.f32 ka, k0;", "mov.f32 kb, k1;", "mov.f32 ta, s0;", "mov.f32 tb, s1;"]
    for mt in range(4):
        for c in range(4):
            if mt or c >= 2:
                out.append(f"max.f32 {'ta' if c % 2 == 0 else 'tb'}, "
                           f"{'ta' if c % 2 == 0 else 'tb'}, s{4 * mt + c};")
    out += _bfly("ta", "max") + _bfly("tb", "max")
    out += ["add.f32 ta, ta, ka;", "add.f32 tb, tb, kb;",
            f"max.f32 ma, ${S + M_A}, ta;", f"max.f32 mb, ${S + M_B}, tb;",
            f"sub.f32 ua, ${S + M_A}, ma;", f"sub.f32 ub, ${S + M_B}, mb;",
            "ex2.approx.ftz.f32 $62, ua;", "ex2.approx.ftz.f32 $63, ub;",
            "sub.f32 oa, ma, ka;", "sub.f32 ob, mb, kb;"]
    for c in range(16):
        out += [f"sub.f32 s{c}, s{c}, {'oa' if c % 2 == 0 else 'ob'};",
                f"ex2.approx.ftz.f32 s{c}, s{c};"]
    alpha = {0: "$62", 1: "$63"}  # PB[30], PB[31]
    for hd, (li, mi) in enumerate(((L_A, M_A), (L_B, M_B))):
        out.append(f"mul.f32 u, ${S + li}, {alpha[hd]};")
        out += [f"add.f32 u, u, s{4 * mt + c};" for mt in range(4) for c in (hd, hd + 2)]
        out += [f"mov.b32 ${O + li}, u;", f"mov.b32 ${O + mi}, {'ma' if hd == 0 else 'mb'};"]
    if ng == 1:
        vs = [[f"${S + VS + i}" for i in range(8)]]
        vm = [[f"${S + VM + i}" for i in range(8)]]
    else:  # float16 pairs (group 0, group 1) of each token: unpacked to float32
        out += [".reg .b16 h0, h1;", ".reg .f32 " + ", ".join(
            f"fs{g}_{i}, fm{g}_{i}" for g in range(2) for i in range(8)) + ";"]
        for i in range(8):
            for src, dst in ((VS, "fs"), (VM, "fm")):
                out += [f"mov.b32 {{h0, h1}}, ${S + src + i};", f"cvt.f32.f16 {dst}0_{i}, h0;",
                        f"cvt.f32.f16 {dst}1_{i}, h1;"]
        vs = [[f"fs{g}_{i}" for i in range(8)] for g in range(2)]
        vm = [[f"fm{g}_{i}" for i in range(8)] for g in range(2)]
    for g in range(ng):
        for hd, slot in enumerate(l2_slots(g)):  # sum p * min (this tile's tokens 8i + g)
            out.append(f"mul.f32 u, ${S + slot}, {alpha[hd]};")
            for i in range(8):
                mt, c = i // 2, hd + 2 * (i % 2)
                out.append(f"fma.rn.f32 u, s{4 * mt + c}, {vm[g][i]}, u;")
            out.append(f"mov.b32 ${O + slot}, u;")
        for i in range(8):  # P' = p * scale, transposed into P.V's B operand
            mt, c = i // 2, 2 * (i % 2)
            out += [f"mul.f32 u, s{4 * mt + c}, {vs[g][i]};",
                    f"mul.f32 w, s{4 * mt + c + 1}, {vs[g][i]};",
                    "cvt.rn.f16x2.f32 pr, w, u;",
                    f"movmatrix.sync.aligned.m8n8.trans.b16 ${32 + 8 * g + i}, pr;"]
    return "\n".join(out + ["}"])


def values_asm(ng: int = 1) -> str:
    """Phase 2 of a tile: O = alpha O + P'.V. The tile's products start from zero (the mma's
    float32 sums truncate: summed over many tiles, the 1024 offset of the codes cost 2e-2 of
    relative error over 8k tokens, GPU test) and the offset is taken off once per tile in
    float32: T = O_t - 1024 L1_t, with L1_t = sum P' from an all-ones mma, divided by 16 in the
    rows that hold 16c. Outputs: O $0..31 (value m-tile mt's 4 accumulators at 4mt..), state
    $32..63. Inputs: O $64.., state $96.., value words $128.., PB $160.."""
    O, S, VW, PB = 64, 96, 128, 160
    regs = ", ".join(f"v{4 * i}_{p}" for i in range(8) for p in range(4))
    out = ["{", f".reg .b32 {regs}, tv, sh, one;",
           ".reg .f32 o<32>, d2, d3, t, l0a, l0b, n0a, n0b, m0a, m0b;", "mov.b32 one, 0x3C003C00;"]
    words = [[f"${VW + 4 * i + e}" for e in range(4)] for i in range(8)]
    if ng == 2:  # lane j takes word 4e + j of each token: m-tile e's channels 32e..32e+31
        words = [[f"w{i}_{e}" for e in range(4)] for i in range(8)]
        out += [".reg .f32 l1a, l1b, n1a, n1b, m1a, m1b;", ".reg .pred q0, q1;",
                ".reg .b32 sx, ln, " + ", ".join(w for row in words for w in row) + ";",
                "mov.u32 ln, %laneid;", "and.b32 sx, ln, 2;", "setp.ne.u32 q1, sx, 0;",
                "and.b32 sx, ln, 1;", "setp.ne.u32 q0, sx, 0;"]
        for i in range(8):
            out += [f"mov.b32 w{i}_{e}, ${VW + 4 * i + e};" for e in range(4)]
            out += quad_transpose(words[i])
    out += [f"mov.f32 o{m}, 0f00000000;" for m in range(32)]
    for g in range(ng):
        out += [f"mov.f32 l{g}a, 0f00000000;", f"mov.f32 l{g}b, 0f00000000;"]
        for kk in range(4):
            out.append(_mma([f"l{g}a", f"l{g}b", "d2", "d3"], ["one"] * 4,
                            [f"${PB + 8 * g + 2 * kk}", f"${PB + 8 * g + 2 * kk + 1}"],
                            [f"l{g}a", f"l{g}b", f"l{g}a", f"l{g}b"]))
        for h in "ab":  # -1024 L1 (rows of c) and -64 L1 (rows of 16c, then / 16)
            out += [f"mul.f32 n{g}{h}, l{g}{h}, 0fC4800000;",
                    f"mul.f32 m{g}{h}, l{g}{h}, 0fC2800000;"]
    for e in range(4):
        gi = e // 2 if ng == 2 else 0  # value group of m-tiles (e, q)
        for i in range(8):
            out.append(f"movmatrix.sync.aligned.m8n8.trans.b16 tv, {words[i][e]};")
            out += _conv("tv", f"v{4 * i}_")
        for q in range(2):
            acc = [f"o{4 * (2 * e + q) + c}" for c in range(4)]
            for kk in range(4):
                a, b = 2 * kk, 2 * kk + 1
                out.append(_mma(acc, [f"v{4 * a}_{2 * q}", f"v{4 * a}_{2 * q + 1}",
                                      f"v{4 * b}_{2 * q}", f"v{4 * b}_{2 * q + 1}"],
                                [f"${PB + 8 * gi + a}", f"${PB + 8 * gi + b}"]))
            for c in range(4):
                m, h = 4 * (2 * e + q) + c, "ab"[c % 2]
                if c < 2:
                    out.append(f"add.f32 t, o{m}, n{gi}{h};")
                else:
                    out.append(f"fma.rn.f32 t, o{m}, 0f3D800000, m{gi}{h};")  # / 16
                out.append(f"fma.rn.f32 ${m}, ${O + m}, ${PB + 30 + c % 2}, t;")
    keep = [M_A, M_B, L_A, L_B] + [s for g in range(ng) for s in l2_slots(g)]
    keep += list(range(VS, VS + 8)) + list(range(VM, VM + 8))
    out += [f"mov.b32 ${32 + s}, ${S + s};" for s in keep]
    return "\n".join(out + ["}"])


def epi_asm(ng: int = 1) -> str:
    """After the last tile: l and L2 summed over the lanes, O = (O + L2) / l. Outputs: Y $0..31
    (as O), Z $32..63 (element: base-2 lse of its head). Inputs: O $64.., state $96.."""
    O, S = 64, 96
    out = ["{", ".reg .b32 sx;", ".reg .f32 la, lb, ia, ib, za, zb, u, p0a, p0b;",
           f"mov.f32 la, ${S + L_A};", f"mov.f32 lb, ${S + L_B};"]
    out += _bfly("la", "add") + _bfly("lb", "add")
    if ng == 2:
        out.append(".reg .f32 p1a, p1b;")
    for g in range(ng):
        a, b = l2_slots(g)
        out += [f"mov.f32 p{g}a, ${S + a};", f"mov.f32 p{g}b, ${S + b};"]
        out += _bfly(f"p{g}a", "add") + _bfly(f"p{g}b", "add")
    out += ["rcp.rn.f32 ia, la;", "rcp.rn.f32 ib, lb;", "lg2.approx.f32 za, la;",
            "lg2.approx.f32 zb, lb;", f"add.f32 za, za, ${S + M_A};", f"add.f32 zb, zb, ${S + M_B};"]
    for mt in range(8):
        g = mt // 4 if ng == 2 else 0
        for c in range(4):
            h = "ab"[c % 2]
            out += [f"add.f32 u, ${O + 4 * mt + c}, p{g}{h};", f"mul.f32 ${4 * mt + c}, u, i{h};",
                    f"mov.b32 ${32 + 4 * mt + c}, z{h};"]
    return "\n".join(out + ["}"])


def constraints(n_out: int, n_in: int, n_ptr: int = 0) -> str:
    """n_out outputs, n_in 32-bit inputs, then n_ptr pointer inputs, 32 elements each."""
    return ",".join(["=r"] * 32 * n_out + ["r"] * 32 * n_in + ["l"] * 32 * n_ptr)
