import json

import pytest
import yaml

from memfit.errors import UserError
from memfit.formats.grid import IntFormat
from memfit.recipe import PRESETS, Quant, Recipe, load_recipe


def test_presets_round_trip_through_dicts():
    for name, r in PRESETS.items():
        assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r, name
    for name in ("w8", "w4g64", "w4g64-hqq", "w4g64-gptq", "w4g128-gptq", "w3g64", "w3g64-gptq"):
        assert name in PRESETS


def test_yaml_file_with_overrides(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump({
        "quant": {"algo": "gptq", "bits": 3, "group_size": 64, "act_order": True},
        "ignore": ["lm_head", "*.k_proj"],
        "overrides": {"*.down_proj": {"bits": 8, "group_size": None}, "*.layers.0.*": None},
        "calib": {"samples": 8, "seq_len": 128}}))
    r = load_recipe(str(f))
    assert r.spec_for("model.layers.3.self_attn.q_proj").format == IntFormat(bits=3, group_size=64)
    assert r.spec_for("model.layers.3.self_attn.q_proj").act_order
    assert r.spec_for("model.layers.3.mlp.down_proj").format.bits == 8
    assert r.spec_for("model.layers.3.mlp.down_proj").algo == "gptq"  # inherits from quant
    assert r.spec_for("model.layers.0.mlp.up_proj") is None
    assert r.spec_for("model.layers.2.self_attn.k_proj") is None
    assert r.spec_for("lm_head") is None
    assert r.calib.samples == 8 and r.needs_data


@pytest.mark.parametrize("d, message", [
    ({"quant": {"algo": "gptq"}, "quantize": 1}, "unknown recipe key"),
    ({"quant": {"algo": "awq2"}}, "unknown algo"),
    ({"quant": {"bits": 5}}, "bits=5 is not supported"),
    ({"quant": {"bitz": 4}}, "unknown quant key"),
    ({"quant": {"bits": 4}, "calib": {"n": 3}}, "unknown calib key"),
    ({"quant": {"algo": "hqq", "symmetric": True}}, "hqq refines a zero point"),
])
def test_bad_recipes(d, message):
    with pytest.raises(UserError, match=message):
        Recipe.from_dict(d)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(UserError, match="w4g64-gptq"):
        load_recipe("w5g64")


def test_hqq_defaults_to_float_zero():
    assert Quant.from_dict({"algo": "hqq", "bits": 4}).format.zero_point == "float"
