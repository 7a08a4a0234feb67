"""Decode speed of a Mixtral-8x7B-shaped model on one GPU: bf16 as transformers runs it (its
fused experts), bf16 with memfit's one-linear-per-expert layers (memfit.moe), and int4 g128
packed experts (memfit's QuantLinear and kernels), through transformers' eager `generate`
and through memfit's decode loop (`memfit generate` on CUDA: it falls back to eager decoding
when the step cannot be captured as a CUDA graph, which the routing's host sync prevents).

Random weights (speed only; the int4 codes random as in decode_gpu.py), batch 1, a 32-token
prompt; decode tokens/s = new tokens / (t(1 + N new) - t(1 new)), best of 2.

    python benchmarks/moe_decode.py [--layers 32] [--new 32] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memfit.formats.grid import IntFormat
from memfit.formats.quant_linear import QuantLinear
from memfit.moe import unfuse_experts_

SHAPE = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
             num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
             max_position_embeddings=4096, sliding_window=None)


def build(layers: int):
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(num_hidden_layers=layers, **SHAPE)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    m = m.to_empty(device="cuda").eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02, generator=g)
        hd = cfg.hidden_size // cfg.num_attention_heads
        for n, b in m.named_buffers():
            if "inv_freq" in n:
                b.copy_(1.0 / (cfg.rope_parameters["rope_theta"]
                               ** (torch.arange(0, hd, 2, device="cuda").float() / hd)))
    return m


def to_int4(m, group: int = 128) -> int:
    fmt = IntFormat(bits=4, group_size=group)
    g = torch.Generator(device="cuda").manual_seed(1)
    n = 0
    for layer in m.model.layers:
        for name, lin in list(layer.named_modules()):
            if not isinstance(lin, torch.nn.Linear):
                continue
            q = QuantLinear(lin.in_features, lin.out_features, fmt, bias=False, device="cuda",
                            dtype=torch.bfloat16)
            q.qdata.copy_(torch.randint(0, 256, q.qdata.shape, device="cuda", generator=g))
            q.zero.copy_(torch.randint(0, 256, q.zero.shape, device="cuda", generator=g))
            q.scale.copy_(torch.rand(q.scale.shape, device="cuda", generator=g) * 0.002)
            layer.set_submodule(name, q)
            n += 1
    torch.cuda.empty_cache()
    return n


def eager_tps(m, new: int, prompt: int = 32) -> float:
    ids = torch.randint(0, m.config.vocab_size, (1, prompt), device="cuda")

    def gen(k):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        m.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    gen(4)
    return new / min(gen(1 + new) - gen(1) for _ in range(2))


def loop_tps(m, new: int, prompt: int = 32) -> float:
    import warnings

    from memfit.decode import greedy_static

    ids = torch.randint(0, m.config.vocab_size, (1, prompt), device="cuda")
    best = None
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(2):
            t: dict = {}
            greedy_static(m, ids, 1 + new, timings=t)
            best = t["decode_s"] if best is None else min(best, t["decode_s"])
    for x in {str(x.message).splitlines()[0] for x in w}:
        print("warning:", x[:200], flush=True)
    return new / best


def graph_us(fn, calls: int = 20, replays: int = 5) -> float:
    """µs a call of `fn`, timed as `calls` calls captured in one CUDA graph."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (calls * replays) * 1e6


def kernel_us(m, rows: tuple[int, ...] = (2, 16)) -> dict:
    """The routed GEMV alone on layer 0's experts (int4 g128), µs a call in a CUDA graph,
    against bf16 cuBLAS of one expert's gate projection at the same rows; at 2 rows also the
    multiply-add form (FMA_ROWS) and other launch shapes."""
    import memfit.kernels.triton_moe as tm

    ex = m.model.layers[0].mlp.experts
    gate, _, down = ex._tables
    out = {}
    for r in rows:
        ids = torch.arange(r, device="cuda", dtype=torch.int32) % ex.num_experts
        x = torch.randn(r, gate.shape[1], device="cuda", dtype=torch.bfloat16)
        h = torch.randn(r, down.shape[1], device="cuda", dtype=torch.bfloat16)
        w = torch.randn(gate.shape, device="cuda", dtype=torch.bfloat16)
        out[f"gate_r{r}_us"] = graph_us(lambda x=x, ids=ids: tm.moe_linear(x, ids, gate))
        out[f"down_r{r}_us"] = graph_us(lambda h=h, ids=ids: tm.moe_linear(h, ids, down))
        out[f"bf16_one_expert_r{r}_us"] = graph_us(lambda x=x, w=w: x @ w.T)
        per = gate.shape[0] * gate.shape[1] // 2 * (1 + 2.5 / 128)  # codes, scales, zeros
        out[f"gate_r{r}_TBps"] = min(r, ex.num_experts) * per / out[f"gate_r{r}_us"] / 1e6
    x = torch.randn(2, gate.shape[1], device="cuda", dtype=torch.bfloat16)
    ids = torch.arange(2, device="cuda", dtype=torch.int32)
    keep = tm.FMA_ROWS, tm.BN_ROWS, tm.WARPS
    tm.FMA_ROWS = 4
    out["gate_r2_fma_us"] = graph_us(lambda: tm.moe_linear(x, ids, gate))
    tm.FMA_ROWS = keep[0]
    for tm.BN_ROWS, tm.WARPS in ((32, 4), (64, 8), (128, 4), (128, 8)):
        out[f"gate_r2_bn{tm.BN_ROWS}_w{tm.WARPS}_us"] = graph_us(lambda: tm.moe_linear(x, ids, gate))
    tm.FMA_ROWS, tm.BN_ROWS, tm.WARPS = keep
    return out


def main() -> None:
    import os

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--json")
    a = ap.parse_args()
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": a.layers,
           "shape": SHAPE}
    m = build(a.layers)
    out["bf16_gb"] = torch.cuda.memory_allocated() / 1e9
    print(json.dumps(out), flush=True)

    def row(name, fn, routed=True):
        os.environ["MEMFIT_MOE_ROUTED"] = "1" if routed else "0"
        out[name] = fn()
        print(name, round(out[name], 2), flush=True)

    m.config._experts_implementation = "grouped_mm"
    row("bf16_hf_grouped_mm_tps", lambda: eager_tps(m, a.new))
    unfuse_experts_(m)
    row("bf16_memfit_loop_eager_tps", lambda: eager_tps(m, a.new), routed=False)
    row("bf16_memfit_routed_eager_tps", lambda: eager_tps(m, a.new))
    row("bf16_memfit_routed_graph_tps", lambda: loop_tps(m, a.new))
    out["int4_linears"] = to_int4(m)
    out["int4_gb"] = torch.cuda.memory_allocated() / 1e9
    row("int4_memfit_loop_eager_tps", lambda: eager_tps(m, a.new), routed=False)
    row("int4_memfit_routed_eager_tps", lambda: eager_tps(m, a.new))
    row("int4_memfit_routed_graph_tps", lambda: loop_tps(m, a.new))
    out.update(kernel_us(m))
    print(json.dumps(out), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
