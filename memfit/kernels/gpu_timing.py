"""Timing GPU kernels the way a decode step runs them: inside one CUDA graph (no launch
overhead), over copies of the weight that together overflow the L2 (each layer's weight is read
from device memory once per token). Used by memfit.kernels.triton_int's per-shape chooser and by
benchmarks/kernel_speed.py."""

from __future__ import annotations

import statistics

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
    return graph_us_each([fns], lambda fns: calls, replays, stat)[0]


def graph_us_each(fn_lists, calls, replays: int = 6, stat=min, alive: int = 8) -> list:
    """`graph_us` for each list of `fn_lists` (its graph calls the list in turn `calls(list)`
    times), the graphs replayed in turns, up to `alive` at a time: replay r runs every graph of a
    batch once, in reverse order on odd r. A device whose clocks sink while it runs (an H200 under
    compute-bound GEMMs: bf16 at M = 2048 timed 312 µs at the start of a benchmark cell and 349
    at its end, benchmarks/RESULTS.md, session 41) so slows the graphs of a batch alike, where
    timing one graph after another charged the drift to whichever ran last. Between batches the
    device differs too (session 43: the same launch read 4-9% faster in a second batch of 1-2
    graphs than in a first of 8), so every later batch replays the first list's graph again and
    its times are scaled by that graph's median in the first batch over its median in theirs.
    A batch also closes early when the device lacks room for one more graph the size of the last
    (`_room_after`): the chooser runs at a model's first forward, on a GPU the model may nearly
    fill; the batch after such a one holds no reference (unscaled)."""
    out, i, ref, tight = [], 0, None, False
    while i < len(fn_lists):
        graphs = []
        if ref is not None and not tight:  # the first list again: what this batch is scaled by
            graphs.append(_capture(fn_lists[0], calls(fn_lists[0])))
        lead, tight = len(graphs), False
        while i < len(fn_lists) and len(graphs) < max(alive, lead + 1):
            before = torch.cuda.memory_reserved()
            graphs.append(_capture(fn_lists[i], calls(fn_lists[i])))
            i += 1
            if not _room_after(torch.cuda.memory_reserved() - before):
                tight = True
                break
        times = [[] for _ in graphs]
        for j in turns(len(graphs), replays):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graphs[j][0].replay()
            b.record()
            b.synchronize()
            times[j].append(a.elapsed_time(b) * 1e3 / graphs[j][1])
        del graphs
        if ref is None:
            ref = times[0]
        elif lead:
            scale = statistics.median(ref) / statistics.median(times[0])
            times = [[t * scale for t in ts] for ts in times[1:]]
        out += [stat(t) for t in times]
    return out


def _room_after(took: int) -> bool:
    """Whether the device's free memory holds another graph that takes `took` bytes (what the
    last capture added to the allocator's reserve) twice over."""
    return took <= 0 or torch.cuda.mem_get_info()[0] >= 2 * took


def turns(n: int, replays: int) -> list[int]:
    """The order `graph_us_each` replays n graphs in: 0..n-1, then n-1..0, and so on. Over an
    even number of replays every graph's mean place in the sequence is the same, so a drift
    linear in time adds the same to each one's mean."""
    return [j for r in range(replays) for j in (range(n) if r % 2 == 0 else range(n - 1, -1, -1))]


def _capture(fns, calls: int):
    """(a CUDA graph of `fns` called in turn `calls` times, calls), warmed up on a side stream
    before the capture and replayed once after it."""
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
    return g, calls
