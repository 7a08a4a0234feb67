"""The tensor-core decode kernel (memfit.kernels.triton_mma) against the float32 reference:
every group size it takes (32, 64, 128, 256, per-channel), both zero-point kinds, M = 1, 2..8,
9..16 and 17..32 (one to four token sets), split K, 2 tiles per step, 2 tiles in flight,
bias, bfloat16
and float16 activations, odd row counts; on the GPU also determinism and CUDA-graph replay. On the CPU
(TRITON_INTERPRET=1) the asm blocks are replaced by the same sums in plain Triton; on a GPU the
mma.sync path runs."""

import pytest
import torch

triton_int = pytest.importorskip("memfit.kernels.triton_int")

from memfit.kernels import triton_mma
from memfit.kernels.reference import linear_reference
from memfit.kernels.weights import dequantize, tile, untile
from tests.kernels.test_triton_int import DEV, make_weight, rel_err

CASES = [  # (n, k, group, zero point, M)
    (64, 256, 128, "int", 1), (40, 384, 64, "sym", 1), (72, 256, 32, "int", 1),
    (33, 512, 256, "int", 1), (48, 256, None, "sym", 1), (64, 256, 128, "int", 3),
    (57, 384, 128, "sym", 8), (64, 256, 256, "int", 11), (40, 128, 128, "int", 16),
    (40, 256, 128, "sym", 23), (64, 256, 128, "int", 32),
]


@pytest.mark.parametrize("n,k,group,zp,m", CASES)
@pytest.mark.parametrize("split_k,unroll,epi", [(1, 1, False), (2, 1, False), (1, 2, False),
                                                (2, 1, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mma_kernel_matches_reference(n, k, group, zp, m, split_k, unroll, epi, dtype):
    """epi: M = 1's asm epilogue (GPU only: the interpreter runs the plain path)."""
    if epi and (m > 1 or DEV == "cpu"):
        pytest.skip("the asm epilogue is the GPU's, at M = 1")
    if (k // 128) % (split_k * unroll) or (m > 16 and unroll > 1):
        pytest.skip("split_k x unroll must divide the row's tiles; M > 16 takes unroll 1")
    w = make_weight(n, k, 4, group, zp, seed=n + k + m)
    assert triton_mma.mma_ineligibility(w, m, dtype) is None
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)).to(dtype).to(DEV)
    bias = torch.randn(n).to(DEV)
    want = linear_reference(x.float(), w, bias)
    got = triton_mma.run_mma(x, w, bias, 32 if DEV == "cpu" else 64, split_k, 4, unroll, epi)
    assert got.shape == (m, n) and got.dtype == dtype and not got.isnan().any()
    err = rel_err(got.float(), want)
    print(f"mma {n}x{k} g{group} {zp} M={m} sk={split_k} u={unroll} {dtype}: rel err {err:.2e}")
    assert err < 1e-2  # 16-bit output rounding (the interpreter truncates bfloat16)


@pytest.mark.parametrize("n,k,group,zp,m,rb", [
    (128, 256, 128, "int", 1, 64), (96, 384, 64, "sym", 1, 32), (64, 256, 32, "int", 1, 16),
    (128, 512, 256, "int", 5, 64), (64, 256, 128, "sym", 16, 16)])
@pytest.mark.parametrize("split_k,unroll,epi", [(1, 1, False), (2, 1, False), (1, 2, False),
                                                (2, 1, True)])
def test_mma_kernel_reads_the_tiled_layout(n, k, group, zp, m, rb, split_k, unroll, epi):
    """weights.tile reorders the bytes; the kernel's sums stay the reference's (and equal the
    stored layout's bit for bit: the same codes meet the same activations in the same order)."""
    if (k // 128) % (split_k * unroll):
        pytest.skip("split_k x unroll must divide the row's tiles")
    if epi and (m > 1 or DEV == "cpu"):
        pytest.skip("the asm epilogue is the GPU's, at M = 1")
    w = make_weight(n, k, 4, group, zp, seed=n + k + m + rb)
    t = tile(w, rb)
    assert t.tile_rows == rb and not torch.equal(t.qdata, w.qdata)
    assert torch.equal(untile(t).qdata, w.qdata) and torch.equal(dequantize(t), dequantize(w))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)).to(torch.bfloat16).to(DEV)
    bias = torch.randn(n).to(DEV)
    bn = 32 if DEV == "cpu" else 64
    got = triton_mma.run_mma(x, t, bias, bn, split_k, 4, unroll, epi)
    assert torch.equal(got, triton_mma.run_mma(x, w, bias, bn, split_k, 4, unroll, epi))
    assert rel_err(got.float(), linear_reference(x.float(), w, bias)) < 1e-2


def test_tiled_weights_take_the_mma_tile_or_dequantize_kernels_and_nothing_else():
    w = make_weight(128, 256, 4, 64, "int", seed=7)
    t = tile(w, 64)
    assert torch.equal(triton_int.dequantize_triton(t, torch.float32).cpu(),
                       dequantize(w).cpu())
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(8)).to(DEV)
    blocks = triton_int.run(x, t, None, triton_int.Config(0, 64, 0))  # dequantize 64 rows at a time
    assert torch.allclose(blocks, triton_int.run(x, w, None, triton_int.Config(0, 0, 0)),
                          rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="split a block"):
        triton_int.run(x, t, None, triton_int.Config(0, 48, 0))
    one = triton_int.candidates(1, t, torch.bfloat16)
    assert one[0].words == "mma" and all(c.words == "mma" or c.BM == 0 for c in one)
    two = triton_int.candidates(2, t, torch.bfloat16)  # g64: the tile kernel, then dequantize
    assert two[-1] == triton_int.Config(0, 0, 0) and all(c.wa and c.BK <= 128 for c in two[:-1])
    x = torch.randn(20, 256, generator=torch.Generator().manual_seed(1)).to(DEV)
    got = triton_int.triton_linear(x, t)
    assert rel_err(got, linear_reference(x, w)) < 1e-5
    assert rel_err(triton_int.run(x, t, None, triton_int.Config(16, 64, 64, 1)),
                   linear_reference(x, w)) < 1e-5  # the tile kernel reads it too
    for c in (triton_int.Config(16, 64, 64, 1, words="dot"), triton_int.Config(8, 32, 64, 1, gemv=True),
              triton_int.Config(16, 64, 256, 1)):
        with pytest.raises(ValueError, match="tiled"):
            triton_int.run(x, t, None, c)
    from memfit.kernels import ops  # the custom op torch.compile calls carries the layout too
    assert rel_err(ops.call(x, t, None), linear_reference(x, w)) < 1e-5


def test_mma_kernel_refuses_what_it_cannot_take():
    bf = torch.bfloat16
    assert "4-bit" in triton_mma.mma_ineligibility(make_weight(8, 256, 8, 128, "int"), 1, bf)
    assert "4-bit" in triton_mma.mma_ineligibility(make_weight(8, 256, 4, 128, "float"), 1, bf)
    w = make_weight(8, 192, 4, 64, "int")
    assert "multiple of 128" in triton_mma.mma_ineligibility(w, 1, bf)
    assert "group size" in triton_mma.mma_ineligibility(make_weight(8, 384, 4, 96, "int"), 1, bf)
    assert "16-bit" in triton_mma.mma_ineligibility(make_weight(8, 256, 4, 128, "int"), 1,
                                                    torch.float32)
    assert "M = 1 only" in triton_mma.mma_ineligibility(make_weight(8, 256, 4, 64, "int"), 2, bf)
    assert "M <= 32" in triton_mma.mma_ineligibility(make_weight(8, 256, 4, 128, "int"), 33, bf)
    assert triton_mma.mma_ineligibility(make_weight(8, 256, 4, 128, "int"), 32, bf) is None


def test_chooser_offers_mma_first_for_16bit_decode_and_serves_the_rest():
    w = make_weight(48, 256, 4, 128, "int")
    assert triton_int.candidates(1, w, torch.bfloat16)[0].words == "mma"
    assert all(c.words != "mma" for c in triton_int.candidates(1, w, torch.float32))
    mid = triton_int.candidates(24, w, torch.bfloat16)  # M = 17..32: rows sharing loads, first
    assert mid[0].words == "mma" and all(c.reps > 1 for c in mid if c.words == "mma")
    assert all(c.words != "mma" for c in triton_int.candidates(40, w, torch.bfloat16))
    x = torch.randn(2, 256).to(torch.bfloat16).to(DEV)
    got = triton_int.triton_linear(x, w)
    assert rel_err(got.float(), linear_reference(x.float(), w)) < 1e-2


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs")
@pytest.mark.parametrize("m,split_k", [(1, 4), (1, 1), (5, 2)])
def test_mma_kernel_is_deterministic_and_graph_safe(m, split_k):
    w = make_weight(512, 1024, 4, 128, "int", seed=3)
    x = torch.randn(m, 1024, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16).to(DEV)
    runs = [triton_mma.run_mma(x, w, None, 128, split_k, 4) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = triton_mma.run_mma(x, w, None, 128, split_k, 4)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, runs[0])


@pytest.mark.parametrize("m,bn,warps,reps", [(16, 64, 4, 2), (5, 128, 4, 4), (11, 64, 4, 2),
                                             (30, 128, 4, 4), (17, 64, 4, 2)])
@pytest.mark.parametrize("tiled", [False, True])
def test_rows_sharing_activation_loads_match_reference(m, bn, warps, reps, tiled):
    """M > 1 with `reps` rows of a lane per asm call (mma_ptx.shared_asm: each word's
    activations loaded once for all of them), up to 4 token sets; on the GPU the asm path, here
    the plain one."""
    w = make_weight(256, 512, 4, 128, "int", seed=m + reps)
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16).to(DEV)
    bias = torch.randn(256).to(DEV)
    v = tile(w, 64) if tiled else w
    got = triton_mma.run_mma(x, v, bias, bn, 2, warps, reps=reps)
    assert rel_err(got.float(), linear_reference(x.float(), w, bias)) < 1e-2
    if DEV != "cpu":  # the interpreter runs the plain path, the same for every `reps`
        assert torch.equal(got, triton_mma.run_mma(x, v, bias, bn, 2, warps))  # same sums, order
    with pytest.raises(ValueError, match="rows per asm call"):
        triton_mma.run_mma(x, v, bias, 64, 2, 4, reps=4)  # a lane holds 2 rows of 64


@pytest.mark.parametrize("group,bn,reps,prefetch", [(128, 128, 4, 1), (128, 64, 2, 2),
                                                   (64, 128, 2, 1), (32, 64, 2, 2),
                                                   (256, 256, 4, 2)])
@pytest.mark.parametrize("tiled,epi", [(False, False), (True, False), (True, True),
                                      (False, True)])
def test_paired_rows_give_the_same_sums_at_m1(group, bn, reps, prefetch, tiled, epi):
    """M = 1 with `reps` rows of a lane per asm call: two rows share each mma (rows g, g + 8) and
    one all-ones mma a word gives XS (mma_ptx.mma_asm, epi_asm); each output element is the same
    tensor-core sum as with one row a call, so the result is bit for bit the same."""
    if epi and DEV == "cpu":
        pytest.skip("the asm epilogue is the GPU's")
    w = make_weight(256, 512, 4, group, "int", seed=group + reps)
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(reps)).to(torch.bfloat16).to(DEV)
    bias = torch.randn(256).to(DEV)
    v = tile(w, 64) if tiled else w
    got = triton_mma.run_mma(x, v, bias, bn, 2, 4, epi=epi, reps=reps, prefetch=prefetch)
    assert rel_err(got.float(), linear_reference(x.float(), w, bias)) < 1e-2
    assert torch.equal(got, triton_mma.run_mma(x, v, bias, bn, 2, 4, epi=epi, prefetch=prefetch))


@pytest.mark.parametrize("m,group,split_k", [(1, 128, 1), (1, 128, 2), (1, 64, 4), (1, 32, 2),
                                             (1, 256, 1), (9, 128, 1), (20, 128, 2)])
@pytest.mark.parametrize("tiled,epi", [(False, False), (True, False), (True, True)])
def test_two_tiles_in_flight_give_the_same_sums(m, group, split_k, tiled, epi):
    """prefetch = 2: each program loads the tile after next while it computes this one (its
    last two steps load nothing); the same sums in the same order as prefetch = 1, bit for bit,
    for 1 to 4 tiles a program (split_k 2 at 1024 columns: 4 tiles a program)."""
    if epi and (m > 1 or DEV == "cpu"):
        pytest.skip("the asm epilogue is the GPU's, at M = 1")
    k = 1024 if m == 20 else 512
    w = make_weight(128, k, 4, group, "int", seed=m + group + split_k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16).to(DEV)
    v = tile(w, 64) if tiled else w
    got = triton_mma.run_mma(x, v, None, 64, split_k, 4, epi=epi, prefetch=2)
    assert rel_err(got.float(), linear_reference(x.float(), w)) < 1e-2
    assert torch.equal(got, triton_mma.run_mma(x, v, None, 64, split_k, 4, epi=epi))


@pytest.mark.parametrize("tiles", [1, 2, 3, 5, 6, 7, 8, 9, 10, 11])
@pytest.mark.parametrize("group,tiled", [(128, True), (64, False)])
def test_two_tiles_ahead_gives_one_tile_aheads_sums_for_every_tile_count(tiles, group, tiled):
    """M = 1, two tiles ahead: a loop that loads the tile after next, then the last two tiles
    (fewer when the program has fewer) with nothing to load; every count of tiles gives
    prefetch 1's sums bit for bit (the same tiles in the same order; on the GPU g128 takes the
    asm fold, FOLD, and g64 the Triton epilogue)."""
    k = 128 * tiles
    w = make_weight(128, k, 4, group, "int", seed=tiles)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(tiles)).to(torch.bfloat16)
    v = tile(w, 64) if tiled else w
    got = triton_mma.run_mma(x.to(DEV), v, None, 64, 1, 4, prefetch=2)
    assert rel_err(got.float(), linear_reference(x.to(DEV).float(), w)) < 1e-2
    assert torch.equal(got, triton_mma.run_mma(x.to(DEV), v, None, 64, 1, 4, prefetch=1))


@pytest.mark.parametrize("m,group,tiles,split_k,prefetch,unroll", [
    (1, 128, 7, 2, 1, 1), (1, 128, 7, 3, 2, 1), (1, 64, 5, 2, 1, 1), (1, 32, 5, 2, 2, 1),
    (4, 128, 7, 3, 1, 1), (20, 128, 5, 2, 1, 1), (1, 128, 10, 3, 1, 2)])
@pytest.mark.parametrize("tiled,epi", [(False, False), (True, False), (True, True)])
def test_an_uneven_split_gives_the_last_program_the_rest(m, group, tiles, split_k, prefetch,
                                                         unroll, tiled, epi):
    """A split need not divide a row's tiles (7 tiles over 3 programs: 3, 3, 1): the sums are
    the reference's, and those of one program (split_k 1) up to float32 addition order."""
    if epi and (m > 1 or DEV == "cpu"):
        pytest.skip("the asm epilogue is the GPU's, at M = 1")
    k = 128 * tiles
    w = make_weight(128, k, 4, group, "int", seed=tiles + split_k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16).to(DEV)
    v = tile(w, 64) if tiled else w
    got = triton_mma.run_mma(x, v, None, 64, split_k, 4, unroll, epi=epi, prefetch=prefetch)
    whole = triton_mma.run_mma(x, v, None, 64, 1, 4, unroll, epi=epi, prefetch=prefetch)
    want = linear_reference(x.float(), w)
    assert rel_err(got.float(), want) < 1e-2
    assert rel_err(got.float(), whole.float()) < 1e-2


def test_a_split_that_leaves_a_program_nothing_is_refused():
    w = make_weight(64, 512, 4, 128, "int")  # 4 tiles: 3 programs of 2 leave the third none
    x = torch.randn(1, 512).to(torch.bfloat16).to(DEV)
    with pytest.raises(ValueError, match="leaves a program none"):
        triton_mma.run_mma(x, w, None, 64, 3, 4)
    from memfit.kernels.launch_shapes import mma_splits
    assert mma_splits(32) == [1, 2, 4, 8, 16, 32]  # even ones reach 8..32: nothing added
    assert mma_splits(148) == [1, 2, 4, 13, 15, 19, 25]  # 12, 10, 8, 6 tiles a program
    for steps in (7, 86, 148, 231):
        for sk in mma_splits(steps):
            per = -(-steps // sk)
            assert 0 < steps - (sk - 1) * per <= per  # the last program has 1..per steps


@pytest.mark.parametrize("m", [1, 6, 19])
def test_activations_off_a_16_byte_boundary_are_read_right(m):
    """M > 1 loads activations as 16-byte vectors in the asm: a view that starts off a 16-byte
    boundary is copied first (on a GPU a misaligned vector load is a fault, not a slow load)."""
    k = 256
    w = make_weight(64, k, 4, 128, "int", seed=m)
    flat = torch.randn(m * k + 1, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    x = flat.to(DEV)[1:].view(m, k)
    assert x.data_ptr() % 16
    got = triton_mma.run_mma(x, w, None, 32 if DEV == "cpu" else 64, 1, 4)
    assert rel_err(got.float(), linear_reference(x.float(), w)) < 1e-2


def test_launch_constants_are_built_once_per_shape_and_follow_the_pairing_switch(monkeypatch):
    """The asm strings of a launch shape are built once (an eager decode pays the build on every
    packed linear otherwise: 48-148 µs of host time a call on a 2-core CPU), and a change of
    mma_ptx.PAIRED (the benchmarks' A/B switch) still gives the other asm."""
    from memfit.kernels import mma_ptx
    args = (16, 128, 1, "bf16", False, 128, 2, 1, 0, False, 2, False, True, 1)
    first = triton_mma.constants(*args)
    assert triton_mma.constants(*args) is first  # served from the cache, not rebuilt
    assert first["ASM_TEXT"] == mma_ptx.shared_asm(2, False, 2)  # what an uncached build gives
    monkeypatch.setattr(mma_ptx, "PAIRED", not mma_ptx.PAIRED)
    other = triton_mma.constants(*args)
    assert other["ASM_TEXT"] == mma_ptx.shared_asm(2, False, 2) != first["ASM_TEXT"]


def test_zero_buffers_made_inside_a_capture_serve_it_alone(monkeypatch):
    """A zero buffer (split-K counters, the M = 1 kernel's zero lanes) made inside a CUDA graph
    capture is only filled when the graph replays: it must not become the shared one that an
    eager call would then read unfilled."""
    from memfit.kernels import triton_words

    cache: dict = {}
    monkeypatch.setattr(triton_words, "_capturing", lambda device: True)
    a = triton_words.zeroed(cache, "cpu", 16)
    b = triton_words.zeroed(cache, "cpu", 16)
    assert cache == {} and a is not b
    assert any(t is a for t in triton_words._CAPTURED)  # held for its graph
    monkeypatch.setattr(triton_words, "_capturing", lambda device: False)
    c = triton_words.zeroed(cache, "cpu", 16)
    assert cache["cpu"] is c and int(c.abs().sum()) == 0 and c.dtype == torch.int32
    assert triton_words.zeroed(cache, "cpu", 8) is c  # large enough: reused
    d = triton_words.zeroed(cache, "cpu", 64)  # grown
    assert d.numel() == 64 and cache["cpu"] is d


@pytest.mark.skipif(DEV == "cpu", reason="CUDA graphs")
def test_a_first_call_inside_a_capture_leaves_eager_calls_right(monkeypatch):
    """The M = 1 kernel with groups of 64 (zero lanes) and split-K (counters) first run inside
    a CUDA graph capture, then eagerly before any replay, then by replaying the graph."""
    from memfit.kernels import triton_words

    w = make_weight(256, 512, 4, 64, "int", seed=3)
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).cuda()
    want = linear_reference(x.float(), w, None)

    def run():
        return triton_mma.run_mma(x, w, None, 64, 2, 4, 1, True)

    run()  # compiled outside the capture; then no buffers made yet
    monkeypatch.setattr(triton_words, "_COUNTERS", {})
    monkeypatch.setattr(triton_mma, "_ZEROS", {})
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = run()
    assert rel_err(run().float(), want) < 1e-2  # eager, the graph not replayed yet
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out.float(), want) < 1e-2
    assert rel_err(run().float(), want) < 1e-2
