"""W8A8Linear and the W8A8 recipes on a tiny Llama: close to the float layer (numbers printed),
saved and loaded bit for bit, SmoothQuant's fold leaves the float function unchanged and lowers
the activation rounding error where a channel has outliers, and bad options are refused."""

import pytest
import torch

from memfit.api import compress_
from memfit.errors import UserError
from memfit.eval.lm import evaluate_lm
from memfit.formats import grid
from memfit.formats.grid import IntFormat
from memfit.formats.intq import PackedIntWeight
from memfit.formats.w8a8 import W8_FORMAT, W8A8Linear
from memfit.io.export_ct import unrepresentable
from memfit.io.save import save
from memfit.models import load_model
from memfit.recipe import PRESETS, Recipe

G = torch.Generator().manual_seed


def _w8a8(w, bias=None, static=False):
    scale, zero = grid.round_params(*grid.minmax_params(w, W8_FORMAT), W8_FORMAT)
    packed = PackedIntWeight.from_codes(grid.quantize(w, scale, zero, W8_FORMAT), scale, None,
                                        W8_FORMAT)
    return W8A8Linear.from_packed(packed, bias, static=static)


def test_close_to_the_float_layer_and_protocol():
    w, b = torch.randn(96, 128, generator=G(0)) * 0.05, torch.randn(96, generator=G(1))
    x = torch.randn(3, 10, 128, generator=G(2))
    m = _w8a8(w, b)
    y, ref = m(x), torch.nn.functional.linear(x, w, b)
    rel = ((y - ref).norm() / ref.norm()).item()
    print(f"W8A8 vs float: relative error {rel:.2e}")
    assert rel < 0.01 and y.shape == ref.shape and y.dtype == x.dtype
    assert m.nbytes() == 96 * 128 + 96 * 2  # int8 codes + float16 scales
    assert torch.allclose(m.dequantize(), w, atol=w.abs().max().item() / 127)
    assert m.describe() == {"fmt": W8_FORMAT.to_dict(), "in_features": 128, "out_features": 96,
                            "bias": True, "static": False}
    m.half()
    assert m.scale.dtype == torch.float16 and m.bias.dtype == torch.float16


def test_static_scale_saturates_beyond_the_calibrated_range():
    w = torch.randn(16, 32, generator=G(0))
    m = _w8a8(w, static=True)
    with pytest.raises(UserError, match="not positive"):
        m.set_input_scale(0.0)
    m.set_input_scale(2.0)
    x = torch.full((1, 32), 5.0)  # beyond 2.0: clamped to 127 * (2 / 127)
    assert torch.allclose(m(x), m(torch.full((1, 32), 2.0)))
    with pytest.raises(UserError, match="per token"):
        _w8a8(w).set_input_scale(1.0)


def test_bad_formats_and_options_are_refused():
    with pytest.raises(UserError, match="8-bit symmetric per-channel"):
        W8A8Linear(8, 8, IntFormat(bits=8, group_size=8, symmetric=True), bias=False)
    q = {"algo": "rtn", "bits": 8, "group_size": None, "symmetric": True, "act_bits": 8}
    for alpha in (0, 0.0, -0.5, 1.5, True):
        with pytest.raises(UserError, match=r"outside \(0, 1\]"):
            Recipe.from_dict({"quant": {**q, "smoothquant": alpha}})
    with pytest.raises(UserError, match="8-bit symmetric per-channel"):
        Recipe.from_dict({"quant": {**q, "bits": 4, "group_size": 64}})
    with pytest.raises(UserError, match="act_bits=4"):
        Recipe.from_dict({"quant": {**q, "act_bits": 4}})
    with pytest.raises(UserError, match="add act_bits: 8"):
        Recipe.from_dict({"quant": {"algo": "rtn", "bits": 8, "group_size": None,
                                    "smoothquant": 0.5}})
    with pytest.raises(UserError, match="choose one"):
        Recipe.from_dict({"quant": {**q, "smoothquant": 0.5, "awq": True}})


def test_recipes_round_trip_and_weight_only_recipes_are_unchanged():
    for name in ("w8a8", "w8a8-sq"):
        r = PRESETS[name]
        assert Recipe.from_dict(r.to_dict()) == r and r.quant.act_bits == 8
    assert PRESETS["w8a8-sq"].quant.smoothquant == 0.5 and PRESETS["w8a8-sq"].needs_data
    assert not PRESETS["w8a8"].needs_data
    assert "act_bits" not in PRESETS["w8"].to_dict()["quant"]


def test_static_without_calibration_data_is_refused(tiny_llama_dir):
    m = load_model(str(tiny_llama_dir))
    static = Recipe.from_dict({"quant": {"algo": "rtn", "bits": 8, "group_size": None,
                                         "symmetric": True, "act_bits": 8, "act_static": True}})
    with pytest.raises(UserError, match="needs calibration data"):
        compress_(m.model, static, None, progress=False)


def _calib():
    return torch.randint(0, 30522, (8, 64), generator=G(1))


def test_saved_and_loaded_bit_for_bit(tiny_llama_dir, tmp_path):
    m = load_model(str(tiny_llama_dir))
    r = Recipe.from_dict({"quant": {"algo": "rtn", "bits": 8, "group_size": None,
                                    "symmetric": True, "act_bits": 8, "act_static": True,
                                    "smoothquant": 0.5}})
    compress_(m.model, r, _calib(), progress=False)
    layers = [x for x in m.model.modules() if isinstance(x, W8A8Linear)]
    assert len(layers) == 14 and all(x.static and float(x.input_scale) > 0 for x in layers)
    assert "W8A8 layers" in next(iter(unrepresentable(m.model).values()))
    save(m.model, m.tokenizer, tmp_path / "q", recipe=r.to_dict(), dense_dtype="keep")
    back = load_model(str(tmp_path / "q")).model
    ids = torch.randint(0, 30522, (2, 32), generator=G(3))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, m.model(ids).logits)


def _outlier_model(tiny_llama_dir):
    """The tiny model with an activation outlier channel: input_layernorm channel 5 x 30 (as in
    real LLMs), weights of q/k/v divided back so the float function is the same."""
    m = load_model(str(tiny_llama_dir))
    with torch.no_grad():
        for layer in m.model.model.layers:
            layer.input_layernorm.weight[5] *= 30
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.weight[:, 5] /= 30
    return m


def test_smoothquant_keeps_the_function_and_helps_with_outliers(tiny_llama_dir):
    from memfit.archs import arch_for, block_list
    from memfit.calib import capture_inputs, propagate
    from memfit.smoothquant import smooth_block_

    ev = torch.randint(0, 30522, (4, 64), generator=G(2))
    ref = _outlier_model(tiny_llama_dir).model
    # the fold alone (no quantization) leaves the logits as they were
    m = _outlier_model(tiny_llama_dir).model
    arch = arch_for(m.config)
    blocks = block_list(m, arch)
    store, kwargs = capture_inputs(m, blocks, _calib())
    spec = PRESETS["w8a8-sq"].quant
    log = []
    for i, block in enumerate(blocks):
        smooth_block_(block, arch, {n: spec for g in arch.groups for n in g}, store, kwargs[i], log)
        propagate(block, store, kwargs[i])
    with torch.no_grad():
        diff = (m(ev).logits - ref(ev).logits).abs().max().item()
    assert diff < 1e-4
    assert any("skipped" in e["smoothquant"] for e in log)  # o_proj under grouped-query attention
    folded = [e["smoothquant"] for e in log if "alpha" in e["smoothquant"]]
    assert len(folded) == 2 * 3 and all(a[1] < a[0] for a in (f["act_absmax"] for f in folded[:1]))
    kld = {}
    for name in ("w8a8", "w8a8-sq"):
        q = _outlier_model(tiny_llama_dir).model
        compress_(q, name, _calib(), progress=False)
        kld[name] = evaluate_lm(q, ev, ref=ref, progress=False)["kld"]
    print(kld)
    assert kld["w8a8-sq"] < kld["w8a8"]


def test_smoothquant_fold_keeps_a_gemma_model(tiny_config):
    """Gemma's norms scale by (1 + w): SmoothQuant's fold through them leaves the logits."""
    from transformers import AutoModelForCausalLM

    from memfit.archs import arch_for, block_list
    from memfit.calib import capture_inputs, propagate
    from memfit.smoothquant import smooth_block_

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(tiny_config("gemma3_text", head_dim=16)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=G(3)) * 0.5)
    ev = torch.randint(0, 30522, (2, 32), generator=G(2))
    with torch.no_grad():
        before = m(ev).logits
    arch = arch_for(m.config)
    blocks = block_list(m, arch)
    store, kwargs = capture_inputs(m, blocks, _calib())
    spec, log = PRESETS["w8a8-sq"].quant, []
    for i, block in enumerate(blocks):
        smooth_block_(block, arch, {n: spec for g in arch.groups for n in g}, store, kwargs[i], log)
        propagate(block, store, kwargs[i])
    with torch.no_grad():
        diff = (m(ev).logits - before).abs().max().item()
    assert sum("alpha" in e["smoothquant"] for e in log) >= 2 * 2
    assert diff < 1e-4 * before.abs().max().item()
