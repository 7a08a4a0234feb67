"""Mixture-of-experts models (memfit.moe): one linear per expert, the same function as
transformers' fused experts, calibration per expert, save/load, refusals."""

from __future__ import annotations

import json

import pytest
import torch

from memfit.archs import arch_for, block_list
from memfit.moe import Experts, is_expert_linear, unfuse_experts_
from memfit.recipe import Recipe

FAMILIES = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 48, "mlp_only_layers": [1]},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "head_dim": 16},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "phimoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16},
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "deepseek_v3": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                    "first_k_dense_replace": 1, "n_shared_experts": 1, "kv_lora_rank": 16,
                    "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                    "v_head_dim": 16, "n_group": 1, "topk_group": 1, "num_key_value_heads": 4},
}


def _tiny(tiny_config, family, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, **FAMILIES[family])
    config._experts_implementation = "eager"  # transformers' own per-expert loop, as reference
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # spread the router's logits: every expert gets tokens
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unfused_experts_compute_what_transformers_computes(tiny_config, family):
    from memfit.errors import UserError

    model = _tiny(tiny_config, family)
    fused = {n: m for n, m in model.named_modules() if type(m).__name__.endswith("Experts")}
    if family == "gpt_oss" and not hasattr(next(iter(fused.values())), "is_concatenated"):
        with pytest.raises(UserError, match="does not declare its weight layout"):
            unfuse_experts_(model)  # older transformers: interleaved rows it cannot tell
        return
    ids = torch.randint(0, 30522, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
        assert unfuse_experts_(model) == len(fused) > 0
        got = model(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for name, m in fused.items():
        new = model.get_submodule(name)
        assert isinstance(new, Experts) and new.num_experts == 4
        e = new.get_submodule("2")
        gu = m.gate_up_proj[2].T if m.is_transposed else m.gate_up_proj[2]
        gate = gu[0::2] if not m.is_concatenated else gu[: gu.shape[0] // 2]
        assert torch.equal(e.gate_proj.weight, gate)  # expert 2's own rows, not another's
    assert unfuse_experts_(model) == 0  # nothing fused is left


def test_stages_follow_each_block(tiny_config):
    """Qwen2-MoE with a dense second block: the sparse block's shared expert and each expert
    are groups of their own, in one stage; the dense block keeps the plain MLP groups."""
    model = _tiny(tiny_config, "qwen2_moe")
    unfuse_experts_(model)
    arch = arch_for(model.config)
    sparse, dense = block_list(model, arch)
    stages = arch.stages(sparse)
    assert stages[0] == [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")]
    assert stages[2] == [("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")] + [
        (f"mlp.experts.{e}.gate_proj", f"mlp.experts.{e}.up_proj") for e in range(4)]
    assert stages[3] == [("mlp.shared_expert.down_proj",)] + [
        (f"mlp.experts.{e}.down_proj",) for e in range(4)]
    assert arch.stages(dense)[2:] == [[("mlp.gate_proj", "mlp.up_proj")], [("mlp.down_proj",)]]
    assert is_expert_linear("model.layers.0.mlp.experts.3.up_proj")
    assert not is_expert_linear("model.layers.0.mlp.shared_expert.up_proj")


def _routing_without(model, expert: int):
    """Forward hooks on every router sending its `expert`'s slots to expert 0 instead."""
    handles = []
    for name, m in model.named_modules():
        if type(m).__name__.endswith("TopKRouter"):
            def hook(_m, _args, out):
                logits, scores, index = out
                return logits, scores, torch.where(index == expert, 0, index)
            handles.append(m.register_forward_hook(hook))
    return handles


def test_gptq_per_expert_statistics_and_an_unreached_expert(tiny_config, monkeypatch):
    """GPTQ sees each expert's own routed tokens, all experts of a stage in one calibration pass;
    an expert no token reaches is rounded to nearest (its inputs taken as isotropic)."""
    from memfit.api import compress_
    from memfit.calib import engine
    from memfit.formats.quant_linear import QuantLinear

    model = _tiny(tiny_config, "mixtral")
    unfuse_experts_(model)
    handles = _routing_without(model, 3)
    passes = []
    real_replay = engine.replay
    monkeypatch.setattr(engine, "replay", lambda *a: (passes.append(1), real_replay(*a)))
    data = torch.randint(0, 30522, (4, 32))
    report = compress_(model, Recipe.from_dict({"quant": {"algo": "gptq", "bits": 4, "group_size": 32}}), data,
                       progress=False)
    for h in handles:
        h.remove()
    assert report["modules"] == 2 * (4 + 4 * 3)
    assert len(passes) == 2 * 4  # four stages a block, not one pass per expert
    notes = [e for e in report["layers"] if "note" in e]
    assert [e["modules"] for e in notes] == [[f"mlp.experts.3.{p}" for p in ("gate_proj", "up_proj")],
                                             ["mlp.experts.3.down_proj"]] * 2
    rtn_model = _tiny(tiny_config, "mixtral")
    unfuse_experts_(rtn_model)
    compress_(rtn_model, Recipe.from_dict({"quant": {"algo": "rtn", "bits": 4, "group_size": 32}}),
              progress=False)
    for name in ("model.layers.0.mlp.experts.3.gate_proj", "model.layers.1.mlp.experts.3.down_proj"):
        g, r = model.get_submodule(name), rtn_model.get_submodule(name)
        assert isinstance(g, QuantLinear)
        torch.testing.assert_close(g.dequantize(torch.float32), r.dequantize(torch.float32))
    # a reached expert: GPTQ's error feedback moves it off round-to-nearest
    name = "model.layers.0.mlp.experts.1.gate_proj"
    assert not torch.equal(model.get_submodule(name).dequantize(torch.float32),
                           rtn_model.get_submodule(name).dequantize(torch.float32))


def test_compressed_moe_saves_and_loads_both_ways(tmp_path, tiny_config):
    """Qwen2-MoE (shared expert, a dense block) quantized: memfit's loader and plain
    transformers (after `import memfit`) give the logits of the model in memory."""
    from transformers import AutoModelForCausalLM

    import memfit  # noqa: F401 -- registers the quantizer with transformers
    from memfit.api import compress_
    from memfit.io.save import load, save

    model = _tiny(tiny_config, "qwen2_moe")
    unfuse_experts_(model)
    compress_(model, Recipe.from_dict({"quant": {"algo": "rtn", "bits": 4, "group_size": 32}}),
              progress=False)
    ids = torch.randint(0, 30522, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits
    save(model, None, tmp_path / "q", recipe={"quant": "rtn"}, dense_dtype="float32")
    modules = json.loads((tmp_path / "q" / "memfit.json").read_text())["modules"]
    assert "model.layers.0.mlp.experts.3.down_proj" in modules
    assert "model.layers.0.mlp.shared_expert.gate_proj" in modules
    assert "model.layers.1.mlp.gate_proj" in modules
    with torch.no_grad():
        mine = load(tmp_path / "q").model(ids).logits
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()(ids).logits
    torch.testing.assert_close(mine, ref, rtol=0, atol=0)
    torch.testing.assert_close(hf, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_awq_folds_leave_the_float_function_unchanged(tiny_config, family):
    """Every AWQ fold memfit plans in a MoE block (attention producers, each expert's and the
    shared expert's up -> down; DeepSeek's latent norms; the MLP norm into all experts' and the
    shared expert's gate/up at once, the router and a shared-expert gate scaled with them), with
    random scales: the logits do not move. gpt-oss's gate clamps up and adds 1, so its down
    projections are not folded."""
    from memfit.awq import _plan, fold_
    from memfit.configs import RTN

    model = _tiny(tiny_config, family)
    if family == "gpt_oss" and not hasattr(model.model.layers[0].mlp.experts, "is_concatenated"):
        pytest.skip("this transformers' gpt-oss experts do not declare their layout")
    unfuse_experts_(model)
    ids = torch.randint(0, 30522, (2, 16))
    with torch.no_grad():
        before = model(ids).logits
    arch = arch_for(model.config)
    spec = RTN(awq=True)
    folded = set()
    for block in block_list(model, arch):
        specs = {n: spec for g in arch.block_groups(block) for n in g}
        todo, _ = _plan(block, arch, specs, tied=True, merge=True)
        for names, fold, tie, _, passengers in todo:
            lins = [block.get_submodule(n) for n in names + (passengers or [])]
            if passengers is not None:
                folded.add("router")
                assert passengers and all(".experts." not in n for n in passengers), passengers
            gen = torch.Generator().manual_seed(len(folded))
            width = lins[0].in_features if tie is None else int(tie.max()) + 1
            src_s = torch.rand(width, generator=gen) + 0.5  # the producer's channels
            s = src_s if tie is None else src_s[tie]  # grouped-query o_proj: tied slots
            fold_(block.get_submodule(fold), lins, s, src_s, arch.norm_offset)
            if passengers is None:
                folded.add(names[0].split(".")[-1] if ".experts." not in names[0] else "experts")
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
    assert ("experts" in folded) == (family != "gpt_oss") and "router" in folded


def test_planner_gives_an_unreached_expert_its_layers_mean_statistics():
    from memfit.plan.sensitivity import Sensitivity, _unreached_experts

    p = "model.layers.0.mlp.experts"
    sens = Sensitivity(tokens=10)
    for e, v in ((0, 1.0), (2, 3.0)):  # expert 1 saw no token
        sens.hessian[f"{p}.{e}.gate_proj"] = torch.full((2, 2), v)
        for proj in ("gate_proj", "up_proj"):
            sens.fisher[f"{p}.{e}.{proj}"] = torch.full((3, 3), 10 * v)
    sens.hessian["model.layers.1.mlp.experts.1.gate_proj"] = torch.full((2, 2), 100.0)  # other layer
    members = {f"{p}.{e}.{proj}": f"{p}.{e}.gate_proj" for e in range(3)
               for proj in ("gate_proj", "up_proj")}
    _unreached_experts(sens, members)
    assert torch.equal(sens.hessian[f"{p}.1.gate_proj"], torch.full((2, 2), 2.0))
    assert torch.equal(sens.fisher[f"{p}.1.up_proj"], torch.full((3, 3), 20.0))
    with pytest.raises(Exception, match="no calibration token reached any expert"):
        _unreached_experts(Sensitivity(tokens=1), {f"{p}.0.down_proj": f"{p}.0.down_proj"})


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_moe_streams_to_the_normal_folder(tmp_path, save_tiny, family):
    """--low-memory reads each expert from the checkpoint, under the model's own names (Qwen2-MoE)
    or the Mixtral-era ones transformers renames on load (block_sparse_moe, w1/w3/w2)."""
    from safetensors import safe_open

    from memfit.compress import CompressOptions, compress_to

    widths = {"moe_intermediate_size": 64, "shared_expert_intermediate_size": 128} \
        if family == "qwen2_moe" else {}
    src = save_tiny(tmp_path / family, family, hidden_size=128, **{**FAMILIES[family], **widths})
    with safe_open(src / "model.safetensors", "pt") as f:
        legacy = any(".w1." in k for k in f.keys())  # noqa: SIM118 -- safe_open has no __iter__
    assert legacy == (family == "mixtral")
    fast = {"samples": 4, "seq_len": 64, "smoke_windows": 2, "smoke_seq_len": 64,
            "format": "memfit", "progress": False}
    for low in (False, True):
        compress_to(str(src), "w4g64-gptq", tmp_path / f"out{low}",
                    CompressOptions(low_memory=low, **fast))
    assert (tmp_path / "outFalse" / "model.safetensors").read_bytes() == \
        (tmp_path / "outTrue" / "model.safetensors").read_bytes()


def test_inspect_counts_the_experts(tiny_config):
    from memfit.eval.memory import inspect_model

    model = _tiny(tiny_config, "mixtral")
    unfuse_experts_(model)
    info = inspect_model(model, context=64)
    per_expert = 3 * 64 * 128 * 4  # gate, up, down of hidden 64 x intermediate 128, float32
    assert info["experts"] == {"layers": 2, "experts": 4, "top_k": 2,
                               "expert_bytes": 2 * 4 * per_expert,
                               "bytes_read_per_token": info["weight_bytes"] - 2 * 2 * per_expert}
    dense = inspect_model(_tiny(tiny_config, "mixtral"), context=64)  # not unfused: no figure
    assert dense["experts"] is None


def test_training_a_moe_model_saves_one_linear_per_expert(tmp_path, save_tiny):
    """memfit train on Mixtral: the saved folder (rebuilt with one linear per expert) loads back
    with the trained expert weights."""
    from safetensors.torch import load_file

    from memfit.models import load_model
    from memfit.train import TrainOptions, train_to

    src = save_tiny(tmp_path / "mixtral", "mixtral", **FAMILIES["mixtral"])
    rep = train_to(str(src), tmp_path / "out", TrainOptions(steps=4, lr=1e-3, seq_len=32,
                                                           batch_size=2, samples=8))
    assert len(rep["loss"]) == 4
    stored = load_file(tmp_path / "out" / "model.safetensors")
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    before = load_model(str(src)).model.get_submodule(name.rpartition(".")[0]).weight
    after = load_model(str(tmp_path / "out")).model.get_submodule(name.rpartition(".")[0]).weight
    assert torch.equal(after, stored[name]) and not torch.equal(after, before)


@pytest.mark.parametrize("recipe", ["w4g64-awq", "w8a8-sq"])
def test_awq_and_smoothquant_on_experts_skip_what_they_cannot_fold(tiny_config, recipe):
    """Attention and each reached expert's down projection are scaled, an expert no token
    reached is skipped, and logged; the experts' gate/up (one norm feeds the router and every
    expert) get one AWQ scale for all, the router scaled with them, and SmoothQuant skips them."""
    from memfit.api import compress_

    model = _tiny(tiny_config, "mixtral")
    unfuse_experts_(model)
    handles = _routing_without(model, 3)
    report = compress_(model, recipe, torch.randint(0, 30522, (4, 64)), progress=False)
    for h in handles:
        h.remove()
    key = "awq" if "awq" in recipe else "smoothquant"
    entries = {e["modules"][0]: e[key] for e in report["layers"][:40] if key in e}
    assert entries["mlp.experts.1.down_proj"]["fold"] == "mlp.experts.1.up_proj"
    assert entries["mlp.experts.3.down_proj"] == {
        "skipped": "no calibration token reached these experts"}
    if key == "awq":
        moe = next(e for e in report["layers"][:40] if e["modules"][0] == "mlp.experts.0.gate_proj")
        assert len(moe["modules"]) == 8 and moe["modules"][-1] == "mlp.experts.3.up_proj"
        assert moe["awq"]["fold"] == "post_attention_layernorm"
        assert moe["awq"]["measured"] == "mlp" and moe["awq"]["also_scaled"] == ["mlp.gate"]
    else:
        assert "feeds the router" in entries["mlp.experts.0.gate_proj"]["skipped"]
    assert entries["self_attn.q_proj"]["fold"] == "input_layernorm"
    ids = torch.randint(0, 30522, (1, 8))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_expert_width_pruning_keeps_each_experts_own_channels(tiny_config, family, tmp_path):
    """structured mlp_keep on a mixture: every routed expert keeps half its channels, chosen by
    its own routed tokens' activations (so the experts keep different channels); the config's
    expert width follows, Qwen2-MoE's shared expert and dense block keep theirs, and the folder
    loads back to the same logits."""
    from memfit.api import compress_
    from memfit.io.save import load, save

    model = _tiny(tiny_config, family)
    unfuse_experts_(model)
    before = {n: m.weight.clone() for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and is_expert_linear(n)}
    shared = {n: m.weight.shape for n, m in model.named_modules()  # Qwen2-MoE's block 1 is dense
              if family == "qwen2_moe" and isinstance(m, torch.nn.Linear)
              and ("shared_expert." in n or "layers.1.mlp." in n)}
    data = torch.randint(0, 30522, (8, 32), generator=torch.Generator().manual_seed(0))
    recipe = {"structured": {"mlp_keep": 0.5}}
    compress_(model, Recipe.from_dict(recipe), data, progress=False)
    c = model.config
    width = c.moe_intermediate_size if family == "qwen2_moe" else c.intermediate_size
    assert width == (16 if family == "qwen2_moe" else 64)
    kept = []
    for i, layer in enumerate(model.model.layers):
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            continue
        for e, ex in enumerate(experts.experts()):
            assert ex.gate_proj.out_features == ex.up_proj.out_features == width
            assert ex.down_proj.in_features == width
            name = f"model.layers.{i}.mlp.experts.{e}.up_proj"
            full = before[name]  # which rows survived
            rows = [int((full == r).all(1).nonzero()) for r in ex.up_proj.weight]
            kept.append(tuple(rows))
    assert len(set(kept)) > 1  # each expert its own channels
    for n, shape in shared.items():
        assert model.get_submodule(n).weight.shape == shape, n
    save(model, None, tmp_path / "w", recipe=recipe, dense_dtype="keep")
    ids = torch.randint(0, 30522, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "w").model(ids).logits, model(ids).logits,
                                   rtol=0, atol=0)


def test_head_pruning_of_a_mixture_is_refused_in_one_line(tiny_config):
    from memfit.api import compress_
    from memfit.errors import UserError

    model = _tiny(tiny_config, "mixtral")
    unfuse_experts_(model)
    data = torch.randint(0, 30522, (2, 16))
    with pytest.raises(UserError, match="attention head pruning .* mixture of experts"):
        compress_(model, Recipe.from_dict({"structured": {"heads_keep": 2}}), data,
                  progress=False)
