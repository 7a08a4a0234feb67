"""The compression loop on tiny models: quality ordering, bytes, resume, offload, families."""

import pytest
import torch

import memfit.api as api
from memfit.api import compress_
from memfit.errors import UserError
from memfit.eval.lm import evaluate_lm
from memfit.formats.quant_linear import QuantLinear
from memfit.models import load_model
from memfit.recipe import Recipe

G = torch.Generator().manual_seed


def _calib(n=16, t=64, vocab=30522):
    return torch.randint(0, vocab, (n, t), generator=G(1))


def _eval(n=6, t=64, vocab=30522):
    return torch.randint(0, vocab, (n, t), generator=G(2))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_gptq_beats_rtn_and_bytes_shrink(tiny_llama_dir):
    ref = load_model(str(tiny_llama_dir)).model
    kld = {}
    for preset in ("w3g64", "w3g64-gptq"):
        m = load_model(str(tiny_llama_dir)).model
        rep = compress_(m, preset, _calib(), progress=False)
        kld[preset] = evaluate_lm(m, _calib(), ref=ref, progress=False)["kld"]
        assert rep["modules"] == 14 and rep["bytes_after"] < rep["bytes_before"]
        qls = [mod for mod in m.modules() if isinstance(mod, QuantLinear)]
        assert len(qls) == 14 and all(q.fmt.bits == 3 for q in qls)
        saved = sum(q.in_features * q.out_features * 4 - q.nbytes() for q in qls)
        assert rep["bytes_before"] - rep["bytes_after"] == saved
    print(kld)
    assert kld["w3g64-gptq"] < kld["w3g64"]


def test_resume_after_interrupt_is_bit_identical(tiny_llama_dir, tmp_path, monkeypatch):
    full = load_model(str(tiny_llama_dir)).model
    compress_(full, "w4g64-gptq", _calib(), progress=False)
    expected = _state(full)

    calls = {"n": 0}
    real = api._compress_block

    def dies_on_second_block(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(api, "_compress_block", dies_on_second_block)
    m = load_model(str(tiny_llama_dir)).model
    with pytest.raises(KeyboardInterrupt):
        compress_(m, "w4g64-gptq", _calib(), checkpoint_dir=tmp_path, progress=False)
    monkeypatch.setattr(api, "_compress_block", real)
    m = load_model(str(tiny_llama_dir)).model
    rep = compress_(m, "w4g64-gptq", _calib(), checkpoint_dir=tmp_path, progress=False)
    assert rep["resumed_blocks"] == 1
    got = _state(m)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_disk_offload_matches_memory(tiny_llama_dir):
    from memfit.recipe import Calib, PRESETS
    from dataclasses import replace
    a = load_model(str(tiny_llama_dir)).model
    compress_(a, "w4g64-gptq", _calib(), progress=False)
    b = load_model(str(tiny_llama_dir)).model
    disk = replace(PRESETS["w4g64-gptq"], calib=Calib(offload="disk"))
    compress_(b, disk, _calib(), progress=False)
    sa, sb = _state(a), _state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_nan_weight_is_refused_with_its_name(tiny_llama_dir):
    m = load_model(str(tiny_llama_dir)).model
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has NaN"):
        compress_(m, "w4g64", progress=False)


def test_group_larger_than_width_is_refused(tiny_llama_dir):
    m = load_model(str(tiny_llama_dir)).model
    recipe = Recipe.from_dict({"quant": {"bits": 4, "group_size": 256}})  # widths are 64/128
    with pytest.raises(UserError, match="divides nothing"):
        compress_(m, recipe, progress=False)


@pytest.mark.parametrize("model_type, kw", [("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4}),
                                            ("qwen2", {}), ("phi3", {})])
def test_other_families_compress(model_type, kw, save_tiny, tmp_path):
    d = save_tiny(tmp_path / model_type, model_type=model_type, **kw)
    ref = load_model(str(d)).model
    m = load_model(str(d)).model
    compress_(m, "w8-gptq", _calib(8), progress=False)
    res = evaluate_lm(m, _eval(), ref=ref, progress=False)
    assert res["kld"] < 1e-3 and res["top1_agreement"] > 0.95, res


def test_bert_encoder_blocks_compress(tiny_config):
    from transformers import AutoModel
    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_config("bert", num_key_value_heads=None)).eval()
    ids = torch.randint(0, 30522, (4, 32), generator=G(3))
    with torch.no_grad():
        before = model(ids).last_hidden_state
    compress_(model, "w8-gptq", ids, progress=False)
    assert sum(isinstance(x, QuantLinear) for x in model.modules()) == 12
    with torch.no_grad():
        after = model(ids).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(before.flatten(1), after.flatten(1)).min()
    assert cos > 0.999, cos


@pytest.mark.parametrize("preset, kind, bpw_range", [
    ("magnitude-50", "sparse bitmask", (16.9, 17.1)),   # fp32 values of half + 1 bit each
    ("wanda-2of4", "sparse 2:4", (16.9, 17.1)),         # fp32 values of half + 2 bits per kept
    ("sparsegpt-50", "sparse bitmask", (16.9, 17.1)),
    ("wsvd-80", "low-rank", (25.0, 25.7)),               # 80% of fp32 parameters
])
def test_prune_and_lowrank_save_bytes_and_reload(preset, kind, bpw_range, tiny_llama_dir, tmp_path):
    from memfit.eval.memory import weight_table
    from memfit.io.save import save
    m = load_model(str(tiny_llama_dir))
    rep = compress_(m.model, preset, _calib(8), progress=False)
    packed = weight_table(m.model)["packed"]
    assert [p["format"] for p in packed] == [kind] and packed[0]["modules"] == 14
    assert bpw_range[0] < packed[0]["bits_per_weight"] < bpw_range[1], packed
    assert rep["bytes_after"] < rep["bytes_before"]
    ids = _eval(2, 32)
    with torch.no_grad():
        before = m.model(ids).logits
    save(m.model, m.tokenizer, tmp_path / "o", recipe=rep["recipe"], dense_dtype="keep")
    with torch.no_grad():
        assert torch.equal(before, load_model(str(tmp_path / "o")).model(ids).logits)


def test_sparsegpt_and_wanda_beat_magnitude_and_wsvd_beats_svd(tiny_llama_dir):
    ref = load_model(str(tiny_llama_dir)).model
    kld = {}
    for preset in ("magnitude-50", "wanda-50", "sparsegpt-50", "svd-80", "wsvd-80"):
        m = load_model(str(tiny_llama_dir)).model
        compress_(m, preset, _calib(), progress=False)
        kld[preset] = evaluate_lm(m, _calib(), ref=ref, progress=False)["kld"]
    print(kld)
    assert kld["sparsegpt-50"] < kld["magnitude-50"] and kld["wanda-50"] < kld["magnitude-50"]
    assert kld["wsvd-80"] < kld["svd-80"]


def test_two_of_four_pattern_holds_in_every_matrix(tiny_llama_dir):
    from memfit.formats.sparse import SparseLinear
    m = load_model(str(tiny_llama_dir)).model
    compress_(m, "sparsegpt-2of4", _calib(8), progress=False)
    sparse = [x for x in m.modules() if isinstance(x, SparseLinear)]
    assert len(sparse) == 14
    for s in sparse:
        w = s.dequantize()
        assert ((w.view(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()


def test_structured_then_quant_reloads_with_plain_transformers(tiny_llama_dir, save_tiny, tmp_path):
    from transformers import AutoModelForCausalLM
    d = save_tiny(tmp_path / "four", num_hidden_layers=4)
    m = load_model(str(d))
    recipe = Recipe.from_dict({"structured": {"drop_blocks": 2, "mlp_keep": 0.5}})
    rep = compress_(m.model, recipe, _calib(8), progress=False)
    assert rep["blocks"] == 2 and m.model.config.num_hidden_layers == 2
    assert m.model.config.intermediate_size == 64
    m.model.save_pretrained(tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = _eval(2, 32)
    with torch.no_grad():
        assert torch.equal(m.model(ids).logits, again(ids).logits)
    m2 = load_model(str(d))
    both = Recipe.from_dict({"structured": {"drop_blocks": 1}, "quant": {"bits": 8, "group_size": None,
                                                                         "symmetric": True}})
    compress_(m2.model, both, _calib(8), progress=False)
    assert sum(isinstance(x, QuantLinear) for x in m2.model.modules()) == 21


def test_owl_gives_outlier_blocks_lower_sparsity(save_tiny, tmp_path):
    from memfit.formats.sparse import SparseLinear
    d = save_tiny(tmp_path / "m", num_hidden_layers=3)
    m = load_model(str(d)).model
    with torch.no_grad():  # block 1 gets a few huge weights: many Wanda-score outliers
        for lin in (m.model.layers[1].mlp.up_proj, m.model.layers[1].self_attn.q_proj):
            lin.weight[:, :4] *= 40.0
    rep = compress_(m, "wanda-50-owl", _calib(8), progress=False)
    s = rep["owl_sparsities"]
    assert len(s) == 3 and abs(sum(s) / 3 - 0.5) < 1e-9 and min(s) == s[1]
    assert all(0.42 - 1e-9 <= x <= 0.58 + 1e-9 for x in s)
    block1 = [x for x in m.model.layers[1].modules() if isinstance(x, SparseLinear)]
    zeros = sum(int((x.dequantize() == 0).sum()) for x in block1)
    numel = sum(x.in_features * x.out_features for x in block1)
    assert abs(zeros / numel - s[1]) < 0.01


def test_groups_collected_in_one_pass_match_one_pass_each(tiny_llama_dir):
    """collect_stats over several groups at once (sequential block, OWL) gives each group the
    statistics a pass of its own gives: shared within a group, separate across groups."""
    from memfit.archs import arch_for, block_list
    from memfit.calib import capture_inputs, collect_stats

    m = load_model(str(tiny_llama_dir)).model
    arch = arch_for(m.config)
    block = block_list(m, arch)[0]
    store, block_kwargs = capture_inputs(m, block_list(m, arch), _calib(4), offload="memory")
    kwargs = block_kwargs[0]
    groups = [{n: block.get_submodule(n) for n in g} for g in arch.groups]
    from memfit.configs import Needs
    needs = {n: Needs.HESSIAN for g in arch.groups for n in g}
    together = collect_stats(block, groups, needs, store, kwargs)
    for g in groups:
        alone = collect_stats(block, g, needs, store, kwargs)
        for n in g:
            torch.testing.assert_close(together[n].hessian, alone[n].hessian, rtol=0, atol=0)
        assert len({id(together[n]) for n in g}) == 1
    assert len({id(s) for s in together.values()}) == len(groups)


def test_block_sequential_uses_the_uncompressed_block_for_every_group(tiny_llama_dir):
    """sequential: block gives o_proj the statistics of the dense attention (so its mask equals
    a one-shot Wanda on the block's dense inputs); group gives it the pruned q/k/v's outputs."""
    masks = {}
    for seq in ("group", "block"):
        m = load_model(str(tiny_llama_dir)).model
        r = Recipe.from_dict({"prune": {"method": "wanda", "sparsity": 0.5},
                              "calib": {"sequential": seq}})
        compress_(m, r, _calib(8), progress=False)
        layer = m.model.layers[0]
        masks[seq] = {n: layer.get_submodule(n).dequantize() != 0
                      for n in ("self_attn.q_proj", "self_attn.o_proj")}
    assert torch.equal(masks["group"]["self_attn.q_proj"], masks["block"]["self_attn.q_proj"])
    assert not torch.equal(masks["group"]["self_attn.o_proj"], masks["block"]["self_attn.o_proj"])
    with pytest.raises(UserError, match="unknown sequential"):
        Recipe.from_dict({"prune": {"sparsity": 0.5}, "calib": {"sequential": "layer"}})


@pytest.mark.parametrize("recipe, order", [
    ({"prune": {"method": "wanda", "sparsity": 0.5}}, "block"),
    ({"prune": {"method": "wanda", "nm": "2:4"}}, "block"),
    ({"prune": {"method": "wanda", "sparsity": 0.5, "owl": True}}, "block"),
    ({"prune": {"method": "wanda", "sparsity": 0.5}, "overrides": {"*.o_proj": None}}, "block"),
    ({"prune": {"method": "sparsegpt", "sparsity": 0.5}}, "group"),
    ({"prune": {"method": "magnitude", "sparsity": 0.5}}, "group"),
    ({"prune": {"method": "wanda", "sparsity": 0.5}, "quant": {"algo": "gptq", "bits": 4,
                                                               "group_size": 64}}, "group"),
    ({"prune": {"method": "wanda", "sparsity": 0.5},
      "overrides": {"*.o_proj": {"method": "sparsegpt", "sparsity": 0.5}}}, "group"),
    ({"quant": {"algo": "gptq", "bits": 4, "group_size": 64}}, "group"),
    ({"prune": {"method": "wanda", "sparsity": 0.5}, "calib": {"sequential": "group"}}, "group"),
    ({"prune": {"method": "sparsegpt", "sparsity": 0.5}, "calib": {"sequential": "block"}},
     "block"),
])
def test_auto_sequential_is_block_for_wanda_alone(recipe, order):
    r = Recipe.from_dict(recipe)
    assert r.sequential == order
    assert Recipe.from_dict(r.to_dict()).sequential == order
