"""Where a model's memory goes: exact weight bytes per module kind and dtype, the KV cache, an
estimate of the inference activation peak, and a peak-memory meter.

Weight bytes are the sum of the bytes of every distinct tensor in the state dict (tied tensors
counted once), so the table's total equals what is resident. Packed formats (QuantLinear etc.)
hold their codes, scales and zero points as buffers, so they are counted the same way and their
bits per weight come from the module itself.
"""

from __future__ import annotations

import resource
from collections import defaultdict
from pathlib import Path

import torch

from memfit.archs import kv_shape, text_config


def _leaf_owner(model: torch.nn.Module):
    """(module name, module, tensor name, tensor) for every distinct state-dict tensor."""
    seen = set()
    for mod_name, mod in model.named_modules():
        tensors = list(mod.named_parameters(recurse=False))
        tensors += [(n, b) for n, b in mod.named_buffers(recurse=False)
                    if n not in mod._non_persistent_buffers_set]
        for name, t in tensors:
            if t is None:
                continue
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) \
                if t.device.type != "meta" else id(t)
            if key in seen:
                continue
            seen.add(key)
            yield mod_name, mod, name, t


def human_bytes(n: float) -> str:
    """'1.234 GB' from 0.1 GB up, else '12.34 MB'."""
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _packed_bytes(mod) -> int | None:
    """Stored weight bytes of a memfit module (the packed-module protocol), None for others."""
    if isinstance(mod, torch.nn.Linear) or not callable(getattr(mod, "describe", None)):
        return None
    return mod.nbytes()


def _packed_label(mod) -> str:
    fmt, layout = getattr(mod, "fmt", None), getattr(mod, "layout", None)
    kind = f"sparse {layout}" if layout else ("low-rank" if hasattr(mod, "rank") else None)
    if fmt is None:
        return kind or type(mod).__name__
    zero = "sym" if fmt.symmetric else f"{fmt.zero_point} zero"
    label = f"int{fmt.bits} group {fmt.group_size or 'channel'} {zero}, {fmt.scale_dtype} scales"
    return f"{kind} + {label}" if kind else label


def _widen_bytes(mod) -> int:
    """Bytes memfit's CUDA decode loop adds holding a 3-bit QuantLinear as 4-bit codes
    (memfit.fastdecode.Tiling.convert, memfit.kernels.weights.widen_bytes)."""
    if getattr(getattr(mod, "fmt", None), "bits", None) != 3 or not hasattr(mod, "kernel_weight"):
        return 0
    from memfit.kernels.weights import widen_bytes
    return widen_bytes(mod.kernel_weight())


def weight_table(model: torch.nn.Module) -> dict:
    """Rows (kind, dtype, tensors, elements, bytes), packed formats with their bits per weight,
    and totals. `parameters` counts logical weights: a packed module contributes its (out x in)
    weights (+ bias), not its code bytes, so bits_per_weight = 8 x bytes / parameters."""
    rows = defaultdict(lambda: {"tensors": 0, "numel": 0, "bytes": 0})
    total_bytes = 0
    for _, mod, _, t in _leaf_owner(model):
        key = (type(mod).__name__, str(t.dtype).replace("torch.", ""))
        nbytes = t.numel() * t.element_size()
        rows[key]["tensors"] += 1
        rows[key]["numel"] += t.numel()
        rows[key]["bytes"] += nbytes
        total_bytes += nbytes
    parameters, packed = 0, defaultdict(lambda: {"modules": 0, "weights": 0, "bytes": 0})
    seen = set()  # tied weights (embeddings = lm_head) are one tensor, counted once
    seen_codes = set()  # packed tensors shared by two modules (tied) are counted once
    outer = []  # packed modules seen so far: their own sub-modules are theirs, not counted again
    for name, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                parameters += p.numel()
        nbytes = _packed_bytes(mod)
        codes = getattr(mod, "qdata", None)
        shared = codes is not None and id(codes) in seen_codes  # a head over the embedding's codes
        if nbytes is not None and not shared and not any(name.startswith(o + ".") for o in outer):
            if codes is not None:
                seen_codes.add(id(codes))
            outer.append(name)
            n = mod.in_features * mod.out_features
            if next(mod.parameters(), None) is None:
                # a packed module holds buffers: its logical weights count as parameters (a
                # low-rank layer's are its factors' r x (in + out))
                bias = getattr(mod, "bias", None)
                logical = mod.rank * (mod.in_features + mod.out_features) \
                    if hasattr(mod, "rank") else n
                parameters += logical + (bias.numel() if bias is not None else 0)
            row = packed[_packed_label(mod)]
            row["modules"] += 1
            row["weights"] += n
            row["bytes"] += nbytes
            row["decode_widen_bytes"] = row.get("decode_widen_bytes", 0) + _widen_bytes(mod)
    table = [{"kind": k, "dtype": d, **v} for (k, d), v in sorted(rows.items(), key=lambda x: -x[1]["bytes"])]
    formats = [{"format": k, **v, "bits_per_weight": 8 * v["bytes"] / v["weights"]}
               for k, v in packed.items()]
    return {"rows": table, "packed": formats, "weight_bytes": total_bytes, "parameters": parameters,
            "bits_per_weight": 8 * total_bytes / max(parameters, 1)}


def kv_bytes_per_token(config, kv_dtype: torch.dtype) -> int:
    """K and V for one token across all layers (GQA-aware: only the KV heads are cached)."""
    layers, kv_heads, head_dim = kv_shape(config)
    return 2 * layers * kv_heads * head_dim * torch.finfo(kv_dtype).bits // 8


_WINDOWED = ("sliding_attention", "hybrid_sliding", "chunked_attention")


def cached_tokens(config, context: int) -> list[int]:
    """Tokens each layer's KV cache holds after `context` tokens, as transformers' DynamicCache
    keeps them: sliding-window (and chunked) layers only their last window - 1 tokens, layers
    that reuse another's cache none, every other layer all of them. The layer types come from
    transformers' own reading of the config (`get_layer_types_and_kwargs`)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    n_layers = kv_shape(config)[0]
    try:
        types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    except (AttributeError, TypeError):  # a config without per-layer facts: every layer is full
        return [context] * n_layers
    if isinstance(kwargs, dict):  # transformers 5.17: one dict for all windowed layers
        kwargs = [kwargs if t in _WINDOWED else {} for t in types]
    out = []
    for t, kw in zip(types, kwargs, strict=True):
        if t == "dummy":
            out.append(0)
        elif kw.get("sliding_window"):
            out.append(min(context, kw["sliding_window"] - 1))
        else:
            out.append(context)
    # older transformers list only the layers that own a cache (KV shared by the last ones)
    return out + [0] * (n_layers - len(out))


def kv_cache_bytes(config, context: int, batch: int, kv_dtype: torch.dtype, kv_format=None) -> dict:
    """Exact KV-cache bytes at `context` x `batch`, per layer type (see `cached_tokens`); with a
    memfit.kvcache.KVFormat, full-attention layers are quantized (sliding ones stay dense)."""
    n_layers, kv_heads, head_dim = kv_shape(config)
    per_layer_token = kv_bytes_per_token(config, kv_dtype) // n_layers
    tokens = cached_tokens(config, context)
    full = sum(t == context for t in tokens)
    # right after a one-shot prefill every caching layer holds the whole prompt: transformers'
    # sliding-window layers keep views of the full prefill K/V until the first decode step, and
    # a quantized cache quantizes only after the dense prefill states exist
    prefill = per_layer_token * batch * context * sum(t > 0 for t in tokens)
    if kv_format is not None:
        from memfit.kvcache import quantized_kv_bytes
        q = quantized_kv_bytes(kv_format, tokens=context, batch=batch, kv_heads=kv_heads,
                               head_dim=head_dim, dtype_bytes=kv_dtype.itemsize)
        dense = sum(t for t in tokens if t != context)
        return {"kv_bytes": q * full + per_layer_token * batch * dense, "kv_layers_full": full,
                "kv_prefill_peak_bytes": prefill,
                "kv_layers_windowed": len(tokens) - full, "kv_tokens_per_layer": tokens,
                "kv_format": f"int{kv_format.bits} (group {kv_format.group}, "
                             f"{kv_format.residual} recent tokens dense)"}
    return {"kv_bytes": per_layer_token * batch * sum(tokens), "kv_prefill_peak_bytes": prefill,
            "kv_layers_full": full, "kv_layers_windowed": len(tokens) - full,
            "kv_tokens_per_layer": tokens}


def activation_peak_estimate(config, context: int, batch: int, dtype: torch.dtype) -> int:
    """Rough peak of transient activations for one prefill of `context` tokens, in bytes.

    Counts, per token, the residual stream and a few hidden-size temporaries (4 x hidden), the
    MLP's intermediate tensors (3 x intermediate: gate, up, their product) and q/k/v
    (hidden + 2 x kv width); attention is assumed memory-efficient (SDPA/flash: no T x T matrix);
    plus fp32 logits for the last position only, as generation computes them. It is an estimate
    for planning, not a measurement: `memfit eval` measures the real peak.
    """
    c = text_config(config)
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd")
    inter = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * hidden
    _, kv_heads, head_dim = kv_shape(config)
    el = torch.finfo(dtype).bits // 8
    per_token = (4 * hidden + 3 * inter + hidden + 2 * kv_heads * head_dim) * el
    return batch * context * per_token + batch * getattr(c, "vocab_size", 0) * 4


def _kernel_view(m: torch.nn.Module):
    """The IntWeight fields a packed module's CPU kernel layout is judged and priced from: a
    QuantLinear's own, a SparseLinear's dense codes' (its kernel_view); else None."""
    if callable(getattr(m, "kernel_weight", None)) and hasattr(m, "_cpu_cache"):
        return m.kernel_weight()
    view = getattr(m, "kernel_view", None)
    return view() if callable(view) else None


def cpu_layout_bytes(mod: torch.nn.Module) -> int:
    """Bytes of the CPU kernel layouts the packed modules in `mod` prepare at their first CPU
    forward (memfit.kernels.cpu.prepare_cpu), from their shapes (fine on the meta device)."""
    from memfit.kernels.cpu import layout_nbytes

    return sum(layout_nbytes(w) for m in mod.modules() if (w := _kernel_view(m)) is not None)


def inspect_model(model, *, context: int = 2048, batch: int = 1, kv_dtype=None,
                  kv_format=None, encoder: bool = False) -> dict:
    """Everything `memfit inspect` prints, as one dict (an encoder: no KV cache)."""
    table = weight_table(model)
    dtype = next(model.parameters()).dtype
    kv_dtype = kv_dtype or (dtype if dtype.is_floating_point else torch.float16)
    per_tok = 0 if encoder else kv_bytes_per_token(model.config, kv_dtype)
    act = activation_peak_estimate(model.config, context, batch, kv_dtype)
    cache = ({"kv_bytes": 0, "kv_prefill_peak_bytes": 0, "kv_layers_full": 0,
              "kv_layers_windowed": 0, "kv_tokens_per_layer": []} if encoder
             else kv_cache_bytes(model.config, context, batch, kv_dtype, kv_format))
    kv = cache["kv_bytes"]
    # on the CPU packed linears keep torch's kernel layout beside their bytes once they ran
    on_cpu = next(model.parameters()).device.type == "cpu"
    layouts = cpu_layout_bytes(model) if on_cpu else 0
    return {**table, "context": context, "batch": batch, "kv_dtype": str(kv_dtype).replace("torch.", ""),
            "kv_bytes_per_token": per_tok, **cache, "activation_bytes_estimate": act,
            "cpu_layout_bytes": layouts,
            "total_bytes_estimate": table["weight_bytes"] + layouts + kv + act,
            "experts": expert_summary(model, table["weight_bytes"])}


def expert_summary(model, weight_bytes: int) -> dict | None:
    """Mixture-of-experts layers (memfit.moe): how many, their experts, the bytes they hold, and
    the weight bytes one token reads (everything but the experts it is not routed to); None
    for a model without experts."""
    from memfit.archs import text_config
    from memfit.moe import Experts

    layers = [m for m in model.modules() if isinstance(m, Experts)]
    if not layers:
        return None
    c = text_config(model.config)
    top_k = getattr(c, "num_experts_per_tok", None) or getattr(c, "moe_topk", None) or 1
    expert_bytes = sum(t.numel() * t.element_size() for m in layers
                       for t in m.state_dict().values())
    idle = sum(t.numel() * t.element_size() * (m.num_experts - min(top_k, m.num_experts))
               / m.num_experts for m in layers for t in m.state_dict().values())
    return {"layers": len(layers), "experts": layers[0].num_experts, "top_k": top_k,
            "expert_bytes": expert_bytes, "bytes_read_per_token": int(weight_bytes - idle)}


def rss_peak_bytes() -> int:
    """Peak resident set size of this process so far.

    Linux's VmHWM, which starts fresh at exec; ru_maxrss would carry over the parent's peak into
    a child process (it survives execve), which is wrong for a benchmark's subprocesses.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


MMAP_THRESHOLD = 128 * 1024  # glibc's initial threshold, held fixed by steady_malloc
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)


_SYSTEM_MALLOC = False


def keep_system_malloc() -> None:
    """For this process, memfit's loaders leave glibc's allocator alone (`steady_malloc` does
    nothing). The compute-heavy commands (compress, fit's planning, distill, train) call it:
    holding the threshold costs page faults on every large tensor (the default model's
    perplexity run, 1 thread: 15% fewer tokens/s), and they promise no memory figure; the
    runtime they measure runs in its own process."""
    global _SYSTEM_MALLOC
    _SYSTEM_MALLOC = True


def steady_malloc() -> bool:
    """Make this process's peak memory repeatable, and return freed heap to the system.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), so later
    large tensors come from the heap, where freed ones stay resident: a packed model's measured
    peak RSS then varied by up to 83 MB from run to run (default model, context 2048, same
    input; benchmarks/RESULTS.md). Holding the threshold at 128 KiB keeps every tensor above it
    in its own mapping, returned on free. memfit's loaders call this on the CPU; set
    MEMFIT_MALLOC=system to leave the allocator alone. The price is a page fault per page of
    every large tensor: the default model's perplexity run (1 thread) lost 15% of its tokens/s.
    False where it does not apply (not glibc, or turned off).
    """
    import os

    if _SYSTEM_MALLOC or os.environ.get("MEMFIT_MALLOC", "").lower() == "system":
        return False
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt") or \
            not libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        return False
    libc.malloc_trim(0)
    return True


def _libc():
    """The C library through ctypes, or None where it cannot be opened."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def trim_heap() -> bool:
    """Hand the freed pages of glibc's heap back to the system now (malloc_trim), leaving its
    thresholds alone; False where it does not apply. A baseline read after it counts only what
    is live, so a later rise is what the next steps really add."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True


def reset_peak_rss() -> bool:
    """Start VmHWM afresh at the current RSS (Linux's clear_refs 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: peak RSS (CPU, process lifetime) or peak CUDA allocation inside the block."""

    def __init__(self, device):
        self.device = torch.device(device)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        return False

    def report(self) -> dict:
        if self.device.type == "cuda":
            return {"peak_memory_bytes": torch.cuda.max_memory_allocated(self.device),
                    "peak_memory_kind": "cuda_max_memory_allocated"}
        return {"peak_memory_bytes": rss_peak_bytes(), "peak_memory_kind": "process_peak_rss"}


def available_memory() -> int | None:
    """Bytes this process may still use: the least of MemAvailable, its memory cgroup's limit
    minus its usage (v2 or v1), and RLIMIT_AS minus the address space already taken; None when
    none is readable."""
    import resource

    found = []
    status = _proc_kb("/proc/meminfo", "MemAvailable")
    if status is not None:
        found.append(status)
    for limit, usage in _cgroup_files():
        try:
            text = limit.read_text().strip()
            if text != "max" and int(text) < 1 << 60:
                found.append(int(text) - int(usage.read_text()))
        except (OSError, ValueError):
            pass
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY:
        found.append(soft - (_proc_kb("/proc/self/status", "VmSize") or 0))
    return min(found) if found else None


def _proc_kb(path: str, key: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_files() -> list[tuple[Path, Path]]:
    """(limit, usage) files of this process's memory cgroup, v2 and v1."""
    root, out = Path("/sys/fs/cgroup"), []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            out.append((root / path.lstrip("/") / "memory.max",
                        root / path.lstrip("/") / "memory.current"))
        elif "memory" in controllers.split(","):
            base = root / "memory" / path.lstrip("/")
            out.append((base / "memory.limit_in_bytes", base / "memory.usage_in_bytes"))
    return out
