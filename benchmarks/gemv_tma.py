"""Probe (issue 10, M = 1): does a TMA pipeline over the tiled layout's contiguous tiles beat the
mma decode kernel's register prefetch? One GPU run, 14336x4096 int4 g128, integer zero points:

- read: a plain streaming read of the codes (Triton loads, the best launch shape; what
  benchmarks/gemv_limits.py --parts stream measures) against the same read through tensor
  descriptors (TMA boxes of BN rows x 16 words into shared memory, `tl.range` stages deep).
- mma: memfit.kernels.triton_mma's M = 1 arithmetic (the same asm, `_tile`) fed by TMA boxes
  (the words) with the scales and zero points prefetched a tile ahead in registers, against
  the kernel as it ships (its best launch shapes); outputs checked against dequantize + cuBLAS.

    python benchmarks/gemv_tma.py [--json OUT]
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from benchmarks.gemv_limits import _read, note, setup, t_us
from memfit.kernels import mma_ptx, triton_int
from memfit.kernels.triton_dequant import _at
from memfit.kernels.triton_mma import _col, _tile, _zero
from memfit.kernels.triton_words import _counters, _finish
from memfit.kernels.weights import tile


@triton.jit
def _read_tma(desc, o_ptr, ITERS, BR: tl.constexpr, STAGES: tl.constexpr):
    """Sum of int32 words: program p reads its own ITERS boxes of (BR, 16) words."""
    pid = tl.program_id(0)
    acc = tl.zeros((BR, 16), tl.int32)
    for it in tl.range(ITERS, num_stages=STAGES):
        acc += desc.load([(pid * ITERS + it) * BR, 0])
    tl.store(o_ptr + pid, tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def _mma_tma(x_ptr, q_desc, s_ptr, z_ptr, y_ptr, p_ptr, c_ptr, N, KT, ITERS, stride_sn,
             stride_zn, stride_ps, GROUP: tl.constexpr, BN: tl.constexpr,
             SPLIT_K: tl.constexpr, STAGES: tl.constexpr, ASM_TEXT: tl.constexpr,
             CONSTRAINTS: tl.constexpr):
    """y[0, rn] for BN rows of a weight tiled with RB = BN (bf16 activations, M = 1, one group
    of >= 128 codes a tile, integer zero points): the words of tile t are one TMA box."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rw = tl.arange(0, 16)
    n_ok = rn < N
    rg = rn % 8
    col = _col(rw, 1)
    acc = tl.zeros((BN, 16), dtype=tl.float32)
    x32 = x_ptr.to(tl.pointer_type(tl.int32))
    t0 = pid_k * ITERS
    g = (t0 * 128) // GROUP
    s = tl.load(s_ptr + _at(rn, g, stride_sn, BN), mask=n_ok, other=0.0).to(tl.float32)[:, None]
    zc = _zero(z_ptr, rn, g, n_ok, stride_zn, 1, BN).to(tl.float32)[:, None]
    for it in tl.range(ITERS, num_stages=STAGES):
        t = t0 + it
        wd = q_desc.load([(pid_n * KT + t) * BN, 0])
        gn = ((t + 1) * 128) // GROUP
        nok = n_ok & ((rn * 0 + it + 1) < ITERS)
        ns = tl.load(s_ptr + _at(rn, gn, stride_sn, BN), mask=nok, other=0.0)
        nz = _zero(z_ptr, rn, gn, nok, stride_zn, 1, BN).to(tl.float32)[:, None]
        acc, _ = _tile(acc, acc, wd, s, zc, zc, t * 16 + rw, x32, x_ptr, rn, rg, rw, 1, 0,
                       False, 1, 1, 1, True, ASM_TEXT, CONSTRAINTS)
        s = ns.to(tl.float32)[:, None]
        zc = nz
    off = rn[:, None] + col[None, :] * 0
    ok = n_ok[:, None] & (rw == 0)[None, :]
    _finish(acc, off, ok, off, y_ptr, p_ptr, c_ptr, y_ptr, pid_n, pid_k, stride_ps, False, SPLIT_K)


def run_tma(x, w, bn, split_k, warps, stages):
    n, k = w.shape
    kt = k // 128
    q = w.qdata.view(torch.int32).reshape(n * kt, 16)
    desc = TensorDescriptor(q, [n * kt, 16], [16, 1], [bn, 16])
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    part = torch.empty(split_k, 1, n, dtype=torch.float32, device=x.device) if split_k > 1 else y
    grid = (n // bn, split_k)
    cnt = _counters(x.device, grid[0]) if split_k > 1 else y
    k_ = _mma_tma[grid](x, desc, w.scale, w.zero, y, part, cnt, n, kt, kt // split_k,
                        w.scale.stride(0), w.zero.stride(0), n, GROUP=w.group_size, BN=bn,
                        SPLIT_K=split_k, STAGES=stages, ASM_TEXT=mma_ptx.mma_asm(False),
                        CONSTRAINTS=mma_ptx.constraints(0), num_warps=warps)
    mma_ptx.check_layout(k_)
    return y


def read(args, gen) -> None:
    n, k = 14336, 4096
    ws, _, _, _ = setup(n, k, 128, 1, gen)
    qs = [w.qdata.view(torch.int32).reshape(-1, 16) for w in ws]
    rows = qs[0].shape[0]
    out = torch.empty(132 * 64, dtype=torch.int32, device="cuda")
    res = []
    for br in (128, 256):
        for warps in (4, 8):
            for per_sm in (1, 2):
                for st in (2, 4):
                    iters = max(1, rows // br // (132 * per_sm))
                    grid = rows // br // iters
                    ds = [TensorDescriptor(q, [rows, 16], [16, 1], [br, 16]) for q in qs]
                    f = [lambda d=d, br=br, warps=warps, st=st, grid=grid, iters=iters:
                         _read_tma[(grid,)](d, out, iters, BR=br, STAGES=st, num_warps=warps)
                         for d in ds]
                    try:
                        res.append((t_us(f), br, warps, grid, st))
                    except Exception as e:  # noqa: BLE001
                        print(f"  tma read {br} {warps} {grid} {st}: {str(e)[:200]}", flush=True)
    res.sort()
    nw = rows * 16
    flat = [q.reshape(-1) for q in qs]
    plain = []
    for block in (2048, 4096):
        for per_sm in (2, 4):
            grid = 132 * per_sm
            iters = triton.cdiv(triton.cdiv(nw, block), grid)
            f = [lambda q=q, grid=grid, iters=iters, block=block: _read[(grid,)](
                q, out, nw, iters, BLOCK=block, CHUNK=1, STAGES=1, num_warps=8) for q in flat]
            plain.append((t_us(f), block, per_sm))
    plain.sort()
    note({"part": "read", "bytes": nw * 4, "tma_bytes_note": "boxes past grid * iters unread", "tma_best_us": round(res[0][0], 2) if res else None,
          "tma_top6": [(round(r[0], 2),) + r[1:] for r in res[:6]],
          "plain_best_us": round(plain[0][0], 2), "plain": plain[0][1:]}, args.json)


def mma(args, gen) -> None:
    n, k, g = 14336, 4096, 128
    ws, x, bf16, want = setup(n, k, g, 1, gen)
    row = {"part": "mma", "bf16_us": round(bf16, 2)}
    wl = [tile(w, 64) for w in ws]
    ship = []
    for c in triton_int.mma_candidates(1, ws[0]):
        if c.BK != 128:
            continue
        f = [lambda w=w, c=c: triton_int.run(x, w, None, c) for w in wl]
        try:
            ship.append((t_us(f), str(c)))
        except Exception as e:  # noqa: BLE001
            print(f"  ship {c}: {str(e)[:160]}", flush=True)
    ship.sort()
    row["ship_us"] = round(ship[0][0], 2)
    row["ship_cfg"] = ship[0][1]
    res = []
    for bn in (64, 128, 256):
        wt = [tile(w, bn) for w in ws]
        for warps in (4, 8):
            if bn // (8 * warps) < 1:
                continue
            for sk in (1, 2, 4):
                for st in (2, 3, 4):
                    f = [lambda w=w, bn=bn, sk=sk, warps=warps, st=st:
                         run_tma(x, w, bn, sk, warps, st) for w in wt]
                    try:
                        err = ((f[0]().float() - want).norm() / want.norm()).item()
                        res.append((t_us(f), bn, warps, sk, st, err))
                    except Exception as e:  # noqa: BLE001
                        print(f"  tma {bn} {warps} {sk} {st}: {type(e).__name__} {str(e)[:160]}",
                              flush=True)
        del wt
    res.sort()
    row["tma_us"] = round(res[0][0], 2) if res else None
    row["tma_x_bf16"] = round(bf16 / res[0][0], 3) if res else None
    row["tma_max_err"] = max(r[5] for r in res) if res else None
    row["tma_top8"] = [(round(r[0], 2),) + r[1:5] for r in res[:8]]
    note(row, args.json)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", nargs="*", default=["read", "mma"])
    ap.add_argument("--json")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    for part in args.parts:
        {"read": read, "mma": mma}[part](args, gen)


if __name__ == "__main__":
    main()
