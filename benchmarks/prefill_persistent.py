"""Probe (issue 10, M = 2048 >= 0.9x bf16): is the int4 tile kernel's gap to cuBLAS at large M
its dequantization or its loop's structure? One GPU run, µs per call as the chooser times them
(CUDA graph over weight copies past the L2), every output checked against dequantize + cuBLAS:

- bf16: cuBLAS (F.linear), dequantize + cuBLAS, the shipped dq 4 tile kernel (memfit's `_int_mm`).
- ceiling: a Triton GEMM on the dense bf16 weight shaped like the tile kernel (the weight tile as
  the dot's A operand, token tiles of BM as the wgmma's N), one program a tile or persistent
  (one program an SM looping over tiles), pointer or tensor-descriptor (TMA) loads, the loop
  over tiles flattened into the K loop or not, warp-specialized (Triton's automatic partition
  into a load warp group and compute warp groups) or not.
- fused: the same persistent forms with the int4 codes unpacked into the wgmma's A fragments
  (memfit.kernels.fragments._perm_tile, dq 4) and the activations in the fragments' column
  order (perm_x, in the timed call as in the shipped path).

- shipped: memfit's own candidates for it (memfit.kernels.triton_prefill through triton_int.run).

    python benchmarks/prefill_persistent.py [--m 2048 512] [--shapes 14336x4096] [--json OUT]
    python benchmarks/prefill_persistent.py --parts shipped --m 2048 1000 [--rb 0 64]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from benchmarks.kernel_speed import copies, int_weight
from memfit.kernels import gpu_timing, launch_shapes, triton_int
from memfit.kernels.fragments import _perm_tile, perm_x
from memfit.kernels.triton_bytes import _out_rows, _tile_groups
from memfit.kernels.triton_dequant import _word_ptrs, dequantize_triton, zmode
from memfit.kernels.weights import tile

ROWS: list = []
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dense_tile(w_ptr, wd, pid_n, k0, K, BN: tl.constexpr, BK: tl.constexpr, TMA: tl.constexpr):
    if TMA:
        return wd.load([pid_n * BN, k0])
    rn = pid_n * BN + tl.arange(0, BN)
    return tl.load(w_ptr + rn[:, None] * K + (k0 + tl.arange(0, BK))[None, :])


@triton.jit
def _x_tile(x_ptr, xd, pid_m, k0, M, K, BM: tl.constexpr, BK: tl.constexpr, TMA: tl.constexpr):
    if TMA:
        return xd.load([pid_m * BM, k0])
    rm = pid_m * BM + tl.arange(0, BM)
    return tl.load(x_ptr + rm[:, None] * K + (k0 + tl.arange(0, BK))[None, :],
                   mask=rm[:, None] < M, other=0.0)


@triton.jit
def _pgemm(x_ptr, w_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_qn, stride_sn, stride_zn,
           GROUP: tl.constexpr, ZMODE: tl.constexpr, RB: tl.constexpr, BM: tl.constexpr,
           BN: tl.constexpr, NPROG: tl.constexpr, TMA: tl.constexpr, FLAT: tl.constexpr,
           WS: tl.constexpr, INT4: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr = True):
    """y[M, N] = x @ W^T, persistent: program p takes tiles p, p + NPROG, ... (token tiles of a
    weight tile consecutive). INT4: W is group-wise 4-bit codes (dq 4 order, x permuted to
    match), else dense 16-bit. acc = W_tile @ x_tile^T, (BN, BM), stored transposed."""
    BK: tl.constexpr = 128
    GW: tl.constexpr = (GROUP // 8) * (GROUP < BK)
    n_m = tl.cdiv(M, BM)
    tiles = n_m * (N // BN)
    if TMA:
        xd = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
        if INT4 and TMA == 2:  # the codes' 32-bit words too (stored layout)
            wd = tl.make_tensor_descriptor(q_ptr.to(tl.pointer_type(tl.int32)),
                                           shape=[N, K // 8], strides=[stride_qn // 4, 1],
                                           block_shape=[BN, BK // 8])
        elif INT4:
            wd = xd
        else:
            wd = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1],
                                           block_shape=[BN, BK])
    else:
        xd = x_ptr
        wd = w_ptr
    ok = tl.full((BN,), 1, tl.int1)
    for t in tl.range(tl.program_id(0), tiles, NPROG, flatten=FLAT, warp_specialize=WS):
        pid_m = t % n_m
        pid_n = t // n_m
        rn = pid_n * BN + tl.arange(0, BN)
        acc = tl.zeros((BN, BM), dtype=tl.float32)
        for kt in tl.range(0, K // BK, num_stages=STAGES):
            k0 = kt * BK
            x = _x_tile(x_ptr, xd, pid_m, k0, M, K, BM, BK, TMA)
            if INT4:
                if TMA == 2:
                    qw = wd.load([pid_n * BN, k0 // 8])
                else:
                    qw = tl.load(_word_ptrs(q_ptr, rn, k0 // 8 + tl.arange(0, BK // 8),
                                            k0 // 8, stride_qn, RB))
                s, z, s1, z1 = _tile_groups(s_ptr, z_ptr, rn, k0, ok, stride_sn, stride_zn,
                                            GROUP, 4, ZMODE, BN, RB, GW)
                w = _perm_tile(qw, z, s, x.dtype, BN, BK, ASM, True, z1, s1, GW)
            else:
                w = _dense_tile(w_ptr, wd, pid_n, k0, K, BN, BK, TMA)
            acc = tl.dot(w, tl.trans(x), acc)
        rm = pid_m * BM + tl.arange(0, BM)
        ro = _out_rows(pid_n, BN, 4 * INT4)
        tl.store(y_ptr + rm[None, :] * N + ro[:, None], acc.to(y_ptr.dtype.element_ty),
                 mask=rm[None, :] < M)


def _alloc(size: int, align: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def pgemm(x, w, dense, cfg: dict, nprog: int) -> torch.Tensor:
    """One call: x (M, K) bf16; w an IntWeight (INT4) or None with `dense` (N, K) bf16."""
    m, k = x.shape
    int4 = w is not None
    n = w.shape[0] if int4 else dense.shape[0]
    if int4:
        x = perm_x(x, 128)
        q, s, z = w.qdata, w.scale, (w.zero if w.zero is not None else w.scale)
        strides = (q.stride(0), s.stride(0), z.stride(0))
        group, zm, rb = w.group_size, zmode(w), w.tile_rows
    else:
        q = s = z = dense
        strides, group, zm, rb = (k, k, k), 128, 0, 0
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(m, cfg["BM"]) * (n // cfg["BN"])
    _pgemm[(min(nprog, tiles),)](
        x, dense if dense is not None else x, q, s, z, y, m, n, k, *strides, GROUP=group,
        ZMODE=zm, RB=rb, BM=cfg["BM"], BN=cfg["BN"], NPROG=min(nprog, tiles), TMA=cfg["TMA"],
        FLAT=cfg["FLAT"], WS=cfg["WS"], INT4=int(int4), STAGES=cfg["st"], ASM=not INTERPRET,
        num_warps=cfg["warps"], num_stages=cfg["st"])
    return y


def configs(int4: bool):
    """Launch shapes: token tiles of 256 (2-3 stages) or 128 (3-4), 128 weight rows on 8 warps or
    64 on 4; warp specialization only where Triton 3.6 applies it on sm_90 (4 warps, loads
    through descriptors: it leaves 8-warp and pointer-load loops as they are, offline build)."""
    for bm, (bn, warps), tma, flat, st in itertools.product(
            (256, 128), ((128, 8), (64, 4)), (0, 1, 2) if int4 else (0, 1), (0, 1), (2, 3, 4)):
        if (bm == 256 and st == 4) or (bm == 128 and st == 2):
            continue  # shared memory; shapes session 20 found slower
        for ws in (0, 1) if (warps == 4 and tma == 1 + int4 and not flat) else (0,):
            yield {"BM": bm, "BN": bn, "warps": warps, "TMA": tma, "FLAT": flat, "WS": ws,
                   "st": st}


def note(row: dict, path: str | None) -> None:
    print(json.dumps(row), flush=True)
    ROWS.append(row)
    if path:
        with open(path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "rows": ROWS}, f, indent=1)


def t_us(fns) -> float:
    return gpu_timing.graph_us(fns, 2 * len(fns), 3, min)


def rel(a, b) -> float:
    return round(((a.float() - b).norm() / b.norm()).item(), 5)


def cells(args, n: int, k: int, m: int, gen, nsm: int) -> None:
    """The baselines, then every launch shape of each part, for one NxK shape and M."""
    ws = [int_weight(n, k, 4, 128, gen) for _ in range(max(2, copies(n * k // 2)))]
    dense = [dequantize_triton(w, torch.bfloat16) for w in ws[:max(2, copies(2 * n * k))]]
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    want = F.linear(x, dense[0]).float()
    row = {"n": n, "k": k, "m": m, "sms": nsm,
           "bf16": round(t_us([lambda d=d: F.linear(x, d) for d in dense]), 2)}
    dq = triton_int.Config(0, 0, 0)
    row["dequant_cublas"] = round(t_us([lambda w=w: triton_int.run(x, w, None, dq)
                                        for w in ws]), 2)
    for bm in (256, 128):
        c = triton_int.Config(bm, 128, 128, 1, 8, 3, magic=True, wa=True, pf=1, dq=4)
        f = [lambda w=w, c=c: triton_int.run(x, w, None, c) for w in ws]
        row[f"shipped_tile_bm{bm}"] = (round(t_us(f), 2), rel(f[0](), want))
    if "shipped" in args.parts:  # memfit's own candidates (memfit.kernels.triton_prefill),
        launch_shapes.TMA_TILED = True  # the tiled layout's too (opt-in in memfit)
        for rb in args.rb:
            vs = [tile(w, rb) for w in ws] if rb else ws
            for c in launch_shapes.tma_candidates(max(m, launch_shapes.TMA_MIN_M), vs[0],
                                                  x.dtype):
                f = [lambda v=v, c=c: triton_int.run(x, v, None, c) for v in vs]
                row[f"rb{rb}_tma{c.tma}_bm{c.BM}_st{c.num_stages}" + "_nfast" * c.nfast] = (
                    round(t_us(f), 2), rel(f[0](), want))
            del vs
    note(row, args.json)
    for part in args.parts:  # warp-specialized shapes last (a hang costs the least there)
        if part == "shipped":
            continue
        int4 = part == "fused"
        res, fails = [], {}
        todo = [(cfg, p) for cfg in configs(int4) for p in (1, 0)
                if not (p == 0 and (cfg["FLAT"] or cfg["WS"]))
                and (args.ws or not cfg["WS"]) and (args.tma is None or cfg["TMA"] in args.tma)
                and (not args.ws_only or cfg["WS"])]
        for cfg, per_sm in sorted(todo, key=lambda c: c[0]["WS"]):
            nprog = nsm * per_sm if per_sm else 1 << 30  # 0: one program a tile
            if int4:
                f = [lambda w=w, cfg=cfg, nprog=nprog: pgemm(x, w, None, cfg, nprog)
                     for w in ws]
            else:
                f = [lambda d=d, cfg=cfg, nprog=nprog: pgemm(x, None, d, cfg, nprog)
                     for d in dense]
            try:
                err = rel(f[0](), want)
                r = (round(t_us(f), 2), err, dict(cfg, per_sm=per_sm))
                res.append(r)
                print(part, r, flush=True)
            except Exception as e:  # noqa: BLE001 (shared memory, autoWS refusals)
                key = f"{type(e).__name__}: {str(e)[:120]}"
                fails[key] = fails.get(key, 0) + 1
        res.sort(key=lambda r: r[0])
        ok = [r for r in res if r[1] < 0.02]
        note({"n": n, "k": k, "m": m, "part": part, "top": res[:args.top], "fails": fails,
              "best_ok": ok[0] if ok else None}, args.json)
    del ws, dense
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="*", default=[2048])
    ap.add_argument("--shapes", nargs="*", default=["14336x4096", "4096x14336"])
    ap.add_argument("--parts", nargs="*", default=["ceiling", "fused"],
                    help="ceiling, fused, shipped (memfit's own descriptor-kernel candidates)")
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--rb", type=int, nargs="*", default=[0, 64],
                    help="shipped: layouts (0 stored, 64 the decode loop's tiled one)")
    ap.add_argument("--ws", action="store_true", help="also the warp-specialized shapes")
    ap.add_argument("--ws-only", action="store_true", help="only the warp-specialized shapes")
    ap.add_argument("--tma", type=int, nargs="*", help="only these TMA forms (0 / 1 / 2)")
    ap.add_argument("--json")
    args = ap.parse_args()
    triton.set_allocator(_alloc)
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator().manual_seed(0)
    for shape, m in itertools.product(args.shapes, args.m):
        n, k = map(int, shape.split("x"))
        cells(args, n, k, m, gen, nsm)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
