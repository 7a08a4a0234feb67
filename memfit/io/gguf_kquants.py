"""GGUF's Q4_K quantization in numpy (the `gguf` package reads K-quants but does not write them).

Q4_K stores rows in super-blocks of 256 weights, each 144 bytes:

    d (float16) | dmin (float16) | 12 bytes: eight 6-bit scales and eight 6-bit mins | 128 bytes

The 256 weights are eight sub-blocks of 32; weight i of sub-block j dequantizes to
d·sc_j·q_i − dmin·m_j with q_i in 0..15 (two per byte: sub-block 2c in the low nibbles of the
32 bytes of chunk c, sub-block 2c + 1 in the high nibbles). The 6-bit scales pack as
gguf.quants.Q4_K.get_scale_min unpacks them: bytes 0-3 hold sc_0..3 (bits 0-5) and the top two
bits of sc_4..7, bytes 4-7 the same for the mins, bytes 8-11 the low four bits of sc_4..7 and
m_4..7.

How values are chosen (memfit's own, simple): each sub-block tries a few shrinks of its
min..max range (as memfit's RTN "mse" clip does) and keeps the one with the smallest squared
error; the sub-blocks' float scales and mins are then put on the super-block's 6-bit grids
(d = max scale / 63, dmin = max min / 63, both stored float16) and the codes are rounded once
more against the stored, rounded scales, so the codes match what a reader dequantizes.
A row whose length is not a multiple of 256 cannot be stored; the exporter picks a fallback.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
Q4_K_BYTES = 144
_SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def _sub_block_params(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block (…, 32) float scale (≥ 0) and min offset (≥ 0: the value of code 0 is
    −min), chosen among shrinks of min..max by squared error. -> (scale, mn), each (…,)."""
    lo = np.minimum(x.min(-1), 0.0)  # code 0 sits at or below 0: Q4_K's min is subtracted
    hi = np.maximum(x.max(-1), 0.0)
    best = None
    for f in _SHRINKS:
        mn, scale = -lo * f, (hi - lo) * f / 15
        inv = np.where(scale > 0, 1 / np.where(scale > 0, scale, 1), 0)
        q = np.clip(np.rint((x + mn[..., None]) * inv[..., None]), 0, 15)
        err = ((q * scale[..., None] - mn[..., None] - x) ** 2).sum(-1)
        if best is None:
            best = [scale, mn, err]
            continue
        better = err < best[2]
        best = [np.where(better, scale, best[0]), np.where(better, mn, best[1]),
                np.where(better, err, best[2])]
    return best[0], best[1]


def _pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(n, 8) 6-bit scales and mins -> (n, 12) bytes in Q4_K's layout."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return out


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """(rows, cols) float -> (rows, cols / 256 · 144) uint8, the Q4_K bytes of every row."""
    rows, cols = w.shape
    if cols % QK_K:
        raise ValueError(f"Q4_K needs rows of whole {QK_K}-wide super-blocks, got {cols}")
    x = w.astype(np.float32).reshape(-1, 8, 32)  # (n, sub-blocks, 32)
    scale, mn = _sub_block_params(x)  # (n, 8) each
    d = (scale.max(-1) / 63).astype(np.float16)
    dmin = (mn.max(-1) / 63).astype(np.float16)
    d32, dmin32 = d.astype(np.float32), dmin.astype(np.float32)
    sc = np.clip(np.rint(scale / np.where(d32 > 0, d32, 1)[:, None]), 0, 63)
    m = np.clip(np.rint(mn / np.where(dmin32 > 0, dmin32, 1)[:, None]), 0, 63)
    step = d32[:, None] * sc  # (n, 8) the stored scale of each sub-block
    off = dmin32[:, None] * m
    inv = np.where(step > 0, 1 / np.where(step > 0, step, 1), 0)
    q = np.clip(np.rint((x + off[..., None]) * inv[..., None]), 0, 15).astype(np.uint8)
    q = q.reshape(-1, 4, 2, 32)  # (n, chunk, low/high nibble, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8),
                             _pack_scales(sc, m), qs], axis=1)  # (n, 144)
    return blocks.reshape(rows, cols // QK_K * Q4_K_BYTES)
