"""The M = 1 tensor-core decode asm (memfit.kernels.mma_ptx: `mma_asm`, `epi_asm`, `param_asm`)
run on the CPU: its PTX text executed for one warp by tests/kernels/ptx_warp.py, the operands laid
out as memfit.kernels.triton_mma hands them to each lane, against float64 sums from the codes.

Otherwise the asm only runs on a GPU (tests/kernels/test_triton_mma.py); this checks the operand
slots, the mma fragments, the activation loads and pointers (the zeroed lanes of groups smaller
than a tile), the magic and ones constants and the scale / zero-point loads on any machine.

Layout: one warp holds 8R rows of a (rows, 16) tile of int32 words, R = `reps` rows a call; lane
(g, j) = 4g + j holds words 4j..4j+3 of rows g + 8r, and operand group k of an asm with pack 4R
has slot k * 4R + 4r + e for row r, element e (word 4j + e). Element e < 2 of lane j carries mma
column 2j + e: with NSUB groups a tile, group (2j + e) % NSUB. Word w holds codes 8w..8w+7 (code
i at bits 4i..4i+3), times activations x[8w..8w+7], the 16 bytes at x + 16w. Activations in
float16 (BASE 1024: 0x6400 | c) and bfloat16 (BASE 128: 0x4300 | c, with bfloat16 scales).

Tolerances: the interpreter rounds each mma's sums to float32; D = sum (1024 + c) x is ~1e4, so
the folded sums s * (D - (1024 + z) XS) are compared within 1e-3 of their scale of magnitude
s * 16 * sum |x| over the group's codes (a wrong group, pointer, word or scale moves them by
~0.1-1 of it; measured errors are below 0.3% of the tolerance), mma_asm's D - 1024 XS within
1e-3 of 16 sum |x| and its XS within 1e-4 of sum |x|; loaded parameters and passed-through slots
bit for bit.
"""

import numpy as np
import pytest

from memfit.kernels import mma_ptx
from tests.kernels.ptx_warp import LANES, Warp

G_, J_ = LANES // 4, LANES % 4  # lane (g, j)
BASE = 1024.0  # float16: 0x6400 | c = 1024 + c


def _base(f16: bool) -> float:
    """(BASE + c) is the 16-bit float of a code c: 1024 in float16, 128 in bfloat16."""
    return 1024.0 if f16 else 128.0
X0 = 64  # the activations' byte offset in memory; bytes 0..63 are the zeros of `_xptr`
TILE = 1  # the tile tested (w0 = 16): pointers carry the tile's offset, as the kernel's do


def _slots(tile: np.ndarray) -> list[np.ndarray]:
    """A (8R, 16) tile as 4R operands: slot 4r + e of lane (g, j) is tile[g + 8r, 4j + e]."""
    return [tile[G_ + 8 * r, 4 * J_ + e] for r in range(tile.shape[0] // 8) for e in range(4)]


def _tile(ops: list[np.ndarray]) -> np.ndarray:
    """The inverse of `_slots`, as float32."""
    out = np.zeros((2 * len(ops), 16), np.uint32)
    for k, o in enumerate(ops):
        out[G_ + 8 * (k // 4), 4 * J_ + k % 4] = o
    return out.view(np.float32)


def _words(codes: np.ndarray) -> np.ndarray:
    """(rows, 128) codes 0..15 -> (rows, 16) uint32 words, code 8w + i at bits 4i of word w."""
    c = codes.reshape(len(codes), 16, 8).astype(np.uint32)
    return (c << (4 * np.arange(8, dtype=np.uint32))).sum(axis=2, dtype=np.uint32)


def _bytes16(x: np.ndarray, f16: bool) -> np.ndarray:
    """x (exactly representable) as float16 or bfloat16 bytes."""
    if f16:
        return np.asarray(x, np.float16).view(np.uint8)
    return (np.asarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)


def _memory(x: np.ndarray, f16: bool = True) -> np.ndarray:
    """64 zero bytes, the 16-bit activations at X0, then 64 bytes of non-zero filler (a load
    past the activations reads nonsense, not zeros)."""
    fill = _bytes16(np.full(32, 7.0), f16)
    return np.concatenate([np.zeros(X0, np.uint8), _bytes16(x, f16), fill])


def _pointers(rows: int, nsub: int, zero_lanes: bool = True) -> list[np.ndarray]:
    """`_xptr`'s operands: element (r, e) of lane (g, j) points at word 4j + e of the tile, or
    (NSUB > 1, g % NSUB != j * NSUB // 4) at the zeros."""
    w = 16 * TILE + np.arange(16)[None, :] + np.zeros((rows, 1), int)
    p = X0 + 16 * w
    if nsub > 1 and zero_lanes:
        keep = (np.arange(rows)[:, None] % 8 % nsub) == (np.arange(16)[None, :] // 4 * nsub // 4)
        p = np.where(keep, p, 0)
    return [v.astype(np.uint64) for v in _slots(p)]


def _case(rng, rows: int, nsub: int, f16: bool = True):
    """Codes, zero points (rows, nsub), float16 scales as float32 (rows, nsub) and float16
    (f16) or bfloat16 activations of two tiles (bfloat16: as float32 values)."""
    codes = rng.integers(0, 16, (rows, 128))
    z = rng.integers(0, 16, (rows, nsub))
    s = (rng.uniform(0.5, 1.5, (rows, nsub)) * 1e-2).astype(np.float16).astype(np.float32)
    x = rng.standard_normal(256).astype(np.float16)
    if not f16:  # truncated to bfloat16
        x = (x.astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
    return codes, z, s, x


def _group_sums(codes, z, x, nsub):
    """(rows, nsub) float64 sums of (c - z) x over each group's codes, and of 16 |x|."""
    gl = 128 // nsub
    xt = x[128 * TILE:128 * (TILE + 1)].astype(np.float64).reshape(nsub, gl)
    c = codes.reshape(len(codes), nsub, gl) - z[:, :, None]
    return (c * xt).sum(axis=2), np.broadcast_to(16 * np.abs(xt).sum(axis=1), z.shape)


def _column_groups(nsub: int) -> np.ndarray:
    """(16,) the group of each word slot's mma column, -1 where the slot carries nothing."""
    e, j = np.arange(16) % 4, np.arange(16) // 4
    if nsub == 1:
        return np.where(e == 0, 0, -1)
    return np.where(e < 2, (2 * j + e) % nsub, -1)


def _epi(nsub, reps, codes, ptrs, acc, sv, nz, memory, f16: bool = True) -> np.ndarray:
    """epi_asm on one warp: the (8R, 16) float32 accumulator it returns."""
    f32 = [o for a in (acc, sv, nz) for o in _slots(a.astype(np.float32).view(np.uint32))]
    ops = [np.zeros(32, np.uint32)] * 4 * reps + _slots(_words(codes)) + ptrs + f32
    return _tile(Warp(memory).run(mma_ptx.epi_asm(f16, nsub, reps), ops)[:4 * reps])


def _run_epi(nsub: int, reps: int, seed: int, zero_lanes: bool = True, f16: bool = True):
    """epi_asm on one warp of 8R rows: (got, want, tol), each (8R, 16)."""
    rng = np.random.default_rng(seed)
    rows = 8 * reps
    codes, z, s, x = _case(rng, rows, nsub, f16)
    cg = _column_groups(nsub)
    acc = rng.standard_normal((rows, 16)).astype(np.float32)
    junk = rng.standard_normal((rows, 16)).astype(np.float32)  # slots carrying no column
    hit = cg[None, :] >= 0
    col = np.maximum(cg, 0)
    sv = np.where(hit, s[:, col], junk)
    nz = np.where(hit, -(_base(f16) + z[:, col]), junk)
    got = _epi(nsub, reps, codes, _pointers(rows, nsub, zero_lanes), acc, sv, nz,
               _memory(x, f16), f16)
    sums, mag = _group_sums(codes, z, x, nsub)
    want = np.where(hit, acc + s[:, col] * sums[:, col], acc)
    tol = np.where(hit, 1e-3 * s[:, col] * mag[:, col], 0.0)
    return got, want, tol


@pytest.mark.parametrize("f16", [True, False])
@pytest.mark.parametrize("reps", [1, 2, 4])
@pytest.mark.parametrize("nsub", [1, 2, 4])
def test_epi_asm_folds_each_group_into_its_column(nsub, reps, f16):
    """acc + s * sum (c - z) x in each slot carrying a column (its own group's codes, scale and
    zero point); every other slot passes acc through bit for bit. float16 and bfloat16."""
    got, want, tol = _run_epi(nsub, reps, seed=10 * nsub + reps, f16=f16)
    err = np.abs(got - want)
    assert (err <= tol).all(), (err / np.maximum(tol, 1e-30)).max()
    assert np.array_equal(got[tol == 0], want[tol == 0].astype(np.float32))


def test_epi_asm_needs_the_zeroed_lanes():
    """Negative check (nsub = 2): with every lane pointing at the real activations each column
    sums the whole tile, not its group, and misses by far more than the tolerance."""
    got, want, tol = _run_epi(2, 2, seed=7, zero_lanes=False)
    hit = tol > 0
    assert np.median(np.abs(got - want)[hit] / tol[hit]) > 20


@pytest.mark.parametrize("f16", [True, False])
@pytest.mark.parametrize("reps", [1, 2, 4])
@pytest.mark.parametrize("nsub", [1, 2, 4])
def test_mma_asm_returns_d_and_xs_per_column(nsub, reps, f16):
    """D - BASE XS = sum c x and XS = sum x over each column's group (z = 0), for the slots
    e < 2 of every row; the two unused slots of each row are 0."""
    rng = np.random.default_rng(100 + 10 * nsub + reps)
    rows = 8 * reps
    codes, _, _, x = _case(rng, rows, nsub, f16)
    ops = ([np.zeros(32, np.uint32)] * 8 * reps + _slots(_words(codes))
           + _pointers(rows, nsub))
    out = Warp(_memory(x, f16)).run(mma_ptx.mma_asm(f16, reps), ops)
    d, xs = _tile(out[:4 * reps]), _tile(out[4 * reps:8 * reps])
    zero = np.zeros((rows, nsub), int)
    cx, mag = _group_sums(codes, zero, x, nsub)
    sx, _ = _group_sums(np.ones_like(codes), zero, x, nsub)
    e = np.arange(16) % 4
    n = np.where(e < 2, (2 * (np.arange(16) // 4) + e) % nsub, 0)
    used = np.broadcast_to(e < 2, d.shape)
    dd = d.astype(np.float64) - _base(f16) * xs
    assert (np.abs(dd - cx[:, n])[used] <= 1e-3 * mag[:, n][used]).all()
    assert (np.abs(xs - sx[:, n])[used] <= 1e-4 * mag[:, n][used] / 16).all()
    assert not d[~used].any() and not xs[~used].any()


def _at(n, c, stride, gs):
    """Element (row n, column c) of a (rows, stride) table stored row by row (gs = 1) or in
    blocks of gs rows, each block column by column (memfit.kernels.triton_dequant._at)."""
    return n * stride + c if gs == 1 else ((n // gs) * stride + c) * gs + n % gs


def _param_tables(rng, rows: int, groups: int, gs: int, sdt: str = "f16"):
    """float16 (or bfloat16: sdt "bf16") scales (rows, groups) and zero points, the memory
    holding both (zero-point bytes from `zb` on: two groups a byte, the even group in the low
    nibble), and `zb`. The scales come back as float32 (exactly the stored values)."""
    s = (rng.uniform(0.5, 1.5, (rows, groups)) * 1e-2).astype(np.float16)
    bits = s.view(np.uint16)
    if sdt == "bf16":  # a float32's upper half, truncated
        bits = (s.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        s = (bits.astype(np.uint32) << 16).view(np.float32)
    z = rng.integers(0, 16, (rows, groups))
    sm = np.zeros(rows * groups, np.uint16)
    zm = np.zeros(rows * groups // 2, np.uint8)
    n, g = np.meshgrid(np.arange(rows), np.arange(groups), indexing="ij")
    sm[_at(n, g, groups, gs)] = bits
    np.bitwise_or.at(zm, _at(n, g // 2, groups // 2, gs), (z << (4 * (g % 2))).astype(np.uint8))
    return s, z, np.concatenate([sm.view(np.uint8), zm]), 2 * rows * groups


@pytest.mark.parametrize("f16", [True, False])
@pytest.mark.parametrize("sdt", ["f16", "bf16"])
@pytest.mark.parametrize("gs,wide", [(1, False), (64, False), (1, True)])
@pytest.mark.parametrize("zmode", [0, 1])
@pytest.mark.parametrize("nsub", [1, 2])
def test_param_asm_loads_scales_and_zero_points(nsub, zmode, gs, wide, sdt, f16):
    """s_t = the scale of group g0 + t, nz_t = -(BASE + z) (symmetric: z = 8), exactly, for
    lanes of different rows and groups; flag 0 gives s = 0, a finite nz, and reads nothing
    (those lanes, and the zero-point pointer when symmetric, point outside memory: a load there
    would raise). wide: both scales of nsub = 2 in one 32-bit load (the interpreter checks its
    4-byte alignment)."""
    if wide and nsub != 2:
        with pytest.raises(ValueError, match="one load of two scales"):
            mma_ptx.param_asm(sdt, zmode, f16, nsub, gs, wide)
        return
    rng = np.random.default_rng(nsub + 2 * zmode + gs)
    rows, groups = 128, 8
    s, z, mem, zb = _param_tables(rng, rows, groups, gs, sdt)
    n = rng.permutation(rows)[:32]  # each lane a row
    g0 = rng.integers(0, groups - nsub + 1, 32) // nsub * nsub  # nsub = 2: even
    flag = (rng.random(32) < 0.75).astype(np.uint32)
    far = np.uint64(1 << 40)
    sp = np.where(flag, 2 * _at(n, g0, groups, gs), far).astype(np.uint64)
    zp = np.where(flag, zb + _at(n, g0 // 2, groups // 2, gs), far).astype(np.uint64)
    if zmode == 0:
        zp[:] = far
    ins = [sp, zp, ((g0 % 2) * 4).astype(np.uint32), flag]
    out = Warp(mem).run(mma_ptx.param_asm(sdt, zmode, f16, nsub, gs, wide),
                        [np.zeros(32, np.uint32)] * 2 * nsub + ins)
    bits = lambda v: np.asarray(v, np.float32).view(np.uint32)  # flag 0: +0.0, not -0.0
    for t in range(nsub):
        zt = z[n, g0 + t] if zmode else np.full(32, 8)
        want_s = np.where(flag, s[n, g0 + t].astype(np.float32), 0)
        assert np.array_equal(out[t].astype(np.uint32), bits(want_s))
        nz = out[nsub + t].astype(np.uint32).view(np.float32)
        assert np.array_equal(nz[flag == 1], (-(_base(f16) + zt[flag == 1])).astype(np.float32))
        assert np.isfinite(nz).all()  # flag 0: s = 0 times a finite sum adds exactly 0


def _epi_params(warp, nsub, ok, p0, zb, groups, g0, f16: bool = True):
    """param_asm as `_epi_params` calls it for the (rows, 16) tile of rows 0..rows-1 (scale and
    zero-point tables at p0, row by row): nsub = 2 one call a row for both groups, element e of
    a lane taking group e; else one call a slot, for group g0 + the slot's column group
    (2j + e) % nsub. Rows not ok: flag 0 and pointers outside memory. Returns s, nz (rows, 16)."""
    rows = len(ok)
    e, j = np.arange(16) % 4, np.arange(16) // 4
    cg = np.where(e < 2, (2 * j + e) % nsub, 0)[None, :] + np.zeros((rows, 1), int)
    g = g0 + cg * (nsub != 2)
    n = np.arange(rows)[:, None] + 0 * cg
    live = np.broadcast_to(ok[:, None], cg.shape)
    sp = np.where(live, p0 + 2 * _at(n, g, groups, 1), 1 << 40).astype(np.uint64)
    zp = np.where(live, p0 + zb + _at(n, g // 2, groups // 2, 1), 1 << 40).astype(np.uint64)
    ins = [_slots(a) for a in (sp, zp, ((g % 2) * 4).astype(np.uint32), live.astype(np.uint32))]
    k = 2 if nsub == 2 else 1
    text = mma_ptx.param_asm("f16" if f16 else "bf16", 1, f16, k, 1, k == 2)  # as the kernel
    sv, nz = [], []
    for i, c in enumerate(_slots(cg)):  # slot i: outputs s_0..s_(k-1), nz_0..nz_(k-1)
        o = warp.run(text, [np.zeros(32, np.uint32)] * 2 * k + [a[i] for a in ins])
        sv.append(np.where(c == 1, o[k - 1], o[0]))
        nz.append(np.where(c == 1, o[2 * k - 1], o[k]))
    return _tile(sv), _tile(nz)


@pytest.mark.parametrize("f16", [True, False])
@pytest.mark.parametrize("nsub", [1, 2, 4])
def test_param_asm_feeds_epi_asm(nsub, f16):
    """The kernel's EPI pair on tile 1 of rows of 256 codes, groups of 128 / nsub codes, reps 2:
    param_asm's s and nz (`_epi_params` above) straight into epi_asm, against the float64 sums
    with the tables' scales and zero points. Rows 14, 15 are out of range (flag 0, pointers
    outside memory, words 0): their accumulator comes back unchanged, bit for bit. float16
    activations and scales, and bfloat16 ones (the kernel's pairing for a bfloat16 model)."""
    rng = np.random.default_rng(40 + nsub)
    rows, groups, g0 = 16, 2 * nsub, nsub
    codes, _, _, x = _case(rng, rows, nsub, f16)
    s, z, tables, zb = _param_tables(rng, rows, groups, 1, "f16" if f16 else "bf16")
    mem = _memory(x, f16)
    warp = Warp(np.concatenate([mem, tables]))
    ok = np.arange(rows) < 14
    codes[~ok] = 0
    sv, nz = _epi_params(warp, nsub, ok, len(mem), zb, groups, g0, f16)
    acc = rng.standard_normal((rows, 16)).astype(np.float32)
    got = _epi(nsub, 2, codes, _pointers(rows, nsub), acc, sv, nz, warp.memory, f16)
    sums, mag = _group_sums(codes, z[:, g0:g0 + nsub], x, nsub)
    sg = s[:, g0:g0 + nsub].astype(np.float64)
    cg = _column_groups(nsub)
    col = np.maximum(cg, 0)
    hit = (cg[None, :] >= 0) & ok[:, None]
    want = np.where(hit, acc + sg[:, col] * sums[:, col], acc)
    tol = np.where(hit, 1e-3 * sg[:, col] * mag[:, col], 0.0)
    assert (np.abs(got - want) <= tol).all()
    assert np.array_equal(got[~hit], acc[~hit])
