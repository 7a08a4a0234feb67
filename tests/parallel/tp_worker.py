"""Run under torchrun (gloo): tiny random Llamas and mixtures of experts, dense and RTN
int4/int8, sharded with memfit.parallel.parallelize_; rank 0 writes logits errors vs the
unsharded model, whether greedy tokens agree, and every rank's holdings as JSON to argv[1]."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from tiny import FORMATS, MOE, quantize_blocks_, tiny_llama, tiny_moe

from memfit.parallel.tp import parallelize_, rank_report


@torch.no_grad()
def run_case(config, fmt, rank, world):
    model = quantize_blocks_(tiny_moe(config) if config in MOE else tiny_llama(config),
                             FORMATS[fmt])
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(7))
    ref = model(ids).logits
    ref_step = model(ids[:1, :1]).logits  # one row: the CPU int kernels' bfloat16 decode path
    ref_tokens = model.generate(ids[:1], max_new_tokens=16, do_sample=False, pad_token_id=0)
    whole = rank_report(model, rank, 1, None)["weight_bytes"]
    whole_experts = _expert_bytes(model)
    report = parallelize_(model, rank, world)
    report["expert_bytes"] = _expert_bytes(model)
    out = model(ids).logits
    step = model(ids[:1, :1]).logits
    tokens = model.generate(ids[:1], max_new_tokens=16, do_sample=False, pad_token_id=0)
    reports = [None] * world
    dist.all_gather_object(reports, report)
    return {"max_abs_logit_diff": (out - ref).abs().max().item(),
            "logit_scale": ref.abs().max().item(),
            "decode_step_diff": (step - ref_step).abs().max().item(),
            "tokens_equal": bool(torch.equal(tokens, ref_tokens)), "ranks": reports,
            "whole_bytes": whole, "whole_expert_bytes": whole_experts}


def _expert_bytes(model) -> int:
    """Bytes of every tensor under a mixture's experts (0 for a dense model)."""
    state = model.state_dict()
    return sum(t.numel() * t.element_size() for k, t in state.items() if ".experts." in k)


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    res = {f"{c}/{f}": run_case(c, f, rank, world)
           for c in ("llama", "gqa_uneven", *MOE) for f in FORMATS}
    if rank == 0:
        Path(sys.argv[1]).write_text(json.dumps(res, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
