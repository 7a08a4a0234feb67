"""What the plan must fit, and the memory model that says whether it does.

Two kinds of budget:
- "memory": everything the model needs at run time on the target device, at the given context
  and batch: resident weights (dense tensors in the compute dtype, packed modules with the
  kernel layouts their forward prepares), the KV cache (memfit.eval.memory.kv_cache_bytes, exact),
  the activation peak of one prefill (estimate_activation below), and the runtime's own memory
  (Python, torch and transformers loaded: measured in a fresh process, memfit.plan.measure);
- "weights": the weight bytes the artifact stores (16-bit dense tensors, packed modules), for
  comparing with other tools' file sizes.
The same functions give `memfit inspect` its numbers; `memfit fit` checks them against a
measurement in a fresh process before it writes anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from memfit.errors import UserError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_size(text: str) -> int:
    """'24GiB', '800MB', '1.5GB', '123456789' -> bytes (GB = 10^9, GiB = 2^30). A number without a
    unit counts bytes and must be a whole number of at least 1 MiB (less is a unit left out)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise UserError(f"cannot read the size {text!r}; write a number with a unit, e.g. 800MB, "
                        "1.5GB or 24GiB (GB = 10^9 bytes, GiB = 2^30)")
    number = float(m.group(1))
    if not unit and (number != int(number) or number < 2**20):
        # a bare number counts bytes: '0.5' or '8' is a unit left out, not a budget in bytes
        raise UserError(f"the size {text!r} has no unit, so it would count bytes; write it with "
                        f"a unit, e.g. {m.group(1)}GB or {m.group(1)}GiB")
    value = int(number * _UNITS[unit])
    if value <= 0:
        raise UserError(f"the size {text!r} must be at least one byte")
    return value


@dataclass(frozen=True, kw_only=True)
class Target:
    """The budget and the conditions it is measured under."""

    budget: int
    kind: str = "memory"          # "memory" (run time, on `device`) or "weights" (stored bytes)
    device: str = "cpu"
    context: int = 2048
    batch: int = 1
    kv: str = "auto"              # none | int8 | int4 | auto (choose)

    def __post_init__(self):
        if self.kind not in ("memory", "weights"):
            raise UserError(f"unknown budget kind {self.kind!r}; use 'memory' or 'weights'")
        if self.kv not in ("none", "int8", "int4", "auto"):
            raise UserError(f"unknown KV precision {self.kv!r}; use none, int8, int4 or auto")
        if self.context < 1 or self.batch < 1:
            raise UserError("context and batch must be at least 1")


def kv_format(name: str):
    if name in ("none", "auto"):
        return None
    from memfit.kvcache import KV_FORMATS
    return KV_FORMATS[name]


def estimate_activation(config, context: int, batch: int, dtype: torch.dtype) -> int:
    """Peak transient bytes of one prefill of `context` tokens (memfit.eval.memory's estimate:
    residual stream and temporaries, MLP intermediates, q/k/v; memory-efficient attention;
    logits of the last position only)."""
    from memfit.eval.memory import activation_peak_estimate
    return activation_peak_estimate(config, context, batch, dtype)


def kv_bytes(config, context: int, batch: int, dtype: torch.dtype, name: str) -> int:
    """Exact KV-cache bytes, including the prefill peak (the larger of the two)."""
    from memfit.eval.memory import kv_cache_bytes
    kv = kv_cache_bytes(config, context, batch, dtype, kv_format(name))
    return max(kv["kv_bytes"], kv["kv_prefill_peak_bytes"] if name in ("none", "auto") else 0)


def kv_options(kind: str, kv: str, fixed: dict, budget: int, least_weights: int) -> list[str]:
    """KV precisions the solve may take: the one asked; with "auto", 16-bit, int8 and int4 when
    the 16-bit cache is over 5% of a run-time budget, or when the smallest weights do not fit
    beside it (else quantizing it cannot pay)."""
    if kv != "auto":
        return [kv]
    forward = fixed.get("forward", {}).get("none", fixed["activation"] + fixed["kv"]["none"])
    if kind == "memory" and (fixed["kv"]["none"] > 0.05 * budget or least_weights
                             + fixed["resident"] + fixed["overhead"] + forward > budget):
        return ["none", "int8", "int4"]
    return ["none"]


LEAST_BITS = 2  # no linear choice of any menu stores fewer bits a weight (int2 g32, 2:4 + int4)


def check_floor(m, arch, budget: int, max_drop: float, runtime: int = 0) -> None:
    """A UserError when the blocks' linear weights alone, at LEAST_BITS a weight with as many
    blocks dropped as allowed, plus `runtime` (the measured bytes of Python, torch and
    transformers, for a run-time budget) exceed `budget`: a floor under every plan (scales,
    tables, norms, the KV cache and activations come on top), known before any calibration."""
    from memfit.archs import block_list

    per_block = sorted(sum(block.get_submodule(n).weight.numel() for g in arch.block_groups(block)
                           for n in g)
                       for block in block_list(m, arch))
    n = len(per_block)
    kept = per_block[:max(n - int(max_drop * n), 0)]
    weights = sum(kept) * LEAST_BITS // 8
    if weights + runtime > budget:
        big = (f"the blocks' linear weights at {LEAST_BITS} bits a weight need "
               f"{weights / 1e6:.1f} MB ({len(kept)} of {n} blocks)")
        if runtime:
            big += f" and the runtime (Python, torch, transformers) {runtime / 1e6:.1f} MB"
        raise UserError(f"the budget {budget / 1e6:.1f} MB is below the floor of every plan: "
                        f"{big}, before scales, embeddings, the KV cache and activations; "
                        "raise the budget")
