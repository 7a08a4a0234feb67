"""FSDP2 on 2 (and 4) gloo ranks reproduces one rank: same global batches, fp32, 10 steps."""

import pytest
import torch
from safetensors.torch import load_file

from memfit.train import TrainOptions, train_to

from .conftest import run_workers

OPTS = {"steps": 10, "lr": 1e-3, "seq_len": 64, "batch_size": 4, "samples": 64}


@pytest.fixture(scope="module")
def single(train_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "model"
    return train_to(str(train_llama_dir), out, TrainOptions(**OPTS)), out


def test_two_ranks_match_one_rank_after_10_steps(single, train_llama_dir, tmp_path):
    one, one_out = single
    out = tmp_path / "model2"
    reps = run_workers(2, train_llama_dir, tmp_path / "w2",
                       [{"name": "fp32", "options": OPTS, "out": str(out)}])
    two = reps[0]["fp32"]
    assert two["world_size"] == 2 and two["engine"] == "fsdp2"
    diffs = [abs(a - b) for a, b in zip(one["loss"], two["loss"], strict=True)]
    print(f"loss 1 rank {one['loss'][-1]:.6f}, 2 ranks {two['loss'][-1]:.6f}, max diff {max(diffs):.2e}")
    assert abs(one["loss"][-1] - two["loss"][-1]) <= 1e-4
    assert max(diffs) <= 1e-4
    assert one["loss"][-1] < one["loss"][0] - 0.1  # it trains
    assert reps[1]["fp32"]["loss"] == two["loss"]  # every rank reports the same global loss
    # each rank holds half of the optimizer state
    assert abs(two["optimizer_state_bytes"] / one["optimizer_state_bytes"] - 0.5) < 0.01
    # rank 0 gathered the full weights and saved them: they equal the 1-rank model's
    w1, w2 = load_file(one_out / "model.safetensors"), load_file(out / "model.safetensors")
    assert w1.keys() == w2.keys()
    worst = max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1)
    print(f"saved weights max abs diff {worst:.2e}")
    assert w1[next(iter(w1))].dtype == torch.float32  # saved as trained
    assert worst < 1e-5


def test_saved_model_loads(single):
    from memfit.models import load_model

    _, out = single
    m = load_model(str(out))
    assert sum(p.numel() for p in m.model.parameters()) == single[0]["parameters"]
    assert torch.isfinite(m.model(torch.tensor([[1, 2, 3]])).logits).all()
