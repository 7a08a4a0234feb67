"""Mixture-of-experts layers as one linear per expert, so every memfit method applies to them.

transformers 5 holds a layer's experts as two 3-D parameters (`gate_up_proj` (E, 2I, H) and
`down_proj` (E, H, I), stored transposed or with gate and up interleaved in some families, with
biases in some) and runs them through one fused or grouped matmul. memfit's algorithms, packed
modules and kernels work on 2-D linears, and an expert's calibration statistics must come from
the tokens routed to that expert only. So memfit swaps each such module for `Experts`: a list of
`Expert`s, each with its own `gate_proj`, `up_proj` and `down_proj` (`nn.Linear`), named like
the hub checkpoints of most families (`mlp.experts.3.gate_proj`), computing the same function
as transformers' eager loop (the routing stays in transformers' own code). The swap happens
wherever memfit builds or loads a model (`memfit.models`, `memfit.io.save`, `memfit.stream`),
also on the meta device; the rows are views of the fused tensors, so it costs no memory.

An expert that no calibration token reaches has no input statistics; memfit then compresses it
as if its inputs were isotropic (memfit.calib.stats `isotropic`): GPTQ becomes round-to-nearest,
Wanda magnitude pruning, whitened SVD plain SVD.

Running: transformers' loop (and `Experts`' own, kept for the CPU, long prefills and autograd)
asks the host which experts were hit, a sync every layer that also stops a CUDA graph. On CUDA,
up to ROUTED_MAX (token, slot) pairs (decode steps) go through memfit.kernels.triton_moe's routed
GEMV instead: every pair through its expert with the ids read on the GPU, capturable; more pairs
(prefill), up to GROUPED_PER_EXPERT an expert on average, through its grouped kernel (the pairs
sorted by expert on the GPU). MEMFIT_MOE_ROUTED=0 turns both off; =1 also takes them in
Triton's interpreter off CUDA (tests).
"""

from __future__ import annotations

import os
import types
import warnings

import torch
from torch import nn

from memfit.errors import UserError
from memfit.kernels import on_device

_FLAGS = ("is_concatenated", "is_transposed", "has_bias", "has_gate", "has_post_expert_norm")


def _fused(module: nn.Module) -> bool:
    """A transformers experts module with 3-D gate_up_proj / down_proj parameters."""
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) \
        and gu.dim() == 3 and down.dim() == 3


class Expert(nn.Module):
    """One expert: down(gate_fn(gate(x), up(x)))."""

    def __init__(self, hidden: int, inter: int, bias: bool, *, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden, inter, bias=bias, **kw)
        self.up_proj = nn.Linear(hidden, inter, bias=bias, **kw)
        self.down_proj = nn.Linear(inter, hidden, bias=bias, **kw)


class Experts(nn.Module):
    """A layer's experts as separate linears (children "0", "1", ...); called like
    transformers' experts module: (hidden_states (T, H), top_k_index (T, k), top_k_weights
    (T, k)) -> (T, H)."""

    def __init__(self, experts: list[Expert], act_fn: nn.Module, gate: types.SimpleNamespace | None,
                 interleaved: bool):
        super().__init__()
        for e, ex in enumerate(experts):
            self.add_module(str(e), ex)
        self.num_experts = len(experts)
        self.act_fn = act_fn
        # A family's own gating (gpt-oss: clamped, with its alpha and limit) is called on the
        # gate/up rows laid out as its fused tensor held them; None: act(gate) * up.
        self._gate = gate
        self.interleaved = interleaved
        self._tables = self._tables_key = None  # the routed kernel's view of the experts
        self._routed_off = False  # set when that kernel failed here: the loop from then on

    def experts(self) -> list[Expert]:
        return [self._modules[str(e)] for e in range(self.num_experts)]

    def _gated(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if self._gate is None:
            return self.act_fn(g) * u
        gu = torch.stack((g, u), -1).flatten(-2) if self.interleaved else torch.cat((g, u), -1)
        return self._gate.apply(self._gate, gu)

    def forget_tables(self) -> None:
        """Drop the routed kernel's tables (they hold the experts' tensors: after the decode loop
        put back layouts it converted, the old ones would stay alive until the next call)."""
        self._tables = self._tables_key = None

    def run_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        m = self._modules[str(e)]
        return m.down_proj(self._gated(m.gate_proj(x), m.up_proj(x)))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if routed_ok(self, hidden_states, top_k_index):
            try:
                with on_device(hidden_states):
                    return self._routed(hidden_states, top_k_index, top_k_weights)
            except Exception as e:  # a kernel that fails: the loop, warned once
                if hidden_states.is_cuda and torch.cuda.is_current_stream_capturing():
                    raise  # the decode loop decodes without a CUDA graph, then lands here
                warnings.warn(f"memfit: the routed experts kernel failed ({type(e).__name__}: "
                              f"{str(e)[:200]}); this layer runs its experts one by one")
                self._routed_off = True
        out = torch.zeros_like(hidden_states)
        n = self.num_experts
        hit = torch.unique(top_k_index).tolist()  # one host sync, as transformers' eager loop
        for e in hit:
            if e >= n:  # an index past the experts marks a slot no expert takes
                continue
            token, slot = torch.where(top_k_index == e)
            y = self.run_expert(e, hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def _routed(self, hidden_states, top_k_index, top_k_weights):
        """Every (token, slot) through its expert on the GPU, no host sync (capturable)."""
        from memfit.kernels.triton_moe import Groups, moe_grouped, moe_linear

        t, k = top_k_index.shape
        ids = top_k_index.reshape(-1)
        valid = ids < self.num_experts
        gate, up, down = self._tables
        if ids.numel() <= ROUTED_MAX:  # decode: a row tile of an expert's weights per program
            ids = torch.where(valid, ids, 0).to(torch.int32)
            x = hidden_states.contiguous()  # row r of the pairs reads token r // k
            h = self._gated(moe_linear(x, ids, gate, k), moe_linear(x, ids, up, k))
            y = moe_linear(h.contiguous(), ids, down, slots=k)
        else:  # prefill: the pairs sorted by expert, BM of them a program
            groups = Groups(ids, self.num_experts)
            x = hidden_states.contiguous()
            h = self._gated(moe_grouped(x, groups, gate, k), moe_grouped(x, groups, up, k))
            y = moe_grouped(h.contiguous(), groups, down)
        w = top_k_weights.reshape(-1, 1) * valid.reshape(-1, 1)
        return (y * w).to(hidden_states.dtype).view(t, k, -1).sum(1)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, interleaved={self.interleaved}"


ROUTED_MAX = 64  # (token, slot) pairs up to which CUDA takes the routed GEMV (decode steps)
# More pairs (prefill) take the grouped kernel up to GROUPED_PER_EXPERT pairs an expert on
# average; past that the loop's one large GEMM an expert (cuBLAS, or dequantize + cuBLAS) wins.
# One H200, Mixtral-8x7B shape, a layer's experts (benchmarks/RESULTS.md, session 33), ms at
# 16 / 64 / 256 / 1024 pairs an expert: int4 grouped 1.11 / 1.52 / 3.89 / 13.8, loop 3.89 /
# 2.44 / 5.23 / 7.09; bf16 grouped 0.86 / 0.95 / 2.05 / 7.88, loop 2.67 / 3.60 / 2.25 / 6.17.
GROUPED = True
GROUPED_PER_EXPERT = 256


def routed_ok(m: Experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> bool:
    """The routed kernel (memfit.kernels.triton_moe) takes this call: CUDA (or the Triton
    interpreter when MEMFIT_MOE_ROUTED=1, for tests), no autograd, at most GROUPED_PER_EXPERT
    (token, slot) pairs an expert on average, and every projection's experts in one format it
    reads. Builds or refreshes `m._tables`."""
    flag = os.environ.get("MEMFIT_MOE_ROUTED")
    pairs = top_k_index.numel()
    if pairs > ROUTED_MAX and (not GROUPED or pairs > GROUPED_PER_EXPERT * m.num_experts) \
            or m._routed_off or flag == "0" \
            or not (hidden_states.is_cuda or flag == "1") \
            or torch.is_grad_enabled() and hidden_states.requires_grad:
        return False
    experts = m.experts()
    key = tuple(_ptr(_weight(p)[0]) for p in (experts[0].gate_proj, experts[-1].down_proj))
    if m._tables_key == key:  # the experts have not moved since the tables were built
        return m._tables is not None
    from memfit.kernels.triton_moe import Table, same_kind

    tables = []
    for proj in ("gate_proj", "up_proj", "down_proj"):
        pairs = [_weight(getattr(e, proj)) for e in experts]
        weights, biases = [w for w, _ in pairs], [b for _, b in pairs]
        dense = isinstance(weights[0], torch.Tensor)
        if any(w is None for w in weights) or same_kind(weights) is not None \
                or dense and weights[0].dtype != hidden_states.dtype \
                or (biases[0] is None) != all(b is None for b in biases):
            tables = None
            break
        tables.append(Table(weights, biases))
    m._tables, m._tables_key = tables, key
    return tables is not None


def _weight(lin: nn.Module):
    """(what memfit.kernels.triton_moe reads of a linear: its IntWeight or dense weight, bias)."""
    from memfit.formats.quant_linear import QuantLinear

    if type(lin) is QuantLinear:
        return lin.kernel_weight(), lin.bias
    if type(lin) is nn.Linear:
        return lin.weight, lin.bias
    return None, None  # another kind (sparse, low-rank): not for the routed kernel


def _ptr(w) -> int:
    return 0 if w is None else w.data_ptr() if isinstance(w, torch.Tensor) else w.qdata.data_ptr()


def _custom_gate(module: nn.Module):
    """The family's own `_apply_gate` (gpt-oss), or None for act(gate) * up."""
    fn = getattr(type(module), "_apply_gate", None)
    return None if fn is None or fn.__name__ == "_default_apply_gate" else fn


def unfuse(module: nn.Module) -> Experts:
    """`Experts` computing what the fused transformers module computes, its weights views of
    (or, for transposed layouts, copies of) the fused tensors."""
    name = type(module).__name__
    if hasattr(module, "is_concatenated"):  # declared by transformers' experts interface
        flags = {f: getattr(module, f, d)  # a flag added later: the feature did not exist
                 for f, d in zip(_FLAGS, (True, False, False, True, False))}
    elif hasattr(module, "gate_up_proj_bias") or _custom_gate(module) is not None:
        raise UserError(f"{name} does not declare its weight layout in this transformers "
                        "version; upgrade transformers (pip install -U transformers)")
    else:  # older transformers: concatenated [gate; up], transposed when the shapes say so
        transposed = module.gate_up_proj.shape[1] == module.down_proj.shape[2] \
            and module.gate_up_proj.shape[2] != module.down_proj.shape[1]
        flags = dict(zip(_FLAGS, (True, transposed, False, True, False)))
    if not flags["has_gate"] or flags["has_post_expert_norm"]:
        raise UserError(f"{name}: experts without a gate projection or with a norm after each "
                        "expert are not supported by memfit yet; compress another model family")
    gu, down = module.gate_up_proj, module.down_proj
    if flags["is_transposed"]:
        gu, down = gu.transpose(1, 2), down.transpose(1, 2)
    e_count, two_i, hidden = gu.shape
    inter = two_i // 2
    if down.shape != (e_count, hidden, inter):
        raise UserError(f"{name}: gate_up_proj {tuple(gu.shape)} and down_proj "
                        f"{tuple(down.shape)} do not form (E, 2I, H) / (E, H, I) experts")
    gu_bias = getattr(module, "gate_up_proj_bias", None) if flags["has_bias"] else None
    down_bias = getattr(module, "down_proj_bias", None) if flags["has_bias"] else None
    inter_l = flags["is_concatenated"] is False
    gate_rows = slice(0, None, 2) if inter_l else slice(0, inter)
    up_rows = slice(1, None, 2) if inter_l else slice(inter, two_i)

    def own(t: torch.Tensor) -> torch.Tensor:  # views where contiguous, else a copy
        return t if t.is_contiguous() or t.is_meta else t.contiguous()

    grad = module.gate_up_proj.requires_grad  # trainable as the fused tensors were
    experts = []
    for e in range(e_count):
        ex = Expert(hidden, inter, gu_bias is not None, device="meta", dtype=gu.dtype)
        with torch.no_grad():
            ex.gate_proj.weight = nn.Parameter(own(gu[e, gate_rows]), grad)
            ex.up_proj.weight = nn.Parameter(own(gu[e, up_rows]), grad)
            ex.down_proj.weight = nn.Parameter(own(down[e]), grad)
            if gu_bias is not None:
                ex.gate_proj.bias = nn.Parameter(own(gu_bias[e, gate_rows]), grad)
                ex.up_proj.bias = nn.Parameter(own(gu_bias[e, up_rows]), grad)
                ex.down_proj.bias = nn.Parameter(own(down_bias[e]), grad)
        experts.append(ex)
    custom = _custom_gate(module)
    gate = None
    if custom is not None:
        plain = {k: v for k, v in vars(module).items()
                 if not k.startswith("_") and isinstance(v, (int, float, str, bool, type(None)))}
        gate = types.SimpleNamespace(apply=custom, act_fn=getattr(module, "act_fn", None), **plain)
    act = getattr(module, "act_fn", None)
    if act is None and gate is None:
        raise UserError(f"{name} has no act_fn and no gating function memfit knows; "
                        "compress another model family")
    return Experts(experts, act if act is not None else nn.Identity(), gate, inter_l)


def unfuse_experts_(model: nn.Module) -> int:
    """Swap every fused experts module of `model` for `Experts`, in place; -> how many."""
    swaps = [(name, m) for name, m in model.named_modules() if _fused(m)]
    for name, m in swaps:
        model.set_submodule(name, unfuse(m))
    return len(swaps)


def is_expert_linear(name: str) -> bool:
    """`name` is a linear of one routed expert (`...experts.<e>.<proj>`)."""
    parts = name.split(".")
    return len(parts) >= 3 and parts[-3] == "experts" and parts[-2].isdigit()


def same_projection(a: str, b: str) -> bool:
    """`a` and `b` are the same projection of two experts of one layer."""
    pa, pb = a.split("."), b.split(".")
    return is_expert_linear(a) and is_expert_linear(b) and len(pa) == len(pb) \
        and pa[:-2] == pb[:-2] and pa[-1] == pb[-1]


_LEGACY = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def checkpoint_names(key: str) -> tuple[str, ...]:
    """Where a tensor of the unfused model may sit in a hub checkpoint: under its own name
    (Qwen-MoE, OLMoE, DeepSeek) or under the Mixtral-era names that transformers renames on
    load (Mixtral, PhiMoE: `block_sparse_moe`, experts' w1 / w3 / w2, PhiMoE's router as
    `gate`), for memfit.stream, which reads a checkpoint tensor by tensor."""
    parts = key.split(".")
    if "mlp" not in parts:
        return (key,)
    i = parts.index("mlp")
    legacy = parts[:i] + ["block_sparse_moe"] + parts[i + 1:]
    if is_expert_linear(".".join(parts[:-1])) and parts[-2] in _LEGACY:
        legacy[-2] = _LEGACY[parts[-2]]
    elif parts[i + 1:] == ["router", "weight"]:
        legacy[i + 1] = "gate"
    return key, ".".join(legacy)
