"""3-bit codes widened to 4-bit words per call (memfit.kernels.triton_widen): bit for bit what
memfit.kernels.weights.widen makes on the CPU, and the 4-bit kernels run on the result give the
3-bit weight's product. Under TRITON_INTERPRET=1 on a CPU (tests/conftest.py), compiled on a GPU."""

import pytest
import torch

triton_int = pytest.importorskip("memfit.kernels.triton_int")

from memfit.kernels import triton_widen
from memfit.kernels.launch_shapes import widen_candidates
from memfit.kernels.weights import dequantize, tile, widen
from tests.kernels.test_triton_int import DEV, make_weight, rel_err


@pytest.mark.parametrize("n,k,group,zp", [
    (17, 320, 64, "int"),    # odd rows; 5 groups: zero points 2 and 5 cross a byte
    (16, 96, 32, "sym"),     # three chunks, symmetric codes shifted by 4
    (33, 1024, 128, "int"),  # two 512-code programs a row block
    (5, 160, None, "int"),   # one group a row
    (20, 576, 64, "int"),    # 9 groups (an odd count: the last 4-bit zero byte half empty)
    (8, 32, None, "sym"),    # one chunk
    (40, 800, 32, "int"),    # 25 groups; the second program's chunks past the row masked
])
def test_widen_is_weights_widen_bit_for_bit(n, k, group, zp):
    w = make_weight(n, k, 3, group, zp, seed=n)
    assert triton_widen.widen_ineligibility(w) is None
    got, want = triton_widen.widen_triton(w), widen(w)
    assert got.bits == 4 and got.shape == w.shape and got.scale is w.scale
    assert torch.equal(got.qdata.cpu(), want.qdata.cpu())
    assert (got.zero is None) == (want.zero is None) == (zp == "sym")
    if zp == "int":
        assert torch.equal(got.zero.cpu(), want.zero.cpu())
    assert torch.equal(dequantize(got).cpu(), dequantize(w).cpu())


def test_widen_refuses_what_it_cannot_take():
    assert "zero points" in triton_widen.widen_ineligibility(make_weight(16, 256, 3, 64, "float"))
    assert "32-code" in triton_widen.widen_ineligibility(make_weight(16, 328, 3, 64, "int"))
    assert "3-bit" in triton_widen.widen_ineligibility(make_weight(16, 256, 4, 64, "int"))
    four = tile(make_weight(64, 256, 4, 64, "int"), 64)
    assert "stored layout" in triton_widen.widen_ineligibility(four)
    with pytest.raises(ValueError, match="32-code"):
        triton_widen.widen_triton(make_weight(16, 328, 3, 64, "int"))


def test_widen_candidates_are_the_4bit_tensor_core_shapes():
    """M = 1: the mma decode kernel's shapes; 16 < M <= 128: the weight-as-A tile kernel's; none
    for float32 activations, float zero points, rows the 4-bit kernels cannot take or M > 128."""
    w = make_weight(64, 512, 3, 128, "int")
    one = widen_candidates(1, w, torch.bfloat16)
    assert one and all(c.widen and c.words == "mma" for c in one)
    forty = widen_candidates(40, w, torch.float16)
    assert forty and all(c.widen and c.wa for c in forty)
    assert widen_candidates(1, w, torch.float32) == []
    assert widen_candidates(200, w, torch.bfloat16) == []
    assert widen_candidates(1, make_weight(64, 512, 3, 128, "float"), torch.bfloat16) == []
    assert widen_candidates(1, make_weight(64, 320, 3, 64, "int"), torch.bfloat16) == []  # 320 % 128
    cands = triton_int.candidates(1, w, torch.bfloat16)
    assert cands[0].BM == 0 and set(one) <= set(cands)  # dequantize + cuBLAS stays the default


@pytest.mark.parametrize("m", [1, 4, 20, 40])
@pytest.mark.parametrize("group,zp", [(128, "int"), (64, "sym"), (256, "int")])
def test_widened_weights_through_the_4bit_kernels_match_reference(m, group, zp):
    w = make_weight(64, 512, 3, group, zp, seed=m + group)
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m)).half().to(DEV)
    want = x.float() @ dequantize(w).T.to(DEV)
    cands = widen_candidates(m, w, x.dtype)
    if DEV != "cuda":  # the interpreter is slow: one shape of each kind
        kinds = {}
        for c in cands:
            kinds.setdefault((c.words, c.dq, c.num_stages, c.epi, c.SPLIT_K > 1), c)
        cands = list(kinds.values())
    assert cands
    for c in cands:
        assert rel_err(triton_int.run(x, w, None, c).float(), want) < 2e-3, c


def test_a_widened_choice_plans_a_fresh_widen_each_call(monkeypatch):
    """`plan` (the eager path's replay) fixes only the choice for a widen shape: each call widens
    the codes again (nothing 4-bit is kept), and gives the reference product."""
    w = make_weight(64, 512, 3, 128, "int", seed=3)
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(3)).half().to(DEV)
    cfg = widen_candidates(1, w, x.dtype)[0]
    monkeypatch.setattr(triton_int, "INTERPRET", False)  # plan() is GPU-only otherwise
    monkeypatch.setattr(triton_int, "choose", lambda *a: cfg)
    calls = []
    real = triton_int.widen_triton
    monkeypatch.setattr(triton_int, "widen_triton", lambda v: calls.append(1) or real(v))
    y, call = triton_int.plan(x, w, None)
    want = x.float() @ dequantize(w).T.to(DEV)
    assert rel_err(y.float(), want) < 2e-3 and len(calls) == 1
    x2 = torch.randn(1, 512, generator=torch.Generator().manual_seed(4)).half().to(DEV)
    assert rel_err(call(x2).float(), x2.float() @ dequantize(w).T.to(DEV)) < 2e-3
    assert len(calls) == 2
