"""Fast CPU matmul for packed integer weights (`IntWeight`), equal to `reference.py`.

Two paths; `cpu_linear` picks one, and neither changes the stored weights:

1. Tiled dequantize + float32 GEMM (every format, every activation dtype). Output rows are
   processed in tiles: a tile's codes are unpacked and turned into (q - z) * s in float32 inside one
   reused buffer, then multiplied with the activations. The dense weight is never materialised
   (peak extra memory is one tile, ~1 MiB). The weights are bit-identical to the reference; only
   the GEMM summation order differs (float32 rounding).

2. torch's own bfloat16 weight-only kernels, for bfloat16 activations with few rows
   (M <= KERNEL_MAX_M), where they beat everything else on this CPU (see benchmarks):
   - 4-bit (and 2- and 3-bit: their codes are 4-bit codes), group size 32/64/128/256 dividing
     `in`, out % 16 == 0, integer or symmetric zeros:
     `_convert_weight_to_int4pack_for_cpu` + `_weight_int4pack_mm_for_cpu`, which compute
     w = (q - 8) * s + t. We pass t = (8 - z) * s. Those two operands must be bfloat16, which would
     round float16 scales, so each is split exactly into a bfloat16 head and tail
     (s = s_hi + s_lo, checked bit-exact at preparation): one kernel call uses the heads and the
     tails go through a second call, or, when s_lo == 0 (bfloat16 scales), through a tiny
     float32 correction with per-group activation sums. Formats whose values do not split exactly
     (float32 scales, float zeros) use path 1.
   - 8-bit symmetric per-channel: `_weight_int8pack_mm` with int8 codes q - 128 and unit scales;
     the real float scale is applied in float32 afterwards.
   These kernels return bfloat16, so their results differ from the reference (float32 sums, one
   rounding) by the bfloat16 rounding of partial results: ~1 unit in the last place of bfloat16.
   The tests bound this. The layouts they need are prepared once (`prepare_cpu`) and cached by
   `QuantLinear`; that cache is extra memory (about the size of `qdata`), reported separately by
   `QuantLinear.cache_nbytes()`, never in the stored-weight size.

Activation dtype policy: compute is float32 (path 1) or bfloat16-in/float32-accumulate (path 2);
the output has the activation's dtype. float32 activations take path 1, except at decode size
(M <= DECODE_MAX_M rows, one token per sequence): there the activations are rounded to bfloat16
(relative error <= 2**-9) and path 2 runs, because at decode a whole model's packed weights are
read from DRAM once per token and path 1's per-call dequantization made packed decode slower
than dense float32 (benchmarks/decode_cpu.py). torch's float32 int4/int8 kernels are not used:
they run a scalar loop on AVX2 (measured 10-50x slower than float32 F.linear). float16
activations take path 1 (the float16 kernels are slow here and float16 overflows on large
activations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memfit.kernels.packing import unpack
from memfit.kernels.weights import IntWeight, dequantize_rows_

KERNEL_MAX_M = 64  # rows of activations up to which the bfloat16 kernels beat path 1
DECODE_MAX_M = 4  # float32 activations with at most this many rows use them too (decode)
TILE_ELEMENTS = 1 << 18  # float32 elements per dequantized tile (1 MiB)
INT4_GROUPS = (32, 64, 128, 256)


@dataclass
class CpuCache:
    """Prepared layout for one of torch's bfloat16 weight-only kernels (see module docstring)."""

    kind: str  # "int4" or "int8"
    qweight: torch.Tensor  # int4: converted uint8 layout; int8: (out, in) int8 codes q - 128
    params: torch.Tensor  # int4: (n_groups, out, 2) bf16 heads; int8: (out,) float32 scales
    tail: torch.Tensor | None = None  # int4: (n_groups, out, 2) bf16 tails for a second call
    group_tail: torch.Tensor | None = None  # int4: (out, n_groups) float32 zero tails t_lo
    group_size: int = 0

    @property
    def nbytes(self) -> int:
        ts = [self.qweight, self.params, self.tail, self.group_tail]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def kernel_ineligibility(w: IntWeight) -> str | None:
    """Why no bfloat16 kernel serves `w` (None when one does), judged from the layout alone."""
    out, k = w.shape
    if w.bits == 8:
        if w.group_size != k or w.zero_point != "sym":
            return "8-bit kernel needs symmetric per-channel weights"
        return None
    if w.bits not in (2, 3, 4):  # 2- and 3-bit codes are 4-bit codes that leave bits unused
        return f"no torch CPU kernel for {w.bits}-bit weights"
    if w.group_size not in INT4_GROUPS or k % w.group_size:
        return f"int4 kernel needs a group size in {INT4_GROUPS} dividing in_features={k}"
    if out % 16:
        return f"int4 kernel needs out_features divisible by 16, got {out}"
    if w.zero_point == "float":
        return "int4 kernel path does not take float zeros"
    return None


def prepare_cpu(w: IntWeight) -> CpuCache | None:
    """Build the kernel layout for `w`, or None when no kernel represents it exactly."""
    if kernel_ineligibility(w) is not None:
        return None
    if w.bits == 8:
        q8 = (w.qdata ^ 0x80).view(torch.int8)  # (out, in) q - 128
        return CpuCache("int8", q8.contiguous(), w.scale.float().reshape(-1).contiguous())
    return _prepare_int4(w)


def _prepare_int4(w: IntWeight) -> CpuCache | None:
    s = w.scale.float()  # (out, G)
    t = (8.0 - w.zeros()) * s  # (out, G); exact: small integer times a 16-bit float
    s_hi, s_lo = _split_bf16(s)
    t_hi, t_lo = _split_bf16(t)
    if s_hi is None or t_hi is None:
        return None  # e.g. float32 scales with more than 16 significant bits
    packed = _int4pack_rows(w)
    heads = torch.stack([s_hi, t_hi], dim=-1).transpose(0, 1).contiguous()  # (G, out, 2)
    cache = CpuCache("int4", packed, heads, group_size=w.group_size)
    if bool((s_lo != 0).any()):
        cache.tail = torch.stack([s_lo, t_lo], dim=-1).transpose(0, 1).contiguous()  # (G, out, 2)
    elif bool((t_lo != 0).any()):
        cache.group_tail = t_lo.float().contiguous()
    return cache


PREPARE_ROWS = 1024  # output rows converted at a time (a multiple of 64)


def _int4pack_rows(w: IntWeight) -> torch.Tensor:
    """torch's CPU int4 layout of `w`, converted PREPARE_ROWS output rows at a time: the layout
    is row-wise (tested equal to one whole conversion), and the int32 codes the conversion
    takes are then a small transient instead of 4 bytes per weight (50 MB for the default
    model's tied 49152 x 256 table, measured as a peak-RSS spike of the first forward)."""
    out, k = w.shape
    packed = torch.empty(out, k // 2, dtype=torch.uint8)
    for i in range(0, out, PREPARE_ROWS):
        codes = unpack(w.qdata[i:i + PREPARE_ROWS], w.bits, k).to(torch.int32)
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
    if cache is not None and ((x.dtype == torch.bfloat16 and m <= KERNEL_MAX_M)
                              or (x.dtype == torch.float32 and m <= DECODE_MAX_M)):
        y = kernel_linear(x2.to(torch.bfloat16), cache, bias)
    else:
        y = tiled_linear(x2, w, bias)
    return y.to(x.dtype).reshape(*lead, w.shape[0])


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
        elif cache.group_tail is not None:
            m, k = x2.shape
            xg = x2.float().view(m, k // cache.group_size, cache.group_size).sum(-1)  # (M, G)
            y += xg @ cache.group_tail.T
    if bias is not None:
        y += bias.float()
    return y


def tiled_linear(x2: torch.Tensor, w: IntWeight,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """(M, in) -> (M, out) float32; dequantizes TILE_ELEMENTS weights at a time (path 1)."""
    out, k = w.shape
    g = w.group_size
    xf = x2.float()  # (M, in)
    scale, zero = w.scale.float(), w.zeros()  # (out, G)
    rows = max(1, min(out, TILE_ELEMENTS // k))
    buf = torch.empty(rows, k, dtype=torch.float32)
    yt = torch.empty(out, xf.shape[0], dtype=torch.float32)  # (out, M): tiles write contiguous rows
    for r0 in range(0, out, rows):
        r1 = min(out, r0 + rows)
        tile = buf[: r1 - r0]
        tile.copy_(unpack(w.qdata[r0:r1], w.bits, k))
        dequantize_rows_(tile, scale[r0:r1], zero[r0:r1], g)
        torch.mm(tile, xf.T, out=yt[r0:r1])
    y = yt.T
    if bias is not None:
        y = y + bias.float()
    return y.contiguous()
