"""Structured pruning: model surgery that makes the matrices genuinely smaller.

Three in-place verbs, each leaving a model that `save_pretrained` writes and plain
`AutoModelForCausalLM.from_pretrained` loads again, with no memfit code at load time:

- `drop_blocks_`     removes whole transformer blocks (depth pruning, ShortGPT-style).
- `prune_mlp_width_` removes intermediate MLP channels: gate/up rows and down_proj columns.
- `prune_heads_`     removes attention heads in whole KV groups (Llama-family q/k/v/o layouts).

The trade-off that keeps plain loading possible: a transformers config describes one width for all
blocks (`intermediate_size`, `num_attention_heads`, `num_key_value_heads`), so every block keeps the
same *number* of channels/groups, while each block chooses *which* ones from its own scores
(per-block top-k with one k). Non-uniform widths would prune better but need custom loading code.

Where the linears live is data (the `layout` of the family's row in memfit.archs.ARCHS); nothing
here checks class names. Scores come from memfit.algos.structured; `measure_block_influence` and
`channel_importance` gather them with the calibration engine (memfit.calib), one block at a
time, on the unpruned model. Structured pruning must run before quantization or unstructured
sparsity: it slices plain `nn.Linear` weights only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from memfit.algos import structured as S
from memfit.calib.stats import InputNormStat
from memfit.archs import ARCHS, Arch, Layout, arch_for, block_list, text_config
from memfit.calib import capture_inputs, propagate
from memfit.errors import UserError


# Config entries holding one value per block: dropping blocks filters them the same way.
PER_LAYER_CONFIG = ("layer_types", "no_rope_layers")
# Attribute names some attention modules cache head counts under ("heads" or "kv" count).
_HEAD_ATTRS = {"num_heads": "heads", "num_attention_heads": "heads", "num_key_value_heads": "kv"}


@dataclass
class Importance:
    """Per-block scores from `channel_importance` (index i = block i)."""

    mlp: list[torch.Tensor]        # (intermediate,) each
    heads: list[torch.Tensor]      # (num_attention_heads,) each
    kv_groups: list[torch.Tensor]  # (num_key_value_heads,) each


def layout_for(model: nn.Module, arch: Arch | None = None) -> Layout:
    """The structured-pruning layout of the model's family (from its memfit.archs row)."""
    layout = _arch(model, arch).layout
    if layout is None:
        known = sorted(name for name, arch in ARCHS.items() if arch.layout is not None)
        raise UserError(f"structured pruning does not know the layout of {model.config.model_type!r}; "
                        f"it supports {', '.join(known)}. Add a layout to its row in "
                        "memfit.archs.ARCHS")
    return layout


def _arch(model, arch: Arch | None) -> Arch:
    return arch if arch is not None else arch_for(model.config)


def _linear(block: nn.Module, path: str) -> nn.Linear:
    mod = block.get_submodule(path)
    if type(mod) is not nn.Linear:
        raise UserError(f"{path} is a {type(mod).__name__}, not a plain Linear; run structured "
                        "pruning before quantization, sparsity or low-rank compression")
    return mod


@torch.no_grad()
def _slice_(lin: nn.Linear, rows: torch.Tensor | None = None,
            cols: torch.Tensor | None = None) -> None:
    """Keep only `rows` (outputs, and their bias) and/or `cols` (inputs) of a Linear, in place."""
    w = lin.weight
    new = w
    if rows is not None:
        new = new.index_select(0, rows.to(w.device))
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.index_select(0, rows.to(w.device)).clone(),
                                    requires_grad=lin.bias.requires_grad)
    if cols is not None:
        new = new.index_select(1, cols.to(w.device))
    lin.weight = nn.Parameter(new.contiguous(), requires_grad=w.requires_grad)
    lin.out_features, lin.in_features = new.shape


# ---------------------------------------------------------------- depth: drop whole blocks

def drop_blocks_(model: nn.Module, indices: Sequence[int], *,
                 arch: Arch | None = None) -> list[int]:
    """Remove the blocks at `indices`; renumber `layer_idx`, fix num_hidden_layers and the
    per-layer config lists so the saved model reloads with plain from_pretrained; -> the
    original indices of the blocks kept."""
    blocks = block_list(model, _arch(model, arch))
    n = len(blocks)
    drop = set()
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise UserError(f"block index {i!r} is out of range; the model has blocks 0..{n - 1}")
        drop.add(i)
    if len(drop) >= n:
        raise UserError(f"cannot drop all {n} blocks; drop at most {n - 1}")
    kept = [i for i in range(n) if i not in drop]
    for i in sorted(drop, reverse=True):
        del blocks[i]  # ModuleList renumbers its keys, so state_dict names stay contiguous
    for new_idx, block in enumerate(blocks):
        for mod in block.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = new_idx
    cfg = text_config(model.config)
    for key in PER_LAYER_CONFIG:
        values = getattr(cfg, key, None)
        if isinstance(values, (list, tuple)) and len(values) == n:
            setattr(cfg, key, type(values)(values[i] for i in kept))
    cfg.num_hidden_layers = len(blocks)
    return kept


# ---------------------------------------------------------------- width: MLP channels

def _per_block_indices(keep, widths: list[int], scores, what: str) -> list[torch.Tensor]:
    """Resolve `keep` (count, fraction, or explicit per-block indices) into sorted index tensors
    of one common length, one per block."""
    if isinstance(keep, (list, tuple)) and keep and not isinstance(keep[0], (int, float)):
        if len(keep) != len(widths):
            raise UserError(f"got {what} indices for {len(keep)} blocks but the model has "
                            f"{len(widths)}; give one index list per block")
        out = []
        for b, (idx, width) in enumerate(zip(keep, widths)):
            t = torch.as_tensor(idx, dtype=torch.int64).reshape(-1).unique(sorted=True)
            if t.numel() != len(idx) or t.numel() == 0 or t.min() < 0 or t.max() >= width:
                raise UserError(f"block {b}: {what} indices must be distinct, non-empty and in "
                                f"0..{width - 1}")
            out.append(t)
        if len({t.numel() for t in out}) != 1:
            raise UserError(f"every block must keep the same number of {what} so that plain "
                            "from_pretrained can load the model; give equal-length index lists")
        return out
    if len(set(widths)) != 1:
        raise UserError(f"blocks differ in {what} width {sorted(set(widths))}; "
                        "pass explicit per-block indices")
    k = S.keep_count(widths[0], keep)
    if scores is not None and len(scores) != len(widths):
        raise UserError(f"got {what} scores for {len(scores)} blocks but the model has "
                        f"{len(widths)}; compute them with channel_importance on this model")
    return [S.keep_indices(s, k) for s in scores]


def prune_mlp_width_(model: nn.Module, keep, *, scores: Sequence[torch.Tensor] | None = None,
                     arch: Arch | None = None) -> list[torch.Tensor]:
    """Keep `keep` intermediate channels in every block's MLP; return the kept indices per block.

    `keep`: an int count or a float fraction of the width (each block keeps its own top-k of
    `scores`, with one k for all blocks), or explicit per-block index lists of equal length.
    `scores`: per-block (intermediate,) scores, e.g. `channel_importance(...).mlp`; without them
    the data-free ‖W_up[j]‖·‖W_down[:, j]‖ is used.
    """
    blocks = block_list(model, _arch(model, arch))
    lay = layout_for(model, arch)
    outs = [_linear(b, lay.mlp_out) for b in blocks]
    ins = [[_linear(b, p) for p in lay.mlp_in] for b in blocks]
    if scores is None:
        scores = [S.weight_channel_scores(i[-1].weight, o.weight) for i, o in zip(ins, outs)]
    kept = _per_block_indices(keep, [o.in_features for o in outs], scores, "MLP channel")
    for block, idx, lins, out in zip(blocks, kept, ins, outs):
        for lin in lins:
            _slice_(lin, rows=idx)
        _slice_(out, cols=idx)
        mlp = block.get_submodule(lay.mlp)
        if isinstance(getattr(mlp, "intermediate_size", None), int):
            mlp.intermediate_size = idx.numel()
    text_config(model.config).intermediate_size = kept[0].numel()
    return kept


# ---------------------------------------------------------------- width: attention heads

def _head_counts(model) -> tuple[int, int, int]:
    cfg = text_config(model.config)
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads, kv, head_dim


def prune_heads_(model: nn.Module, kv_groups=None, *, num_heads: int | None = None,
                 scores: Sequence[torch.Tensor] | None = None,
                 arch: Arch | None = None) -> list[torch.Tensor]:
    """Keep whole KV groups (a KV head and its query heads) in every block; return the kept
    group indices per block. Sets num_attention_heads, num_key_value_heads and head_dim.

    Give either `kv_groups` (an int count, a float fraction, or per-block group index lists of
    equal length) or `num_heads` (query heads to keep: a multiple of heads / kv_heads).
    `scores`: per-block (num_key_value_heads,) scores, e.g. `channel_importance(...).kv_groups`;
    without them each group is scored by its o_proj column norms alone.
    """
    if (kv_groups is None) == (num_heads is None):
        raise UserError("give exactly one of kv_groups (KV groups to keep) or num_heads "
                        "(query heads to keep) to prune_heads_")
    blocks = block_list(model, _arch(model, arch))
    lay = layout_for(model, arch)
    if lay.q is None:
        raise UserError(f"{model.config.model_type!r} has no separate q/k/v projections; "
                        "head pruning supports Llama-family layouts only")
    heads, kv, head_dim = _head_counts(model)
    if num_heads is not None:
        kv_groups = S.groups_for_heads(heads, kv, num_heads)
    if scores is None:
        scores = []
        for b in blocks:
            o = _linear(b, lay.o)
            ones = torch.ones(o.in_features, device=o.weight.device)
            scores.append(S.kv_group_scores(S.head_scores(ones, o.weight, heads, head_dim), kv))
    kept = _per_block_indices(kv_groups, [kv] * len(blocks), scores, "KV group")
    for block, groups in zip(blocks, kept):
        q_rows, kv_rows = S.gqa_indices(groups, heads, kv, head_dim)
        _slice_(_linear(block, lay.q), rows=q_rows)
        _slice_(_linear(block, lay.k), rows=kv_rows)
        _slice_(_linear(block, lay.v), rows=kv_rows)
        _slice_(_linear(block, lay.o), cols=q_rows)
    new_kv = kept[0].numel()
    new_heads = new_kv * (heads // kv)
    cfg = text_config(model.config)
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = new_heads, new_kv, head_dim
    attn_path = lay.q.rsplit(".", 1)[0]
    for block in blocks:
        attn = block.get_submodule(attn_path)
        for name, which in _HEAD_ATTRS.items():
            if isinstance(getattr(attn, name, None), int):
                setattr(attn, name, new_heads if which == "heads" else new_kv)
    return kept


# ---------------------------------------------------------------- scores from calibration data

def measure_block_influence(model: nn.Module, arch: Arch, windows: torch.Tensor, *,
                            batch: int = 8, offload: str = "memory") -> list[float]:
    """Mean angular distance in [0, 1] between each block's input and output over (N, T) token
    windows; low = the block changes little and is the first to drop."""
    blocks = block_list(model, arch)
    store, block_kwargs = capture_inputs(model, blocks, windows, batch=batch, offload=offload)
    scores = []
    for block, kwargs in zip(blocks, block_kwargs):
        acc = {"sum": 0.0, "n": 0}

        def hook(_mod, args, out, acc=acc):
            y = out[0] if isinstance(out, (tuple, list)) else out
            d = S.angular_distances(args[0], y)
            acc["sum"] += float(d.sum())
            acc["n"] += d.numel()

        handle = block.register_forward_hook(hook)
        try:
            propagate(block, store, kwargs)
        finally:
            handle.remove()
        if acc["n"] == 0:
            raise UserError("no calibration tokens reached the blocks; give more calibration text")
        scores.append(acc["sum"] / acc["n"])
    return scores


def channel_importance(model: nn.Module, arch: Arch, windows: torch.Tensor, *,
                       batch: int = 8, offload: str = "memory") -> Importance:
    """Per-block MLP channel, attention head and KV-group scores from (N, T) token windows,
    read from the inputs of down_proj and o_proj while the blocks run in order."""
    blocks = block_list(model, arch)
    lay = layout_for(model, arch)
    heads, kv, head_dim = _head_counts(model)
    store, block_kwargs = capture_inputs(model, blocks, windows, batch=batch, offload=offload)
    result = Importance([], [], [])
    for block, kwargs in zip(blocks, block_kwargs):
        down, o = _linear(block, lay.mlp_out), _linear(block, lay.o)
        stats = {"mlp": InputNormStat(down.in_features), "attn": InputNormStat(o.in_features)}
        handles = [mod.register_forward_hook(lambda _m, i, _o, s=stat: s.update(i[0]))
                   for mod, stat in ((down, stats["mlp"]), (o, stats["attn"]))]
        try:
            propagate(block, store, kwargs)
        finally:
            for h in handles:
                h.remove()
        result.mlp.append(S.mlp_channel_scores(stats["mlp"].norms, down.weight))
        per_head = S.head_scores(stats["attn"].norms, o.weight, heads, head_dim)
        result.heads.append(per_head)
        result.kv_groups.append(S.kv_group_scores(per_head, kv))
    return result


# ---------------------------------------------------------------- width: experts of a mixture

@torch.no_grad()
def prune_expert_width_(model: nn.Module, arch: Arch, windows: torch.Tensor, keep, *,
                        batch: int = 8, offload: str = "memory") -> int:
    """Keep `keep` (a count or a fraction) intermediate channels in every routed expert of a
    mixture of experts (memfit.moe): each expert its own top-k of ‖W_down[:, j]‖ · RMS of its
    input j over the calibration tokens routed to it (Wanda-style, as `channel_importance`
    scores a dense MLP; an expert no token reaches by ‖W_up[j]‖·‖W_down[:, j]‖), one k for all
    so that the config's one expert width (moe_intermediate_size, or intermediate_size where
    that is the experts') still describes the model and plain from_pretrained loads it. Dense
    MLP blocks and shared experts keep their widths (their own config entries). -> k."""
    from memfit.moe import Experts

    blocks = block_list(model, arch)
    store, block_kwargs = capture_inputs(model, blocks, windows, batch=batch, offload=offload)
    scored = []  # (expert, its down_proj's input statistics)
    for block, kwargs in zip(blocks, block_kwargs):
        experts = [e for m in block.modules() if isinstance(m, Experts) for e in m.experts()]
        stats = [InputNormStat(e.down_proj.in_features) for e in experts]
        handles = [e.down_proj.register_forward_hook(lambda _m, i, _o, s=s: s.update(i[0]))
                   for e, s in zip(experts, stats)]
        try:
            propagate(block, store, kwargs)
        finally:
            for h in handles:
                h.remove()
        scored += zip(experts, stats)
    widths = {e.down_proj.in_features for e, _ in scored}
    if len(widths) != 1:
        raise UserError(f"the experts differ in width {sorted(widths)}; expert width pruning "
                        "keeps one width for all")
    k = S.keep_count(widths.pop(), keep)
    for e, stat in scored:
        for lin in (e.gate_proj, e.up_proj, e.down_proj):
            if type(lin) is not nn.Linear:
                raise UserError("run structured pruning before quantization, sparsity or "
                                "low-rank compression: an expert is already compressed")
        score = S.mlp_channel_scores(stat.norms, e.down_proj.weight) if stat.nsamples else \
            S.weight_channel_scores(e.up_proj.weight, e.down_proj.weight)
        idx = S.keep_indices(score, k)
        _slice_(e.gate_proj, rows=idx)
        _slice_(e.up_proj, rows=idx)
        _slice_(e.down_proj, cols=idx)
    c = text_config(model.config)
    setattr(c, "moe_intermediate_size" if getattr(c, "moe_intermediate_size", None)
            else "intermediate_size", k)
    return k
