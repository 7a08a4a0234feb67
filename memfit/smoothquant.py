"""SmoothQuant and static activation scales for W8A8 on one block, before its linears are
quantized.

For every group of linears sharing an input that holds a W8A8 spec (`act_bits: 8`) asking for
`smoothquant: α` or `act_static: true`, one pass of the block as it is records max|x| per input
channel of the group's input. Then:

- SmoothQuant: s = smooth_scales(max|x|, max|W| over the group's stacked weights, α)
  (memfit.algos.smoothquant) is folded exactly as AWQ folds its scales, by the same code
  (memfit.awq: the producer named in `Arch.awq_fold` divided by s, the group's input columns
  multiplied by s), so the float function is unchanged. Groups AWQ cannot fold are skipped the
  same way and logged (o_proj under grouped-query attention).
- static scales: each group's per-tensor activation bound is max_j(max|x_j| / s_j), the max of
  its input after the fold (the fold divides channel j by s_j exactly), returned per W8A8 static
  layer for `W8A8Linear.set_input_scale` once the layer exists.

Statistics come from the float block before any of its groups is quantized (SmoothQuant's
protocol): folding one group rescales only that group's input. Calibration data is required;
without it this is a UserError.
"""

from __future__ import annotations

import torch

from memfit.algos.smoothquant import smooth_scales
from memfit.awq import _plan, fold_
from memfit.calib.engine import ActivationStore, replay
from memfit.errors import UserError
from memfit.moe import is_expert_linear, same_projection


def _act_spec(spec):
    """A W8A8 spec that measures activations (SmoothQuant or static scales), else None."""
    if getattr(spec, "act_bits", None) and (spec.smoothquant is not None or spec.act_static):
        return spec
    return None


def _sq_spec(spec):
    return spec if getattr(spec, "act_bits", None) and spec.smoothquant is not None else None


class _AbsMax:
    def __init__(self, in_features: int, device):
        self.value = torch.zeros(in_features, device=device)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        self.value = torch.maximum(self.value, x.float().abs().amax(0).to(self.value))


@torch.inference_mode()
def _collect(block, groups: list[list[str]], store: ActivationStore, kwargs: dict) -> list:
    stats, handles = [], []
    for names in groups:
        mod = block.get_submodule(names[0])
        stat = _AbsMax(mod.in_features, mod.weight.device)
        handles.append(mod.register_forward_hook(lambda _m, inp, _o, s=stat: s.update(inp[0])))
        stats.append(stat)
    replay(block, store, kwargs, handles)
    return stats


def smooth_block_(block, arch, specs: dict, store: ActivationStore | None, kwargs: dict,
                  log: list) -> dict[str, float]:
    """Fold SmoothQuant's scales into `block` in place (log entries appended to `log`) and
    -> {W8A8 static layer name: max |input| after the fold}, its calibrated activation bound."""
    if store is None:
        raise UserError("W8A8 with smoothquant or act_static needs calibration data; pass data= "
                        "or tokenizer= (the CLI uses the recipe's calib text)")
    groups = [[n for n in g] for g in arch.block_groups(block) if any(_act_spec(specs.get(n)) for n in g)]
    if not groups:
        return {}
    stats = dict(zip(map(tuple, groups), _collect(block, groups, store, kwargs)))
    absmax = {g: st.value for g, st in stats.items()}
    if any(_sq_spec(specs.get(n)) for g in groups for n in g):
        todo, skipped = _plan(block, arch, specs, wants=_sq_spec, what="SmoothQuant")
        log.extend({"modules": names, "smoothquant": {"skipped": why}, "error": None}
                   for names, why in skipped)
        for names, fold, *_ in todo:
            spec = next(_sq_spec(specs.get(n)) for n in names if _sq_spec(specs.get(n)))
            mods = [block.get_submodule(n) for n in names]
            w_absmax = torch.cat([m.weight.detach().float() for m in mods]).abs().amax(0)
            x = absmax[tuple(names)]
            if not bool(x.any()):  # an expert no calibration token reached (memfit.moe)
                log.append({"modules": names, "error": None, "smoothquant": {
                    "skipped": "no calibration token reached these experts"}})
                continue
            s = smooth_scales(x, w_absmax, spec.smoothquant)
            fold_(block.get_submodule(fold), mods, s, norm_offset=arch.norm_offset)
            absmax[tuple(names)] = x / s
            log.append({"modules": names, "error": None, "smoothquant": {
                "alpha": spec.smoothquant, "fold": fold,
                "act_absmax": [float(x.max()), float((x / s).max())],  # before, after
                "scale_range": [float(s.min()), float(s.max())]}})
    bounds = {n: float(absmax[tuple(g)].max()) for g in groups for n in g
              if getattr(specs.get(n), "act_static", False) and specs[n].act_bits}
    for n, b in bounds.items():  # an expert no token reached: the largest bound of its siblings
        if b == 0 and is_expert_linear(n):
            bounds[n] = max((v for k, v in bounds.items() if same_projection(k, n)), default=0.0)
    return bounds
