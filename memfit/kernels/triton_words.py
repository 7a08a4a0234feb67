"""Word-wise Triton kernels for decode (M <= 16): the packed rows read as 32-bit words.

Layout: none new, no repacking, no extra bytes. memfit's rows are little-endian bit streams
(memfit.kernels.packing), so the row's bytes read as int32 words give word w = codes
PERW*w .. PERW*w + PERW - 1 with code PERW*w + i in bits [BITS*i, BITS*(i+1)) (PERW = 32 // BITS).
A row's bytes must fill whole words (in * bits % 32 == 0) and the group size must hold whole
words; `word_ineligibility` says when not, and the byte kernels (memfit.kernels.triton_int) take
such layers.

Why words: one 16-byte load per thread brings 32 int4 codes, and each code costs about three
instructions, with no int-to-float conversion (a quarter-rate unit on Hopper, which bounded the
byte GEMV):
- field i of a word is masked in place, `w & (MASK << BITS*i)` (fields in the low 16 bits; the high
  half is shifted down once per word), OR-ed into the exponent of 2**23 and read as a float32:
  2**23 + c * 2**(BITS*i), exact; one subtraction gives c * 2**(BITS*i) exactly;
- the power of two is folded into the activation (x * 2**-(BITS*i), exact in float32 and bfloat16),
  so the multiply-add sees c and x directly.

Two kernels:
- `_words_fma` (M = 1): CUDA-core multiply-adds into a float32 (BN, T, WG) accumulator; the
  scale and zero point are applied once per word slot and tile,
  sum_k s * x_k * (c_k - z) = s * (sum_k x_k c_k - z * sum_k x_k).
- `_words_dot` (M <= 16): each field's (BN, T*WG) tile is dequantized in registers,
  (c - z) * s in the activation dtype, and fed to tl.dot against the matching activation columns
  (the dot sums over K, so the column order within a tile does not matter).
Both split K over SPLIT_K programs in one launch: each stores a float32 partial and counts itself
in on its column tile's counter; the last to arrive adds the partials in a fixed order, adds the
bias, casts, and resets the counter (one kernel per call, no zero-fill, deterministic sums). Each
program loads its next tile before computing the current one (`_words_fma`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memfit.kernels.sizes import cdiv
from memfit.kernels.weights import IntWeight

WG_CAP = 32  # most words of one group in a tile slice


@triton.jit
def _field(wd, wh, i: tl.constexpr, BITS: tl.constexpr, SHIFT: tl.constexpr):
    """float32 value of field i of each word: c (SHIFT) or c * 2**(BITS*(i % HALF)) (in place);
    wh = wd >> 16 (shared by the high fields)."""
    PERW: tl.constexpr = 32 // BITS
    HALF: tl.constexpr = PERW // 2
    MASK: tl.constexpr = (1 << BITS) - 1
    if SHIFT:
        c = (wd >> (BITS * i)) & MASK
    elif i < HALF:
        c = wd & (MASK << (BITS * i))
    else:
        c = wh & (MASK << (BITS * (i - HALF)))
    return (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _zeros(z_ptr, rn, g, ok, stride_zn, BITS: tl.constexpr, ZMODE: tl.constexpr):
    """float32 zero points of rows rn (BN, 1) and groups g (1, T): (BN, T)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    if ZMODE == 0:
        return tl.zeros(ok.shape, tl.float32) + (1 << (BITS - 1))
    elif ZMODE == 1:
        zb = tl.load(z_ptr + rn * stride_zn + (g * BITS) // 8, mask=ok, other=0).to(tl.int32)
        return ((zb >> ((g * BITS) % 8)) & MASK).to(tl.float32)
    else:
        return tl.load(z_ptr + rn * stride_zn + g, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _store_y(acc, off, ok, boff, y_ptr, b_ptr, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(b_ptr + boff, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + off, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _parts(off, ok, p_ptr, stride_ps, SPLIT_K: tl.constexpr):
    """The sum of the SPLIT_K float32 partials at off."""
    acc = tl.zeros(off.shape, tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(p_ptr + s * stride_ps + off, mask=ok, other=0.0, cache_modifier=".cg")
    return acc


@triton.jit
def _finish(acc, off, ok, boff, y_ptr, p_ptr, c_ptr, b_ptr, pid_n, pid_k, stride_ps,
            HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, acc1=0.0, off1=0, ok1=0,
            TWO: tl.constexpr = False):
    """Write acc (+ bias) to y[off]. With SPLIT_K > 1: store the float32 partial, count arrivals
    on this column tile's counter; the last program to arrive sums the partials, writes y and
    resets the counter to 0 (so the counters are always zero between calls). TWO: also acc1 to
    y[off1] where ok1 (memfit.kernels.triton_mma at M = 17..32), one arrival for the two."""
    if SPLIT_K > 1:
        tl.store(p_ptr + pid_k * stride_ps + off, acc, mask=ok)
        if TWO:
            tl.store(p_ptr + pid_k * stride_ps + off1, acc1, mask=ok1)
        tl.debug_barrier()  # every thread's partial is stored before the (one-thread) release
        arrived = tl.atomic_add(c_ptr + pid_n, 1, sem="acq_rel")
        tl.debug_barrier()
        if arrived == SPLIT_K - 1:
            _store_y(_parts(off, ok, p_ptr, stride_ps, SPLIT_K), off, ok, boff, y_ptr, b_ptr,
                     HAS_BIAS)
            if TWO:
                _store_y(_parts(off1, ok1, p_ptr, stride_ps, SPLIT_K), off1, ok1, boff, y_ptr,
                         b_ptr, HAS_BIAS)
            tl.atomic_xchg(c_ptr + pid_n, 0)
    else:
        _store_y(acc, off, ok, boff, y_ptr, b_ptr, HAS_BIAS)
        if TWO:
            _store_y(acc1, off1, ok1, boff, y_ptr, b_ptr, HAS_BIAS)


@triton.jit
def _load_tile(q_ptr, s_ptr, z_ptr, rn, n_ok, w0, wend, NG, stride_qn, stride_sn, stride_zn,
               GROUP: tl.constexpr, BITS: tl.constexpr, ZMODE: tl.constexpr, T: tl.constexpr,
               WG: tl.constexpr):
    """Words (BN, T, WG) from word w0 of rows rn, their scales and zero points (BN, T); words
    at or past `wend` (the end of the row or of this program's chunk) are not read."""
    PERW: tl.constexpr = 32 // BITS
    rt = tl.arange(0, T)
    wi = w0 + rt[:, None] * WG + tl.arange(0, WG)[None, :]
    w_ok = wi < wend
    wd = tl.load(q_ptr + rn[:, None, None] * stride_qn + wi[None, :, :],
                 mask=n_ok[:, None, None] & w_ok[None, :, :], other=0)
    g = ((w0 + rt * WG) * PERW) // GROUP
    ok = n_ok[:, None] & ((w0 + rt * WG) < wend)[None, :]
    s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :], mask=ok, other=0.0).to(tl.float32)
    z = _zeros(z_ptr, rn[:, None], g[None, :], ok, stride_zn, BITS, ZMODE)
    return wd, s, z


@triton.jit
def _words_fma(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, p_ptr, c_ptr, N, NW, NG, ITERS,
               stride_qn, stride_sn, stride_zn, stride_ps, GROUP: tl.constexpr,
               BITS: tl.constexpr, ZMODE: tl.constexpr, HAS_BIAS: tl.constexpr, BN: tl.constexpr,
               T: tl.constexpr, WG: tl.constexpr, SPLIT_K: tl.constexpr, SHIFT: tl.constexpr):
    """y[0, rn] = x[0, :] @ dequant(q)^T for BN rows; program pid_k takes K chunk pid_k. The next
    tile's words are loaded before this tile is computed (one tile always in flight)."""
    PERW: tl.constexpr = 32 // BITS
    HALF: tl.constexpr = PERW // 2
    TW: tl.constexpr = T * WG
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn < N
    rt = tl.arange(0, T)
    rw = tl.arange(0, WG)
    acc = tl.zeros((BN, T, WG), dtype=tl.float32)
    w0 = pid_k * ITERS * TW  # each program streams one contiguous chunk of every row
    wend = tl.minimum(w0 + ITERS * TW, NW)
    wd, s, z = _load_tile(q_ptr, s_ptr, z_ptr, rn, n_ok, w0, wend, NG, stride_qn,
                          stride_sn, stride_zn, GROUP, BITS, ZMODE, T, WG)
    for it in range(0, ITERS):
        nwd, ns, nz = _load_tile(q_ptr, s_ptr, z_ptr, rn, n_ok, w0 + TW, wend, NG,
                                 stride_qn, stride_sn, stride_zn, GROUP, BITS, ZMODE, T, WG)
        wi = w0 + rt[:, None] * WG + rw[None, :]  # (T, WG) word index along the row
        w_ok = wi < NW
        wh = wd >> 16
        part = tl.zeros((BN, T, WG), dtype=tl.float32)
        xsum = tl.zeros((T, WG), dtype=tl.float32)
        for i in tl.static_range(PERW):
            xi = tl.load(x_ptr + wi * PERW + i, mask=w_ok, other=0.0).to(tl.float32)
            xsum += xi
            if not SHIFT:
                xi = xi * (1.0 / (1 << (BITS * (i % HALF))))
            part += _field(wd, wh, i, BITS, SHIFT) * xi[None, :, :]
        acc += (part - z[:, :, None] * xsum[None, :, :]) * s[:, :, None]
        wd, s, z = nwd, ns, nz
        w0 += TW
    y = tl.sum(tl.sum(acc, axis=2), axis=1)  # (BN,)
    _finish(y, rn, n_ok, rn, y_ptr, p_ptr, c_ptr, b_ptr, pid_n, pid_k, stride_ps, HAS_BIAS,
            SPLIT_K)


@triton.jit
def _words_dot(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, p_ptr, c_ptr, M, N, NW, NG, ITERS,
               stride_xm, stride_qn, stride_sn, stride_zn, stride_ym, stride_ps, GROUP: tl.constexpr,
               BITS: tl.constexpr, ZMODE: tl.constexpr, HAS_BIAS: tl.constexpr,
               IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, T: tl.constexpr,
               WG: tl.constexpr, SPLIT_K: tl.constexpr, SHIFT: tl.constexpr):
    """y[pid_k, M, N] partials (or the output) of x @ dequant(q)^T, one tl.dot per code field."""
    PERW: tl.constexpr = 32 // BITS
    HALF: tl.constexpr = PERW // 2
    TW: tl.constexpr = T * WG
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    n_ok = rn < N
    m_ok = rm < M
    rt = tl.arange(0, T)
    rw = tl.arange(0, WG)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for it in range(0, ITERS):
        w0 = (pid_k * ITERS + it) * TW  # each program streams one contiguous chunk
        wi = w0 + rt[:, None] * WG + rw[None, :]  # (T, WG)
        w_ok = wi < NW
        wd = tl.load(q_ptr + rn[:, None, None] * stride_qn + wi[None, :, :],
                     mask=n_ok[:, None, None] & w_ok[None, :, :], other=0)
        wh = wd >> 16
        g = ((w0 + rt * WG) * PERW) // GROUP
        ok = n_ok[:, None] & (g < NG)[None, :]
        s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :], mask=ok, other=0.0).to(tl.float32)
        z = _zeros(z_ptr, rn[:, None], g[None, :], ok, stride_zn, BITS, ZMODE)
        for i in tl.static_range(PERW):
            if SHIFT:
                zi = z
            else:
                zi = z * (1 << (BITS * (i % HALF)))
            w = ((_field(wd, wh, i, BITS, SHIFT) - zi[:, :, None]) * s[:, :, None])
            xi = tl.load(x_ptr + rm[:, None, None] * stride_xm + (wi * PERW + i)[None, :, :],
                         mask=m_ok[:, None, None] & w_ok[None, :, :], other=0.0)
            if not SHIFT:
                xi = (xi.to(tl.float32) * (1.0 / (1 << (BITS * (i % HALF))))).to(x_ptr.dtype.element_ty)
            w2 = tl.reshape(w, (BN, TW)).to(x_ptr.dtype.element_ty)
            x2 = tl.reshape(xi, (BM, TW))
            if IEEE:
                acc = tl.dot(w2, tl.trans(x2), acc, input_precision="ieee")
            else:
                acc = tl.dot(w2, tl.trans(x2), acc)
    ok = n_ok[:, None] & m_ok[None, :]
    _finish(acc, rm[None, :] * stride_ym + rn[:, None], ok, rn[:, None] + rm[None, :] * 0, y_ptr,
            p_ptr, c_ptr, b_ptr, pid_n, pid_k, stride_ps, HAS_BIAS, SPLIT_K)


def word_ineligibility(w: IntWeight) -> str | None:
    """Why the word kernels cannot take `w` (None when they can)."""
    n, k = w.shape
    perw = 32 // w.bits if w.bits in (2, 4, 8) else 0
    if not perw:
        return f"{w.bits}-bit codes do not tile a 32-bit word"
    if k % perw:
        return f"rows of {k} {w.bits}-bit codes do not fill whole 32-bit words"
    if w.n_groups > 1 and w.group_size % perw:
        return f"a group of {w.group_size} codes does not hold whole words"
    if not w.qdata.is_contiguous() or w.qdata.data_ptr() % 4:
        return "the packed codes are not a contiguous, word-aligned tensor"
    return None


def slice_words(w: IntWeight) -> int:
    """WG: words of one group in a tile slice (a power of two dividing the group's words)."""
    if w.n_groups == 1:
        return WG_CAP
    gw = w.group_size // (32 // w.bits)
    wg = 1
    while wg < WG_CAP and gw % (2 * wg) == 0:
        wg *= 2
    return wg


def run_words(x2: torch.Tensor, w: IntWeight, bias, cfg, dot: bool, zmode: int) -> torch.Tensor:
    """(M, in) -> (M, out) through `_words_fma` (M = 1) or `_words_dot`; cfg.BK is the k columns
    per tile (T slices of WG words), cfg.SPLIT_K the programs along K, cfg.shift whether each
    field is shifted down (else masked in place, the activation pre-scaled)."""
    m, k = x2.shape
    n = w.shape[0]
    perw = 32 // w.bits
    wg = slice_words(w)
    t = max(1, cfg.BK // perw // wg)
    wg = min(wg, max(1, cfg.BK // perw))
    while dot and t * wg < 16:  # tl.dot takes K >= 16 (words here) on the GPU
        t *= 2
    nw = k // perw
    iters = cdiv(cdiv(nw, t * wg), cfg.SPLIT_K)
    q = w.qdata.view(torch.int32)
    z = w.zero if w.zero is not None else w.scale
    b = bias if bias is not None else w.scale
    x2 = x2.contiguous()
    sk = cfg.SPLIT_K
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    grid = (cdiv(n, cfg.BN), sk)
    part, cnt = split_buffers(y, sk, grid[0], q)
    shift = cfg.shift or x2.dtype == torch.float16  # x * 2**-12 would leave float16's range
    common = dict(GROUP=w.group_size, BITS=w.bits, ZMODE=zmode, HAS_BIAS=bias is not None,
                  BN=cfg.BN, T=t, WG=wg, SPLIT_K=sk, SHIFT=shift, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    if not dot:
        assert m == 1
        LAST[0] = _words_fma[grid](x2, q, w.scale, z, b, y, part, cnt, n, nw, w.n_groups, iters, q.stride(0),
                         w.scale.stride(0), z.stride(0), m * n, **common)
    else:
        LAST[0] = _words_dot[grid](x2, q, w.scale, z, b, y, part, cnt, m, n, nw, w.n_groups, iters,
                         x2.stride(0), q.stride(0), w.scale.stride(0), z.stride(0), n, m * n,
                         IEEE=x2.dtype == torch.float32, BM=cfg.BM, **common)
    return y


LAST: list = [None]  # the last launched compiled kernel (benchmarks read n_regs, n_spills)
_COUNTERS: dict = {}
_CAPTURED: list = []  # zero buffers made inside captures: kept for the process (a graph may replay)


def split_buffers(y: torch.Tensor, split_k: int, tiles: int, unused: torch.Tensor):
    """(partials, counters) of a launch writing y (M, N) split `split_k` ways along K: float32
    (split_k, M, N) partials and the arrival counters of `tiles` output tiles (`_finish`); not
    split: (y, unused), placeholders the kernel does not read."""
    if split_k == 1:
        return y, unused
    m, n = y.shape
    return (torch.empty(split_k, m, n, dtype=torch.float32, device=y.device),
            _counters(y.device, tiles))


def _counters(device, n: int) -> torch.Tensor:
    """Per-device int32 arrival counters for split-K, zero between calls (each call's last
    program resets its own); grown, never shrunk (`zeroed`). Shared by every layer of a device:
    split-K calls must not run concurrently on two streams."""
    return zeroed(_COUNTERS, device, max(n, 4096))


def zeroed(cache: dict, device, n: int) -> torch.Tensor:
    """A per-device int32 buffer of at least n zeros, kept in `cache`. One made inside a CUDA
    graph capture is only zeroed when the graph replays (the fill is recorded, not run), so it
    serves that capture alone: it is held (for the process: the graph may replay at any time)
    but not shared, and the next call outside a capture makes the shared one (an eager call must
    never find it unfilled)."""
    c = cache.get(device)
    if c is None or c.numel() < n:
        fresh = torch.zeros(n, dtype=torch.int32, device=device)
        if _capturing(device):
            _CAPTURED.append(fresh)
            return fresh
        c = cache[device] = fresh
    return c


def _capturing(device) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()
