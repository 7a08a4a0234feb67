"""Mixture-of-experts GEMV on CUDA: each row of x through the expert its id names, read from
device memory, so a decode step's experts run with no host sync and can be captured in a CUDA
graph (memfit.moe's routed path; transformers' own loop asks the host which experts were hit).

    y[r] = W[ids[r]] x[r] (+ b[ids[r]])      r < R = tokens x experts a token (decode: small)

The experts' tensors stay where they are (one allocation each, as loaded): the launch gets the
first expert's tensor and each expert's element offset from it (int64, built once per layer and
kept while the tensors do not move; `Table`). Weights: memfit's packed integer rows (4 or 8
bits, stored layout, zero points symmetric / packed int / float, groups that hold whole K
tiles) or dense rows in the activations' dtype. A program takes BN output rows of one expert
and every row of x routed to it (an expert no row names exits at once), so each used expert's
weights are read once however many rows it serves; it walks K in tiles of BK codes inside one
group: the codes minus the zero point are exact integers in the activations' dtype, dotted on
the tensor cores with the routed rows (4 bits: a byte's low nibbles against x's even columns,
high nibbles against the odd ones), and the group's scale applies once per tile. K is split
over SPLIT programs when the used experts' row tiles alone would leave the GPU idle; their
float32 partials are summed after (a fixed order: deterministic). Under TRITON_INTERPRET=1 it
runs on the CPU (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memfit.kernels.sizes import cdiv


@triton.jit
def _scale_zero(s_ptr, z_ptr, rn64, n_ok, g, stride_sn, stride_zn, BITS: tl.constexpr,
                ZMODE: tl.constexpr, BN: tl.constexpr):
    """Group g's float32 scales and zero points of rows rn64 (ZMODE 0 symmetric, 1 packed
    integers, 2 floats)."""
    s = tl.load(s_ptr + rn64 * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
    if ZMODE == 0:
        z = tl.zeros((BN,), tl.float32) + (1 << (BITS - 1))
    elif ZMODE == 1:
        zb = tl.load(z_ptr + rn64 * stride_zn + (g * BITS) // 8, mask=n_ok, other=0).to(tl.int32)
        z = ((zb >> ((g * BITS) % 8)) & ((1 << BITS) - 1)).to(tl.float32)
    else:
        z = tl.load(z_ptr + rn64 * stride_zn + g, mask=n_ok, other=0.0).to(tl.float32)
    return s, z


@triton.jit
def _moe_gemv(x_ptr, ids_ptr, qo_ptr, so_ptr, zo_ptr, bo_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
              R, N, K, stride_xr, stride_qn, stride_sn, stride_zn, stride_ys, stride_yr,
              KT_PER: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, ZMODE: tl.constexpr,
              HAS_BIAS: tl.constexpr, PREC: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              RB: tl.constexpr, DOT: tl.constexpr):
    pid_n, e, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rr = tl.arange(0, RB)
    sel = tl.load(ids_ptr + rr, mask=rr < R, other=-1) == e  # the rows routed to expert e
    if tl.sum(sel.to(tl.int32), 0) > 0:  # an expert no row names reads nothing
        e64 = e.to(tl.int64)
        q_ptr += tl.multiple_of(tl.load(qo_ptr + e64), 16)  # Table checks the alignment
        rn = pid_n * BN + tl.arange(0, BN)
        n_ok = rn < N
        rn64 = rn.to(tl.int64)
        acc = tl.zeros((BN, RB), tl.float32)
        xr = x_ptr + rr[None, :] * stride_xr
        dt = x_ptr.dtype.element_ty
        if BITS == 16:  # dense rows in the activations' dtype
            for t in range(0, KT_PER):
                rk = (pid_k * KT_PER + t) * BK + tl.arange(0, BK)
                k_ok = rk < K
                x = tl.load(xr + rk[:, None], mask=k_ok[:, None] & sel[None, :], other=0.0)
                w = tl.load(q_ptr + rn64[:, None] * stride_qn + rk[None, :],
                            mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                acc += tl.dot(w, x, input_precision=PREC)
        else:
            s_ptr += tl.load(so_ptr + e64)
            if ZMODE != 0:
                z_ptr += tl.load(zo_ptr + e64)
            for t in range(0, KT_PER):
                k0 = (pid_k * KT_PER + t) * BK
                g = k0 // G
                s, z = _scale_zero(s_ptr, z_ptr, rn64, n_ok, g, stride_sn, stride_zn, BITS, ZMODE,
                                   BN)
                if BITS == 4:  # a byte: code 2j (low nibble) and 2j + 1 (high)
                    j = tl.arange(0, BK // 2)
                    b = tl.load(q_ptr + rn64[:, None] * stride_qn + k0 // 2 + j[None, :],
                                mask=n_ok[:, None], other=0).to(tl.int32)
                    xe = tl.load(xr + (k0 + 2 * j)[:, None], mask=sel[None, :], other=0.0)
                    xo = tl.load(xr + (k0 + 2 * j + 1)[:, None], mask=sel[None, :], other=0.0)
                    if DOT:
                        lo = ((b & 15).to(tl.float32) - z[:, None]).to(dt)  # exact integers
                        hi = ((b >> 4).to(tl.float32) - z[:, None]).to(dt)
                        d = tl.dot(lo, xe, input_precision=PREC)
                        d = tl.dot(hi, xo, d, input_precision=PREC)
                    else:  # few rows: multiply-adds on the CUDA cores, row by row
                        lo, hi = (b & 15).to(tl.float32), (b >> 4).to(tl.float32)
                        d = tl.zeros((BN, RB), tl.float32)
                        for i in tl.static_range(RB):
                            pick = (rr == i)[None, :]
                            ei = tl.sum(tl.where(pick, xe, 0.0).to(tl.float32), 1)
                            oi = tl.sum(tl.where(pick, xo, 0.0).to(tl.float32), 1)
                            di = tl.sum(lo * ei[None, :] + hi * oi[None, :], 1) \
                                - z * (tl.sum(ei, 0) + tl.sum(oi, 0))
                            d += tl.where(pick, di[:, None], 0.0)
                else:
                    rk = k0 + tl.arange(0, BK)
                    c = tl.load(q_ptr + rn64[:, None] * stride_qn + rk[None, :],
                                mask=n_ok[:, None], other=0).to(tl.float32)
                    x = tl.load(xr + rk[:, None], mask=sel[None, :], other=0.0)
                    d = tl.dot((c - z[:, None]).to(dt), x, input_precision=PREC)
                acc += s[:, None] * d
        if HAS_BIAS:  # noqa: SIM102 -- a constexpr test, then a run-time one
            if pid_k == 0:
                b_ptr += tl.load(bo_ptr + e64)
                acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + pid_k * stride_ys + rr[None, :] * stride_yr + rn[:, None], acc,
                 mask=n_ok[:, None] & sel[None, :])


@triton.jit
def _moe_grouped(x_ptr, order_ptr, cnt_ptr, qo_ptr, so_ptr, zo_ptr, bo_ptr, q_ptr, s_ptr, z_ptr,
                 b_ptr, y_ptr, N, K, E, X_DIV, stride_xr, stride_qn, stride_sn, stride_zn,
                 stride_yr, BITS: tl.constexpr, G: tl.constexpr, ZMODE: tl.constexpr,
                 HAS_BIAS: tl.constexpr, PREC: tl.constexpr, EP2: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, JOIN: tl.constexpr):
    # Program (b, n): row block b of the (token, slot) pairs sorted by expert; an expert's pairs
    # take ceil(count / BM) blocks, in expert order; blocks past the last expert's exit.
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    ee = tl.arange(0, EP2)
    cnt = tl.load(cnt_ptr + ee, mask=ee < E, other=0)
    blocks = (cnt + BM - 1) // BM
    ends = tl.cumsum(blocks, 0)
    e = tl.sum((ends <= pid_m).to(tl.int32), 0)
    if e < E:
        here = ee == e
        first_block = tl.sum(tl.where(here, ends - blocks, 0), 0)
        first_row = tl.sum(tl.where(here, tl.cumsum(cnt, 0) - cnt, 0), 0)
        local = (pid_m - first_block) * BM + tl.arange(0, BM)
        m_ok = local < tl.sum(tl.where(here, cnt, 0), 0)
        pair = tl.load(order_ptr + first_row + local, mask=m_ok, other=0).to(tl.int64)
        xr = x_ptr + (pair // X_DIV)[:, None] * stride_xr
        e64 = e.to(tl.int64)
        q_ptr += tl.multiple_of(tl.load(qo_ptr + e64), 16)  # Table checks the alignment
        rn = pid_n * BN + tl.arange(0, BN)
        n_ok = rn < N
        rn64 = rn.to(tl.int64)
        acc = tl.zeros((BM, BN), tl.float32)
        dt = x_ptr.dtype.element_ty
        if BITS == 16:
            for k0 in range(0, K, BK):
                rk = k0 + tl.arange(0, BK)
                k_ok = rk < K
                x = tl.load(xr + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(q_ptr + rn64[None, :] * stride_qn + rk[:, None],
                            mask=n_ok[None, :] & k_ok[:, None], other=0.0)
                acc += tl.dot(x, w, input_precision=PREC)
        else:
            s_ptr += tl.load(so_ptr + e64)
            if ZMODE != 0:
                z_ptr += tl.load(zo_ptr + e64)
            for k0 in range(0, K, BK):  # BK divides the group and K (same_kind, _tile_k)
                g = k0 // G
                s, z = _scale_zero(s_ptr, z_ptr, rn64, n_ok, g, stride_sn, stride_zn, BITS, ZMODE,
                                   BN)
                if BITS == 4:  # a byte: code 2j (low nibble) and 2j + 1 (high)
                    j = tl.arange(0, BK // 2)
                    b = tl.load(q_ptr + rn64[None, :] * stride_qn + k0 // 2 + j[:, None],
                                mask=n_ok[None, :], other=0).to(tl.int32)
                    lo = ((b & 15).to(tl.float32) - z[None, :]).to(dt)
                    hi = ((b >> 4).to(tl.float32) - z[None, :]).to(dt)
                    if JOIN:  # the nibbles interleaved into (BK, BN): x's columns in order
                        w = tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (BK, BN))
                        x = tl.load(xr + (k0 + tl.arange(0, BK))[None, :], mask=m_ok[:, None],
                                    other=0.0)
                        d = tl.dot(x, w, input_precision=PREC)
                    else:  # low nibbles against x's even columns, high against the odd
                        xe = tl.load(xr + (k0 + 2 * j)[None, :], mask=m_ok[:, None], other=0.0)
                        xo = tl.load(xr + (k0 + 2 * j + 1)[None, :], mask=m_ok[:, None],
                                     other=0.0)
                        d = tl.dot(xe, lo, input_precision=PREC)
                        d = tl.dot(xo, hi, d, input_precision=PREC)
                else:
                    rk = k0 + tl.arange(0, BK)
                    c = tl.load(q_ptr + rn64[None, :] * stride_qn + rk[:, None],
                                mask=n_ok[None, :], other=0).to(tl.float32)
                    x = tl.load(xr + rk[None, :], mask=m_ok[:, None], other=0.0)
                    d = tl.dot(x, (c - z[None, :]).to(dt), input_precision=PREC)
                acc += d * s[None, :]
        if HAS_BIAS:
            b_ptr += tl.load(bo_ptr + e64)
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + pair[:, None] * stride_yr + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


# Up to this many routed rows a 4-bit call multiply-adds on the CUDA cores instead of the
# tensor cores (timed on one H200, session 32, benchmarks/RESULTS.md: Mixtral-8x7B shape, int4
# g128, a gate call for 1 row 54.7 -> 37.4 us, 2 rows 84.2 -> 79.0 us, down 2 rows 93.0 ->
# 71.0 us; 4 rows 109.5 -> 346.9 us, so not past 2: batch-1 decode with top-2 routing is 2 rows;
# memfit's CUDA-graph decode loop 72.0 -> 81.4 tokens/s).
FMA_ROWS = 2
BN_ROWS, WARPS = 64, 4  # output rows a program, its warps


class Table:
    """One projection of a layer's experts for the kernel: its first expert's tensors and every
    expert's element offset from them, built from the experts' memfit.kernels IntWeight (or
    dense weight tensors) and rebuilt when any of their tensors moves."""

    def __init__(self, weights: list, biases: list):
        self.key = _key(weights, biases)
        first = weights[0]
        self.dense = isinstance(first, torch.Tensor)
        dev = (first if self.dense else first.qdata).device

        self.experts = len(weights)

        def offsets(ts: list) -> torch.Tensor:
            base, size = ts[0].data_ptr(), ts[0].element_size()
            return torch.tensor([(t.data_ptr() - base) // size for t in ts], dtype=torch.int64,
                                device=dev)

        self.bias = biases[0]
        self.b_off = offsets(biases) if self.bias is not None else None
        if self.dense:
            self.q, self.q_off = first, offsets(weights)
            self.s = self.z = self.s_off = self.z_off = None
            self.shape, self.bits, self.group, self.zmode = tuple(first.shape), 16, 0, 0
            return
        self.first, self.mma = first, None  # (its IntWeight; moe_mma's offsets, built on use)
        self.q, self.s, self.z = first.qdata, first.scale, first.zero
        self.q_off = offsets([w.qdata for w in weights])
        self.s_off = offsets([w.scale for w in weights])
        self.z_off = offsets([w.zero for w in weights]) if first.zero is not None else None
        self.shape, self.bits, self.group = first.shape, first.bits, first.group_size
        self.zmode = {"sym": 0, "int": 1, "float": 2}[first.zero_point]


def _key(weights: list, biases: list) -> tuple:
    ptrs = [t.data_ptr() for t in biases if t is not None]
    for w in weights:
        ptrs += [w.data_ptr()] if isinstance(w, torch.Tensor) else \
            [w.qdata.data_ptr(), w.scale.data_ptr(), 0 if w.zero is None else w.zero.data_ptr()]
    return tuple(ptrs)


def same_kind(weights: list) -> str | None:
    """Why one Table cannot hold these experts' weights (None when it can)."""
    first = weights[0]
    rows = [w if isinstance(w, torch.Tensor) else w.qdata for w in weights]
    if any(t.data_ptr() % 16 for t in rows):
        return "expert weights not 16-byte aligned"
    if isinstance(first, torch.Tensor):
        if any(not isinstance(w, torch.Tensor) or w.shape != first.shape or w.dtype != first.dtype
               or w.stride() != first.stride() for w in weights):
            return "experts of different shapes or dtypes"
        return None if first.is_contiguous() else "non-contiguous expert weights"
    if any(isinstance(w, torch.Tensor) for w in weights):
        return "packed and dense experts mixed"
    sig = lambda w: (w.shape, w.bits, w.group_size, w.zero_point, w.tile_rows, w.scale.dtype,
                     w.qdata.stride(), w.scale.stride(),
                     None if w.zero is None else (w.zero.dtype, w.zero.stride()))
    if any(sig(w) != sig(first) for w in weights):
        return "experts in different formats"
    if first.tile_rows:
        return "tiled layout"
    if first.bits not in (4, 8):
        return f"{first.bits}-bit codes (4 and 8 only)"
    k = first.shape[1]
    if first.group_size % 32 or k % first.group_size:
        return f"group size {first.group_size} with {k} inputs (whole groups of a multiple of 32)"
    return None


def _tile_k(t: Table) -> int:
    k = t.shape[1]
    if t.bits == 16:
        return 128
    return next(bk for bk in (128, 64, 32) if t.group % bk == 0 and k % bk == 0)


def moe_linear(x: torch.Tensor, ids: torch.Tensor, t: Table, x_div: int = 1,
               slots: int = 0) -> torch.Tensor:
    """(R / x_div, K) activations and (R,) int32 expert ids -> (R, N) in x's dtype (R <= 64;
    row r reads x[r // x_div]; slots: rows a token, its experts distinct, default x_div). Rows
    expected to name mostly distinct experts take moe_mma, the rest `_moe_gemv`."""
    if mma_form(t, x.dtype, ids.numel(), slots or x_div):
        return moe_mma(x, ids, t, x_div)
    return moe_gemv(x.repeat_interleave(x_div, 0) if x_div > 1 else x, ids, t)


def moe_gemv(x: torch.Tensor, ids: torch.Tensor, t: Table) -> torch.Tensor:
    """(R, K) activations and (R,) int32 expert ids -> (R, N) through `_moe_gemv`: a program
    takes BN output rows of one expert and every row routed to it."""
    r, k = x.shape
    n = t.shape[0]
    assert k == t.shape[1] and x.stride(1) == 1 and r <= 64, (x.shape, t.shape)
    bn, bk = BN_ROWS, _tile_k(t)
    dot = r > FMA_ROWS or t.bits != 4  # tensor cores, or (4-bit, few rows) multiply-adds
    rb = max(16, 1 << (r - 1).bit_length()) if dot else 1 << (r - 1).bit_length()
    k_tiles = cdiv(k, bk)
    active = cdiv(n, bn) * min(r, t.experts)  # programs that read a weight tile
    split = 1
    while active * split < 264 and k_tiles % (2 * split) == 0 and k_tiles // (2 * split) >= 4:
        split *= 2
    y = torch.empty((split, r, n), device=x.device, dtype=torch.float32)
    dummy = t.q_off
    _moe_gemv[(cdiv(n, bn), t.experts, split)](
        x, ids, t.q_off, t.s_off if t.s_off is not None else dummy,
        t.z_off if t.z_off is not None else dummy, t.b_off if t.b_off is not None else dummy,
        t.q, t.s if t.s is not None else t.q, t.z if t.z is not None else t.q,
        t.bias if t.bias is not None else x, y,
        r, n, k, x.stride(0), t.q.stride(0), 0 if t.s is None else t.s.stride(0),
        0 if t.z is None else t.z.stride(0), y.stride(0), y.stride(1),
        KT_PER=k_tiles // split, BITS=t.bits, G=t.group or bk, ZMODE=t.zmode,
        HAS_BIAS=t.bias is not None, PREC="ieee" if x.dtype == torch.float32 else "tf32",
        BN=bn, BK=bk, RB=rb, DOT=dot, num_warps=WARPS)
    out = y[0] if split == 1 else y.sum(0)
    return out.to(x.dtype)


# Routed rows take moe_mma (a program per row: its expert's weights read once per row) when the
# rows are expected to name mostly distinct experts: rows / E[distinct experts] <= MMA_DUP, T
# tokens of k distinct experts each routed uniformly over E (one token: 1.0).
MMA_ROWS = True
MMA_DUP = 1.5
# The pairs as the grid's first axis (ROUTED 2 in triton_mma._mma_gemv: a weight tile's programs
# for every pair run together, so pairs of one expert could share its reads through the L2),
# else its last (ROUTED 1, the form timed: session 34). Timed on an H100 (session 38,
# benchmarks/moe_mma_rows.py, Mixtral-shaped gate): pairs first 33.8 / 68.4 / 129.8 µs at 2 / 4
# / 8 rows against 32.4 / 64.4 / 114.4 last, faster only from 16 rows (174.5 against 220.9),
# which MMA_DUP sends to the routed GEMV in decode: off.
MMA_PAIRS_FIRST = False


def mma_form(t: Table, dtype: torch.dtype, rows: int, slots: int = 1) -> bool:
    """Whether moe_linear takes moe_mma for `rows` routed rows of `dtype` activations, `slots`
    of them a token."""
    if not MMA_ROWS or t.dense or rows > 64:
        return False
    from memfit.kernels.triton_mma import mma_ineligibility
    if mma_ineligibility(t.first, 1, dtype) is not None:
        return False
    e, k = t.experts, max(1, min(slots, t.experts))
    distinct = e * (1 - (1 - k / e) ** (rows / k))
    return rows <= k or rows / distinct <= MMA_DUP


def mma_offsets(t: Table) -> torch.Tensor:
    """moe_mma's (experts, 4) int64 table: each expert's element offsets of its codes (in 32-bit
    words), scales, zero points and bias from the first expert's (kept on `t`)."""
    if t.mma is None:
        none = torch.zeros_like(t.s_off)
        t.mma = torch.stack([t.q_off * t.q.element_size() // 4, t.s_off,
                             none if t.z_off is None else t.z_off,
                             none if t.b_off is None else t.b_off], 1).contiguous()
    return t.mma


def moe_mma(x: torch.Tensor, ids: torch.Tensor, t: Table, x_div: int = 1) -> torch.Tensor:
    """Each routed row r through memfit.kernels.triton_mma's M = 1 tensor-core kernel on expert
    ids[r]'s 4-bit codes, in the launch shape the dense path's chooser takes for one expert's
    shape (its K split too: splitting fewer ways as the rows multiply the programs was up to
    22% slower at 8 rows, keeping it at most 3.3% off the best split at 1-8 rows; H100, Mixtral
    shape, benchmarks/RESULTS.md session 34); row r reads x[r // x_div]. (R,) ids -> (R, N)."""
    from memfit.kernels import triton_int
    from memfit.kernels.launch_shapes import mma_candidates
    from memfit.kernels.triton_mma import run_mma
    cfg = triton_int.choose(x[:1], t.first, None)
    if cfg.words != "mma":
        cfg = mma_candidates(1, t.first)[0]
    return run_mma(x, t.first, t.bias, cfg.BN, cfg.SPLIT_K, cfg.num_warps, cfg.BK // 128,
                   epi=cfg.epi, reps=cfg.reps, prefetch=cfg.num_stages, maxnreg=cfg.regs,
                   route=(ids, mma_offsets(t), x_div, 2 if MMA_PAIRS_FIRST else 1))


class Groups:
    """(token, slot) pairs sorted by expert, built on the GPU (no host sync) once a layer call and
    shared by its three projections: `order` (P,) int32 pair indices, `counts` (E,) int32."""

    def __init__(self, ids: torch.Tensor, experts: int):
        ids = ids.reshape(-1).to(torch.int64)  # ids >= experts: a slot no expert takes
        self.pairs, self.experts = ids.numel(), experts
        self.order = torch.sort(ids, stable=True).indices.to(torch.int32)
        counts = torch.zeros(experts + 1, dtype=torch.int32, device=ids.device)
        counts.scatter_add_(0, ids.clamp(max=experts), torch.ones_like(ids, dtype=torch.int32))
        self.counts = counts[:experts]


# moe_grouped's launch shape and 4-bit form, timed on one H200 (session 33, benchmarks/RESULTS.md;
# Mixtral-8x7B shape, int4 g128, top-2 over 8 experts, all three projections of a layer): the
# nibbles interleaved into one (BK, BN) tile (JOIN), so x's columns load in order, against two
# dots over x's even and odd columns: 64 tokens 1.52 -> 1.11 ms, 256 5.77 -> 1.52, 1024 17.6 ->
# 3.89; no other launch shape of ten was faster.
GROUP_BM, GROUP_BN, GROUP_WARPS, GROUP_STAGES = 64, 128, 4, 3
GROUP_JOIN = True


def moe_grouped(x: torch.Tensor, groups: Groups, t: Table, x_div: int = 1) -> torch.Tensor:
    """Every (token, slot) pair of `groups` through its expert: (P / x_div, K) activations (pair p
    reads row p // x_div: x_div = slots a token, so a token's row is not copied per slot) ->
    (P, N) in x's dtype, zeros for a pair no expert takes. A program multiplies BM pairs of one
    expert by BN of its output rows, dequantizing each weight tile once for all of them (the
    prefill form; decode steps take moe_linear)."""
    k = x.shape[1]
    n = t.shape[0]
    assert k == t.shape[1] and x.stride(1) == 1 and x.shape[0] * x_div == groups.pairs, \
        (x.shape, t.shape, x_div, groups.pairs)
    bm = min(GROUP_BM, max(16, 1 << (cdiv(groups.pairs, groups.experts) - 1).bit_length()))
    bn, bk = GROUP_BN, 64 if t.bits == 16 else min(64, _tile_k(t))
    y = torch.zeros((groups.pairs, n), device=x.device, dtype=x.dtype)
    blocks = cdiv(groups.pairs, bm) + groups.experts  # enough for any split between experts
    dummy = t.q_off
    _moe_grouped[(blocks, cdiv(n, bn))](
        x, groups.order, groups.counts, t.q_off, t.s_off if t.s_off is not None else dummy,
        t.z_off if t.z_off is not None else dummy, t.b_off if t.b_off is not None else dummy,
        t.q, t.s if t.s is not None else t.q, t.z if t.z is not None else t.q,
        t.bias if t.bias is not None else x, y,
        n, k, t.experts, x_div, x.stride(0), t.q.stride(0), 0 if t.s is None else t.s.stride(0),
        0 if t.z is None else t.z.stride(0), y.stride(0),
        BITS=t.bits, G=t.group or bk, ZMODE=t.zmode, HAS_BIAS=t.bias is not None,
        PREC="ieee" if x.dtype == torch.float32 else "tf32",
        EP2=max(16, 1 << (t.experts - 1).bit_length()), BM=bm, BN=bn, BK=bk, JOIN=GROUP_JOIN,
        num_warps=GROUP_WARPS, num_stages=GROUP_STAGES)
    return y
