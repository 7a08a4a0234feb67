"""The second-order damage estimates against measured KL divergence, for small changes (where a
second-order estimate must be right) on a tiny random Llama."""

import pytest
import torch

from memfit.plan.probe import ProbeReference, swapped
from memfit.plan.sensitivity import kfac_damage, sensitivity_pass


@pytest.fixture(scope="module")
def setup(tiny_llama):
    torch.manual_seed(0)
    ids = torch.randint(0, tiny_llama.model.config.vocab_size, (12, 64))
    return tiny_llama, ids


class _Delta(torch.nn.Module):
    """A stand-in packed module: weight + delta."""

    def __init__(self, w):
        super().__init__()
        self.w = w

    def dequantize(self, dtype=torch.float32):
        return self.w.to(dtype)


def _measure(loaded, ids, assignment):
    ref = ProbeReference(loaded.model, ids)
    from memfit.archs import block_list
    blocks = block_list(loaded.model, loaded.arch)
    with swapped(loaded.model, blocks, assignment):
        return ref.kld(loaded.model)["kld"]


@pytest.mark.parametrize("name", ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj"])
def test_kfac_predicts_small_weight_changes(setup, name):
    loaded, ids = setup
    sens = sensitivity_pass(loaded.model, loaded.arch, ids, seed=0)
    w = loaded.model.get_submodule(name).weight.detach().float()
    torch.manual_seed(1)
    dw = 0.2 * w.std() * torch.randn_like(w)
    predicted = kfac_damage(dw, sens.hessian[name], sens.fisher[name])
    measured = _measure(loaded, ids, {name: _Delta(w + dw)})
    print(f"{name}: predicted {predicted:.3e}, measured {measured:.3e}")
    assert 1 / 3 < predicted / measured < 3  # K-FAC: g and x taken as independent


def test_head_estimate_is_the_softmax_fisher(setup):
    loaded, ids = setup
    head = loaded.model.get_output_embeddings()
    torch.manual_seed(2)
    w = head.weight.detach().float()
    changed = _Delta(w + 0.1 * w.std() * torch.randn_like(w))
    sens = sensitivity_pass(loaded.model, loaded.arch, ids, tables={"head": {"x": changed}})
    predicted = sens.tables["head/x"]
    # the head is tied to the embeddings in this model only if tie_word_embeddings; measure by
    # swapping the head weight alone
    ref = ProbeReference(loaded.model, ids)
    old = head.weight.data
    try:
        head.weight.data = changed.w.clone()
        tied = loaded.model.get_input_embeddings().weight is head.weight
        assert not tied
        measured = ref.kld(loaded.model)["kld"]
    finally:
        head.weight.data = old
    print(f"head: predicted {predicted:.3e}, measured {measured:.3e}")
    assert 0.8 < predicted / measured < 1.25


def test_drop_estimate_tracks_the_measured_order(setup):
    loaded, ids = setup
    sens = sensitivity_pass(loaded.model, loaded.arch, ids, seed=0)
    assert len(sens.drop) == 2 and all(d > 0 for d in sens.drop)
    assert sens.tokens == ids.shape[0] * (ids.shape[1] - 1)
