"""Pruning and low-rank composed with quantization: recipes, the masked GPTQ sweep, the sparse
int format, the whole loop on a tiny model, save/reload and healing."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from memfit.algos.gptq import gptq
from memfit.algos.prune import wanda_mask
from memfit.algos.rtn import rtn
from memfit.api import compress_
from memfit.errors import UserError
from memfit.eval.lm import evaluate_lm
from memfit.eval.memory import weight_table
from memfit.formats import grid
from memfit.formats.grid import IntFormat, minmax_params, round_params
from memfit.formats.intq import zeros_float
from memfit.formats.quant_linear import QuantLinear
from memfit.formats.lowrank import LowRankLinear
from memfit.formats.sparse import SparseIntWeight, SparseLinear
from memfit.io.save import save
from memfit.models import load_model
from memfit.recipe import PRESETS, Compose, Recipe

G = torch.Generator().manual_seed
F4 = IntFormat(bits=4, group_size=32)


def _calib(n=8, t=64):
    return torch.randint(0, 30522, (n, t), generator=G(1))


def _layer(out=48, k=128, n=512):
    """A weight and correlated inputs (so the Hessian is far from diagonal)."""
    w = torch.randn(out, k, generator=G(3))
    mix = torch.randn(k, k, generator=G(4)) / k ** 0.5 + torch.eye(k)
    x = torch.randn(n, k, generator=G(5)) @ mix * torch.linspace(0.2, 3, k)
    return w, x, 2 * x.T @ x / n


# ----- the format -------------------------------------------------------------------------------

def _on_grid(w, keep, fmt=F4):
    s, z = round_params(*minmax_params(w * keep, fmt), fmt)
    return grid.dequantize(grid.quantize(w * keep, s, z, fmt), s, z, fmt) * keep, s, z


@pytest.mark.parametrize("layout", ["bitmask", "2:4"])
def test_sparse_int_round_trip_and_bytes(layout):
    w = torch.randn(64, 256, generator=G(0))
    nm = (2, 4) if layout == "2:4" else None
    keep = wanda_mask(w, torch.ones(256), None if nm else 0.5, nm)
    w_hat, s, z = _on_grid(w, keep, IntFormat(bits=4, group_size=64))
    sw = SparseIntWeight.from_dense(w_hat, s, z, IntFormat(bits=4, group_size=64), layout)
    assert torch.equal(sw.to_dense(), w_hat)
    # 1 bit of structure + 2 bits of codes + (16 + 4) / 64 of scale and zero per weight
    assert sw.nbytes * 8 / w.numel() == 3.3125
    lin = SparseLinear(sw)
    x = torch.randn(3, 256, generator=G(1))
    assert torch.allclose(lin(x), x @ w_hat.T, atol=1e-5)
    again = SparseLinear(lin.weight_format())  # through its buffers
    assert torch.equal(again.dequantize(), w_hat)


def test_sparse_int_refuses_values_off_the_grid():
    w = torch.randn(8, 64, generator=G(0))
    keep = w.abs() > 0.5
    w_hat, s, z = _on_grid(w, keep)
    with pytest.raises(UserError, match="not on the given grid"):
        SparseIntWeight.from_dense(w_hat + 0.01 * keep, s, z, F4, "bitmask")
    sw = SparseIntWeight.from_dense(w_hat, s, z, F4, "bitmask")
    with pytest.raises(UserError, match="qdata must be uint8"):
        SparseIntWeight("bitmask", sw.pattern, sw.qdata[:-1], sw.scale, sw.zero, sw.shape, F4)


# ----- the masked GPTQ sweep ----------------------------------------------------------------------

def test_masked_gptq_keeps_zeros_and_beats_prune_then_round():
    w, x, H = _layer()
    keep = wanda_mask(w, x.pow(2).mean(0).sqrt(), 0.5)
    res = gptq(w, H, F4, mask=keep)
    w_hat = grid.dequantize(res.codes, res.scale, res.zero, F4)
    assert torch.equal(w_hat[~keep], torch.zeros(int((~keep).sum())))  # exact zeros
    r = rtn(w * keep, F4)
    w_rtn = grid.dequantize(r.codes, r.scale, r.zero, F4)
    err = lambda v: (x @ (w - v).T).pow(2).mean().item()
    print(err(w * keep), err(w_rtn), err(w_hat))
    # GPTQ compensates both the pruned and the rounded weights: below prune + RTN, and even
    # below pruning alone in float
    assert err(w_hat) < 0.8 * err(w_rtn) and err(w_hat) < err(w * keep)


def test_masked_gptq_refuses_float_zero_and_bad_mask():
    w, _, H = _layer()
    with pytest.raises(UserError, match="integer or symmetric zero"):
        gptq(w, H, IntFormat(bits=4, group_size=32, zero_point="float"), mask=w > 0)
    with pytest.raises(UserError, match="mask must be a bool"):
        gptq(w, H, F4, mask=(w > 0).float())


# ----- recipes ----------------------------------------------------------------------------------

def test_composed_recipe_from_dict_and_overrides():
    r = Recipe.from_dict({"prune": {"method": "wanda", "sparsity": 0.5},
                          "quant": {"algo": "gptq", "bits": 4, "group_size": 64},
                          "overrides": {"*.down_proj": {"quant": {"bits": 8, "group_size": None}},
                                        "*.o_proj": {"quant": None}, "*.q_proj": None}})
    assert isinstance(r.main, Compose) and r.needs_data
    down = r.spec_for("model.layers.0.mlp.down_proj")
    assert down.quant.format.bits == 8 and down.first.sparsity == 0.5
    assert r.spec_for("model.layers.0.self_attn.o_proj").method == "wanda"  # pruned only
    assert r.spec_for("model.layers.0.self_attn.q_proj") is None
    assert r.spec_for("lm_head") is None
    assert Recipe.from_dict(r.to_dict()) == r


@pytest.mark.parametrize("d, message", [
    ({"prune": {"sparsity": 0.5}, "lowrank": {"keep": 0.8}}, "prune or lowrank, not both"),
    ({"prune": {"sparsity": 0.5}, "quant": {"algo": "hqq"}}, "integer or symmetric zero"),
    ({"prune": {"method": "sparsegpt", "sparsity": 0.5},
      "quant": {"algo": "gptq", "act_order": True}}, "joint sweep"),
    ({"prune": {"sparsity": 0.5}, "quant": {"bits": 4}, "overrides": {"*": {"bits": 8}}},
     "maps parts"),
])
def test_bad_compositions_are_refused(d, message):
    with pytest.raises(UserError, match=message):
        Recipe.from_dict(d)


def _assert_reloads_exactly(m, rep, folder, transformers_too=False):
    """Saved and loaded again (memfit's loader, and transformers' when asked): same logits."""
    ids = torch.randint(0, 30522, (2, 32), generator=G(2))
    with torch.no_grad():
        before = m.model(ids).logits
    save(m.model, m.tokenizer, folder, recipe=rep["recipe"], dense_dtype="keep")
    with torch.no_grad():
        assert torch.equal(before, load_model(str(folder)).model(ids).logits)
        if transformers_too:
            assert torch.equal(before, AutoModelForCausalLM.from_pretrained(folder)(ids).logits)


# ----- the loop on a tiny model -------------------------------------------------------------------

COMPOSED = {  # recipe -> expected packed label and bits per weight
    "wanda-50-w4g32": ({"prune": {"method": "wanda", "sparsity": 0.5},
                        "quant": {"algo": "gptq", "bits": 4, "group_size": 32, "act_order": True,
                                  "clip": "mse"}}, "sparse bitmask + int4 group 32", 3.625),
    "sparsegpt-2of4-w4g32": ({"prune": {"method": "sparsegpt", "nm": "2:4"},
                              "quant": {"algo": "gptq", "bits": 4, "group_size": 32}},
                             "sparse 2:4 + int4 group 32", 3.625),
    "magnitude-50-w8": ({"prune": {"method": "magnitude", "sparsity": 0.5},
                         "quant": {"bits": 8, "group_size": None, "symmetric": True}},
                        "sparse bitmask + int8 group channel", None),
}


@pytest.mark.parametrize("name", sorted(COMPOSED))
def test_prune_plus_quant_end_to_end(name, tiny_llama_dir, tmp_path):
    d, label, bpw = COMPOSED[name]
    m = load_model(str(tiny_llama_dir))
    rep = compress_(m.model, Recipe.from_dict(d), _calib(), progress=False)
    sparse = [x for x in m.model.modules() if isinstance(x, SparseLinear)]
    assert len(sparse) == 14 and rep["modules"] == 14
    for s in sparse:
        w = s.dequantize()
        assert (w == 0).float().mean() >= 0.5
        if "2of4" in name:
            assert ((w.view(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
        f = s.weight_format()
        # every kept weight sits on its group's grid: re-encoding gives the same codes
        zeros = None if f.fmt.symmetric else zeros_float(f.zero, f.fmt, *f.scale.shape, "cpu")
        again = SparseIntWeight.from_dense(w, f.scale.float(), zeros, f.fmt, s.layout)
        assert torch.equal(again.qdata, f.qdata) and torch.equal(again.pattern, f.pattern)
    (row,) = weight_table(m.model)["packed"]
    assert row["format"].startswith(label), row
    if bpw is not None:  # 1 + 2 + (16 + 4) / 32 bits; 2:4: 2-bit index per kept = 1 per weight
        assert abs(row["bits_per_weight"] - bpw) < 0.02, row
    _assert_reloads_exactly(m, rep, tmp_path / "o", transformers_too=True)


def test_wanda_gptq_beats_wanda_rtn_on_a_tiny_model(tiny_llama_dir):
    ref = load_model(str(tiny_llama_dir)).model
    kld = {}
    for algo in ("rtn", "gptq"):
        m = load_model(str(tiny_llama_dir)).model
        r = Recipe.from_dict({"prune": {"method": "wanda", "sparsity": 0.5},
                              "quant": {"algo": algo, "bits": 3, "group_size": 32}})
        compress_(m, r, _calib(16), progress=False)
        kld[algo] = evaluate_lm(m, _calib(6), ref=ref, progress=False)["kld"]
    print(kld)
    assert kld["gptq"] < kld["rtn"]


def test_lowrank_factors_quantized_end_to_end(tiny_llama_dir, tmp_path):
    m = load_model(str(tiny_llama_dir))
    r = Recipe.from_dict({"lowrank": {"method": "wsvd", "keep": 0.6},
                          "quant": {"algo": "gptq", "bits": 8, "group_size": 32}})
    rep = compress_(m.model, r, _calib(), progress=False)
    lrs = [x for x in m.model.modules() if isinstance(x, LowRankLinear)]
    assert len(lrs) == 14
    for lr in lrs:
        assert isinstance(lr.up, QuantLinear) and isinstance(lr.down, QuantLinear)
        assert lr.rank % 32 == 0 and lr.fmt.bits == 8
    (row,) = weight_table(m.model)["packed"]
    assert row["format"].startswith("low-rank + int8 group 32") and row["modules"] == 14
    # int8 factors of ~60% of the parameters: about a fifth of the fp32 bytes
    assert 0.1 < row["bits_per_weight"] / 32 < 0.25, row
    _assert_reloads_exactly(m, rep, tmp_path / "o")


def test_healing_keeps_sparse_int_and_quantized_factors(tiny_llama_dir):
    from memfit.distill import distill_
    ref = load_model(str(tiny_llama_dir)).model
    for d, lr in ((COMPOSED["sparsegpt-2of4-w4g32"][0], 1e-3),
                  ({"lowrank": {"method": "svd", "keep": 0.6}, "quant": {"bits": 8, "group_size": 32}},
                   1e-4)):
        m = load_model(str(tiny_llama_dir)).model
        compress_(m, Recipe.from_dict(d), _calib(), progress=False)
        before = weight_table(m)
        kld0 = evaluate_lm(m, _calib(4), ref=ref, progress=False)["kld"]
        distill_(m, ref, _calib(), steps=15, lr=lr, batch_size=4, progress=False)
        after = weight_table(m)
        assert after["packed"] == before["packed"]  # same formats, same bytes
        kld1 = evaluate_lm(m, _calib(4), ref=ref, progress=False)["kld"]
        print(d, kld0, kld1)
        assert kld1 < kld0
        for s in (x for x in m.modules() if isinstance(x, SparseLinear)):
            w = s.dequantize()
            assert s.fmt is not None and ((w.view(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()


def test_composed_presets_exist():
    for name in ("wanda-50-w4g64", "sparsegpt-50-w4g64", "sparsegpt-2of4-w4g64", "wsvd-80-w8"):
        assert isinstance(PRESETS[name].main, Compose)


def test_lowrank_rank_from_energy_or_fixed_and_bad_ranks(tiny_llama_dir):
    m = load_model(str(tiny_llama_dir)).model
    compress_(m, Recipe.from_dict({"lowrank": {"method": "svd", "energy": 0.5}}), progress=False)
    ranks = {lr.rank for lr in m.modules() if isinstance(lr, LowRankLinear)}
    assert len(ranks) > 1  # per-matrix ranks from each spectrum
    m = load_model(str(tiny_llama_dir)).model
    compress_(m, Recipe.from_dict({"lowrank": {"method": "svd", "rank": 16}}), progress=False)
    assert {lr.rank for lr in m.modules() if isinstance(lr, LowRankLinear)} == {16}
    m = load_model(str(tiny_llama_dir)).model
    with pytest.raises(UserError, match="rank=65 is larger than a 64x64 matrix"):
        compress_(m, Recipe.from_dict({"lowrank": {"method": "svd", "rank": 65}}), progress=False)
    with pytest.raises(UserError, match="exactly one of lowrank keep"):
        Recipe.from_dict({"lowrank": {"keep": 0.5, "rank": 8}})


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_four_of_eight_in_a_bitmask_with_and_without_int4(method, tiny_llama_dir):
    for quant in (None, {"algo": "gptq" if method == "wanda" else "rtn", "bits": 4,
                         "group_size": 32}):
        m = load_model(str(tiny_llama_dir)).model
        d = {"prune": {"method": method, "nm": "4:8"}, **({"quant": quant} if quant else {})}
        compress_(m, Recipe.from_dict(d), _calib(), progress=False)
        sparse = [x for x in m.modules() if isinstance(x, SparseLinear)]
        assert len(sparse) == 14 and all(s.layout == "bitmask" for s in sparse)
        for s in sparse:
            w = s.dequantize()
            assert ((w.view(w.shape[0], -1, 8) != 0).sum(-1) <= 4).all()
            assert (s.fmt is None) == (quant is None)


def test_nm_that_does_not_divide_the_width_is_refused(save_tiny, tmp_path):
    d = save_tiny(tmp_path / "odd", hidden_size=76, intermediate_size=152, num_attention_heads=2,
                  num_key_value_heads=1)  # 76 inputs: whole groups of 4, not of 8
    m = load_model(str(d)).model
    with pytest.raises(UserError, match="76") as e:
        compress_(m, Recipe.from_dict({"prune": {"method": "magnitude", "nm": "4:8"}}),
                  progress=False)
    print(e.value)


def test_half_casts_float_values_but_never_an_int_grid():
    w = torch.randn(8, 64, generator=G(0))
    keep = w.abs() > 0.5
    fmt = IntFormat(bits=4, group_size=32, scale_dtype="float32")
    w_hat, s, z = _on_grid(w, keep, fmt)
    q = SparseLinear(SparseIntWeight.from_dense(w_hat, s, z, fmt, "bitmask")).half()
    assert q.scale.dtype == torch.float32 and torch.equal(q.dequantize(), w_hat)
    from memfit.formats.sparse import BitmaskWeight
    f = SparseLinear(BitmaskWeight.from_dense(w * keep)).half()
    assert f.values.dtype == torch.float16 and f.nbytes() == int(keep.sum()) * 2 + 64
