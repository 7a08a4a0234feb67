"""The 4-bit tile kernel for long prefills (M > 128), its loads through tensor descriptors.

The same tile as memfit.kernels.triton_bytes's dq 4 kernel (the weight tile as the wgmma's A
operand, its codes unpacked in registers straight into the A fragments by
memfit.kernels.fragments._perm_tile; BK = 128 codes; the activations in the fragments' column
order, `perm_x`), but both the activations' tile and the codes' 32-bit words come in through
tensor descriptors (`tl.make_tensor_descriptor`: the bulk tensor copy, TMA, on Hopper), and
`Config.tma` 2 runs one program an SM looping over the output tiles (persistent; 1: one program
a tile). Why (H100, M = 2048, benchmarks/prefill_persistent.py, benchmarks/RESULTS.md session
39): 14336x4096 345 µs against the pointer-load tile kernel's 372 and dequantize + cuBLAS's 357
(bf16 cuBLAS 305); 4096x14336 374 against 382 / 344 (bf16 294); at M = 1000 192-196 against
200-215. Activations through a descriptor with the words still loaded by pointer gave wrong
outputs at 3 stages (relative error 0.03 against 0.0034) under Triton 3.6: not offered.

Takes: 4-bit codes with integer or symmetric zero points, groups of 64 or more codes (a 128-code
tile spans at most two groups), K a multiple of 128, rows a multiple of the tile's BN, 16-bit
activations, the stored layout or the decode loop's tiled one (RB = 64: the words of a row
block's 128-code tile are one 4 KB run, read as a 4-d descriptor; the chooser offers this form
only with MEMFIT_PREFILL_TILE=1, launch_shapes.TMA_TILED: right on an H100, slower there than
the stored layout, 389-404 µs against 344-354 on 14336x4096 at 2048 tokens). Triton needs a
scratch allocator for descriptors made in a kernel; `run_tma` sets one (torch memory on the
call's device) for its own launch only, in a copy of the context, so a caller's allocator is
untouched.
"""

from __future__ import annotations

import contextvars
import os

import torch
import triton
import triton.language as tl

from memfit.kernels.fragments import _perm_tile, perm_x
from memfit.kernels.sizes import cdiv
from memfit.kernels.triton_bytes import _out_rows, _tile_groups
from memfit.kernels.triton_dequant import zmode
from memfit.kernels.weights import IntWeight

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # the CPU tests: no PTX
BK = 128
RB_TILED = 64  # the decode loop's row blocks (memfit.fastdecode)


@triton.jit
def _tma_mm(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, stride_qn, stride_sn, stride_zn,
            NPROG, GROUP: tl.constexpr, ZMODE: tl.constexpr, HAS_BIAS: tl.constexpr,
            RB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, ASM: tl.constexpr,
            NFAST: tl.constexpr = False):
    """y[M, N] = x[M, K] @ dequant(q)[N, K]^T (+ bias); x in `perm_x(x, 128)` order. Program p
    takes output tiles p, p + NPROG, ...: the token tiles of one weight tile consecutive (the
    programs running at once share weight tiles), or with NFAST the weight tiles of one token
    tile (they share activation tiles: fewer bytes from HBM where the activations outgrow the
    L2, as 2048 x 14336 bf16 does). acc = W_tile @ x_tile^T, (BN, BM), stored transposed with
    the rows dq 4 reordered put back (`_out_rows`). Each K tile's scales and zero points are
    loaded in the loop after its descriptor loads (loading them a tile ahead, in registers, as
    `_int_mm`'s PF does, gave wrong outputs on an H100 under Triton 3.6, session 40; so did
    loading them first in each step, before the copies are waited for, at K = 4096 and 14336 but
    not at K = 384, session 42: keep this order)."""
    BK: tl.constexpr = 128  # codes a tile (the module's BK)
    BW: tl.constexpr = BK // 8  # 32-bit words a row's tile
    GW: tl.constexpr = (GROUP // 8) * (GROUP < BK)  # a tile of two groups: words from GW on
    n_m = tl.cdiv(M, BM)
    n_n = N // BN
    tiles = n_m * n_n
    xd = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    q32 = q_ptr.to(tl.pointer_type(tl.int32))
    if RB:  # [row block, tile, row, word]: one 4 KB run per (row block, tile)
        qd = tl.make_tensor_descriptor(q32, shape=[N // RB, K // BK, RB, BW],
                                       strides=[(K // BK) * RB * BW, RB * BW, BW, 1],
                                       block_shape=[BN // RB, 1, RB, BW])
    else:
        qd = tl.make_tensor_descriptor(q32, shape=[N, K // 8], strides=[stride_qn // 4, 1],
                                       block_shape=[BN, BW])
    ok = tl.full((BN,), 1, tl.int1)
    for t in tl.range(tl.program_id(0), tiles, NPROG):
        if NFAST:
            pid_n = t % n_n
            pid_m = t // n_n
        else:
            pid_m = t % n_m
            pid_n = t // n_m
        rn = pid_n * BN + tl.arange(0, BN)
        acc = tl.zeros((BN, BM), dtype=tl.float32)
        for kt in range(K // BK):
            k0 = kt * BK
            x = xd.load([pid_m * BM, k0])  # rows past M read as zeros
            if RB:
                qw = tl.reshape(qd.load([pid_n * (BN // RB), kt, 0, 0]), (BN, BW))
            else:
                qw = qd.load([pid_n * BN, kt * BW])
            s, z, s1, z1 = _tile_groups(s_ptr, z_ptr, rn, k0, ok, stride_sn, stride_zn, GROUP,
                                        4, ZMODE, BN, RB, GW)
            w = _perm_tile(qw, z, s, x.dtype, BN, BK, ASM, True, z1, s1, GW)
            acc = tl.dot(w, tl.trans(x), acc)
        rm = pid_m * BM + tl.arange(0, BM)
        ro = _out_rows(pid_n, BN, 4)
        if HAS_BIAS:
            acc += tl.load(b_ptr + ro).to(tl.float32)[:, None]
        tl.store(y_ptr + rm[None, :] * N + ro[:, None], acc.to(y_ptr.dtype.element_ty),
                 mask=rm[None, :] < M)


def tma_ineligibility(w: IntWeight, dtype: torch.dtype, bn: int) -> str | None:
    """Why `_tma_mm` cannot take `w` with BN rows a tile (None when it can)."""
    if not hasattr(tl, "make_tensor_descriptor"):
        return "this Triton has no tensor descriptors (tl.make_tensor_descriptor)"
    if w.bits != 4 or w.zero_point == "float":
        return "the descriptor tile kernel takes 4-bit codes with integer or no zero points"
    if dtype not in (torch.bfloat16, torch.float16):
        return "the descriptor tile kernel takes 16-bit activations"
    n, k = w.shape
    if k % BK or n % bn or (w.n_groups > 1 and w.group_size < BK // 2):
        return "the descriptor tile kernel needs K a multiple of 128, whole row tiles, groups >= 64"
    if w.tile_rows not in (0, RB_TILED) or (w.tile_rows and bn % w.tile_rows):
        return "the descriptor tile kernel takes the stored layout or 64-row tiles"
    q = w.qdata
    if q.data_ptr() % 16 or q.stride(-1) != 1 or (not w.tile_rows and q.stride(0) % 16):
        return "the descriptor tile kernel needs 16-byte aligned rows of codes"
    return None


def _launch(device: torch.device, grid, *args, **kw) -> None:
    """`_tma_mm` with Triton's scratch for its descriptors (128 bytes a program) taken from
    torch on `device` (run in a copy of the caller's context: the allocator is a ContextVar)."""
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8,
                                                                 device=device))
    _tma_mm[grid](*args, **kw)


_SMS: dict = {}


def programs(device: torch.device) -> int:
    """Programs of a persistent launch: the device's multiprocessors (4 off a GPU)."""
    if device.type != "cuda":
        return 4
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


def run_tma(x2: torch.Tensor, w: IntWeight, bias: torch.Tensor | None, bm: int, bn: int,
            warps: int, stages: int, persistent: bool, nfast: bool = False) -> torch.Tensor:
    """(M, K) 16-bit activations -> (M, N) in their dtype through `_tma_mm`."""
    why = tma_ineligibility(w, x2.dtype, bn)
    if why:
        raise ValueError(f"memfit.kernels.triton_prefill: {why}")
    m, k = x2.shape
    n = w.shape[0]
    xp = perm_x(x2, 128)  # contiguous, 16-byte aligned (a fresh buffer)
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    tiles = cdiv(m, bm) * (n // bn)
    nprog = min(tiles, programs(x2.device)) if persistent else tiles
    z = w.zero if w.zero is not None else w.scale
    b = bias.to(x2.dtype) if bias is not None else w.scale
    contextvars.copy_context().run(  # NPROG a run-time argument: no build per grid size
        _launch, x2.device, (nprog,), xp, w.qdata, w.scale, z, b, y, m, n, k, w.qdata.stride(0),
        w.scale.stride(0), z.stride(0), nprog, GROUP=w.group_size, ZMODE=zmode(w),
        HAS_BIAS=bias is not None, RB=w.tile_rows, BM=bm, BN=bn, ASM=not INTERPRET,
        NFAST=nfast, num_warps=warps, num_stages=stages)
    return y
