"""Prefill through a mixture of experts on one GPU: one Mixtral-8x7B-shaped layer's experts
(benchmarks/moe_decode.py's shape, random weights, random top-2 routing of T tokens), and a
whole few-layer model's forward over a prompt. Rows:

- bf16 transformers: its experts module as loaded (`grouped_mm`, one grouped GEMM a projection);
- bf16 / int4 g128 memfit loop: memfit.moe.Experts one expert at a time (MEMFIT_MOE_ROUTED=0; a
  host sync a layer, each expert's linear through memfit's packed-linear kernels);
- bf16 / int4 g128 memfit grouped: memfit.kernels.triton_moe.moe_grouped (MEMFIT_MOE_ROUTED=1;
  the pairs sorted by expert on the GPU, no host sync), at the shipped launch shape and, with
  --shapes, others.

Times are eager (the loop cannot be captured): mean of 10 calls after 3 warm-up calls, host
synchronized. Every grouped output is checked against the loop's (max relative error printed).

    python benchmarks/moe_prefill.py [--tokens 16 64 256 1024 4096] [--layers 4] [--shapes]
                                     [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.moe_decode import build, to_int4
from memfit.moe import unfuse_experts_


def eager_us(fn, calls: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def routing(tokens: int, experts: int, k: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(tokens, experts, device="cuda", generator=g)
    w, idx = torch.topk(torch.softmax(logits, -1), k, -1)
    return idx, (w / w.sum(-1, keepdim=True)).to(torch.bfloat16)


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def gate_check(ex, x, idx, samples: int = 64) -> float:
    """The grouped kernel's gate projection at any size (whichever path the layer takes there)
    against float32 products of sampled pairs with their expert's dequantized weight: the max
    relative error over the samples."""
    from memfit.kernels.triton_moe import Groups, moe_grouped
    from memfit.kernels.weights import dequantize
    from memfit.moe import _weight, routed_ok

    os.environ["MEMFIT_MOE_ROUTED"] = "1"
    assert routed_ok(ex, x[:8], idx[:8])  # builds the layer's tables
    k = idx.shape[1]
    y = moe_grouped(x, Groups(idx, ex.num_experts), ex._tables[0], k)
    worst = 0.0
    for p in torch.linspace(0, idx.numel() - 1, samples).long().tolist():
        w = _weight(ex.experts()[int(idx.reshape(-1)[p])].gate_proj)[0]
        w = w.float() if isinstance(w, torch.Tensor) else dequantize(w).float()
        want = x[p // k].float() @ w.T
        worst = max(worst, ((y[p].float() - want).norm() / want.norm()).item())
    return worst


def main() -> None:
    import memfit.kernels.triton_moe as tm

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 256, 1024, 4096])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--shapes", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    out: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "triton": __import__("triton").__version__, "layers": a.layers}
    m = build(a.layers)
    m.config._experts_implementation = "grouped_mm"
    hf = copy.deepcopy(m.model.layers[0].mlp.experts)  # transformers' own module, bf16
    k, e = m.config.num_experts_per_tok, m.config.num_local_experts
    h = m.config.hidden_size

    def model_rows(tag):
        for p in a.prompts:
            ids = torch.randint(0, m.config.vocab_size, (1, p), device="cuda")
            with torch.no_grad():
                out[f"{tag}_prompt{p}_us"] = eager_us(lambda ids=ids: m(ids, use_cache=False),
                                                      calls=3)
            print(tag, p, round(out[f"{tag}_prompt{p}_us"]), flush=True)

    model_rows("model_bf16_hf")
    unfuse_experts_(m)
    ex = m.model.layers[0].mlp.experts

    def layer_rows(tag, hf=None):
        for t in a.tokens:
            x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
            idx, w = routing(t, e, k, t)
            call = functools.partial(ex, x, idx, w)
            with torch.no_grad():
                if hf is not None:
                    out[f"hf_bf16_t{t}_us"] = eager_us(functools.partial(hf, x, idx, w))
                os.environ["MEMFIT_MOE_ROUTED"] = "0"
                loop = call()
                out[f"loop_{tag}_t{t}_us"] = eager_us(call)
                os.environ["MEMFIT_MOE_ROUTED"] = "1"
                got = call()
                out[f"grouped_{tag}_t{t}_relerr"] = rel(got, loop)
                out[f"grouped_{tag}_t{t}_us"] = eager_us(call)
                out[f"gate_{tag}_t{t}_vs_float32"] = gate_check(ex, x, idx)
                if a.shapes and t * k > 64:
                    keep = tm.GROUP_BM, tm.GROUP_BN, tm.GROUP_WARPS, tm.GROUP_STAGES, \
                        tm.GROUP_JOIN
                    for shape in ((64, 128, 4, 3, True), (64, 64, 4, 3, False),
                                  (64, 128, 8, 3, False), (128, 128, 8, 3, False),
                                  (128, 128, 8, 3, True), (64, 128, 4, 4, False),
                                  (32, 128, 4, 3, False), (128, 64, 4, 3, False),
                                  (64, 256, 8, 3, False), (64, 256, 8, 3, True)):
                        tm.GROUP_BM, tm.GROUP_BN, tm.GROUP_WARPS, tm.GROUP_STAGES, \
                            tm.GROUP_JOIN = shape
                        try:
                            us = eager_us(call)
                            assert rel(call(), loop) < 1e-2
                        except Exception as err:  # noqa: BLE001 -- a launch shape that fails
                            us = repr(err)[:100]
                        out[f"grouped_{tag}_t{t}_" + "_".join(map(str, shape))] = us
                    tm.GROUP_BM, tm.GROUP_BN, tm.GROUP_WARPS, tm.GROUP_STAGES, \
                        tm.GROUP_JOIN = keep
            print(tag, t, {kk: v for kk, v in out.items() if f"_t{t}_" in kk and tag in kk
                           or kk.startswith(f"hf_bf16_t{t}_")}, flush=True)

    layer_rows("bf16", hf)
    for tag in ("bf16_loop", "bf16_grouped"):
        os.environ["MEMFIT_MOE_ROUTED"] = "1" if tag.endswith("grouped") else "0"
        model_rows(f"model_{tag}")
    hf = None  # free transformers' copy
    out["int4_linears"] = to_int4(m)
    ex = m.model.layers[0].mlp.experts
    layer_rows("int4")
    for tag in ("int4_loop", "int4_grouped"):
        os.environ["MEMFIT_MOE_ROUTED"] = "1" if tag.endswith("grouped") else "0"
        model_rows(f"model_{tag}")
    print(json.dumps(out), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
