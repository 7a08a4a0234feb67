"""memfit's packed integer weights written as GGUF blocks without rounding them again.

Three GGUF block types are memfit grids in another byte order (blocks of 32 weights along a row):

    Q8_0  w = d * x           x int8,  d float16       = memfit int8, symmetric, group 32:  x = q - 128
    Q4_0  w = d * (x - 8)     x 0..15, d float16       = memfit int4, symmetric, group 32:  x = q
    Q4_1  w = d * x + m       x 0..15, d, m float16    = memfit int4, integer zero, group 32:
                                                         x = q, d = s, m = -z * s

So a weight whose format is one of these keeps its codes bit for bit; its float16 scale is d. The
one value that may not survive is Q4_1's m: -z * s needs up to 15 significant bits and float16
holds 11, unless the format was quantized with `gguf_exact` (memfit.formats.grid), which keeps
s to 7 significant bits so m is exact. `to_blocks` says how much the dequantized weight changed
(0.0 when exact). Other layouts (groups of 64, per channel, 2/3 bits, float zeros, K-quants'
6-bit sub-scales) do not map and are quantized again from the dequantized weight; `why_not`
names the reason.

Byte layout per block, as `gguf.quants` and llama.cpp read it: Q8_0 [d: 2 bytes][32 int8];
Q4_0 [d][16 bytes]; Q4_1 [d][m][16 bytes]; in a 4-bit block byte j holds weight j in its low
nibble and weight j + 16 in its high nibble.
"""

from __future__ import annotations

import numpy as np
import torch

from memfit.formats.intq import PackedIntWeight

BLOCK = 32
EXACT_TYPES = {"Q8_0": (8, True), "Q4_0": (4, True), "Q4_1": (4, False)}  # bits, symmetric


def block_type(packed: PackedIntWeight) -> str | None:
    """The GGUF type that holds `packed`'s codes as they are, or None."""
    return next((t for t in EXACT_TYPES if not why_not(packed, t)), None)


def layout(fmt) -> str:
    """'int4 asymmetric group 64'-style words for an IntFormat."""
    group = "per channel" if fmt.group_size is None else f"group {fmt.group_size}"
    return f"int{fmt.bits} {'symmetric' if fmt.symmetric else 'asymmetric'} {group}"


def why_not(packed: PackedIntWeight, qtype: str) -> str:
    """'' when `packed` maps onto `qtype`'s blocks, else a short reason."""
    fmt, (_, k) = packed.fmt, packed.shape
    if qtype not in EXACT_TYPES:
        return f"{qtype} is not a plain block type (memfit maps Q8_0, Q4_0, Q4_1)"
    bits, sym = EXACT_TYPES[qtype]
    if fmt.bits != bits or fmt.symmetric != sym or fmt.group_size != BLOCK:
        return (f"{layout(fmt)}; {qtype} is int{bits} {'symmetric' if sym else 'asymmetric'} "
                f"group {BLOCK}")
    if k % BLOCK:
        return f"rows of {k} are not whole blocks of {BLOCK}"
    if not sym and fmt.zero_point != "int":
        return "float zero points (Q4_1 stores a float16 minimum, not a zero)"
    if fmt.scale_dtype == "float32":
        return "float32 scales (GGUF stores float16)"
    return ""


def to_blocks(packed: PackedIntWeight, qtype: str,
              rows: torch.Tensor | None = None) -> tuple[np.ndarray, float]:
    """(uint8 (out, in / 32 * block bytes) GGUF data, max |change| of the dequantized weight).
    `rows` reorders the output rows (the rotary permutation of q/k). Raises ValueError if the
    layout does not map (check `why_not` first)."""
    reason = why_not(packed, qtype)
    if reason:
        raise ValueError(f"cannot store this weight as {qtype} blocks: {reason}")
    codes, scale = packed.codes(), packed.scale.float()
    zeros = packed.zeros()
    if rows is not None:
        codes, scale, zeros = codes[rows], scale[rows], zeros[rows]
    out, k = codes.shape
    n = k // BLOCK
    d = scale.to(torch.float16)
    parts = [_f16_bytes(d)]
    q = codes.view(out, n, BLOCK)
    if qtype == "Q8_0":
        qs = (q.to(torch.int16) - 128).to(torch.int8).numpy().view(np.uint8)
    else:
        qs = (q[..., : BLOCK // 2] | (q[..., BLOCK // 2:] << 4)).numpy()
    if qtype == "Q4_1":
        parts.append(_f16_bytes((-zeros * scale).to(torch.float16)))
    data = np.concatenate(parts + [qs], axis=-1).reshape(out, -1)
    return data, _change(packed, qtype, data, rows)


def _f16_bytes(t: torch.Tensor) -> np.ndarray:
    """(out, n) float16 -> (out, n, 2) uint8, little-endian as GGUF stores it."""
    return t.contiguous().numpy().astype("<f2").view(np.uint8).reshape(*t.shape, 2)


def _change(packed: PackedIntWeight, qtype: str, data: np.ndarray, rows) -> float:
    """Max |GGUF's dequantized weight - memfit's| (exactly 0.0 when d and m survived)."""
    import gguf

    back = torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]))
    mine = packed.dequantize(torch.float32)
    if rows is not None:
        mine = mine[rows]
    return float((back - mine).abs().max())
