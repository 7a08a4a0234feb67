"""Timing GPU kernels the way a decode step runs them: inside one CUDA graph (no launch
overhead), over copies of the weight that together overflow the L2 (each layer's weight is read
from device memory once per token). Used by memfit.kernels.triton_int's per-shape chooser and by
benchmarks/kernel_speed.py."""

from __future__ import annotations

import torch

from memfit.kernels.weights import IntWeight

L2_BYTES = 64 << 20


def weight_copies(w: IntWeight) -> list[IntWeight]:
    """`w` and copies of it, together several times the L2, so that a timing reads the weight
    from device memory as a decode step does (each layer's weight is read once per token)."""
    nbytes = sum(t.numel() * t.element_size() for t in (w.qdata, w.scale, w.zero)
                 if t is not None)
    n = max(1, min(32, -(-4 * L2_BYTES // max(nbytes, 1))))
    return [w] + [w._replace(qdata=w.qdata.clone(), scale=w.scale.clone(),
                             zero=None if w.zero is None else w.zero.clone())
                  for _ in range(n - 1)]


def graph_us(fns, calls: int, replays: int = 3, stat=min) -> float:
    """µs per call of `fns` called in turn `calls` times inside one CUDA graph (no launch
    overhead, as in a captured decode step), `stat` (min, a median...) over `replays` replays.
    Warmed up on a side stream before the capture."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fns[i % len(fns)]()
    g.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    del g
    return stat(times)
