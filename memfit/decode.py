"""Greedy decoding with a static KV cache and one CUDA graph per decode step.

transformers' eager `generate` launches every kernel of every layer from Python at each token; on
a fast GPU a small batch then waits on the CPU (launch overhead), not on memory. Here the prompt
is prefilled eagerly into a `StaticCache` (fixed shapes), one decode step is captured in a CUDA
graph, and each further token is one graph replay: the input token and its position are copied
into the graph's static input tensors, the argmax stays on the GPU. Kernel choices (memfit's
Triton launch shapes) are made in the warm-up steps before capture.

The arithmetic is the model's own forward, so greedy tokens equal the eager path's up to the
floating-point differences of a static vs dynamic cache layout (benchmarks/decode_gpu.py
compares them). CPU models use transformers' `generate` (no graphs there).
"""

from __future__ import annotations

import torch

from memfit.errors import UserError
from memfit.kvcache import cache_kwarg


@torch.inference_mode()
def greedy_cuda_graph(model, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """(B, T) prompt ids on CUDA -> (B, max_new_tokens) greedy continuation."""
    from transformers import StaticCache

    if not ids.is_cuda:
        raise UserError("CUDA-graph decoding needs the model and ids on a CUDA device")
    b, t = ids.shape
    dev = ids.device
    cache = StaticCache(config=model.config, max_cache_len=t + max_new_tokens)
    kw = {cache_kwarg(model): cache, "use_cache": True}
    logits = model(input_ids=ids, cache_position=torch.arange(t, device=dev), **kw).logits
    token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    static_in = token.clone()
    pos = torch.full((1,), t, dtype=torch.long, device=dev)

    def step():
        out = model(input_ids=static_in, cache_position=pos, **kw).logits
        return out[:, -1].argmax(-1, keepdim=True)

    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):  # warm-up: the same position is written again by the replay
        for _ in range(2):
            step()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    tokens = [token]
    for i in range(max_new_tokens - 1):
        static_in.copy_(tokens[-1])
        pos.fill_(t + i)
        graph.replay()
        tokens.append(static_out.clone())
    return torch.cat(tokens, dim=1)
