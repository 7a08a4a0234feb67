"""Fast CPU matmul for packed integer weights (`IntWeight`), equal to `reference.py`.

Three paths; `cpu_linear` picks one, and none changes the stored weights:

1. Tiled dequantize + float32 GEMM (every format, every activation dtype). Output rows are
   processed in tiles of up to TILE_ELEMENTS weights (whole multiples of 64 rows): a tile's
   codes are unpacked and turned into (q - z) * s in float32 inside one reused buffer, then
   multiplied with the activations straight into the output's columns. The dense weight is
   never materialised (extra memory is one tile's buffers, 5 MiB, kept by the thread across
   calls). The weights are bit-identical to
   the reference; only the GEMM summation order differs (float32 rounding).

2. Tiled dequantize + bfloat16 GEMM, for bfloat16 activations with more than FAST_KERNEL_MAX_M
   rows on a CPU that multiplies bfloat16 in hardware (AMX tiles: `FAST_BF16`), where oneDNN's
   bfloat16 GEMM runs 5-6x float32's (benchmarks/RESULTS.md). Each tile is dequantized exactly
   in float32 as in path 1 and rounded once to bfloat16, so the layer computes what its
   dequantized weight stored in bfloat16 would (a bfloat16 dense model's own arithmetic: float32
   accumulation, one rounding of the output). Without AMX, bfloat16 activations take path 1 or 3
   as before (a bfloat16 GEMM there ran 4x slower than float32).

3. torch's own bfloat16 weight-only kernels, for bfloat16 activations with few rows
   (M <= KERNEL_MAX_M, or FAST_KERNEL_MAX_M with AMX), where they beat everything else on this
   CPU (see benchmarks):
   - 4-bit (and 2- and 3-bit: their codes are 4-bit codes), group size 32/64/128/256 dividing
     `in`, any zeros (integer, symmetric, or float as HQQ stores them); the kernel takes
     output rows in multiples of 16: other counts, e.g. a 50257-token head, are padded with
     zero rows in the prepared layout and the output sliced back:
     `_convert_weight_to_int4pack_for_cpu` + `_weight_int4pack_mm_for_cpu`, which compute
     w = (q - 8) * s + t. We pass t = (8 - z) * s. Those two operands must be bfloat16, which would
     round float16 scales, so each is split into a bfloat16 head and tail (s = s_hi + s_lo,
     checked bit-exact at preparation): one kernel call uses the heads and the tails go through
     a second call. What the bfloat16 parts leave of t (all of t - t_hi when s_lo == 0, e.g.
     bfloat16 scales; for float zeros, the bits of t past the 16 two parts hold) goes through a
     tiny float32 correction with per-group activation sums, so t is applied exactly. float32
     scales that do not split exactly use path 1.
   - 8-bit symmetric per-channel: `_weight_int8pack_mm` with int8 codes q - 128 and unit scales;
     the real float scale is applied in float32 afterwards.
   These kernels return bfloat16, so their results differ from the reference (float32 sums, one
   rounding) by the bfloat16 rounding of partial results: ~1 unit in the last place of bfloat16.
   The tests bound this. The layouts they need are prepared once (`prepare_cpu`) and cached by
   `QuantLinear`; that cache is extra memory (about the size of `qdata`), reported separately by
   `QuantLinear.cache_nbytes()`, never in the stored-weight size.

Activation dtype policy: compute is float32 (path 1), bfloat16 with float32 accumulation (paths
2 and 3); the output has the activation's dtype. float32 activations take path 1, except at
decode size (M <= DECODE_MAX_M rows, one token per sequence): there the activations are rounded
to bfloat16 (relative error <= 2**-9) and path 3 runs, because at decode a whole model's packed
weights are read from DRAM once per token and path 1's per-call dequantization made packed
decode slower than dense float32 (benchmarks/decode_cpu.py). float32 activations never take
path 2: a float32 model's prefill and evaluation stay float32 arithmetic. torch's float32
int4/int8 kernels are not used: they run a scalar loop on AVX2 (measured 10-50x slower than
float32 F.linear). float16 activations take path 1 (the float16 kernels are slow here and
float16 overflows on large activations).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from memfit.kernels.packing import unpack
from memfit.kernels.weights import IntWeight, dequantize_rows_

KERNEL_MAX_M = 64  # rows of activations up to which the bfloat16 kernels beat path 1
FAST_KERNEL_MAX_M = 48  # ... and path 2, on a CPU with AMX (whole-model crossover ~48 rows)
DECODE_MAX_M = 4  # float32 activations with at most this many rows use them too (decode)
TILE_ELEMENTS = 1 << 20  # weights dequantized at a time (4 MiB of float32)
TILE_ROWS = 64  # tiles hold whole multiples of this many rows (GEMM blocking)
INT4_GROUPS = (32, 64, 128, 256)
PREPARE_ROWS = 1024  # output rows converted at a time (a multiple of 64)
INT4_ROWS = 16  # the int4 layout holds output rows in multiples of this
# oneDNN keeps a compiled bfloat16 GEMM (AMX) per (M, N, K), each holding memory: a mixture of
# experts, whose experts see a different row count each call, grew by ~330 MB over 6 windows of
# 512 tokens. Path 2 pads its rows to a multiple of this, which bounds the shapes it creates.
BF16_ROWS = 16


def _fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in AMX tiles, where oneDNN's bfloat16 GEMM is
    several times float32's. CPUs with AVX512-BF16 alone were not measured: they keep the
    float32 tiles."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


FAST_BF16 = _fast_bf16()


@dataclass
class CpuCache:
    """Prepared layout for one of torch's bfloat16 weight-only kernels (see module docstring)."""

    kind: str  # "int4" or "int8"
    qweight: torch.Tensor  # int4: converted uint8 layout; int8: (out, in) int8 codes q - 128
    params: torch.Tensor  # int4: (n_groups, out, 2) bf16 heads; int8: (out,) float32 scales
    tail: torch.Tensor | None = None  # int4: (n_groups, out, 2) bf16 tails for a second call
    group_tail: torch.Tensor | None = None  # int4: (out, n_groups) float32: t the parts leave
    group_size: int = 0
    out: int = 0  # int4: the real output rows, where the layout holds zero rows past them

    @property
    def nbytes(self) -> int:
        ts = [self.qweight, self.params, self.tail, self.group_tail]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def kernel_ineligibility(w: IntWeight) -> str | None:
    """Why no bfloat16 kernel serves `w` (None when one does), judged from the layout alone."""
    k = w.shape[1]
    if w.bits == 8:
        if w.group_size != k or w.zero_point != "sym":
            return "8-bit kernel needs symmetric per-channel weights"
        return None
    if w.bits not in (2, 3, 4):  # 2- and 3-bit codes are 4-bit codes that leave bits unused
        return f"no torch CPU kernel for {w.bits}-bit weights"
    if w.group_size not in INT4_GROUPS or k % w.group_size:
        return f"int4 kernel needs a group size in {INT4_GROUPS} dividing in_features={k}"
    return None


def prepare_cpu(w: IntWeight) -> CpuCache | None:
    """Build the kernel layout for `w`, or None when no kernel represents it exactly."""
    if kernel_ineligibility(w) is not None:
        return None
    if w.bits == 8:
        q8 = (w.qdata ^ 0x80).view(torch.int8)  # (out, in) q - 128
        return CpuCache("int8", q8.contiguous(), w.scale.float().reshape(-1).contiguous())
    return _prepare_int4(w)


def int4_rows(out: int) -> int:
    """Output rows the int4 layout holds for `out`: a multiple of INT4_ROWS (zero rows past)."""
    return -(-out // INT4_ROWS) * INT4_ROWS


def layout_nbytes(w: IntWeight) -> int:
    """Bytes of the layout `prepare_cpu(w)` builds, from the fields' shapes and dtypes alone (no
    codes read: `w.qdata` may be absent); 0 where no kernel takes `w`."""
    if kernel_ineligibility(w) is not None:
        return 0
    out, k = w.shape
    groups = w.scale.numel() // out
    if w.bits == 8:
        return out * k + 4 * out * groups
    rows = int4_rows(out)  # padded; the split scales' tails likewise
    tail = 0 if w.scale.dtype == torch.bfloat16 else 4 * rows * groups
    # the float32 (out, G) rest of t = (8 - z) s: float zeros, or bfloat16 scales times integer
    # zeros (symmetric ones give t = 0)
    rest = 4 * out * groups if w.zero_point == "float" or (
        w.scale.dtype == torch.bfloat16 and w.zero_point == "int") else 0
    return rows * k // 2 + 4 * rows * groups + tail + rest


def _prepare_int4(w: IntWeight) -> CpuCache | None:
    """The int4 layout of `w`: codes, and s and t = (8 - z) s split into the parts the module
    docstring names. Both passes go PREPARE_ROWS rows at a time: the first finds which parts
    the layout needs, the second fills them, so the transient is a chunk's (whole-matrix
    temporaries were 24 MB over a 49152 x 576 head's 21 MB layout)."""
    out, n_groups = w.shape[0], w.n_groups
    tail = rest_after_tail = rest_after_head = False
    for part in _row_chunks(w):
        split = _split_params(part)
        if split is None:
            return None  # e.g. float32 scales with more than 16 significant bits
        s_lo, rest = split[1], split[4]
        tail |= bool((s_lo != 0).any())
        rest_after_tail |= bool((rest != 0).any())
        rest_after_head |= bool((rest + split[3].float() != 0).any())
    packed = _int4pack_rows(w)
    rows = packed.shape[0]
    cache = CpuCache("int4", packed, torch.zeros(n_groups, rows, 2, dtype=torch.bfloat16),
                     group_size=w.group_size, out=out)
    if tail:
        cache.tail = torch.zeros(n_groups, rows, 2, dtype=torch.bfloat16)
    if rest_after_tail if tail else rest_after_head:
        cache.group_tail = torch.empty(out, n_groups)
    for r0, part in zip(range(0, out, PREPARE_ROWS), _row_chunks(w)):
        s_hi, s_lo, t_hi, t_lo, rest = _split_params(part)
        r1 = r0 + s_hi.shape[0]
        cache.params[:, r0:r1, 0], cache.params[:, r0:r1, 1] = s_hi.T, t_hi.T
        if tail:
            cache.tail[:, r0:r1, 0], cache.tail[:, r0:r1, 1] = s_lo.T, t_lo.T
        if cache.group_tail is not None:  # the float32 rest of t, through per-group sums
            cache.group_tail[r0:r1] = rest if tail else rest + t_lo.float()
    return cache


def _row_chunks(w: IntWeight):
    """`w`'s rows PREPARE_ROWS at a time, each an IntWeight of its own (codes not sliced)."""
    out, k = w.shape
    for r0 in range(0, out, PREPARE_ROWS):
        r1 = min(out, r0 + PREPARE_ROWS)
        yield w._replace(scale=w.scale[r0:r1], shape=(r1 - r0, k),
                         zero=None if w.zero is None else w.zero[r0:r1])


def _split_params(w: IntWeight):
    """(s_hi, s_lo, t_hi, t_lo, rest) of `w`'s rows: s = s_hi + s_lo exactly (None if no
    bfloat16 pair holds s), t = (8 - z) s = t_hi + t_lo + rest exactly, in float32: exact for
    integer zeros (a small integer times a 16-bit float), one float32 rounding for float zeros
    (HQQ; 2**-24 relative, as the reference's (q - z) s)."""
    s = w.scale.float()  # (rows, G)
    s_hi, s_lo = _split_bf16(s)
    if s_hi is None:
        return None
    t = (8.0 - w.zeros()) * s
    t_hi = t.to(torch.bfloat16)
    t_lo = (t - t_hi.float()).to(torch.bfloat16)
    return s_hi, s_lo, t_hi, t_lo, t - t_hi.float() - t_lo.float()  # each step exact


def _int4pack_rows(w: IntWeight) -> torch.Tensor:
    """torch's CPU int4 layout of `w`, converted PREPARE_ROWS output rows at a time: the layout
    is row-wise (tested equal to one whole conversion), and the int32 codes the conversion
    takes are then a small transient instead of 4 bytes per weight (50 MB for the default
    model's tied 49152 x 256 table, measured as a peak-RSS spike of the first forward)."""
    out, k = w.shape
    rows = int4_rows(out)
    packed = torch.empty(rows, k // 2, dtype=torch.uint8)
    for i in range(0, rows, PREPARE_ROWS):
        codes = unpack(w.qdata[i:i + PREPARE_ROWS], w.bits, k).to(torch.int32)
        short = min(PREPARE_ROWS, rows - i) - codes.shape[0]  # the last chunk's padding rows
        if short:
            codes = torch.cat([codes, codes.new_zeros(short, k)])
        packed[i:i + PREPARE_ROWS] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    return packed


def _split_bf16(v: torch.Tensor):
    """float32 v -> (hi, lo) bfloat16 with hi + lo == v exactly, or (None, None)."""
    hi = v.to(torch.bfloat16)
    lo = (v - hi.float()).to(torch.bfloat16)
    if not torch.equal(hi.float() + lo.float(), v):
        return None, None
    return hi, lo


def cpu_linear(x: torch.Tensor, w: IntWeight, bias: torch.Tensor | None = None,
               cache: CpuCache | None = None) -> torch.Tensor:
    """(..., in) -> (..., out) on the CPU; the path follows the module docstring's policy."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (M, in)
    m = x2.shape[0]
    if cache is not None and kernel_rows(x.dtype, m):
        y = kernel_linear(x2.to(torch.bfloat16), cache, bias)
    elif x.dtype == torch.bfloat16 and FAST_BF16 and m > FAST_KERNEL_MAX_M:
        y = tiled_linear(x2, w, bias, torch.bfloat16)
    else:
        y = tiled_linear(x2, w, bias)
    return y.to(x.dtype).reshape(*lead, w.shape[0])


def kernel_rows(dtype: torch.dtype, m: int) -> bool:
    """Whether m rows of `dtype` activations take torch's kernels (path 3) where a layout is
    prepared: the module docstring's policy."""
    if dtype == torch.bfloat16:
        return m <= (FAST_KERNEL_MAX_M if FAST_BF16 else KERNEL_MAX_M)
    return dtype == torch.float32 and m <= DECODE_MAX_M


def kernel_linear(x2: torch.Tensor, cache: CpuCache, bias: torch.Tensor | None) -> torch.Tensor:
    """(M, in) bfloat16 -> (M, out) float32 through torch's weight-only kernels (their
    bfloat16 partial results, the float32 tail terms and bias added in float32)."""
    x2 = x2.contiguous()
    if cache.kind == "int8":
        ones = torch.ones(cache.params.shape[0], dtype=torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(x2, cache.qweight, ones).float() * cache.params
    else:
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        y = mm(x2, cache.qweight, cache.group_size, cache.params).float()
        if cache.tail is not None:
            y += mm(x2, cache.qweight, cache.group_size, cache.tail).float()
        y = y[:, : cache.out]  # the layout's padding rows, if any
        if cache.group_tail is not None:
            m, k = x2.shape
            xg = x2.float().view(m, k // cache.group_size, cache.group_size).sum(-1)  # (M, G)
            y += xg @ cache.group_tail.T
    if bias is not None:
        y += bias.float()
    return y


def tile_rows(out: int, k: int) -> int:
    """Output rows dequantized at a time: TILE_ELEMENTS weights, whole multiples of TILE_ROWS
    rows where a tile holds that many (GEMMs over 455-row tiles ran ~1.3x slower here)."""
    rows = max(1, min(out, TILE_ELEMENTS // k))
    return rows if rows == out or rows < TILE_ROWS else rows // TILE_ROWS * TILE_ROWS


def tiled_linear(x2: torch.Tensor, w: IntWeight, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(M, in) -> (M, out) in `dtype` (float32: path 1, bfloat16: path 2); dequantizes
    TILE_ELEMENTS weights at a time, each tile's GEMM writing its columns of the output."""
    out, k = w.shape
    g = w.group_size
    m = x2.shape[0]
    if dtype == torch.float32:
        xc = x2.to(dtype)  # (M, in)
    else:  # rows rounded up to a multiple of BF16_ROWS: see its comment
        xc = x2.new_zeros(-(-m // BF16_ROWS) * BF16_ROWS, k, dtype=dtype)
        xc[:m] = x2
    scale, zero = w.scale.float(), w.zeros()  # (out, G)
    rows = tile_rows(out, k)
    codes = None if w.bits == 8 else scratch("codes", rows * k, torch.uint8).view(rows, k)
    buf = scratch("float32", rows * k, torch.float32).view(rows, k)
    low = buf if dtype == torch.float32 else scratch("low", rows * k, dtype).view(rows, k)
    b = None if bias is None else bias.to(dtype)
    y = torch.empty(xc.shape[0], out, dtype=dtype)
    for r0 in range(0, out, rows):
        r1 = min(out, r0 + rows)
        tile = buf[: r1 - r0]
        q = w.qdata[r0:r1]
        tile.copy_(q if w.bits == 8 else unpack(q, w.bits, k, out=codes[: r1 - r0]))
        dequantize_rows_(tile, scale[r0:r1], zero[r0:r1], g)  # exact, in float32
        if low is not buf:
            low[: r1 - r0].copy_(tile)  # one rounding of each exact weight
        wt = low[: r1 - r0].T
        if b is None:
            torch.mm(xc, wt, out=y[:, r0:r1])
        else:  # the bias inside the GEMM: added before its one rounding, as F.linear does
            torch.addmm(b[r0:r1], xc, wt, out=y[:, r0:r1])
    return y[:m]


_local = threading.local()


def scratch(name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat buffer of at least n elements of `dtype` kept by this thread across calls (the
    tiles', and memfit.formats.sparse_rows' rebuilt rows): its contents live until the next
    call for the same name and dtype on this thread. Allocating them anew each call cost the
    default model's bfloat16 prefill 23% of its time:
    memfit.eval.memory.steady_malloc maps every large tensor afresh, so each one's pages fault
    in again. They stay at the largest tile seen: at most TILE_ELEMENTS weights (7 MiB with
    bfloat16 activations), or one row where a row is longer."""
    key = f"{name}_{str(dtype).removeprefix('torch.')}"
    held = getattr(_local, key, None)
    if held is None or held.numel() < n:
        with torch.inference_mode(False):  # usable outside inference mode later
            held = torch.empty(n, dtype=dtype)
        setattr(_local, key, held)
    return held[:n]


def reserve_tiles() -> None:
    """Grow this thread's tile buffers to their largest size and touch their pages now, as a
    packed layer's first prefill would: the memory a process running packed layers keeps."""
    with torch.inference_mode():
        scratch("codes", TILE_ELEMENTS, torch.uint8).zero_()
        scratch("float32", TILE_ELEMENTS, torch.float32).zero_()
        if FAST_BF16:
            scratch("low", TILE_ELEMENTS, torch.bfloat16).zero_()


def buffer(name: str, n: int, dtype: torch.dtype, reuse: bool,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """`scratch(name, n, dtype)` when reuse (CPU), else a new tensor of n elements on device:
    one code path for callers that keep their temporaries only on the CPU without autograd."""
    return scratch(name, n, dtype) if reuse else torch.empty(n, dtype=dtype, device=device)
