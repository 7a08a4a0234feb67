"""The descriptor tile kernel for long prefills (memfit.kernels.triton_prefill) against the
float32 reference: both layouts, groups of 64 and 128, integer and symmetric zero points, bias,
M not a multiple of the token tile, a persistent grid with fewer programs than tiles; what it
refuses; where the chooser offers it. Under TRITON_INTERPRET=1 on a CPU (tests/conftest.py:
16-bit floats are float16 there), compiled on a GPU (bfloat16)."""

import pytest
import torch

triton_int = pytest.importorskip("memfit.kernels.triton_int")

from memfit.kernels import launch_shapes, triton_prefill
from memfit.kernels.reference import linear_reference
from memfit.kernels.weights import tile
from tests.kernels.test_triton_int import DEV, make_weight, rel_err

DT = torch.float16 if DEV == "cpu" else torch.bfloat16
TOL = 5e-3 if DEV == "cpu" else 2e-2  # 16-bit weights into the dot, float32 sums


@pytest.mark.parametrize("n,k,group,zp,rb,m", [
    (256, 512, 128, "int", 0, 300),   # 3 token tiles of 128 (the last partial) x 2 row tiles
    (256, 384, 64, "sym", 0, 136),    # tiles of two groups, symmetric codes
    (384, 256, 128, "int", 64, 257),  # the decode loop's tiled layout: 2 row blocks a tile
    (128, 512, 64, "int", 64, 40),    # fewer tokens than a tile
])
@pytest.mark.parametrize("bias", [False, True])
def test_every_tma_candidate_matches_reference(n, k, group, zp, rb, m, bias, monkeypatch):
    monkeypatch.setattr(launch_shapes, "TMA_TILED", True)
    w = make_weight(n, k, 4, group, zp, seed=n + k + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEV, DT)
    b = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(DEV, DT) if bias else None
    want = linear_reference(x.float(), w, None if b is None else b.float())
    v = tile(w, rb) if rb else w
    cands = launch_shapes.tma_candidates(2048, v, DT)
    assert {(c.BM, c.tma, c.nfast) for c in cands} == {
        (256, 2, False), (256, 1, False), (256, 2, True), (256, 1, True)}
    for c in cands:
        y = triton_int.run(x, v, b, c)
        assert y.shape == (m, n) and y.dtype == DT and not y.isnan().any()
        assert rel_err(y.float(), want) < TOL, c


@pytest.mark.skipif(DEV == "cpu", reason="a long K on the GPU (the interpreter has no races)")
@pytest.mark.parametrize("n,k", [(1024, 4096), (512, 14336)])
def test_every_tma_candidate_matches_reference_over_a_long_k(n, k):
    """Forms of this kernel that were right at K <= 512 gave wrong outputs at K = 4096 and 14336
    on an H100 (the scales loaded a tile ahead, session 40, or first in each step, session 42):
    the compiled pipeline is checked over as many K tiles as a Llama-3-8B layer has."""
    w = make_weight(n, k, 4, 128, "int", seed=k)
    x = torch.randn(600, k, generator=torch.Generator().manual_seed(7)).to(DEV, DT)
    want = linear_reference(x.float(), w, None)
    for c in launch_shapes.tma_candidates(2048, w, DT):
        assert rel_err(triton_int.run(x, w, None, c).float(), want) < TOL, c


def test_persistent_programs_loop_over_more_tiles_than_programs(monkeypatch):
    """One program for all 8 output tiles (and 3 for 8: uneven runs) gives every tile, in
    either order (a weight tile's token tiles consecutive, or a token tile's weight tiles)."""
    w = make_weight(256, 256, 4, 128, "int", seed=3)
    x = torch.randn(500, 256, generator=torch.Generator().manual_seed(4)).to(DEV, DT)
    want = linear_reference(x.float(), w, None)
    for p in (1, 3):
        for nfast in (False, True):
            monkeypatch.setattr(triton_prefill, "programs", lambda device, p=p: p)
            y = triton_prefill.run_tma(x, w, None, 128, 128, 8, 3, True, nfast)
            assert rel_err(y.float(), want) < TOL, (p, nfast)


def test_tma_refuses_what_it_cannot_take():
    why = triton_prefill.tma_ineligibility
    assert "4-bit" in why(make_weight(128, 256, 3, 64, "int"), DT, 128)
    assert "zero points" in why(make_weight(128, 256, 4, 64, "float"), DT, 128)
    assert "16-bit" in why(make_weight(128, 256, 4, 64, "int"), torch.float32, 128)
    assert "groups" in why(make_weight(128, 256, 4, 32, "int"), DT, 128)
    assert "multiple of 128" in why(make_weight(128, 320, 4, 64, "int"), DT, 128)
    assert "row tiles" in why(make_weight(192, 256, 4, 64, "int"), DT, 128)
    w = make_weight(128, 256, 4, 64, "int")  # the same codes 4 bytes off a 16-byte boundary
    buf = torch.zeros(w.qdata.numel() + 4, dtype=torch.uint8, device=DEV)
    off = w._replace(qdata=buf[4:].view(w.qdata.shape))
    off.qdata.copy_(w.qdata)
    assert "aligned" in why(off, DT, 128)
    assert "64-row" in why(tile(w, 64)._replace(tile_rows=32), DT, 128)
    with pytest.raises(ValueError, match="memfit.kernels.triton_prefill: .*aligned"):
        triton_prefill.run_tma(torch.zeros(4, 256, dtype=DT, device=DEV), off, None, 128, 128,
                               8, 3, True)


def test_candidates_offer_it_past_1024_tokens(monkeypatch):
    w = make_weight(256, 512, 4, 128, "int")
    # the tiled layout only opt-in (MEMFIT_PREFILL_TILE=1): not yet run on a GPU
    assert not any(c.tma for c in triton_int.candidates(2048, tile(w, 64), torch.bfloat16))
    monkeypatch.setattr(launch_shapes, "TMA_TILED", True)
    for v in (w, tile(w, 64)):
        assert not any(c.tma for c in triton_int.candidates(1024, v, torch.bfloat16))
        long = triton_int.candidates(2048, v, torch.bfloat16)
        assert long[0] == triton_int.Config(0, 0, 0)  # dequantize + cuBLAS stays the default
        assert sum(c.tma > 0 for c in long) == 4
        assert not any(c.tma for c in triton_int.candidates(2048, v, torch.float32))
    monkeypatch.setattr(launch_shapes, "TMA_MIN_M", 129)  # MEMFIT_PREFILL_TILE=1
    assert any(c.tma for c in triton_int.candidates(300, w, torch.bfloat16))


def test_run_leaves_the_callers_triton_allocator_alone():
    from triton.runtime import _allocation
    before = _allocation._allocator.get()
    w = make_weight(128, 256, 4, 128, "int", seed=5)
    x = torch.randn(130, 256, generator=torch.Generator().manual_seed(6)).to(DEV, DT)
    triton_prefill.run_tma(x, w, None, 128, 128, 8, 3, persistent=False)
    assert _allocation._allocator.get() is before
