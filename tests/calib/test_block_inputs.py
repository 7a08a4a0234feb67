"""The calibration engine feeds each block the inputs the real forward gives it, on a model whose
blocks differ (Gemma-3: sliding-window and global layers with their own masks and rotary bases)."""

import pytest
import torch

from memfit.api import compress_
from memfit.archs import arch_for, block_list
from memfit.calib import capture_inputs, propagate

LAYERS = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
          "full_attention"]


def _gemma3(tiny_config, model_type="gemma3_text"):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type, num_hidden_layers=len(LAYERS), head_dim=16, sliding_window=16,
                      layer_types=LAYERS, attn_implementation="eager")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _real_block_inputs(model, blocks, ids):
    seen = []
    hooks = [b.register_forward_pre_hook(
        lambda _m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).clone()),
        with_kwargs=True) for b in blocks]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("model_type", ["gemma3_text", "gemma2"])
def test_every_block_gets_the_inputs_of_the_real_forward(tiny_config, model_type):
    model = _gemma3(tiny_config, model_type)
    blocks = block_list(model, arch_for(model.config))
    ids = torch.randint(0, 30522, (5, 64), generator=torch.Generator().manual_seed(3))
    real = _real_block_inputs(model, blocks, ids)
    store, kwargs = capture_inputs(model, blocks, ids, batch=2)  # batches 2, 2, 1
    _, old = capture_inputs(model, blocks, ids, batch=2)
    old = [old[0]] * len(blocks)  # what every block got before: block 0's kwargs
    old_store, _ = capture_inputs(model, blocks, ids, batch=2)
    errors, old_errors = [], []
    for i, block in enumerate(blocks):
        got = torch.cat([store[b] for b in range(len(store))])
        errors.append((got - real[i]).abs().max().item())
        old_errors.append((torch.cat([old_store[b] for b in range(len(old_store))])
                           - real[i]).abs().max().item())
        propagate(block, store, kwargs[i])
        propagate(block, old_store, old[i])
    print("max abs error per block:", errors, "with block-0 kwargs:", old_errors)
    assert max(errors) < 1e-5
    # the first global layer (block 2) is where block-0 kwargs go wrong: the test can fail
    assert old_errors[2] == 0 and old_errors[3] > 1e-3


def test_compress_a_mixed_layer_model(tiny_config):
    model = _gemma3(tiny_config)
    calib = torch.randint(0, 30522, (6, 64), generator=torch.Generator().manual_seed(1))
    for recipe in ("w4g64", "w4g64-gptq"):
        m = _gemma3(tiny_config)
        rep = compress_(m, recipe, calib, progress=False)
        assert rep["modules"] == 7 * len(LAYERS)
        with torch.no_grad():
            ref = model(input_ids=calib[:1]).logits
            out = m(input_ids=calib[:1]).logits
        assert torch.isfinite(out).all() and (out - ref).abs().max() < 1.0


ENCODERS = {"bert": {}, "deberta-v2": {}, "mpnet": {}, "modernbert": {}, "nomic_bert": {},
            "distilbert": {"hidden_dim": 128}}


@pytest.mark.parametrize("model_type", sorted(ENCODERS))
def test_encoder_blocks_get_the_inputs_of_the_real_forward(tiny_encoder, encoder_tokenizer,
                                                           model_type):
    """Encoder calibration windows are full [CLS] ... [SEP] windows with no padding: each block
    gets what the model's own forward gives it with the all-ones attention mask `embed` passes
    (DeBERTa passes its blocks the mask by position: kept by name, replayed as a keyword)."""
    from memfit.calib.data import sentence_windows

    model = tiny_encoder(model_type, num_hidden_layers=3, **ENCODERS[model_type])
    tok = encoder_tokenizer
    ids = sentence_windows(tok, "builtin", "calib", seq_len=48, max_windows=5, seed=0)
    blocks = block_list(model, arch_for(model.config))
    seen = []
    hooks = [b.register_forward_pre_hook(
        lambda _m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).clone()),
        with_kwargs=True) for b in blocks]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    for h in hooks:
        h.remove()
    store, kwargs = capture_inputs(model, blocks, ids, batch=2)  # batches 2, 2, 1
    errors = []
    for i, block in enumerate(blocks):
        errors.append((torch.cat([store[b] for b in range(len(store))]) - seen[i]).abs().max())
        propagate(block, store, kwargs[i])
    assert max(errors) < 1e-5, errors
    # the block inputs do depend on the mask: masking the last half changes them (can fail)
    half = torch.ones_like(ids)
    half[:, 24:] = 0
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=half).last_hidden_state
        full = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert (masked[:, :24] - full[:, :24]).abs().max() > 1e-3
