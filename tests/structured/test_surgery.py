"""Structured pruning surgery on tiny random Llama/Qwen2 models: the pruned model computes what
the masked original computes, saves, and reloads with plain AutoModelForCausalLM.from_pretrained."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from memfit.archs import arch_for, block_list
from memfit.errors import UserError
from memfit.structured import (channel_importance, drop_blocks_, measure_block_influence,
                               prune_heads_, prune_mlp_width_)
from memfit.algos.structured import choose_blocks_to_drop

HIDDEN, INTER, HEADS, KV, HEAD_DIM = 64, 128, 4, 2, 16


class _Skip(torch.nn.Module):
    """A block that returns its input: the original model with blocks skipped, as reference."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _model(tiny_config, model_type="llama", layers=4, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = tiny_config(model_type, num_hidden_layers=layers, **kw)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _ids(n=2, t=16, seed=0):
    return torch.randint(200, 30000, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def _reload(model, path):
    model.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_drop_two_blocks_reloads_identically(tiny_config, tmp_path, model_type):
    extra = dict(use_sliding_window=True, sliding_window=8, max_window_layers=2) \
        if model_type == "qwen2" else {}
    model = _model(tiny_config, model_type, layers=4, **extra)
    if model_type == "qwen2":
        assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    ids = _ids()
    reference = _model(tiny_config, model_type, layers=4, **extra)  # same seed: same weights
    for i in (1, 2):
        reference.model.layers[i] = _Skip()
    drop_blocks_(model, [1, 2])
    blocks = block_list(model, arch_for(model.config))
    assert len(blocks) == 2 and model.config.num_hidden_layers == 2
    assert [b.self_attn.layer_idx for b in blocks] == [0, 1]
    if model_type == "qwen2":
        assert model.config.layer_types == ["full_attention", "sliding_attention"]
    before = _logits(model, ids)
    torch.testing.assert_close(before, _logits(reference, ids), rtol=0, atol=0)
    again = _reload(model, tmp_path / "m")
    assert again.config.num_hidden_layers == 2
    assert torch.equal(_logits(again, ids), before)
    # the KV cache is indexed by layer_idx: cached greedy decoding must match uncached
    prompt = ids[:1, :6]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(again.generate(prompt, use_cache=True, **kw),
                       again.generate(prompt, use_cache=False, **kw))


def test_identity_block_scores_zero_and_is_dropped_first(tiny_config):
    model = _model(tiny_config, layers=4)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    scores = measure_block_influence(model, arch_for(model.config), _ids(4, 16), batch=2)
    assert len(scores) == 4 and all(0.0 <= s <= 1.0 for s in scores)
    assert scores[2] < 1e-3 < min(scores[:2] + scores[3:])
    assert choose_blocks_to_drop(scores, 1) == [2]


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_mlp_half_width_halves_params_matches_masking_and_reloads(tiny_config, tmp_path,
                                                                  model_type):
    model = _model(tiny_config, model_type, layers=2)
    ids = _ids()
    mlp_before = [_count(b.mlp) for b in model.model.layers]
    masked = _model(tiny_config, model_type, layers=2)  # same seed: same weights
    kept = prune_mlp_width_(model, 0.5)
    assert [_count(b.mlp) for b in model.model.layers] == [m // 2 for m in mlp_before]
    assert model.config.intermediate_size == INTER // 2 and all(k.numel() == 64 for k in kept)
    with torch.no_grad():  # zeroing the pruned down_proj columns is the same function
        for block, k in zip(masked.model.layers, kept):
            drop = torch.ones(INTER, dtype=torch.bool)
            drop[k] = False
            block.mlp.down_proj.weight[:, drop] = 0
    out = _logits(model, ids)
    torch.testing.assert_close(out, _logits(masked, ids), rtol=1e-4, atol=1e-4)
    again = _reload(model, tmp_path / "m")
    assert again.config.intermediate_size == 64
    assert torch.equal(_logits(again, ids), out)


@pytest.mark.parametrize("model_type", ["granite", "starcoder2"])
def test_width_pruning_of_more_families_matches_masking_and_reloads(tiny_config, tmp_path,
                                                                    model_type):
    """Granite (Llama's linears, its own multipliers) and Starcoder 2 (one MLP input linear
    with a bias, behind a GELU): half the MLP channels and half the KV groups cut is the same
    function as the masked model, and reloads."""
    kw = dict(num_attention_heads=8, num_key_value_heads=4)
    model = _model(tiny_config, model_type, layers=2, **kw)
    masked = _model(tiny_config, model_type, layers=2, **kw)
    arch = arch_for(model.config)
    ids = _ids()
    kept = prune_mlp_width_(model, 0.5)
    groups = prune_heads_(model, num_heads=4)
    hd = HIDDEN // 8
    with torch.no_grad():
        for block, k, g in zip(block_list(masked, arch), kept, groups):
            drop = torch.ones(INTER, dtype=torch.bool)
            drop[k] = False
            block.get_submodule(arch.layout.mlp_out).weight[:, drop] = 0
            cols = torch.ones(8 * hd, dtype=torch.bool)
            for j in g.tolist():
                cols[j * 2 * hd:(j + 1) * 2 * hd] = False
            block.get_submodule(arch.layout.o).weight[:, cols] = 0
    out = _logits(model, ids)
    torch.testing.assert_close(out, _logits(masked, ids), rtol=1e-4, atol=1e-4)
    again = _reload(model, tmp_path / "m")
    assert again.config.intermediate_size == INTER // 2
    assert (again.config.num_attention_heads, again.config.num_key_value_heads) == (4, 2)
    assert torch.equal(_logits(again, ids), out)


def test_keeping_all_channels_and_groups_changes_nothing(tiny_config):
    model = _model(tiny_config, layers=2)
    ids = _ids()
    before = _logits(model, ids)
    prune_mlp_width_(model, INTER)
    prune_heads_(model, KV)
    assert torch.equal(_logits(model, ids), before)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_head_pruning_keeps_gqa_matches_masking_and_reloads(tiny_config, tmp_path, model_type):
    heads, kv = 8, 4  # 2 query heads per KV head
    kw = dict(num_attention_heads=heads, num_key_value_heads=kv)
    model = _model(tiny_config, model_type, layers=2, **kw)
    masked = _model(tiny_config, model_type, layers=2, **kw)
    hd = HIDDEN // heads
    ids = _ids()
    imp = channel_importance(model, arch_for(model.config), ids, batch=2)
    assert [s.shape for s in imp.kv_groups] == [(kv,)] * 2 and imp.heads[0].shape == (heads,)
    kept = prune_heads_(model, num_heads=4, scores=imp.kv_groups)  # 4 heads = 2 KV groups
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, hd)
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    bias = model_type == "qwen2"  # Qwen2 has q/k/v biases
    for block in model.model.layers:
        q, k = 4 * hd, 2 * hd
        want = HIDDEN * q + 2 * HIDDEN * k + q * HIDDEN + (q + 2 * k if bias else 0)
        assert _count(block.self_attn) == want
    with torch.no_grad():  # zeroing the o_proj columns of the pruned heads is the same function
        for block, groups in zip(masked.model.layers, kept):
            cols = torch.ones(heads * hd, dtype=torch.bool)
            for g in groups.tolist():
                cols[g * 2 * hd:(g + 1) * 2 * hd] = False
            block.self_attn.o_proj.weight[:, cols] = 0
    out = _logits(model, ids)
    torch.testing.assert_close(out, _logits(masked, ids), rtol=1e-4, atol=1e-4)
    again = _reload(model, tmp_path / "m")
    assert (again.config.num_attention_heads, again.config.num_key_value_heads) == (4, 2)
    assert torch.equal(_logits(again, ids), out)


def test_activation_scores_beat_their_reverse(tiny_config):
    """Keeping the top half of channels by importance loses less than keeping the bottom half."""
    ids = _ids(4, 16)
    ref = _logits(_model(tiny_config, layers=2), ids)
    probe = _model(tiny_config, layers=2)
    imp = channel_importance(probe, arch_for(probe.config), ids, batch=2)
    errs = {}
    for name, scores in (("top", imp.mlp), ("bottom", [-s for s in imp.mlp])):
        m = _model(tiny_config, layers=2)
        prune_mlp_width_(m, 0.25, scores=scores)
        errs[name] = float((_logits(m, ids) - ref).norm() / ref.norm())
    print(f"relative logit error at 25% MLP width: top {errs['top']:.4f} "
          f"bottom {errs['bottom']:.4f}")
    assert errs["top"] < errs["bottom"]


def test_bad_input_is_a_user_error(tiny_config):
    model = _model(tiny_config, layers=2)
    with pytest.raises(UserError, match="cannot drop all 2 blocks"):
        drop_blocks_(model, [0, 1])
    with pytest.raises(UserError, match="out of range"):
        drop_blocks_(model, [2])
    with pytest.raises(UserError, match="out of range"):
        drop_blocks_(model, [-1])
    for bad in (0, INTER + 1, 0.0, 1.5):
        with pytest.raises(UserError):
            prune_mlp_width_(model, bad)
    with pytest.raises(UserError, match="same number"):
        prune_mlp_width_(model, [[0, 1, 2], [0, 1]])
    with pytest.raises(UserError, match="KV groups of 2"):
        prune_heads_(model, num_heads=3)
    with pytest.raises(UserError):
        prune_heads_(model, KV + 1)
    with pytest.raises(UserError, match="exactly one"):
        prune_heads_(model, 1, num_heads=2)
    # nothing was changed by the rejected calls
    assert len(model.model.layers) == 2 and model.config.intermediate_size == INTER
    assert model.model.layers[0].mlp.down_proj.in_features == INTER


def test_layouts_live_in_the_arch_table():
    from memfit.archs import ARCHS

    with_layout = {name for name, arch in ARCHS.items() if arch.layout is not None}
    assert with_layout == {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3",
                           "gemma3_text", "granite", "starcoder2"}
    lay = ARCHS["gemma3_text"].layout
    assert (lay.q, lay.o, lay.mlp_in, lay.mlp_out) == (
        "self_attn.q_proj", "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")


def test_block_influence_on_mixed_attention_layers_matches_the_real_forward(tiny_config):
    """Gemma 3 alternates sliding and global layers: each block is scored on its real inputs."""
    from memfit.algos.structured import angular_distances

    model = _model(tiny_config, "gemma3_text", layers=4, head_dim=HEAD_DIM, sliding_window=8,
                   layer_types=["sliding_attention", "full_attention"] * 2)
    ids = _ids(3, 32)
    blocks = block_list(model, arch_for(model.config))
    dists = [[] for _ in blocks]
    handles = [b.register_forward_hook(
        lambda _m, args, out, i=i: dists[i].append(angular_distances(args[0], out[0] if isinstance(
            out, tuple) else out))) for i, b in enumerate(blocks)]
    with torch.no_grad():
        for start in (0, 2):  # the batches measure_block_influence uses
            model(input_ids=ids[start:start + 2], use_cache=False)
    for h in handles:
        h.remove()
    real = [float(torch.cat(d).mean()) for d in dists]
    scores = measure_block_influence(model, arch_for(model.config), ids, batch=2)
    assert scores == pytest.approx(real, abs=1e-6)


def test_unknown_layout_is_a_user_error(tiny_config):
    model = _model(tiny_config, "gpt2", layers=2, n_embd=64, n_head=4, n_layer=2)
    with pytest.raises(UserError, match="layout of .gpt2.*memfit.archs.ARCHS"):
        prune_mlp_width_(model, 0.5)



def test_all_three_combined_round_trip_through_memfit_save(tiny_config, tmp_path):
    from memfit.io.save import load, save

    model = _model(tiny_config, layers=4)
    ids = _ids()
    drop_blocks_(model, [1])
    prune_mlp_width_(model, 0.5)
    prune_heads_(model, num_heads=2)
    out = _logits(model, ids)
    save(model, None, tmp_path / "m", recipe={}, dense_dtype="keep")
    loaded = load(tmp_path / "m").model.eval()
    cfg = loaded.config
    assert (cfg.num_hidden_layers, cfg.intermediate_size, cfg.num_attention_heads,
            cfg.num_key_value_heads) == (3, 64, 2, 1)
    assert torch.equal(_logits(loaded, ids), out)
