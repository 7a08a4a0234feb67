"""The stream-K form of the tensor-core decode kernel (memfit.kernels.triton_mma_stream) against
the float32 reference: runs that end inside a row block, cross one or several, cover exactly one,
or are empty (more programs than tiles); M = 1 and 2..16, groups 32..256, both layouts, bias,
1 or 2 tiles in flight; the slot count; on the GPU also determinism and CUDA-graph replay (the
arrival counters must be back at zero after every call). On the CPU the interpreter runs the
plain-Triton tile path; on a GPU the mma.sync asm."""

import pytest
import torch

triton_int = pytest.importorskip("memfit.kernels.triton_int")

from memfit.kernels import triton_mma_stream as ts
from memfit.kernels.reference import linear_reference
from memfit.kernels.weights import tile
from tests.kernels.test_triton_int import DEV, make_weight, rel_err


@pytest.mark.parametrize("n,k,group,zp,m,programs", [
    (128, 512, 128, "int", 1, 3),    # 2 row blocks of 64 x 4 tiles = 8 units over 3 runs
    (128, 512, 128, "int", 1, 8),    # one tile a program: 4 programs share each row block
    (128, 512, 128, "int", 1, 2),    # each run is one whole row block (no partials)
    (96, 384, 64, "sym", 1, 5),      # odd rows: the last block is half masked
    (72, 256, 32, "int", 1, 4),
    (33, 512, 256, "int", 1, 3),
    (64, 256, 128, "int", 1, 11),    # more programs than units: some runs are empty
    (128, 512, 128, "int", 5, 3),
    (57, 384, 128, "sym", 16, 4),
    (64, 256, 256, "int", 11, 2),
])
@pytest.mark.parametrize("prefetch", [1, 2])
@pytest.mark.parametrize("tiled", [False, True])
def test_stream_kernel_matches_reference(n, k, group, zp, m, programs, prefetch, tiled):
    w = make_weight(n, k, 4, group, zp, seed=n + k + m + programs)
    v = tile(w, 32) if tiled and n % 32 == 0 else w
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)).to(torch.bfloat16).to(DEV)
    bias = torch.randn(n).to(DEV)
    want = linear_reference(x.float(), w, bias)
    got = ts.run_stream(x, v, bias, 64, 1, 4, prefetch=prefetch, programs=programs)
    assert got.shape == (m, n) and got.dtype == torch.bfloat16 and not got.isnan().any()
    err = rel_err(got.float(), want)
    print(f"stream {n}x{k} g{group} {zp} M={m} P={programs} pf={prefetch}: rel err {err:.2e}")
    assert err < 1e-2  # 16-bit output rounding (the interpreter truncates bfloat16)
    # the arrival counters are left at zero: a second call gives the same result
    assert torch.equal(got, ts.run_stream(x, v, bias, 64, 1, 4, prefetch=prefetch,
                                          programs=programs))


def test_slot_count_is_the_most_runs_meeting_one_row_block():
    # 8 units (2 blocks x 4 tiles) over 3 runs [0,2) [2,5) [5,8): block 0 meets runs 0-1,
    # block 1 meets runs 1-2
    assert ts.slots(8, 3, 4) == 2
    assert ts.slots(8, 8, 4) == 4  # one tile a run
    assert ts.slots(8, 2, 4) == 1  # a run is a block
    assert ts.slots(1792, 132, 32) == 4  # 14336x4096 in 256-row blocks over 132 SMs


def test_stream_kernel_refuses_what_it_cannot_take():
    w = make_weight(64, 256, 4, 128, "int", seed=1)
    x = torch.randn(17, 256).to(torch.bfloat16).to(DEV)
    with pytest.raises(ValueError, match="M <= 16"):
        ts.run_stream(x, w, None, 64, 1, 4)
    w3 = make_weight(64, 256, 8, 128, "int", seed=1)
    with pytest.raises(ValueError, match="4-bit"):
        ts.run_stream(x[:1], w3, None, 64, 1, 4)


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs")
@pytest.mark.parametrize("m,per_sm", [(1, 1), (1, 2), (7, 1)])
def test_stream_kernel_is_deterministic_and_graph_safe(m, per_sm):
    w = make_weight(4096, 1024, 4, 128, "int", seed=3)
    x = torch.randn(m, 1024, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16).to(DEV)
    runs = [ts.run_stream(x, w, None, 128, per_sm, 4) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    assert rel_err(runs[0].float(), linear_reference(x.float(), w)) < 1e-2
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = ts.run_stream(x, w, None, 128, per_sm, 4)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, runs[0])
