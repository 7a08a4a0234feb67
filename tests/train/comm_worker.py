"""Run by test_grad_comm under torchrun (not a test module): exercises the gradient collectives
of memfit.train.comm on random gradient-like buffers and writes what each rank measured to
PREFIX.rank<r>.json.

- bf16 and int8 reduce-scatter against the float32 sum, with each element's error bound;
- int8 error feedback over STEPS steps: the summed outputs against the true sum, and the
  residual every rank carries;
- PowerSGD on a DDP model: the bytes counted per step against the P and Q the hook really
  all-reduced.
"""

import gc
import json
import sys

import torch
import torch.distributed as dist

STEPS = 20


def reduce_scatter_errors(rank: int, w: int) -> dict:
    from memfit.train.comm import ByteCounter, CountingReduceScatter, Int8ReduceScatter

    g = torch.Generator().manual_seed(100 + rank)
    n = 4 * 1000  # not a multiple of 256: the last block is padded
    x = torch.randn(w * n, generator=g) * torch.logspace(-4, 0, w * n)  # uneven magnitudes
    everyone = [torch.empty_like(x) for _ in range(w)]
    dist.all_gather(everyone, x)
    exact = torch.stack(everyone).view(w, w, n)[:, rank].double().sum(0)  # (n,) my chunk's sum
    c = ByteCounter()
    out = torch.empty(n)
    CountingReduceScatter(c)(out, x.clone(), dist.group.WORLD, dist.ReduceOp.SUM)
    fp32 = c.reset()
    out16 = torch.empty(n, dtype=torch.bfloat16)
    CountingReduceScatter(c)(out16, x.to(torch.bfloat16), dist.group.WORLD, dist.ReduceOp.SUM)
    bf16 = c.reset()
    out8 = torch.empty(n)
    Int8ReduceScatter(c)(out8, x.clone(), dist.group.WORLD, dist.ReduceOp.SUM)
    int8 = c.reset()
    abs_sum = torch.stack(everyone).view(w, w, n)[:, rank].abs().sum(0)
    # int8 bound: every rank's element is off by at most half a step of its block (absmax/254)
    block_max = torch.stack(everyone).view(w, w, n)[:, rank]
    pad = (-n) % 256
    bm = torch.nn.functional.pad(block_max, (0, pad)).view(w, -1, 256).abs().amax(2)  # (w, nb)
    int8_bound = (bm / 254).repeat_interleave(256, 1)[:, :n].sum(0)
    return {"fp32_err": (out.double() - exact).abs().max().item(),
            "bf16_excess": ((out16.double() - exact).abs() - 2 ** -7 * abs_sum).max().item(),
            "bf16_rel": ((out16.double() - exact).abs() / abs_sum).max().item(),
            "int8_excess": ((out8.double() - exact).abs() - int8_bound * 1.0001).max().item(),
            "int8_rel": ((out8.double() - exact).abs() / abs_sum).max().item(),
            "bytes": {"fp32": fp32, "bf16": bf16, "int8": int8}}


def error_feedback(rank: int, w: int) -> dict:
    from memfit.train.comm import Int8ReduceScatter

    n = 3000
    g = torch.Generator().manual_seed(200 + rank)
    with_ef, without = Int8ReduceScatter(), Int8ReduceScatter()
    total_in = torch.zeros(w * n, dtype=torch.float64)
    got_ef, got_plain = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    out = torch.empty(n)
    for _ in range(STEPS):
        x = torch.randn(w * n, generator=g) * 1e-3 + 1e-5  # a small bias int8 steps round off
        total_in += x.double()
        with_ef(out, x.clone(), dist.group.WORLD, dist.ReduceOp.SUM)
        got_ef += out.double()
        without(out, x.clone(), dist.group.WORLD, dist.ReduceOp.SUM)
        without.residual = None  # no feedback: every step starts fresh
        got_plain += out.double()
    sums = [torch.empty_like(total_in) for _ in range(w)]
    dist.all_gather(sums, total_in)
    exact = torch.stack(sums).view(w, w, n)[:, rank].sum(0)
    res = [torch.empty(w, n) for _ in range(w)]
    dist.all_gather(res, with_ef.residual.contiguous())
    carried = torch.stack(res)[:, rank].double().sum(0)  # every sender's residual for my chunk
    return {"ef_err": (got_ef - exact).abs().max().item(),
            "plain_err": (got_plain - exact).abs().max().item(),
            "ef_identity_err": (got_ef + carried - exact).abs().max().item(),
            "residual_absmax": with_ef.residual.abs().max().item()}


def powersgd_bytes(rank: int, w: int) -> dict:
    from memfit.train.comm import ByteCounter, attach_powersgd, powersgd_payload
    from memfit.train.engine import replicate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 128),
                                torch.nn.Linear(128, 8))
    ddp = replicate(model, torch.device("cpu"))
    c = ByteCounter()
    state = attach_powersgd(ddp, 4, c)
    per_step = []
    for i in range(3):
        torch.manual_seed(10 * rank + i)
        ddp(torch.randn(16, 256)).square().mean().backward()
        per_step.append(c.reset())
    shapes = [p.shape for p in model.parameters()]
    expected = powersgd_payload(shapes, 4)
    sent_p = sum(t.numel() for t in state.p_memory_dict.values())
    sent_q = sum(t.numel() for t in state.q_memory_dict.values())
    return {"per_step": per_step, "expected": expected, "sent_p": sent_p, "sent_q": sent_q,
            "params": sum(s.numel() for s in shapes)}


def main() -> None:
    from memfit.train.engine import init_distributed

    rank, w, _, _ = init_distributed("cpu")
    out = {"rs": reduce_scatter_errors(rank, w), "ef": error_feedback(rank, w),
           "psgd": powersgd_bytes(rank, w)}
    with open(f"{sys.argv[1]}.rank{rank}.json", "w") as f:
        json.dump(out, f)
    gc.collect()  # the DDP model (a reference cycle through its hook) goes before the group
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
