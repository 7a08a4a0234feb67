"""SparseLinear's forward over row tiles (memfit.formats.sparse_rows): any tile of rows rebuilt
from byte ranges of the stored tensors equals those rows of the whole rebuild, for every layout,
value kind and code width, with tiles that start inside a byte (widths not a multiple of 8) or
inside a 3-bit unit; and the tiled forward equals the whole-matrix one (to float32 rounding: the
GEMM may block a narrower matrix otherwise)."""

import pytest
import torch

from memfit.algos.prune import magnitude_mask
from memfit.formats import grid, sparse
from memfit.formats.grid import IntFormat, minmax_params, round_params
from memfit.formats.sparse import SparseIntWeight, SparseLinear
from memfit.formats.sparse_rows import (
    dense_rows,
    pack_bits,
    row_offsets,
    scatter_kept,
    stream_codes,
)
from memfit.kernels.packing import pack

G = torch.Generator().manual_seed


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_stream_codes_reads_any_range(bits):
    n = 1000
    codes = torch.randint(0, 2 ** bits, (n,), generator=G(bits), dtype=torch.uint8)
    packed = pack_bits(codes.bool()) if bits == 1 else pack(codes.view(1, -1), bits)[0]
    for start, count in [(0, n), (1, 7), (5, 300), (997, 3), (333, 0), (8, 16), (13, 501)]:
        got = stream_codes(packed, bits, start, count)
        assert torch.equal(got.to(torch.uint8), codes[start: start + count])


@pytest.mark.parametrize("fraction", [0.0, 0.03, 0.5, 1.0])
def test_scatter_kept_equals_boolean_index_assignment(fraction):
    keep = torch.rand(37, 100, generator=G(7)) < fraction
    keep[0, 0] = fraction > 0  # a kept first place (or none at all)
    src = torch.randn(int(keep.sum()), generator=G(8)).half()
    if fraction > 0:  # an overflowed kept value stays itself, its neighbours zeros (not NaN)
        src[0] = float("inf")
    want = torch.zeros(37, 100, dtype=torch.float16)
    want[keep] = src
    got = scatter_kept(keep, src)
    assert got.dtype == src.dtype and torch.equal(got, want)
    assert not torch.signbit(got[~keep]).any()  # zeros, not a kept value times zero


def _module(layout, bits, out=37, k=100, seed=0):
    """A SparseLinear of each kind: float values (bits None) or int codes on a group grid."""
    w = torch.randn(out, k, generator=G(seed))
    keep = magnitude_mask(w, **({"nm": (2, 4)} if layout == "2:4" else {"sparsity": 0.6}))
    if bits is None:
        lin = torch.nn.Linear(k, out)
        with torch.no_grad():
            lin.weight.copy_(w * keep)
        return SparseLinear.from_linear(lin, layout)
    fmt = IntFormat(bits=bits, group_size=16)  # 100 = 6 x 16 + 4: a ragged last group
    s, z = round_params(*minmax_params(w * keep, fmt), fmt)
    w_hat = grid.dequantize(grid.quantize(w * keep, s, z, fmt), s, z, fmt) * keep
    return SparseLinear(SparseIntWeight.from_dense(w_hat, s, z, fmt, layout), torch.randn(out))


@pytest.mark.parametrize("layout,bits", [("bitmask", None), ("2:4", None), ("bitmask", 4),
                                         ("bitmask", 3), ("bitmask", 2), ("bitmask", 8),
                                         ("2:4", 4), ("2:4", 3)])
def test_any_row_tile_equals_the_whole_rebuild(layout, bits, monkeypatch):
    m = _module(layout, bits)
    whole = m.dequantize()
    shape, t = (m.out_features, m.in_features), m._stored()
    if layout == "bitmask":
        off = m.row_offsets()
        assert off[0] == 0 and torch.equal(off[1:] - off[:-1], (whole != 0).sum(1).long()) \
            or bits is not None  # int codes may round a kept weight to 0: count the mask instead
        assert torch.equal(off, row_offsets(m.bitmask, shape, 5))  # any counting tile
    for r0, r1 in [(0, 37), (1, 2), (3, 10), (10, 37), (36, 37)]:
        off = m.row_offsets() if layout == "bitmask" else None
        assert torch.equal(dense_rows(layout, m.fmt, shape, t, r0, r1, off), whole[r0:r1])
    x = torch.randn(4, m.in_features, generator=G(9))
    ref = m(x)  # one tile: the whole matrix
    monkeypatch.setattr(sparse, "TILE_WEIGHTS", 3 * m.in_features)  # 3 rows a tile, 13 tiles
    m.__dict__.pop("_row_off", None)
    got = m(x)  # same rows, same x: only the GEMM's blocking may differ with the tile width
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


@pytest.mark.parametrize("layout,bits,dtype", [("bitmask", None, torch.float32),
                                               ("bitmask", None, torch.bfloat16),
                                               ("2:4", None, torch.float32), ("bitmask", 4, None),
                                               ("2:4", 4, None), ("bitmask", 3, None)])
def test_kept_buffers_serve_one_tile_at_a_time(layout, bits, dtype, monkeypatch):
    """Without autograd on the CPU a tile is rebuilt in this thread's kept buffers
    (dense_rows(reuse=True)): every tile of two layers of different shapes, called in turn,
    equals its fresh rebuild, and the forward equals the float reference."""
    a, b = _module(layout, bits, 37, 100, seed=1), _module(layout, bits, 20, 64, seed=2)
    if dtype is not None:
        a, b = a.to(dtype), b.to(dtype)
    xa = torch.randn(5, 100, generator=G(3)).to(dtype or torch.float32)
    xb = torch.randn(5, 64, generator=G(4)).to(dtype or torch.float32)
    want = [torch.nn.functional.linear(x, m.dequantize().to(x.dtype), None if m.bias is None
                                       else m.bias.to(x.dtype)) for m, x in ((a, xa), (b, xb))]
    monkeypatch.setattr(sparse, "TILE_WEIGHTS", 7 * 100)  # a: 6 tiles of 7 rows (the last 2)
    for m in (a, b):
        m.__dict__.pop("_row_off", None)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    with torch.inference_mode():
        for _ in range(2):
            for (m, x), w in zip(((a, xa), (b, xb)), want):
                assert torch.allclose(m(x), w, rtol=tol, atol=1e-5)
        off = a.row_offsets() if layout == "bitmask" else None
        whole_a, whole_b = a.dequantize(), b.dequantize()
        assert (whole_a != 0).float().mean() <= 0.5  # 60% or 2:4 dropped: zeros, not (0 - z) s
        for r0, r1 in [(0, 7), (7, 14), (35, 37)]:
            got = dense_rows(layout, a.fmt, (37, 100), a._stored(), r0, r1, off,
                             reuse=True).clone()
            other = dense_rows(layout, b.fmt, (20, 64), b._stored(), 0, 20,
                               None, reuse=True)
            assert torch.equal(got, whole_a[r0:r1])
            assert torch.equal(other, whole_b)  # the same buffers, rewritten


@pytest.mark.parametrize("layout,fmt", [
    ("bitmask", IntFormat(bits=4, group_size=32)),
    ("2:4", IntFormat(bits=4, group_size=64, symmetric=True)),
    ("bitmask", IntFormat(bits=3, group_size=32)),
    ("2:4", IntFormat(bits=8, group_size=None, symmetric=True)),
], ids=str)
def test_decode_takes_the_kernel_over_the_dense_codes(layout, fmt):
    """Pruned + quantized: a decode-sized CPU forward goes through torch's kernel layout of the
    dense codes, a dropped place holding its group's zero point. It computes exactly what the
    dense QuantLinear of the same weights does (quantizing an exact zero gives the code z), and
    that layer's weights are the sparse ones (dropped places exactly 0). 1037 rows: padded."""
    from memfit.formats.quant_linear import QuantLinear

    out, k = 1037, 128
    w = torch.randn(out, k, generator=G(5))
    keep = magnitude_mask(w, **({"nm": (2, 4)} if layout == "2:4" else {"sparsity": 0.6}))
    s, z = round_params(*minmax_params(w * keep, fmt), fmt)
    codes = grid.quantize(w * keep, s, z, fmt)
    w_hat = grid.dequantize(codes, s, z, fmt) * keep
    bias = torch.randn(out, generator=G(6))
    m = SparseLinear(SparseIntWeight.from_dense(w_hat, s, z, fmt, layout), bias)
    lin = torch.nn.Linear(k, out)
    with torch.no_grad():
        lin.weight.copy_(w_hat), lin.bias.copy_(bias)
    dense_codes = grid.quantize(w_hat, s, z, fmt)
    q = QuantLinear.from_linear(lin, dense_codes, s, None if fmt.symmetric else z, fmt)
    assert torch.equal(q.dequantize(), m.dequantize())  # the same weights, zeros included
    with torch.inference_mode():
        for x in (torch.randn(1, 1, k, generator=G(7)),  # float32 decode
                  torch.randn(2, 8, k, generator=G(8)).bfloat16()):  # bfloat16, 16 rows
            assert torch.equal(m(x), q(x))
        assert m.cache_nbytes() == q.cache_nbytes() > 0
        x = torch.randn(3, 8, k, generator=G(9))  # float32 prefill: the rebuilt tiles
        ref = torch.nn.functional.linear(x, w_hat, bias)
        assert torch.allclose(m(x), ref, rtol=1e-5, atol=1e-5)
    m.float()  # a move forgets the layout
    assert m.cache_nbytes() == 0
