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
@pytest.mark.parametrize("tokens", [5, 40, 400])  # (token, slot) pairs 30: routed GEMV; 240:
def test_experts_routed_path_equals_the_loop(tiny_config, monkeypatch, recipe, tokens):
    # grouped; 2400 = 600 an expert: past GROUPED_PER_EXPERT, the loop
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
    ids = torch.randint(0, 30522, (3, tokens), device=DEV)
    with torch.no_grad():
        monkeypatch.setenv("MEMFIT_MOE_ROUTED", "0")
        loop = model(ids).logits
        monkeypatch.setenv("MEMFIT_MOE_ROUTED", "1")
        calls = {"moe_linear": 0, "moe_grouped": 0}

        def counted(name, f):
            def call(*a, **kw):
                calls[name] += 1
                return f(*a, **kw)
            return call
        for name in calls:
            monkeypatch.setattr(triton_moe, name, counted(name, getattr(triton_moe, name)))
        routed = model(ids).logits
    if tokens == 400:
        assert sum(calls.values()) == 0 and torch.equal(routed, loop)
        return
    assert model.model.layers[0].mlp.experts._tables is not None  # the routed kernel ran
    form = "moe_linear" if tokens == 5 else "moe_grouped"
    assert calls[form] == 3 * model.config.num_hidden_layers and sum(calls.values()) == calls[form]
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


@pytest.mark.parametrize("n,k,bits,group,zp", CASES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("join", [False, True])  # 4-bit: nibbles interleaved, or two dots
def test_grouped_kernel_matches_each_pairs_expert(n, k, bits, group, zp, bias, join,
                                                  monkeypatch):
    """The prefill form: 40 tokens x 2 slots over 3 experts (one expert
    gets no pair, one slot names no expert), each pair's output against its expert's
    dequantized weight; a token's row is read by both of its slots (x_div 2)."""
    if join and bits != 4:
        pytest.skip("JOIN is a 4-bit layout choice")
    monkeypatch.setattr(triton_moe, "GROUP_JOIN", join)
    experts = [make_weight(n, k, bits, group, zp, seed=10 * e + n) for e in range(4)]
    biases = [torch.randn(n, generator=torch.Generator().manual_seed(e)).to(DEV) if bias else None
              for e in range(4)]
    table = triton_moe.Table(experts, biases)
    gen = torch.Generator().manual_seed(n)
    tokens = 40
    x = torch.randn(tokens, k, generator=gen).to(DEV)
    ids = torch.randint(0, 3, (tokens, 2), generator=gen)  # expert 3: no pair
    ids[5, 1] = 4  # a slot no expert takes
    ids = ids.to(DEV)
    got = triton_moe.moe_grouped(x, triton_moe.Groups(ids, 4), table, x_div=2)
    assert got.shape == (tokens * 2, n)
    for p in range(tokens * 2):
        e = int(ids.reshape(-1)[p])
        if e >= 4:
            assert torch.equal(got[p], torch.zeros_like(got[p]))
            continue
        want = x[p // 2] @ dequantize(experts[e]).T.to(DEV).float() + (biases[e] if bias else 0)
        assert rel_err(got[p], want) < 1e-5, (p, e)


def test_grouped_kernel_dense_experts_and_groups():
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(50, 200, generator=gen).to(DEV) for _ in range(5)]
    table = triton_moe.Table(weights, [None] * 5)
    ids = torch.tensor([4] * 70 + [0] * 3 + [2] * 17, dtype=torch.int64).to(DEV)  # blocks of 16
    g = triton_moe.Groups(ids, 5)
    assert g.counts.tolist() == [3, 0, 17, 0, 70]
    assert ids[g.order.long()].tolist() == sorted(ids.tolist())
    x = torch.randn(90, 200, generator=gen).to(DEV)
    got = triton_moe.moe_grouped(x, g, table)
    want = torch.stack([x[p] @ weights[int(ids[p])].T for p in range(90)])
    assert rel_err(got, want) < 1e-6


MMA_CASES = [  # (n, k, group, zero point, bias, x_div, split, (BN, warps, rows a call, tiles
    # ahead, asm epilogue)): one expert named twice, one never
    (128, 256, 128, "int", False, 2, 1, (64, 4, 1, 1, False)),
    (64, 512, 64, "sym", True, 1, 2, (64, 4, 2, 1, True)),
    (256, 1280, 128, "int", True, 2, 3, (128, 4, 4, 2, False)),  # 10 tiles split 3: uneven
    (128, 512, 32, "int", False, 1, 4, (128, 4, 4, 1, True)),
    (96, 384, 128, "sym", False, 4, 2, (256, 8, 2, 2, False))]  # rows past N masked


@pytest.mark.parametrize("n,k,group,zp,bias,x_div,split,shape", MMA_CASES)
@pytest.mark.parametrize("order", [1, 2])  # the pairs as the grid's last or first axis
def test_mma_rows_match_each_rows_expert(n, k, group, zp, bias, x_div, split, shape, order):
    """moe_mma's kernel (memfit.kernels.triton_mma's M = 1 kernel, ROUTED): each row through
    the expert its id names, at that expert's table offsets, reading token r // x_div, split K
    ways (partials and arrival counters of its own); on a GPU in the launch shapes the dense
    chooser picks at M = 1 (two tiles ahead folded in the asm, the asm epilogue)."""
    from memfit.kernels.triton_mma import run_mma

    experts = [make_weight(n, k, 4, group, zp, seed=7 * e + n, scale_dtype=torch.bfloat16)
               for e in range(4)]
    biases = [torch.randn(n, generator=torch.Generator().manual_seed(e)).to(DEV) if bias else None
              for e in range(4)]
    table = triton_moe.Table(experts, biases)
    ids = torch.tensor([3, 1, 0, 3], dtype=torch.int32, device=DEV)
    x = torch.randn(4 // x_div, k, generator=torch.Generator().manual_seed(n)).to(DEV).bfloat16()
    bn, warps, reps, ahead, epi = shape
    route = (ids, triton_moe.mma_offsets(table), x_div, order)
    got = run_mma(x, table.first, table.bias, bn, split, warps, epi=epi, reps=reps,
                  prefetch=ahead, route=route)
    assert got.shape == (4, n) and got.dtype == torch.bfloat16
    for r in range(4):
        e = int(ids[r])
        want = x[r // x_div].float() @ dequantize(experts[e]).T.to(DEV).float() \
            + (biases[e] if bias else 0)
        assert rel_err(got[r].float(), want) < 8e-3, (r, e)  # the bf16 output's rounding
        other = x[r // x_div].float() @ dequantize(experts[(e + 1) % 4]).T.to(DEV).float()
        assert rel_err(got[r].float(), other) > 0.5  # another expert's sum is far off
    again = run_mma(x, table.first, table.bias, bn, split, warps, epi=epi, reps=reps,
                    prefetch=ahead, route=route)
    assert torch.equal(again, got)  # the split-K counters were left at zero


def test_moe_linear_takes_the_mma_form_for_distinct_experts(monkeypatch):
    """One token's rows (distinct experts) take moe_mma; many rows over few experts, float32
    activations, 8-bit codes or float zero points take `_moe_gemv`; both agree."""
    experts = [make_weight(64, 256, 4, 64, "int", seed=e, scale_dtype=torch.bfloat16)
               for e in range(8)]
    table = triton_moe.Table(experts, [None] * 8)
    bf = torch.bfloat16
    assert triton_moe.mma_form(table, bf, 2, 2) and triton_moe.mma_form(table, bf, 8, 8)
    assert triton_moe.mma_form(table, bf, 4, 2)  # 2 tokens x top-2 of 8: 4 / 3.5 distinct
    assert not triton_moe.mma_form(table, bf, 16, 2)  # 8 tokens: 16 / 7.2 distinct
    assert not triton_moe.mma_form(table, torch.float32, 2, 2)
    eight = triton_moe.Table([make_weight(64, 256, 8, 64, "int", seed=e) for e in range(8)],
                             [None] * 8)
    flt = triton_moe.Table([make_weight(64, 256, 4, 64, "float", seed=e) for e in range(8)],
                           [None] * 8)
    assert not triton_moe.mma_form(eight, bf, 2, 2) and not triton_moe.mma_form(flt, bf, 2, 2)
    calls = []
    real = triton_moe.moe_mma
    monkeypatch.setattr(triton_moe, "moe_mma", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(3)).to(DEV).to(bf)
    ids = torch.tensor([5, 2], dtype=torch.int32, device=DEV)
    got = triton_moe.moe_linear(x, ids, table, 2)
    assert calls == [1]
    monkeypatch.setattr(triton_moe, "MMA_ROWS", False)
    want = triton_moe.moe_linear(x, ids, table, 2)  # `_moe_gemv` on the repeated rows
    assert calls == [1] and rel_err(got.float(), want.float()) < 8e-3


def test_experts_one_token_takes_the_mma_form(tiny_config, monkeypatch):
    """A bf16 tiny Mixtral (hidden 128, intermediate 256), 4-bit experts: a one-token step's
    three projections a layer take moe_mma (gate and up read the token's row for both slots,
    not a copy), and its logits match the loop's."""
    from transformers import AutoModelForCausalLM

    from memfit.api import compress_
    from memfit.moe import unfuse_experts_

    torch.manual_seed(0)
    cfg = tiny_config("mixtral", num_local_experts=4, num_experts_per_tok=2, hidden_size=128,
                      intermediate_size=256)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    unfuse_experts_(model)
    compress_(model, "w4g64", progress=False)
    model = model.to(DEV, torch.bfloat16)
    ids = torch.randint(0, 30522, (1, 1), device=DEV)
    calls = []
    real = triton_moe.moe_mma
    monkeypatch.setattr(triton_moe, "moe_mma", lambda *a: calls.append(a[0].shape) or real(*a))
    with torch.no_grad():
        monkeypatch.setenv("MEMFIT_MOE_ROUTED", "0")
        loop = model(ids).logits.float()
        monkeypatch.setenv("MEMFIT_MOE_ROUTED", "1")
        routed = model(ids).logits.float()
    assert calls == [(1, 128), (1, 128), (2, 256)] * cfg.num_hidden_layers
    assert rel_err(routed, loop) < 2e-2  # bf16 activations, other summation orders


def test_3bit_experts_are_widened_for_the_routed_kernels(tiny_config, monkeypatch):
    """In the decode loop's layout 3-bit experts hold 4-bit codes, untiled: the routed kernel
    takes them (its tables built from the widened tensors), the logits are the stored 3-bit
    model's (its per-expert loop), and on exit every tensor is the stored one again."""
    from transformers import AutoModelForCausalLM

    from memfit import fastdecode
    from memfit.api import compress_
    from memfit.decode import _expert_ids
    from memfit.moe import unfuse_experts_

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("mixtral", num_local_experts=4,
                                                         num_experts_per_tok=2)).eval().to(DEV)
    unfuse_experts_(model)
    compress_(model, "w3g64", progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 30522, (1, 3), device=DEV)
    ex = model.model.layers[0].mlp.experts
    with torch.no_grad():
        monkeypatch.setenv("MEMFIT_MOE_ROUTED", "1")
        loop = model(ids).logits  # 3-bit experts: no routed kernel, the loop
        assert ex._tables is None
        tiling = fastdecode.Tiling(model, 1, 16)
        with fastdecode.tiled_linears(model, tiling, untiled=_expert_ids(model)):
            gate = ex.experts()[0].gate_proj
            assert gate.held_bits == 4 and gate.tile_rows == 0
            assert model.model.layers[0].self_attn.q_proj.held_bits == 4  # (64 codes a row:
            # not tileable)
            routed = model(ids).logits
            assert ex._tables is not None  # the routed kernel ran on the widened experts
    assert rel_err(routed, loop) < 5e-3  # the loop's CPU int kernels round to bfloat16
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert ex._tables is None  # no table keeps the widened tensors alive
