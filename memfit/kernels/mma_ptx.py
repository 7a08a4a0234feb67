"""PTX text for the tensor-core decode kernel (memfit.kernels.triton_mma), and the check that a
compiled kernel lays its asm operands out as these fragments assume.

Per 32-bit word of 4-bit codes: one SHF + one LOP3 per pair turn two codes into 16-bit floats,
`(w >> 4i) & 0x000F000F | 0x43004300` = (128 + c_i, 128 + c_{i+4}) in bfloat16 (0x6400: 1024 + c
in float16), exact; two warp-wide `mma.sync.m16n8k16` multiply them by the activations with
float32 accumulation. With one row a call the mma's rows g + 8 hold ones, so the same
instructions return XS = the sum of the activations (`chain`); with an even number of a lane's
rows a call (`PAIRED`, the default), two rows fill rows g and g + 8 of one mma and one all-ones
mma a word returns XS for all of them (`paired_chain`, `shared_asm`): a quarter fewer mma.sync,
and no copies of the ones into every A register quad (sm_90 SASS a tile: M = 1 347 -> 308, M = 16
402 -> 356; 14336x4096 M = 16 21.6 -> 18.8 µs, benchmarks/RESULTS.md session 13).
`mma_asm` returns D and XS for the Triton epilogue; `epi_asm` folds
them into the accumulator itself (M = 1) with the scales and zero points `param_asm` loads a tile
ahead. The fragments assume Triton's (rows, 16) int32 layout of 16-byte vectors, 4 lanes along a
row and 8 rows per warp; `check_layout` reads the compiled TTGIR and refuses any other
(MmaLayoutError), so a compiler that lays the asm out otherwise cannot give wrong sums.
"""

from __future__ import annotations

import re
import struct


def _codes(w: str, magic: str, dst: str = "p") -> list[str]:
    """Word w's 8 codes as 16-bit (BASE + c) pairs dst0..dst3: dst_i = (c_i, c_{i+4}), one SHF
    and one LOP3 each ((w >> 4i) & 0x000F000F | magic)."""
    out = []
    for i in range(4):
        src = w
        if i:
            out.append(f"shr.u32 t, {w}, {4 * i};")
            src = "t"
        out.append(f"lop3.b32 {dst}{i}, {src}, 0x000F000F, {magic}, 0xEA;")  # (a & b) | c
    return out


def _mma(ty: str, acc: list[str], p: str, xs: list[str], low: str = "",
         ones_only: bool = False) -> list[str]:
    """The two mma.sync of one word: A = its code pairs p0..p3 (rows g) over ones (rows g + 8,
    whose sums are XS) or over another row's pairs low0..low3, or all ones (ones_only: XS in
    every row); B = the activation pairs xs[0..3], into the 4 accumulators `acc`."""
    c = ", ".join(acc)
    out = []
    for h in range(2):
        if ones_only:
            a = "one, one, one, one"
        else:
            lo = (f"{low}{2 * h}", f"{low}{2 * h + 1}") if low else ("one", "one")
            a = f"{p}{2 * h}, {lo[0]}, {p}{2 * h + 1}, {lo[1]}"
        out.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {{{c}}}, "
                   f"{{{a}}}, {{{xs[2 * h]}, {xs[2 * h + 1]}}}, {{{c}}};")
    return out


def xload(ptr: str) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """M = 1: lines loading the activation pairs of a lane's 4 words in the asm (word e's 8
    activations are the 16 bytes at ptr + 16e; all four loads issued first), the loaded
    registers of each word and its pair registers, X_i = (x_i, x_{i+4}) at [e][i], each to be
    made by `_pairs` before its word's mma. One 16-byte load a word instead of four 4-byte
    loads, and a lane whose B column must not see its group points ptr at zeros (the caller's
    choice, once a tile) instead of a select per register and row (session 26)."""
    q = [[f"q{e}_{k}" for k in range(4)] for e in range(4)]
    xs = [[f"x{e}_{i}" for i in range(4)] for e in range(4)]
    out = [f".reg .b32 {', '.join(r for row in q + xs for r in row)};"]
    for e in range(4):
        at = f"[{ptr}+{16 * e}]" if e else f"[{ptr}]"
        out.append(f"ld.global.nc.v4.b32 {{{', '.join(q[e])}}}, {at};")
    return out, q, xs


def _pairs(q: list[str], x: list[str]) -> list[str]:
    """A word's activation pairs (x_i, x_{i+4}) from its loaded pairs q_k = (x_2k, x_2k+1)."""
    return [f"prmt.b32 {x[0]}, {q[0]}, {q[2]}, 0x5410;", f"prmt.b32 {x[1]}, {q[0]}, {q[2]}, 0x7632;",
            f"prmt.b32 {x[2]}, {q[1]}, {q[3]}, 0x5410;", f"prmt.b32 {x[3]}, {q[1]}, {q[3]}, 0x7632;"]


def chain(f16: bool, w0: int, ptr: str) -> list[str]:
    """M = 1: PTX declarations and the mma chain over one lane's 4 words (w at $w0..$w0+3, their
    activations loaded from `ptr`, see `xload`) into a0-a3."""
    ty = "f16" if f16 else "bf16"
    magic = "0x64006400" if f16 else "0x43004300"
    ones = "0x3C003C00" if f16 else "0x3F803F80"
    out = [".reg .b32 p<4>, t, one;", ".reg .f32 a<4>, u, v;", f"mov.b32 one, {ones};"]
    loads, qs, xs = xload(ptr)
    out += loads + [f"mov.f32 a{i}, 0f00000000;" for i in range(4)]
    for e in range(4):  # word e of this lane
        out += _pairs(qs[e], xs[e])
        out += _codes(f"${w0 + e}", magic)
        out += _mma(ty, ["a0", "a1", "a2", "a3"], "p", xs[e])
    return out


def mma_asm(f16: bool, reps: int = 1) -> str:
    """M = 1 PTX for one lane's 4 words of `reps` rows (pack 4 * reps). Outputs: D of row r at
    $(4r)..$(4r + 3) (mma columns 2j, 2j + 1 of the (BASE + c) products, then two unused), XS at
    $(4R + 4r).. (the same columns of the activation sums). Inputs (R = reps): words of row r at
    $(8R + 4r + e), then a pointer operand at $(12R): the activations of the lane's first word
    (row 0's element 0 is read; `xload`). One row (R = 1): XS from ones in the mma's rows g + 8.
    Even R: rows 2i and 2i + 1 share one mma (rows g and g + 8) and XS comes from one all-ones
    mma per word for all of them: fewer mma.sync, and no ones copied into every A operand
    (`shared_asm` measured the same)."""
    if reps % 2 and reps != 1:
        raise ValueError(f"mma_asm: {reps} rows a call (1 or an even number)")
    if reps == 1:
        out = ["{"] + chain(f16, 8, "$12")
        for i, v in enumerate(("a0", "a1") + ("0f00000000",) * 2 + ("a2", "a3")
                              + ("0f00000000",) * 2):
            out.append(f"mov.b32 ${i}, {v};")
        out.append("}")
        return "\n".join(out)
    R = reps
    out, d, xs = paired_chain(f16, R, 8 * R, f"${12 * R}")
    for r in range(R):
        for e, v in enumerate(d[r] + ["0f00000000"] * 2):
            out.append(f"mov.b32 ${4 * r + e}, {v};")
        for e, v in enumerate(xs + ["0f00000000"] * 2):
            out.append(f"mov.b32 ${4 * R + 4 * r + e}, {v};")
    out.append("}")
    return "\n".join(out)


def paired_chain(f16: bool, reps: int, w0: int, ptr: str) -> tuple[list[str], list, list]:
    """M = 1, an even number of rows R: "{", declarations and the mma chain over one lane's 4
    words of R rows (row r's word e at $(w0 + 4r + e), the activations loaded from `ptr`, see
    `xload`): rows 2i, 2i + 1 share each mma (rows g, g + 8), XS from one all-ones mma a word.
    Returns the lines, row r's D registers (mma columns 2j, 2j + 1) and XS's."""
    R = reps
    ty = "f16" if f16 else "bf16"
    magic = "0x64006400" if f16 else "0x43004300"
    ones = "0x3C003C00" if f16 else "0x3F803F80"
    acc = [[f"a{i}_{c}" for c in range(4)] for i in range(R // 2)]
    sums = [f"s{c}" for c in range(4)]
    regs = [a for pair in acc for a in pair] + sums
    loads, qs, xw = xload(ptr)
    out = ["{", ".reg .b32 p<4>, u<4>, t, one;", f".reg .f32 {', '.join(regs)}, u, v;",
           f"mov.b32 one, {ones};"] + loads + [f"mov.f32 {a}, 0f00000000;" for a in regs]
    for e in range(4):
        xs = xw[e]
        out += _pairs(qs[e], xs)
        out += _mma(ty, sums, "", xs, ones_only=True)
        for i in range(R // 2):
            out += _codes(f"${w0 + 8 * i + e}", magic)
            out += _codes(f"${w0 + 8 * i + 4 + e}", magic, "u")
            out += _mma(ty, acc[i], "p", xs, "u")
    d = [acc[r // 2][2 * (r % 2):2 * (r % 2) + 2] for r in range(R)]
    return out, d, sums[:2]


def shared_asm(sets: int, f16: bool, reps: int) -> str:
    """M = 2..32 PTX for `reps` rows of one lane at once (pack 4 * reps: Triton hands a thread's
    row repetitions to one asm call, 4 words each) and `sets` token sets of 8 (lane g supplies
    token 8h + g of set h, loaded in the asm: a (rows, 16) activation load would pull the asm into
    another layout). The rows of a lane share their lane quad g, hence their tokens, so each
    word's activations of a set are loaded and paired once for all of them. With P = 4 * reps
    and Q = ceil(sets / 2) pairs of sets: D of pair q, row r at $(2qP + 4r + e) (element e: set 2q
    columns 2j, 2j + 1 for e < 2, set 2q + 1's for e >= 2), its XS at $((2q + 1)P + 4r + e); then
    the inputs from B = 2QP: words $(B + 4r + e), and per element (row 0's are read) a pointer
    $(B + P + e): element h < sets points at token set h's activations of the lane's first word
    (the caller clamps tokens past M to M - 1, whose columns the store masks), word e's are 16e
    bytes on. So the loads are unpredicated, with no zeroing and no address arithmetic (session
    12: 402 SASS instructions a tile at M = 16, BN 128, against 434 with predicated loads, and
    21.3 against 25.5 µs tiled on 14336x4096; benchmarks/RESULTS.md)."""
    P = 4 * reps
    Q = -(-sets // 2)
    B = 2 * Q * P
    ty = "f16" if f16 else "bf16"
    magic = "0x64006400" if f16 else "0x43004300"
    ones = "0x3C003C00" if f16 else "0x3F803F80"
    xs = [f"x{h}_{i}" for h in range(sets) for i in range(4)]
    paired = PAIRED and reps % 2 == 0
    if paired:  # rows 2i, 2i + 1 of a lane in one mma (rows g, g + 8): D of both
        acc = [[[f"a{r}_{h}_{i}" for i in range(4)] for h in range(sets)] for r in range(reps // 2)]
        sums = [[f"s{h}_{i}" for i in range(4)] for h in range(sets)]
    else:
        acc = [[[f"a{r}_{h}_{i}" for i in range(4)] for h in range(sets)] for r in range(reps)]
        sums = []
    regs = [a for r in acc for h in r for a in h] + [a for h in sums for a in h]
    out = ["{", f".reg .b32 p<4>, u<4>, t, one, q<4>, {', '.join(xs)};",
           f".reg .f32 {', '.join(regs)};", f"mov.b32 one, {ones};"]
    out += [f"mov.f32 {a}, 0f00000000;" for a in regs]
    for e in range(4):  # word e of each row
        for h in range(sets):  # the word's activations of token set h, once for all rows
            out.append(f"ld.global.nc.v4.b32 {{q0, q1, q2, q3}}, [${B + P + h}+{16 * e}];")
            out += _pairs(["q0", "q1", "q2", "q3"], [f"x{h}_{i}" for i in range(4)])
            if paired:  # XS of set h: all-ones rows
                out += _mma(ty, sums[h], "", [f"x{h}_{i}" for i in range(4)], ones_only=True)
        if paired:
            for r in range(0, reps, 2):
                out += _codes(f"${B + 4 * r + e}", magic)
                out += _codes(f"${B + 4 * r + 4 + e}", magic, "u")
                for h in range(sets):
                    out += _mma(ty, acc[r // 2][h], "p", [f"x{h}_{i}" for i in range(4)], "u")
        else:
            for r in range(reps):
                out += _codes(f"${B + 4 * r + e}", magic)
                for h in range(sets):
                    out += _mma(ty, acc[r][h], "p", [f"x{h}_{i}" for i in range(4)])
    zero = ["0f00000000"] * 4
    for q in range(Q):
        for r in range(reps):
            if paired:  # row r's D: c0, c1 (r even) or c2, c3 of its pair; XS from the sums
                half = 2 * (r % 2)
                d = [acc[r // 2][h][half:half + 2] for h in (2 * q, 2 * q + 1) if h < sets]
                x = [sums[h][0:2] for h in (2 * q, 2 * q + 1) if h < sets]
                a, b = d[0] + x[0], (d[1] + x[1]) if len(d) > 1 else zero
            else:
                a = acc[r][2 * q]
                b = acc[r][2 * q + 1] if 2 * q + 1 < sets else zero
            for e, v in enumerate((a[0], a[1], b[0], b[1])):
                out.append(f"mov.b32 ${2 * q * P + 4 * r + e}, {v};")
            for e, v in enumerate((a[2], a[3], b[2], b[3])):
                out.append(f"mov.b32 ${(2 * q + 1) * P + 4 * r + e}, {v};")
    out.append("}")
    return "\n".join(out)


PAIRED = True  # pair a lane's rows in one mma (False builds the old form: benchmarks A/B it)


def epi_asm(f16: bool, nsub: int, reps: int = 1) -> str:
    """M = 1 PTX that also folds the tile into the accumulator (EPI): the mma chain over one
    lane's 4 words, then acc_e += s_e * (D_e + nz_e * XS_e) for the mma columns that matter only
    (e = 0 with one group per tile: every column holds the same sum; e = 0, 1 with NSUB groups:
    column 2j + e, group (2j + e) % NSUB); the other slots pass through. Outputs: acc $0-$3.
    Inputs: w $4-$7, the activations' pointer $8 (`xload`; pack 4: $8-$11, $8 is read), acc
    $12-$15, s $16-$19, nz $20-$23 (`param_asm`'s, per element: element e holds column 2j + e's
    group). Even reps R (pack 4R): R rows a call, paired as in `paired_chain`; each operand
    group above R times as long (row r's element e at offset 4r + e; the pointer of row 0's
    element 0 is read)."""
    if reps % 2 and reps != 1:
        raise ValueError(f"epi_asm: {reps} rows a call (1 or an even number)")
    if reps > 1:
        R = reps
        out, d, xs = paired_chain(f16, R, 4 * R, f"${8 * R}")
        acc, sc, nz = 12 * R, 16 * R, 20 * R
        for r in range(R):
            o = 4 * r
            out += [f"fma.rn.f32 u, ${nz + o}, {xs[0]}, {d[r][0]};",
                    f"fma.rn.f32 ${o}, ${sc + o}, u, ${acc + o};"]
            if nsub == 1:
                out.append(f"mov.b32 ${o + 1}, ${acc + o + 1};")
            else:
                out += [f"fma.rn.f32 v, ${nz + o + 1}, {xs[1]}, {d[r][1]};",
                        f"fma.rn.f32 ${o + 1}, ${sc + o + 1}, v, ${acc + o + 1};"]
            out += [f"mov.b32 ${o + 2}, ${acc + o + 2};", f"mov.b32 ${o + 3}, ${acc + o + 3};"]
        return "\n".join(out + ["}"])
    out = ["{"] + chain(f16, 4, "$8")
    out += ["fma.rn.f32 u, $20, a2, a0;", "fma.rn.f32 $0, $16, u, $12;"]
    if nsub == 1:
        out.append("mov.b32 $1, $13;")
    else:
        out += ["fma.rn.f32 v, $21, a3, a1;", "fma.rn.f32 $1, $17, v, $13;"]
    out += ["mov.b32 $2, $14;", "mov.b32 $3, $15;", "}"]
    return "\n".join(out)


def epi_constraints(reps: int) -> str:
    """Operand constraints of `epi_asm` (pack 4 * reps)."""
    p = 4 * reps
    return ",".join(["=r"] * p + ["r"] * p + ["l"] * p + ["r"] * 3 * p)


def param_asm(sdt: str, zmode: int, f16: bool, nsub: int = 1, gs: int = 1,
              wide: bool = False) -> str:
    """PTX loading the scales of `nsub` groups of one row from group g0 on, as float32, and
    their nz = -(BASE + z) (EPI). Where the flag is 0 it reads nothing and s = 0 (nz = -BASE,
    finite, so s * (D + nz * XS) adds exactly 0). Outputs: s_t at $t, nz_t at $(n + t) (n =
    nsub); inputs: group g0's scale pointer $(2n), its zero-point byte pointer $(2n + 1), the
    shift of g0's nibble $(2n + 2) (nsub > 1: g0 is even, so one byte holds two groups' zero
    points and the shifts are 0, 4), flag $(2n + 3). gs: rows between one group's parameters
    and the next's (the tiled layout's RB, else 1). One call a row and tile loads every group
    of the tile. wide (nsub = 2, gs = 1, 16-bit scales; the caller makes the scale pointer
    4-byte aligned): both scales, adjacent, in one 32-bit load (14336x4096 g64 stored 16.0 ->
    15.0-15.2 µs, RESULTS.md session 28). A zero point becomes a float by the magic-number
    trick, (z | 0x4B000000) is 2^23 + z, so nz = (2^23 - BASE) - that, one subtraction (the
    integer conversion, add and negation took three more instructions a group; the M = 1
    kernel's time follows its instruction count, benchmarks/RESULTS.md session 27); a bfloat16
    scale is a float32's upper half. Issued a tile ahead, like the words, so its latency hides
    behind a tile's arithmetic; loading in the asm keeps the values in the mma layout (a
    (rows,) load is laid out otherwise and converted through shared memory, with barriers,
    every tile)."""
    n = nsub
    base = 1024.0 if f16 else 128.0
    esz = 4 if sdt == "f32" else 2
    sp, zp, sh, flag = (f"${2 * n + i}" for i in range(4))
    out = ["{", ".reg .b32 h, zb, zv;", ".reg .b16 hh, hi;", ".reg .pred ok;",
           f"setp.ne.u32 ok, {flag}, 0;"]
    if wide:
        if n != 2 or gs != 1 or sdt == "f32":
            raise ValueError("param_asm: one load of two scales takes nsub 2, gs 1, 16-bit scales")
        out += ["mov.b32 h, 0;", f"@ok ld.global.nc.b32 h, [{sp}];"]  # group g0 in the low half
        if sdt == "f16":
            out += ["mov.b32 {hh, hi}, h;", "cvt.f32.f16 $0, hh;", "cvt.f32.f16 $1, hi;"]
        else:
            out += ["shl.b32 $0, h, 16;", "and.b32 $1, h, 0xFFFF0000;"]
    for t in range(0 if wide else n):
        at = f"[{sp}+{t * gs * esz}]" if t else f"[{sp}]"
        if sdt == "f32":
            out += [f"mov.b32 ${t}, 0;", f"@ok ld.global.nc.b32 ${t}, {at};"]
        elif sdt == "f16":
            out += ["mov.b16 hh, 0;", f"@ok ld.global.nc.b16 hh, {at};", f"cvt.f32.f16 ${t}, hh;"]
        else:  # bfloat16: the upper half of a float32
            out += ["mov.b32 h, 0;", f"@ok ld.global.nc.u16 h, {at};", f"shl.b32 ${t}, h, 16;"]
    for t in range(n):
        if zmode == 0:  # -(BASE + 8)
            out.append(f"mov.b32 ${n + t}, {_f32(-(base + 8))};")
            continue
        if t % 2 == 0:
            at = f"[{zp}+{(t // 2) * gs}]" if t else f"[{zp}]"
            out += ["mov.b32 zb, 0;", f"@ok ld.global.nc.u8 zb, {at};"]
        if n == 1:
            out += [f"shr.u32 zv, zb, {sh};", "lop3.b32 zv, zv, 0xF, 0x4B000000, 0xEA;"]
        elif t % 2 == 0:
            out.append("lop3.b32 zv, zb, 0xF, 0x4B000000, 0xEA;")
        else:  # the byte's upper nibble
            out += ["shr.u32 zv, zb, 4;", "or.b32 zv, zv, 0x4B000000;"]
        out.append(f"sub.f32 ${n + t}, {_f32(2.0 ** 23 - base)}, zv;")
    return "\n".join(out + ["}"])


def _f32(v: float) -> str:
    """A PTX float32 immediate."""
    return "0f" + struct.pack(">f", v).hex().upper()


def constraints(sets: int, reps: int = 1) -> str:
    """Operand constraints of `mma_asm` (sets = 0: M = 1) or `shared_asm`."""
    p = 4 * reps
    if sets == 0:
        return ",".join(["=r"] * 2 * p + ["r"] * p + ["l"] * p)
    return ",".join(["=r"] * 2 * -(-sets // 2) * p + ["r"] * p + ["l"] * p)


class MmaLayoutError(RuntimeError):
    """The compiler laid the asm block out otherwise than the mma fragments need."""


LAYOUT_OK: dict = {}
def check_layout(kernel) -> None:
    """Raise MmaLayoutError unless every asm block of this compiled kernel has the layout the
    mma fragments assume (4 lanes x 16-byte vectors along a row, 8 rows per warp). Read once per
    compiled kernel from its TTGIR; a layout Triton chose otherwise would compute wrong sums."""
    key = id(kernel)
    want = ("sizePerThread = [1, 4]", "threadsPerWarp = [8, 4]", "order = [1, 0]")
    if key not in LAYOUT_OK:
        ttgir = kernel.asm.get("ttgir", "")
        lays = dict(re.findall(r"^(#\w+) = (.*)$", ttgir, re.MULTILINE))
        used = [u for ln in ttgir.splitlines() if "mma.sync" in ln
                for u in re.findall(r"elementwise_inline_asm \"\{.*?-> tensor<[^,]+, (#\w+)>", ln)]
        LAYOUT_OK[key] = bool(used) and all(all(w in lays.get(u, "") for w in want)
                                             for u in used)
    if not LAYOUT_OK[key]:
        raise MmaLayoutError("the compiled mma decode kernel's asm layout is not the one its "
                             "fragments assume; this launch shape cannot be used")
