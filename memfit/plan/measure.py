"""Measure a saved model's peak memory in a fresh process: `python -m memfit.plan.measure DIR
--context C --batch B [--kv int4] [--device cpu]` prints one JSON line.

The process imports memfit and builds the model's skeleton (so the runtime's own memory is in
`baseline_bytes`), loads DIR with memfit's loader, runs one prefill of C random tokens per
sequence (logits of the last position only, as generation does) and 8 decode steps through the
(quantized) KV cache. CPU: peak resident set size (VmHWM); CUDA: torch's peak allocation.
Before the baseline it holds glibc's mmap threshold fixed, as memfit's loader does
(memfit.eval.memory.steady_malloc): with glibc's moving threshold the same model's peak varied
by up to 83 MB from run to run. `--overhead` stops after the baseline: the memory model's
runtime overhead; with `--forward` too, it then loads the model, reads every weight once (so the
forward touches no new weight pages) and reports `forward_bytes` for each precision in `--kv`
(a comma list): the peak growth of the same prefill and decode over the memory held before it,
the activation, workspace and KV-cache peak the planner counts (measured, because attention
paths that materialise T x T scores, e.g. sliding-window masks, escape any estimate).
"""

from __future__ import annotations

import argparse
import json
import sys


def in_fresh_process(model: str, *args: str) -> dict:
    """This module's JSON result for `model` with `args`, measured in a fresh Python process."""
    import subprocess

    r = subprocess.run([sys.executable, "-m", "memfit.plan.measure", model, *args],
                       capture_output=True, text=True, timeout=3600, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"measuring {model} failed: {r.stderr.strip()[-800:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _rss(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _tokenizer(spec: str):
    """The model's tokenizer, loaded as memfit's loader loads it (None if it has none)."""
    from memfit.io.checkpoint import load_tokenizer
    from memfit.models import _convert_gguf, resolve

    kind, location = resolve(spec)
    if kind == "gguf":
        location = _convert_gguf(location)
    return load_tokenizer(location, spec, local=kind != "hub")


def _warm_up() -> None:
    """Run each CPU kernel family a model's forward uses once, on tiny tensors: their code pages
    and one-time workspaces are the runtime's, not the model's. That includes the packed path's
    tile buffers (memfit.kernels.cpu.scratch), which a packed layer's prefill grows to one whole
    tile (5 MiB) and keeps (measured: a plan with an int4 head of 30522 rows otherwise missed
    its prediction by 6 MB)."""
    import torch
    import torch.nn.functional as F

    from memfit.algos.rtn import rtn
    from memfit.formats.grid import IntFormat
    from memfit.formats.quant_linear import QuantLinear
    from memfit.kernels.cpu import reserve_tiles

    x = torch.randn(1, 8, 64)
    with torch.inference_mode():
        F.scaled_dot_product_attention(x[None], x[None], x[None], is_causal=True)
        for fmt in (IntFormat(bits=4, group_size=32), IntFormat(bits=3, group_size=32),
                    IntFormat(bits=8, group_size=None, symmetric=True)):
            lin = torch.nn.Linear(64, 32, bias=False)
            r = rtn(lin.weight.detach(), fmt)
            q = QuantLinear.from_linear(lin, r.codes, r.scale, r.zero, fmt)
            q(x[:, :1]), q(x)
    reserve_tiles()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m memfit.plan.measure")
    p.add_argument("model")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--kv", default="none", help="KV precision; with --forward, a comma list")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overhead", action="store_true")
    p.add_argument("--forward", action="store_true")
    a = p.parse_args(argv)

    import torch

    import memfit  # noqa: F401 -- what a user's process imports
    from memfit.eval.memory import steady_malloc
    from memfit.models import skeleton

    torch.manual_seed(0)
    skeleton(a.model)  # imports the model's transformers module, builds nothing real
    tok = _tokenizer(a.model)  # a loaded tokenizer is part of the runtime (47 MB for the default's)
    cuda = a.device.startswith("cuda")
    if not cuda:
        _warm_up()
        steady_malloc()  # what memfit's loader does first; it also trims the freed heap
    baseline = _rss()
    if a.overhead and not a.forward:
        return {"baseline_bytes": baseline}
    from memfit.models import load_model

    del tok  # the loaded model brings its own (the loader first hands the freed memory back)
    loaded = load_model(a.model, device=a.device)
    model = loaded.model
    if a.overhead:  # --forward: every weight read once, so only the forward's growth is left
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                if t.is_floating_point():
                    float(t.float().sum())
        return {"baseline_bytes": baseline,
                "forward_bytes": {kv: _forward_growth(loaded, a, kv, cuda)
                                  for kv in a.kv.split(",")}}
    after_load = _rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats(a.device)
        loaded_alloc = torch.cuda.memory_allocated(a.device)
    _run(loaded, a, a.kv)
    return _result(baseline, after_load, cuda, a.device, loaded_alloc if cuda else 0)


def _run(loaded, a, kv: str) -> None:
    """One prefill of a.context random tokens per sequence (last position's logits only, as
    generation computes them) and 8 greedy decode steps through the (quantized) KV cache; an
    encoder runs one forward of the batch."""
    import torch
    from transformers import DynamicCache

    from memfit.kvcache import QuantizedKVCache, cache_kwarg
    from memfit.plan.target import kv_format

    model = loaded.model
    torch.manual_seed(0)
    if loaded.kind == "encoder":
        ids = torch.randint(0, model.config.vocab_size, (a.batch, a.context), device=a.device)
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
        return
    fmt = kv_format(kv)
    cache = QuantizedKVCache(model.config, fmt) if fmt else DynamicCache(config=model.config)
    kw = cache_kwarg(model)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (a.batch, a.context), device=a.device)
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
        for _ in range(8):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=nxt, use_cache=True, logits_to_keep=1, **{kw: cache})


def _forward_growth(loaded, a, kv: str, cuda: bool) -> int:
    """Peak growth of `_run` with this KV precision over the memory held before it: the
    activation, workspace and KV-cache peak that the planner adds to the weights."""
    import gc

    import torch

    from memfit.eval.memory import reset_peak_rss, steady_malloc

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(a.device)
        start = torch.cuda.memory_allocated(a.device)
        _run(loaded, a, kv)
        return torch.cuda.max_memory_allocated(a.device) - start
    steady_malloc()
    if not reset_peak_rss():
        raise RuntimeError("measuring several forwards needs /proc/self/clear_refs (Linux)")
    start = _rss()
    _run(loaded, a, kv)
    return max(0, _rss("VmHWM") - start)


def _result(baseline: int, after_load: int, cuda: bool, device: str, loaded_alloc: int) -> dict:
    res = {"baseline_bytes": baseline, "after_load_bytes": after_load,
           "peak_bytes": _rss("VmHWM"), "kind": "process_peak_rss"}
    res["forward_bytes"] = max(0, res["peak_bytes"] - after_load)
    if cuda:
        import torch
        res.update(peak_bytes=torch.cuda.max_memory_allocated(device),
                   after_load_bytes=loaded_alloc, baseline_bytes=0,
                   forward_bytes=torch.cuda.max_memory_allocated(device) - loaded_alloc,
                   kind="cuda_max_memory_allocated")
    return res


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
