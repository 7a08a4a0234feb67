"""bfloat16 weights with stochastically rounded 8-bit AdamW updates, and stepping each parameter in
the backward pass (memfit.train.optim): the rounding is unbiased, stepping in the backward gives
the weights of stepping after it, bf16 weights keep learning where round-to-nearest stalls, and
`memfit train --weights bf16 --step-in-backward` runs end to end."""

import json

import pytest
import torch

from memfit.cli.main import main
from memfit.train.optim import StepInBackward, make_optimizer, stochastic_round_bf16

SMALL = ["--steps", "3", "--seq-len", "32", "--batch-size", "2", "--samples", "16", "--lr", "1e-3"]
# every step sees the same two windows, so its loss compares with the first step's (with 16 the
# steps' batches differ, and which loss is lower depended on the text: CPython's own prose,
# which differs between its patch releases)
FIXED = ["--steps", "3", "--seq-len", "32", "--batch-size", "2", "--samples", "2", "--lr", "1e-3"]


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * 10
    lo = x.to(torch.bfloat16)  # nearest; the two neighbours are around it
    torch.manual_seed(0)
    draws = torch.stack([stochastic_round_bf16(x).float() for _ in range(400)])
    down = (x.view(torch.int32) & -65536).view(torch.float32)
    up = ((x.view(torch.int32) & -65536) + 65536).view(torch.float32)
    assert bool(((draws == down) | (draws == up)).all())  # only the two neighbours
    err = (draws.mean(0) - x).abs() / (up - down)  # mean over draws -> x
    assert err.mean() < 0.01 and err.max() < 0.12, (err.mean(), err.max())
    assert (lo.float() - x).abs().max() <= (up - down).max()


def _train(step_in_backward: bool, dtype=torch.float32, optim="adamw8bit", steps=8, lr=3e-3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 600), torch.nn.GELU(),
                                torch.nn.Linear(600, 3)).to(dtype)
    x, y = torch.randn(128, 16, dtype=dtype), torch.randn(128, 3, dtype=dtype)
    opt = (StepInBackward(optim, model.parameters(), lr) if step_in_backward
           else make_optimizer(optim, model.parameters(), lr))
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, losses, opt


@pytest.mark.parametrize("optim", ["adamw", "adamw8bit"])
def test_step_in_backward_gives_the_same_weights(optim):
    a, la, _ = _train(False, optim=optim)
    b, lb, opt = _train(True, optim=optim)
    assert la == lb
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
        assert q.grad is None  # freed in the backward pass
    assert len(opt.state) == 4  # one state per parameter


def test_bf16_weights_keep_learning_with_small_updates():
    """lr 1e-5: every update is ~1e-5 of a weight, below bfloat16's resolution (~4e-3)."""
    ref, l32, _ = _train(False, torch.float32, steps=30, lr=1e-5)
    sr, l16, _ = _train(False, torch.bfloat16, steps=30, lr=1e-5)
    start = _train(False, torch.float32, steps=0)[0]
    moved32 = torch.cat([(p - s).flatten() for p, s in zip(ref.parameters(), start.parameters())])
    moved16 = torch.cat([(p.float() - s).flatten() for p, s in zip(sr.parameters(),
                                                                   start.parameters())])
    # round-to-nearest would leave the bf16 weights where they started; stochastic rounding
    # moves them as far as float32's updates on average (cosine of the two displacements)
    cos = torch.nn.functional.cosine_similarity(moved32, moved16 - (moved16 - moved32).mean(),
                                                dim=0)
    print(f"loss fp32 {l32[0]:.5f} -> {l32[-1]:.5f}, bf16 {l16[0]:.5f} -> {l16[-1]:.5f}; "
          f"displacement norm ratio {moved16.norm() / moved32.norm():.3f}")
    assert l16[-1] < l16[0] and abs((l16[0] - l16[-1]) / (l32[0] - l32[-1]) - 1) < 0.5
    assert cos > 0.3


def test_cli_bf16_weights_step_in_backward(train_llama_dir, capsys, tmp_path):
    out = tmp_path / "bf16"
    assert main(["train", str(train_llama_dir), *FIXED, "--ac", "full", "--optim", "adamw8bit",
                 "--weights", "bf16", "--step-in-backward", "--out", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["engine"] == "single" and rep["compute_dtype"] == "bfloat16"
    assert rep["loss"][-1] < rep["loss"][0]
    p = rep["predicted"]
    n = rep["parameters"]
    assert p["states_bytes"] == round(n * (2 + 2 + 8 / 256))  # bf16 weights + 8-bit states
    from memfit.models import load_model
    assert load_model(str(out)).kind == "decoder"


@pytest.mark.parametrize("args, message", [
    (["--weights", "bf16"], "needs --optim adamw8bit"),
    (["--weights", "bf16", "--optim", "adamw8bit", "--precision", "fp32"], "drop --precision"),
    (["--step-in-backward", "--grad-comm", "bf16"], "drop --grad-comm"),
])
def test_bad_combinations(train_llama_dir, capsys, args, message):
    assert main(["train", str(train_llama_dir), *SMALL, *args]) == 2
    assert message in capsys.readouterr().err
