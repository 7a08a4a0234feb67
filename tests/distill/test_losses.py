"""Distillation losses: the chunked KL equals the full-logit KL (value and gradient)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from memfit.distill.losses import hidden_mse, hidden_states, logit_kl


def _pair(tiny_config):
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=101, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(cfg).eval(), AutoModelForCausalLM.from_config(cfg).eval()


def test_chunked_kl_matches_full_logits(tiny_config):
    student, teacher = _pair(tiny_config)
    ids = torch.randint(0, 101, (2, 13))
    h_s, _ = hidden_states(student, ids)
    with torch.no_grad():
        h_t, _ = hidden_states(teacher, ids)
    T = 2.0
    chunked = logit_kl(student, teacher, h_s, h_t, temperature=T, chunk=5)
    g_chunked = torch.autograd.grad(chunked, student.model.embed_tokens.weight)[0]
    h_s, _ = hidden_states(student, ids)
    log_s = F.log_softmax(student(ids).logits / T, -1)
    with torch.no_grad():
        log_t = F.log_softmax(teacher(ids).logits / T, -1)
    full = (log_t.exp() * (log_t - log_s)).sum(-1).mean() * T * T
    g_full = torch.autograd.grad(full, student.model.embed_tokens.weight)[0]
    print(f"kl chunked {chunked.item():.6f} full {full.item():.6f}")
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_chunked, g_full, rtol=1e-4, atol=1e-8)


def test_kl_and_mse_vanish_for_identical_models(tiny_config):
    model, _ = _pair(tiny_config)
    ids = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        h, layers = hidden_states(model, ids, (1, 2))
        assert logit_kl(model, model, h, h, chunk=4).abs().item() < 1e-6
        assert hidden_mse(layers, layers, {1: 1, 2: 2}).item() == 0
        assert hidden_mse(layers, layers, {1: 2}).item() > 0


def test_matched_layers_pairs_kept_blocks_or_spreads_evenly():
    from memfit.distill.losses import matched_layers
    from memfit.errors import UserError

    # hidden-state indices (block i's output is i + 1); the student's last block is not paired
    assert matched_layers(4, 4) == {1: 1, 2: 2, 3: 3}
    assert matched_layers(6, 3) == {2: 1, 4: 2}
    assert matched_layers(6, 3, kept=[0, 4, 5]) == {1: 1, 5: 2}
    assert matched_layers(30, 28, kept=[0, 1, 2, *range(5, 30)])[6] == 4
    with pytest.raises(UserError, match="do not describe"):
        matched_layers(6, 3, kept=[0, 7, 8])
    with pytest.raises(UserError, match="more than the teacher"):
        matched_layers(2, 3)
