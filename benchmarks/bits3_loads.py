"""How a Triton kernel should read 3-bit codes (8 codes in 3 bytes, the stored layout): session 37's
experiment after the GPU showed the session-36 kernels (three strided byte planes, then a join tree)
at 0.36x bf16 for M = 1 and the dequantize kernel at half the 4-bit one's speed.

Each way of reading a tile's (BN, BK // 8) 24-bit block words, in the one-pass dequantize and in a
one-row GEMV (CUDA cores, activations split 8 ways), timed over weight copies past the L2:
- planes: three strided byte loads (shipped in session 36);
- lanes: one (BN, BK // 8, 4) byte load, the 4th lane masked, shifted and summed in registers;
- words: the two int32 words that hold each block, funnel-shifted (all loads 4-byte; shipped in
  session 37 as memfit.kernels.triton_dequant._blocks3 with W3);
- chunks (read alone): a 32-code chunk is 96 bits, three aligned int32 words (three loads for
  32 codes where the words above take 16; shipped in session 38 as memfit.kernels.triton_widen's
  read, its GEMV and dequantize timed and removed);
and, for the dequantize, `nojoin`: planes without the join tree (codes stored plane-major, a wrong
order on purpose: only what the join costs). Each variant is checked against memfit's dequantize.

    python benchmarks/bits3_loads.py --json OUT.json                 # parts loads and grid
    python benchmarks/bits3_loads.py --parts grid --json OUT.json    # tile and grid shapes only
    python benchmarks/bits3_loads.py --parts chunks --json OUT.json  # 32-code chunks (3 words)
    python benchmarks/bits3_loads.py --parts widen --json OUT.json   # widening to 4-bit words

Results: benchmarks/RESULTS.md, session 37 (raw in benchmarks/results/s37_gpu/).
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from memfit.kernels import triton_dequant
from memfit.kernels.triton_dequant import _blocks3, _group_params

PLANES, LANES, WORDS = 0, 1, 2
CHUNKS, CHUNK_LANES = 3, 4  # `_read_tiles` only: 32-code chunks, three words


@triton.jit
def _words3(q_ptr, rn, k0, n_ok, stride_qn, NB, BK: tl.constexpr, MODE: tl.constexpr):
    """(BN, BK // 8) int32 24-bit words of the tile's 8-code blocks from column k0: memfit's
    `_blocks3` (byte planes or words), or the byte-lane load tried beside them."""
    if MODE == 1:
        NBK: tl.constexpr = BK // 8
        jb = (k0 // 8) * 3 + 3 * tl.arange(0, NBK)
        ok = n_ok[:, None] & (jb < NB)[None, :]
        lane = tl.arange(0, 4)
        p = q_ptr + rn[:, None, None] * stride_qn + jb[None, :, None] + lane[None, None, :]
        b = tl.load(p, mask=ok[:, :, None] & (lane < 3)[None, None, :], other=0).to(tl.int32)
        return tl.sum(b << (8 * lane)[None, None, :], axis=2)
    return _blocks3(q_ptr, rn, k0, n_ok, stride_qn, NB, BK, MODE == 2)


@triton.jit
def _dequant3(q_ptr, s_ptr, z_ptr, w_ptr, N, K, NB, stride_qn, stride_sn, stride_zn,
              GROUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, MODE: tl.constexpr,
              JOIN: tl.constexpr, KFIRST: tl.constexpr = False):
    if KFIRST:  # consecutive programs walk one row block along K
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        k0 = tl.program_id(0) * BK
    else:
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        k0 = tl.program_id(1) * BK
    n_ok = rn < N
    s, z = _group_params(s_ptr, z_ptr, rn, k0 // GROUP, n_ok, stride_sn, stride_zn, 3, 1, BN, 0)
    wd = _words3(q_ptr, rn, k0, n_ok, stride_qn, NB, BK, MODE)
    c0, c1, c2, c3 = wd & 7, (wd >> 3) & 7, (wd >> 6) & 7, (wd >> 9) & 7
    c4, c5, c6, c7 = (wd >> 12) & 7, (wd >> 15) & 7, (wd >> 18) & 7, wd >> 21
    if JOIN:
        even = tl.join(tl.join(c0, c4), tl.join(c2, c6))
        odd = tl.join(tl.join(c1, c5), tl.join(c3, c7))
        c = tl.reshape(tl.join(even, odd), (BN, BK)).to(tl.float32)
        kk = k0 + tl.arange(0, BK)
        w = (c - z[:, None]) * s[:, None]
        tl.store(w_ptr + rn[:, None] * K + kk[None, :], w.to(w_ptr.dtype.element_ty),
                 mask=n_ok[:, None] & (kk[None, :] < K))
    else:  # plane-major: code i of every block in a run (timing only)
        NBK: tl.constexpr = BK // 8
        kb = k0 + tl.arange(0, NBK)
        for i in tl.static_range(8):
            ci = (wd >> (3 * i)) & 7
            w = (ci.to(tl.float32) - z[:, None]) * s[:, None]
            tl.store(w_ptr + rn[:, None] * K + (kb + i * NBK)[None, :],
                     w.to(w_ptr.dtype.element_ty), mask=n_ok[:, None] & (kb[None, :] < K))


@triton.jit
def _gemv3(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, N, K, NB, ITERS, stride_qn, stride_sn, stride_zn,
           GROUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
           MODE: tl.constexpr, PF: tl.constexpr = False):
    """One row: y[N] (float32, atomics over the K split) = W x; PF: the next tile's words
    loaded before this one is decoded."""
    NBK: tl.constexpr = BK // 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    jj = tl.arange(0, NBK)
    n_ok = rn < N
    acc = tl.zeros((BN, NBK), dtype=tl.float32)
    nxt = _words3(q_ptr, rn, pid_k * BK, n_ok, stride_qn, NB, BK, MODE)
    for it in range(0, ITERS):
        k0 = (it * SPLIT_K + pid_k) * BK
        s, z = _group_params(s_ptr, z_ptr, rn, k0 // GROUP, n_ok & ((rn * 0 + k0) < K),
                             stride_sn, stride_zn, 3, 1, BN, 0)
        if PF:
            wd = nxt
            nxt = _words3(q_ptr, rn, k0 + SPLIT_K * BK, n_ok, stride_qn, NB, BK, MODE)
        else:
            wd = _words3(q_ptr, rn, k0, n_ok, stride_qn, NB, BK, MODE)
        part = tl.zeros((BN, NBK), dtype=tl.float32)
        xs = tl.zeros((NBK,), dtype=tl.float32)
        for i in tl.static_range(8):
            kk = k0 + jj * 8 + i
            xi = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            part += ((wd >> (3 * i)) & 7).to(tl.float32) * xi[None, :]
            xs += xi
        acc += (part - z[:, None] * xs[None, :]) * s[:, None]
    tl.atomic_add(y_ptr + rn, tl.sum(acc, axis=1), mask=n_ok)


@triton.jit
def _read_flat(q_ptr, o_ptr, NW, BLOCK: tl.constexpr):
    """Sum of a run of int32 words: how fast the codes stream when read in order."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(q_ptr.to(tl.pointer_type(tl.int32)) + i, mask=i < NW, other=0)
    tl.atomic_add(o_ptr + tl.program_id(0) % 64, tl.sum(v, axis=0))


@triton.jit
def _read_tiles(q_ptr, o_ptr, N, NB, ITERS, stride_qn, BN: tl.constexpr, BK: tl.constexpr,
                SPLIT_K: tl.constexpr, MODE: tl.constexpr):
    """The GEMV's reads alone (its grid, tiles and loads, no decode): what the pattern costs.
    MODE: a `_words3` read, or CHUNKS / CHUNK_LANES (`_chunk_words`)."""
    W: tl.constexpr = BK // 32 if MODE >= 3 else BK // 8
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    acc = tl.zeros((BN, W), dtype=tl.int32)
    for it in range(0, ITERS):
        k0 = (it * SPLIT_K + tl.program_id(1)) * BK
        if MODE >= 3:
            w0, w1, w2 = _chunk_words(q_ptr, rn, k0, rn < N, stride_qn, NB, BK, MODE == 4)
            acc ^= w0 ^ w1 ^ w2
        else:
            acc ^= _words3(q_ptr, rn, k0, rn < N, stride_qn, NB, BK, MODE)
    tl.atomic_add(o_ptr + rn % 64, tl.sum(acc, axis=1), mask=rn < N)


@triton.jit
def _chunk_words(q_ptr, rn, k0, n_ok, stride_qn, NB, BK: tl.constexpr, LANES: tl.constexpr):
    """The three int32 words (each (BN, BK // 32)) of every 32-code chunk of the tile from column
    k0 (a multiple of 32): a chunk is 96 bits, bytes 12c..12c+11 of the row, so its words are
    aligned when the row is. Three strided word loads, or (LANES) one (BN, BK // 32, 4) load with
    the 4th lane masked, split in registers."""
    NC: tl.constexpr = BK // 32
    jw = (k0 // 32) * 3 + 3 * tl.arange(0, NC)
    q32 = q_ptr.to(tl.pointer_type(tl.int32))
    row = q32 + rn[:, None] * (stride_qn // 4) + jw[None, :]
    ok = n_ok[:, None] & ((jw * 4) < NB)[None, :]
    if LANES:
        lane = tl.arange(0, 4)[None, None, :]
        v = tl.load(row[:, :, None] + lane, mask=ok[:, :, None] & (lane < 3), other=0)
        w0 = tl.sum(tl.where(lane == 0, v, 0), axis=2)
        w1 = tl.sum(tl.where(lane == 1, v, 0), axis=2)
        w2 = tl.sum(tl.where(lane == 2, v, 0), axis=2)
    else:
        w0 = tl.load(row, mask=ok, other=0)
        w1 = tl.load(row + 1, mask=ok, other=0)
        w2 = tl.load(row + 2, mask=ok, other=0)
    return w0, w1, w2


def read_chunks(w, o, lanes: bool, bn: int = 16, bk: int = 128, split_k: int = 1):
    read_tiles(w, o, CHUNK_LANES if lanes else CHUNKS, bn, bk, split_k)


def read_flat(w, o, block: int = 2048):
    nw = w.qdata.numel() // 4
    _read_flat[(triton.cdiv(nw, block),)](w.qdata, o, nw, BLOCK=block)


def read_tiles(w, o, mode: int, bn: int = 64, bk: int = 128, split_k: int = 8):
    n, k = w.shape
    iters = triton.cdiv(triton.cdiv(k, bk), split_k)
    _read_tiles[(triton.cdiv(n, bn), split_k)](w.qdata, o, n, w.qdata.shape[1], iters,
                                                w.qdata.stride(0), BN=bn, BK=bk,
                                                SPLIT_K=split_k, MODE=mode)


def dequant(w, out, mode: int, join: bool, bn: int = 32, bk: int = 128, kfirst: bool = False):
    n, k = w.shape
    grid = (triton.cdiv(k, bk), triton.cdiv(n, bn)) if kfirst else (triton.cdiv(n, bn),
                                                                      triton.cdiv(k, bk))
    _dequant3[grid](
        w.qdata, w.scale, w.zero, out, n, k, w.qdata.shape[1], w.qdata.stride(0),
        w.scale.stride(0), w.zero.stride(0), GROUP=w.group_size, BN=bn, BK=bk, MODE=mode,
        JOIN=join, KFIRST=kfirst)
    return out


def gemv(w, x, y, mode: int, bn: int = 64, bk: int = 128, split_k: int = 8, pf: bool = False):
    n, k = w.shape
    iters = triton.cdiv(triton.cdiv(k, bk), split_k)
    y.zero_()
    _gemv3[(triton.cdiv(n, bn), split_k)](
        x, w.qdata, w.scale, w.zero, y, n, k, w.qdata.shape[1], iters, w.qdata.stride(0),
        w.scale.stride(0), w.zero.stride(0), GROUP=w.group_size, BN=bn, BK=bk, SPLIT_K=split_k,
        MODE=mode, PF=pf)
    return y


def grid_part(row, ws, ref, out, x, y, yref) -> None:
    """Word loads: the dequantize's program order and tiles, the GEMV's tiles, K split and
    prefetch, each checked."""
    from memfit.kernels import gpu_timing

    for kfirst in (False, True):
        for bn, bk in ((32, 128), (16, 128), (64, 128), (32, 64)):
            tag = f"dq_words_bn{bn}_bk{bk}" + ("_kfirst" if kfirst else "")
            dequant(ws[0], out, WORDS, True, bn, bk, kfirst)
            row[tag + "_equal"] = bool(torch.equal(out, ref))
            row[tag + "_us"] = round(gpu_timing.graph_us(
                [lambda w=w: dequant(w, out, WORDS, True, bn, bk, kfirst) for w in ws], 20), 2)
    res = []
    for bn in (16, 32, 64):
        for bk in (64, 128):
            for sk in (1, 2, 4, 8):
                for pf in (False, True):
                    gemv(ws[0], x, y, WORDS, bn, bk, sk, pf)
                    err = float(((y - yref).abs().max() / yref.abs().max()).item())
                    t = gpu_timing.graph_us(
                        [lambda w=w: gemv(w, x, y, WORDS, bn, bk, sk, pf) for w in ws], 20)
                    res.append((round(t, 2), f"bn{bn} bk{bk} sk{sk} pf{int(pf)}", err < 1e-2))
    res.sort()
    row["gemv_words_grid"] = res


def chunks_part(row, ws, out, x, y, o) -> None:
    """32-code chunks (three aligned words) read alone, against the shipped word loads
    (`_blocks3`, W3) read, in the GEMV and in the dequantize, in the same run. (Session 38 also
    timed a CUDA-core GEMV and a dequantize over the chunks: 43.6 and 50.9 µs against the word
    forms' 50.3 and 54.0 on an H100, not adopted; commit f66b4b9 has them.)"""
    from memfit.kernels import gpu_timing

    def t(fn):
        return round(gpu_timing.graph_us([lambda w=w: fn(w) for w in ws], 20), 2)

    row["read_flat_us"] = t(lambda w: read_flat(w, o))
    row["read_words_bn16_sk1_us"] = t(lambda w: read_tiles(w, o, WORDS, 16, 128, 1))
    row["gemv_words_bn16_sk4_us"] = t(lambda w: gemv(w, x, y, WORDS, 16, 128, 4))
    row["dequant_words_bn16_kfirst_us"] = t(lambda w: dequant(w, out, WORDS, True, 16, 128, True))
    for lanes in (False, True):
        tag = "lanes" if lanes else "strided"
        for bn, sk in ((16, 1), (64, 8), (8, 1)):
            row[f"read_chunks_{tag}_bn{bn}_sk{sk}_us"] = t(
                lambda w, bn=bn, sk=sk: read_chunks(w, o, lanes, bn, 128, sk))


def widen_part(row, ws, o) -> None:
    """The per-call widening to 4-bit words (memfit.kernels.triton_widen) for a few launch
    shapes (rows a program, codes a step), checked against weights.widen, and a plain read."""
    from memfit.kernels import gpu_timing, triton_widen
    from memfit.kernels.weights import widen

    want = widen(ws[0])
    row["read_flat_us"] = round(gpu_timing.graph_us([lambda w=w: read_flat(w, o) for w in ws],
                                                    20), 2)
    shipped = (triton_widen.ROWS, triton_widen.COLS)
    for rows, cols in ((16, 512), (8, 512), (16, 1024), (8, 1024), (32, 256), (4, 1024)):
        triton_widen.ROWS, triton_widen.COLS = rows, cols
        got = triton_widen.widen_triton(ws[0])
        row[f"widen_r{rows}_c{cols}_equal"] = bool(torch.equal(got.qdata, want.qdata)
                                                  and torch.equal(got.zero, want.zero))
        row[f"widen_r{rows}_c{cols}_us"] = round(gpu_timing.graph_us(
            [lambda w=w: triton_widen.widen_triton(w) for w in ws], 20), 2)
    triton_widen.ROWS, triton_widen.COLS = shipped


def main() -> None:
    from benchmarks.kernel_speed import copies, int_weight
    from memfit.kernels import gpu_timing

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=["14336x4096", "4096x14336"])
    ap.add_argument("--json")
    ap.add_argument("--parts", nargs="*", default=["loads", "grid"])
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in args.shapes:
        n, k = map(int, shape.split("x"))
        ws = [int_weight(n, k, 3, 128, gen) for _ in range(max(2, copies(n * k * 3 // 8)))]
        ref = triton_dequant.dequantize_triton(ws[0], torch.bfloat16)
        out = torch.empty_like(ref)
        x = torch.randn(k, dtype=torch.bfloat16, device="cuda")
        y = torch.empty(n, dtype=torch.float32, device="cuda")
        yref = ref.float() @ x.float()
        w16 = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
        row = {"n": n, "k": k, "bf16_gemv_us": round(gpu_timing.graph_us(
            [lambda a=a: a @ x for a in w16], 20), 2)}
        del w16
        o = torch.zeros(64, dtype=torch.int32, device="cuda")
        if "chunks" in args.parts:
            chunks_part(row, ws, out, x, y, o)
        if "widen" in args.parts:
            widen_part(row, ws, o)
        if "grid" in args.parts:
            grid_part(row, ws, ref, out, x, y, yref)
        if "loads" not in args.parts:
            print(json.dumps(row), flush=True)
            rows.append(row)
            continue
        row["read_flat_us"] = round(gpu_timing.graph_us([lambda w=w: read_flat(w, o) for w in ws],
                                                        20), 2)
        for name, mode in (("planes", PLANES), ("words", WORDS)):
            for bn, bk, sk in ((64, 128, 8), (16, 128, 1), (64, 512, 8)):
                row[f"read_{name}_bn{bn}_bk{bk}_sk{sk}_us"] = round(gpu_timing.graph_us(
                    [lambda w=w: read_tiles(w, o, mode, bn, bk, sk) for w in ws], 20), 2)
        for name, mode in (("planes", PLANES), ("lanes", LANES), ("words", WORDS)):
            for join in (True, False) if mode == PLANES else (True,):
                tag = f"dequant_{name}" + ("" if join else "_nojoin")
                dequant(ws[0], out, mode, join)
                if join:
                    row[tag + "_equal"] = bool(torch.equal(out, ref))
                row[tag + "_us"] = round(gpu_timing.graph_us(
                    [lambda w=w: dequant(w, out, mode, join) for w in ws], 20), 2)
            for bn, bk, sk in ((64, 128, 8), (16, 128, 1)):
                tag = f"gemv_{name}_bn{bn}_bk{bk}_sk{sk}"
                gemv(ws[0], x, y, mode, bn, bk, sk)
                row[tag + "_err"] = float(((y - yref).abs().max() / yref.abs().max()).item())
                row[tag + "_us"] = round(gpu_timing.graph_us(
                    [lambda w=w: gemv(w, x, y, mode, bn, bk, sk) for w in ws], 20), 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
        ws = ref = out = None
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
