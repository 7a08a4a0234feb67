"""How much each choice would hurt: second-order estimates of the KL divergence to the original,
from one forward/backward pass over calibration windows, then calibrated on measured plans.

The model's mean per-token KL(p || p̃) after a small change δ of some activation is, to second
order, ½ E[δᵀ F δ] with F the Fisher information of the output distribution with respect to that
activation. F = E_y[g gᵀ], g = ∂(−log p(y))/∂activation with y SAMPLED from the model itself (the
true Fisher, not the empirical one), so one backward pass per window gives an unbiased estimate.

- linear with weight change ΔW (δ = ΔW x): K-FAC, ½ tr(Ḡ ΔW H̄ ΔWᵀ) with H̄ = E[x xᵀ] over the
  layer's inputs and Ḡ = E[g gᵀ] over its output gradients (the input/gradient independence
  approximation); exact in the output channels' correlations, which a diagonal Fisher ignores.
- dropping block i (δ = −(block output − input)): ½ E[(gᵀ δ)²], exact per token.
- the embedding table (δ = the changed rows): ½ E[(gᵀ δ)²], exact per token.
- the output head (δ = ΔW h, on the logits): ½ E[Var_p(δ)], the exact softmax Fisher.

These are proxies. Interactions between layers and the non-quadratic regime of strong
compression make measured KL differ from their sum, so each family of choices (int8, int4, ...,
drop, tables) gets a factor fitted on measured probe plans (memfit.plan.fit).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from memfit.archs import Arch, block_list
from memfit.errors import UserError
from memfit.moe import is_expert_linear, same_projection


@dataclass
class Sensitivity:
    """What the pass collected (means over the calibration tokens)."""

    hessian: dict[str, torch.Tensor] = field(default_factory=dict)   # linear -> 2 E[x xᵀ]
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)    # linear -> E[g gᵀ]
    drop: list[float] = field(default_factory=list)                  # block -> ½ E[(gᵀδ)²]
    tables: dict[str, float] = field(default_factory=dict)           # "embeddings/int8" -> ...
    tokens: int = 0


def kfac_damage(dw: torch.Tensor, hessian: torch.Tensor, fisher: torch.Tensor) -> float:
    """½ tr(Ḡ ΔW H̄ ΔWᵀ), H̄ = hessian / 2 (memfit's H is 2 E[x xᵀ])."""
    with torch.no_grad():  # a number, not a graph (dw may come from a trainable weight)
        right = dw @ hessian  # (out, in)
        left = fisher @ dw    # (out, in)
        return 0.25 * float((left * right).sum())


HEAD_POSITIONS = 128  # positions per window at which the head candidates' damage is computed


class _Acc:
    """Running sums of x xᵀ (per group input) and g gᵀ (per linear output), in float32."""

    def __init__(self):
        self.xx: dict[str, torch.Tensor] = {}
        self.gg: dict[str, torch.Tensor] = {}

    @staticmethod
    def add(store: dict, key: str, v: torch.Tensor) -> None:
        v = v.detach().reshape(-1, v.shape[-1]).float()  # (tokens, features)
        prod = v.T @ v
        if key in store:
            store[key] += prod
        else:
            store[key] = prod


def _sample_labels(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(logits.detach().float(), dim=-1)  # (T, V)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _encoder_backward(model, ids: torch.Tensor, gen: torch.Generator) -> int:
    """An encoder's stand-in for the sampled-label loss: the damage measured is 1 - cosine of
    each token's final hidden state h, whose second-order form is ½‖P Δh‖² / ‖h‖² (P projects
    out h's direction). Back-propagating rᵀh with r = P z / ‖h‖, z ~ N(0, I), gives gradients g
    with E[g gᵀ] = Jᵀ P J / ‖h‖², so ½E[(gᵀδ)²] estimates it like the Fisher does the KL."""
    h = model(input_ids=ids).last_hidden_state[0].float()  # (T, hidden)
    with torch.no_grad():
        n = h.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        u = h / n
        z = torch.randn(h.shape, generator=gen).to(h.device)
        r = (z - (z * u).sum(-1, keepdim=True) * u) / n
    (h * r).sum().backward()
    return int(h.shape[0])


def sensitivity_pass(model, arch: Arch, windows: torch.Tensor, *, tables: dict | None = None,
                     seed: int = 0, progress: bool = False, encoder: bool = False) -> Sensitivity:
    """One forward/backward per calibration window (batch 1) with labels sampled from the model
    (an encoder: random directions of its hidden states, `_encoder_backward`).
    `tables`: {"embeddings": {name: module}, "head": {name: module}} candidate replacements of
    the embedding table / output head whose damage is estimated in the same pass."""
    tables = tables or {}
    blocks = block_list(model, arch)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    acc, drop, table_sums, handles = _Acc(), [0.0] * len(blocks), {}, []
    gen = torch.Generator().manual_seed(seed)
    members: dict[str, str] = {}  # linear -> the key of its group's shared input statistic
    def linear_hooks(path: str, mod: torch.nn.Module, group_key: str, first: bool):
        def fwd(_m, args, out):
            if first:
                acc.add(acc.xx, group_key, args[0])
            if out.requires_grad:
                out.register_hook(lambda g: acc.add(acc.gg, path, g))
        return mod.register_forward_hook(fwd)

    for i, block in enumerate(blocks):
        for group in arch.block_groups(block):
            for j, n in enumerate(group):
                path = f"{prefix}.{i}.{n}"
                members[path] = f"{prefix}.{i}.{group[0]}"
                handles.append(linear_hooks(path, block.get_submodule(n), f"{prefix}.{i}.{group[0]}",
                                            j == 0))

        def block_fwd(_m, args, kwargs, out, i=i):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, (tuple, list)) else out
            delta = (y - x).detach()

            def on_grad(g):
                drop[i] += float(((g.float() * delta.float()).sum(-1) ** 2).sum())
            if y.requires_grad:
                y.register_hook(on_grad)
        handles.append(block.register_forward_hook(block_fwd, with_kwargs=True))

    emb = model.get_input_embeddings()

    def emb_fwd(_m, args, out):
        out = out.detach().requires_grad_(True)
        deltas = {}
        with torch.no_grad():
            for name, cand in tables.get("embeddings", {}).items():
                deltas[name] = (cand(args[0]).to(out.dtype) - out).float()

        def on_grad(g):
            for name, d in deltas.items():
                key = f"embeddings/{name}"
                table_sums[key] = table_sums.get(key, 0.0) + float(
                    ((g.float() * d).sum(-1) ** 2).sum())
        out.register_hook(on_grad)
        return out
    handles.append(emb.register_forward_hook(emb_fwd))

    head = model.get_output_embeddings()
    # each head candidate's weight change, dequantized once: (V, hidden) float32
    head_dw = {name: cand.dequantize(torch.float32) - head.weight.detach().float()
               for name, cand in tables.get("head", {}).items()}

    def head_fwd(_m, args, out):
        with torch.no_grad():
            # the scored positions, at most HEAD_POSITIONS of them drawn at random: the estimate
            # stays unbiased and its cost (a (V, hidden) product per candidate) bounded
            n = args[0].shape[1] - 1
            pos = torch.randperm(n, generator=gen)[:HEAD_POSITIONS] if n > HEAD_POSITIONS \
                else torch.arange(n)
            h = args[0].detach()[0, pos].float()  # (P, hidden)
            p = torch.softmax(out.detach()[0, pos].float(), dim=-1)  # (P, V)
            scale = n / len(pos)
            for name, dw in head_dw.items():
                d = h @ dw.T  # (T - 1, V): the change of the logits
                mean = (p * d).sum(-1)
                var = (p * d * d).sum(-1) - mean * mean
                key = f"head/{name}"
                table_sums[key] = table_sums.get(key, 0.0) + 0.5 * scale * float(var.sum())
    if head is not None and head_dw:
        handles.append(head.register_forward_hook(head_fwd))

    tokens = 0
    was = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.enable_grad():
            from tqdm import tqdm
            for w in tqdm(range(len(windows)), desc="sensitivity", unit="window",
                          disable=not progress):
                ids = windows[w:w + 1].to(emb.weight.device if hasattr(emb, "weight") else "cpu")
                if encoder:
                    tokens += _encoder_backward(model, ids, gen)
                    continue
                logits = model(input_ids=ids, use_cache=False).logits[0, :-1]  # (T - 1, V)
                y = _sample_labels(logits, gen)
                F.cross_entropy(logits.float(), y, reduction="sum").backward()
                tokens += int(y.numel())
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), was):
            p.requires_grad_(r)
    sens = Sensitivity(tokens=tokens)
    for path, key in members.items():
        if path == key and key in acc.xx:
            sens.hessian[path] = acc.xx[key] * (2.0 / tokens_in(windows))
    for key, gg in acc.gg.items():
        sens.fisher[key] = gg / tokens
    _unreached_experts(sens, members)
    sens.drop = [0.5 * d / tokens for d in drop]
    sens.tables = {k: (v if k.startswith("head/") else 0.5 * v) / tokens
                   for k, v in table_sums.items()}
    for path, key in members.items():  # group members share their first member's tensor
        sens.hessian[path] = sens.hessian[key]
    return sens


def _unreached_experts(sens: Sensitivity, members: dict[str, str]) -> None:
    """An expert no window's token was routed to (memfit.moe) has no statistics: it gets the
    mean Hessian and Fisher of the same projection of its layer's other experts (an expert the
    calibration never used is assumed to matter like the layer's average one)."""
    for table, paths in ((sens.hessian, set(members.values())), (sens.fisher, members)):
        for path in paths:
            if path in table or not is_expert_linear(path):
                continue
            seen = [t for k, t in table.items() if same_projection(k, path)]
            if not seen:
                raise UserError(f"no calibration token reached any expert of {path}'s layer; "
                                "give more calibration text (--samples)")
            table[path] = sum(seen) / len(seen)


def tokens_in(windows: torch.Tensor) -> int:
    """Input positions seen by the linears (every position of every window)."""
    return int(windows.numel())
