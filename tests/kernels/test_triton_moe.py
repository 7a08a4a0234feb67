"""The routed mixture-of-experts GEMV (memfit.kernels.triton_moe) against dequantize + matmul per
row; the Experts module's routed path against its host-synced loop. On a CPU-only machine this
runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET)."""

import pytest
import torch

triton_moe = pytest.importorskip("memfit.kernels.triton_moe")

from memfit.kernels.weights import dequantize
from tests.kernels.test_triton_int import DEV, make_weight, rel_err

CASES = [  # (n, k, bits, group, zero point)
    (70, 256, 4, 64, "int"), (64, 256, 4, 32, "sym"), (33, 384, 4, 128, "float"),
    (48, 256, 8, None, "sym"), (40, 192, 8, 64, "int"), (64, 1024, 4, 128, "int"),  # split K
]


@pytest.mark.parametrize("n,k,bits,group,zp", CASES)
@pytest.mark.parametrize("rows", [1, 3, 6])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("fma_rows", [0, 4])  # tensor cores only; multiply-adds up to 4 rows
def test_routed_gemv_matches_each_rows_expert(n, k, bits, group, zp, rows, bias, fma_rows,
                                              monkeypatch):
    monkeypatch.setattr(triton_moe, "FMA_ROWS", fma_rows)
    experts = [make_weight(n, k, bits, group, zp, seed=10 * e + n) for e in range(3)]
    biases = [torch.randn(n, generator=torch.Generator().manual_seed(e)).to(DEV) if bias else None
              for e in range(3)]
    assert triton_moe.same_kind(experts) is None
    table = triton_moe.Table(experts, biases)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=gen).to(DEV)
    ids = torch.tensor([2, 0, 1, 2, 2, 1][:rows], dtype=torch.int32, device=DEV)
    got = triton_moe.moe_linear(x, ids, table)
    for r in range(rows):
        e = int(ids[r])
        want = x[r] @ dequantize(experts[e]).T.to(DEV).float() \
            + (biases[e] if bias else 0)
        assert rel_err(got[r], want) < 1e-5, (r, e)


def test_routed_gemv_dense_experts():
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(50, 200, generator=gen).to(DEV) for _ in range(4)]
    table = triton_moe.Table(weights, [None] * 4)
    x = torch.randn(5, 200, generator=gen).to(DEV)
    ids = torch.tensor([3, 3, 0, 1, 2], dtype=torch.int32, device=DEV)
    got = triton_moe.moe_linear(x, ids, table)
    want = torch.stack([x[r] @ weights[int(ids[r])].T for r in range(5)])
    assert rel_err(got, want) < 1e-6


def test_refusals_name_the_reason():
    a, b = make_weight(32, 128, 4, 64, "int"), make_weight(32, 128, 4, 32, "int")
    assert "different formats" in triton_moe.same_kind([a, b])
    assert "2-bit" in triton_moe.same_kind([make_weight(32, 128, 2, 64, "int")])
    assert "group size 16" in triton_moe.same_kind([make_weight(32, 128, 4, 16, "int")])


@pytest.mark.parametrize("recipe", [None, "w4g64", "w8", "w4g64-hqq"])
def test_experts_routed_path_equals_the_loop(tiny_config, monkeypatch, recipe):
    """A tiny Mixtral's logits with the routed kernel (MEMFIT_MOE_ROUTED=1 off CUDA) equal those
    of the per-expert loop, dense or packed experts; the packed loop itself is checked against
    transformers in tests/core/test_moe.py."""
    from transformers import AutoModelForCausalLM

    from memfit.api import compress_
    from memfit.moe import unfuse_experts_

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("mixtral", num_local_experts=4,
                                                         num_experts_per_tok=2)).eval().to(DEV)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    unfuse_experts_(model)
    if recipe:
        compress_(model, recipe, progress=False)
    ids = torch.randint(0, 30522, (3, 5), device=DEV)
    with torch.no_grad():
        monkeypatch.setenv("MEMFIT_MOE_ROUTED", "0")
        loop = model(ids).logits
        monkeypatch.setenv("MEMFIT_MOE_ROUTED", "1")
        routed = model(ids).logits
    assert model.model.layers[0].mlp.experts._tables is not None  # the routed kernel ran
    assert rel_err(routed, loop) < 1e-3  # the loop's CPU int kernels round differently


def test_a_failing_routed_kernel_falls_back_to_the_loop(tiny_config, monkeypatch):
    from transformers import AutoModelForCausalLM

    import memfit.kernels.triton_moe as tm
    from memfit.moe import unfuse_experts_

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("mixtral", num_local_experts=4,
                                                         num_experts_per_tok=2)).eval().to(DEV)
    unfuse_experts_(model)
    ids = torch.randint(0, 30522, (1, 4), device=DEV)
    with torch.no_grad():
        monkeypatch.setenv("MEMFIT_MOE_ROUTED", "0")
        loop = model(ids).logits
        monkeypatch.setenv("MEMFIT_MOE_ROUTED", "1")

        def broken(*_a, **_k):
            raise RuntimeError("no kernel image for this device")
        monkeypatch.setattr(tm, "moe_linear", broken)
        with pytest.warns(UserWarning, match="routed experts kernel failed"):
            got = model(ids).logits
    assert torch.equal(got, loop)
    assert model.model.layers[0].mlp.experts._routed_off
