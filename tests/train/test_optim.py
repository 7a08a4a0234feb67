"""8-bit block-wise AdamW (memfit.train.optim) against torch's float32 AdamW on plain tensors:
per-step parameter and update difference, loss curve, state bytes."""

import torch

from memfit.train.optim import ShardedAdamW8bit, make_optimizer, state_nbytes


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 300), torch.nn.GELU(), torch.nn.Linear(300, 4))


def _regression(opt_name: str, steps: int = 60):
    """-> (losses, flat parameters before and after every step, optimizer)."""
    model = _model()
    x, y = torch.randn(256, 32), torch.randn(256, 4)
    opt = make_optimizer(opt_name, model.parameters(), lr=3e-3)
    flat = [torch.cat([p.detach().flatten() for p in model.parameters()])]
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        flat.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    return losses, flat, opt


def test_8bit_tracks_float32_adamw_step_by_step():
    l32, p32, _ = _regression("adamw")
    l8, p8, _ = _regression("adamw8bit")
    # relative norm of (8-bit - float32) parameters against how far float32 moved, every step
    drift = [((p8[t] - p32[t]).norm() / (p32[t] - p32[0]).norm()).item() for t in range(1, 61)]
    # relative norm of the difference of the two updates of each step
    upd = [((p8[t] - p8[t - 1]) - (p32[t] - p32[t - 1])).norm().item()
           / (p32[t] - p32[t - 1]).norm().item() for t in range(1, 61)]
    rel_loss = max(abs(a - b) / b for a, b in zip(l8, l32, strict=True))
    print(f"parameter drift max {max(drift):.3f}, update difference max {max(upd):.3f}; loss "
          f"{l32[0]:.4f} -> {l32[-1]:.5f} (fp32) vs {l8[-1]:.5f} (8-bit), max rel diff "
          f"{rel_loss:.2e}")
    assert drift[0] < 1e-5  # the first step sees exact moments (quantized after the update)
    assert max(drift) < 0.05
    assert max(upd) < 0.1
    assert rel_loss < 0.01
    assert l8[-1] < 0.05 * l8[0]


def test_8bit_state_is_a_quarter():
    *_, o32 = _regression("adamw", steps=1)
    *_, o8 = _regression("adamw8bit", steps=1)
    n = sum(p.numel() for g in o8.param_groups for p in g["params"])
    b8, b32 = state_nbytes(o8), state_nbytes(o32)
    print(f"{n} parameters: state {b32} bytes (float32 AdamW) vs {b8} (8-bit): {b8 / b32:.4f}x")
    assert b32 == 8 * n + 4 * 4  # m, v and a float32 step counter per tensor
    assert b8 / b32 < 0.27  # 2 bytes + per-block scales (+ padding of the last block of each tensor)
    assert b8 >= 2 * n


def test_empty_shard_is_stepped():
    p = torch.nn.Parameter(torch.zeros(0))
    p.grad = torch.zeros(0)
    opt = ShardedAdamW8bit([p], lr=1e-3)
    opt.step()
    opt.step()
    assert opt.state[p]["step"] == 2


def test_chunked_update_equals_the_whole_tensor_update():
    """A tensor of 1.5 chunks: the chunked 8-bit step matches memfit.distill's unchunked one."""
    from memfit.distill.loop import AdamW8bit
    from memfit.train.optim import CHUNK_BLOCKS

    n = CHUNK_BLOCKS * 256 * 3 // 2 + 77
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(n))
    b = torch.nn.Parameter(a.detach().clone())
    oa, ob = ShardedAdamW8bit([a], lr=1e-2), AdamW8bit([b], lr=1e-2)
    for _ in range(3):
        g = torch.randn(n)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    worst = (a - b).abs().max().item()
    print(f"chunked vs whole: max |diff| {worst:.1e}")
    assert worst < 1e-7
    assert torch.equal(oa.state[a]["m"], ob.state[b]["m"])
