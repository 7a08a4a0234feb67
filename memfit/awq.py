"""AWQ on one block, before its linears are quantized: search each group's input-channel scales
(memfit.algos.awq) and fold them into the model so the float function is unchanged.

For every group of linears sharing an input whose specs ask for `awq`, the op producing that
input is named in `Arch.awq_fold` (data, per family): a norm (weight and bias divided by s;
Gemma's (1 + weight) divided as a whole, `Arch.norm_offset`) or a
linear (output rows and bias divided by s: v_proj before o_proj, up_proj before down_proj); the
group's input columns are multiplied by s. With grouped-query attention o_proj reads more
channels than v_proj writes: query head h's slot of o_proj's input is value head h // rep, so
those slots share one scale (`tie`, searched on their averaged statistics) and v_proj's row is
divided by it. A group is skipped, and the skip logged, when its producer is None or its shape
does not match in any other way.

Each candidate scale is scored with the recipe's own quantizer (`_quantizer`: min-max RTN, or
GPTQ on the scaled Hessian; a costly one walks α upwards and stops WALK_PATIENCE steps past
its best), by the output error of what the group feeds: its linears' outputs (exact from the
Hessian), or the module named in `Arch.awq_inspect` (the MLP for gate/up, run on about
INSPECT_ROWS kept input rows; the attention module for q/k/v, run on whole kept windows with
the block's mask and positions, so q and k are judged through the softmax). Measured on the
default model (benchmarks/RESULTS.md): scoring GPTQ by the linears' own errors picked gate/up
scales that made AWQ+GPTQ worse than GPTQ; the MLP's output fixes that. Scoring q/k/v on the
attention output lowered the KLD to the float model in every AWQ preset, 3 and 4 bits, RTN
and GPTQ (AWQ round 4). The quantizer of the recipe (RTN, HQQ, GPTQ) then runs on the
scaled weights as usual, so AWQ composes with all of them. With `awq_clip` (default) each
scaled weight is then clamped per (row, group) to the bound whose RTN output error on that
group's inputs is smallest (AWQ's auto_clip; query and key are left alone, `Arch.awq_no_clip`):
this one step changes the float function, deliberately. With a min-max RTN quantizer the clip
search runs inside the α search (`JOINT`): each candidate scale is scored after its own clip
search, so α is chosen for the weights that will really be rounded. Measured on the default
model (benchmarks/RESULTS.md, AWQ round 3): clipping after an α chosen for unclipped RTN made
the block output worse than no clip at all (gate/up's clip, scored on their own outputs, costs
the MLP's output); scoring each α after its clip cut the block error by 27%.

A mixture of experts (memfit.moe, `Arch.experts`): one norm feeds the router and every
expert's (and a shared expert's) gate/up, so those groups become one group with one scale,
its statistics taken at the MoE module's input (every token), each candidate scored on the MoE
module's output (routing included), and the fold also multiplies the input columns of the
other modules that read that input (the router, a shared-expert gate: `_passengers`, float),
so the routing and the float function are unchanged. That group is not clipped (a clip search
inside the α search over every expert was 2.6x slower; each expert's would want its routed
tokens' Hessian). SmoothQuant skips these groups.

Statistics come from one pass of the block as it is (float): every fold only rescales its own
group's input, so the other groups' inputs do not change. Mean |x| counts every calibration
token; the Hessian of the output error is built from about HESSIAN_ROWS evenly strided tokens,
so its cost does not grow with the calibration set.
"""

from __future__ import annotations

import torch

from memfit.algos.awq import alphas, clipped_rtn, search_clip, search_scale
from memfit.calib.engine import ActivationStore, replay
from memfit.calib.stats import HessianStat
from memfit.configs import RTN
from memfit.errors import UserError
from memfit.formats.grid import dequantize


HESSIAN_ROWS = 8192  # token rows (about) the search's Hessian is built from: bounded cost
INSPECT_ROWS = 4096  # token rows (about) a measured module (the MLP) is run on per candidate
WALK_PATIENCE = 2    # costly quantizers (GPTQ, HQQ): stop the α walk 2 steps past the best
JOINT = True         # awq_clip with RTN: score every α after its clip search (False: clip after)
TWO_SIDED = False    # the clip search shrinks min and max separately (measured worse; for
                     # benchmarks/awq_blocks.py, not a recipe option)


class _Hessian:  # the statistic object memfit.methods' quantizers read (.hessian)
    def __init__(self, h: torch.Tensor):
        self.hessian = h


def _quantizer(spec):
    """The recipe's own quantizer as the search's `quantize`: (W s, format, H / (s sᵀ)) ->
    the dequantized W s it would store."""
    from memfit.methods import METHODS

    def quantize(w, fmt, h):
        res = METHODS[type(spec)](w, spec, _Hessian(h))
        return dequantize(res.codes, res.scale, res.zero, fmt)
    return quantize


def _cheap(spec) -> bool:
    return isinstance(spec, RTN) and spec.clip == "minmax"


class _AWQStat:
    """Mean |x| per input channel over every token, the Hessian 2/n XᵀX of one group's input
    over every `stride`-th token (the output error of the search) and, when `keep` (a module's
    output is measured), every `keep`-th token's input itself."""

    def __init__(self, in_features: int, device, stride: int, keep: int | None = None,
                 whole: bool = False):
        self.h = HessianStat(in_features, device)
        self.abs_sum = torch.zeros(in_features, device=device)
        self.rows, self.stride, self.keep, self.kept = 0, stride, keep, []
        self.whole = whole  # keep the first whole windows instead (a module mixing tokens)

    def update(self, x: torch.Tensor) -> None:
        if self.whole and self.keep and sum(k[..., 0].numel() for k in self.kept) < INSPECT_ROWS:
            self.kept.append(x.detach().clone())
        x = x.detach().reshape(-1, x.shape[-1])
        self.h.update(x[::self.stride])
        self.abs_sum += x.float().abs().sum(0).to(self.abs_sum)
        self.rows += x.shape[0]
        if self.keep and not self.whole:
            self.kept.append(x[::self.keep].clone())

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(1, self.rows)


def _awq_spec(spec):
    return spec if getattr(spec, "awq", False) else None


def _plan(block, arch, specs: dict, wants=_awq_spec, what: str = "AWQ",
          tied: bool = False, merge: bool = False) -> tuple[list, list]:
    """[(group names, fold path, tie or None, inspect or None, passengers or None)] to scale,
    and [(group names, reason)] skipped, for the groups with a spec that `wants` (AWQ's by
    default; SmoothQuant reuses this, memfit.smoothquant). `tied`: a grouped-query o_proj is
    scaled with a tie map (_gqa_tie). A mixture of experts' norm feeds the router and every
    expert: with `merge` (AWQ) all of that stage's groups become one group with one scale,
    and `passengers` names the other modules reading that input (the router, a shared-expert
    gate: float, their input columns scaled by the fold so the function is unchanged);
    without it those groups are skipped."""
    if not arch.awq_fold:
        raise UserError(f"{what} is not supported for this architecture yet (no foldable norm "
                        f"is listed in memfit.archs for it); use a recipe without {what}")
    todo, skipped = [], []
    inspects = arch.awq_inspect or (None,) * len(arch.groups)
    for stage, fold, inspect in zip(arch.stages(block), arch.awq_fold, inspects):
        wanted = [g for g in stage if any(wants(specs.get(n)) for n in g)]
        if not wanted:
            continue
        if arch.experts and fold is not None and not fold.startswith("^") \
                and any(".experts." in n or "shared_expert" in n for g in stage for n in g):
            if not merge:
                why = f"{fold} feeds the router and every expert: only AWQ scales this input"
                skipped += [(list(g), why) for g in wanted]
                continue
            names = [n for g in stage for n in g]  # every expert's, wanted or not: one fold
            todo.append((names, fold, None, inspect,
                         _passengers(block, inspect, names, block.get_submodule(names[0]))))
            continue
        for group in wanted:
            _plan_group(block, group, fold, inspect, tied, todo, skipped)
    return todo, skipped


def _plan_group(block, group, fold, inspect, tied, todo: list, skipped: list) -> None:
    if fold is not None and fold.startswith("^"):  # a sibling of the group's linears
        fold = f"{group[0].rpartition('.')[0]}.{fold[1:]}".lstrip(".")
    first = block.get_submodule(group[0])
    src = None if fold is None else block.get_submodule(fold)
    width = src.out_features if isinstance(src, torch.nn.Linear) else \
        getattr(src, "weight", torch.empty(0)).shape[0]
    tie = _gqa_tie(block, fold, width, first.in_features) if tied and src is not None \
        and isinstance(src, torch.nn.Linear) and width != first.in_features else None
    if src is None or not isinstance(first, torch.nn.Linear):
        skipped.append((list(group), "no foldable op before this group"))
    elif width != first.in_features and tie is None:
        skipped.append((list(group), (f"{fold} gives {width} channels, the group reads "
                                      f"{first.in_features} (grouped-query attention)")))
    else:
        todo.append((list(group), fold, tie, inspect, None))


def _passengers(block, moe: str, names: list[str], first) -> list[str]:
    """The modules of mixture `moe` besides `names` that read its input: a 2-D weight over its
    hidden channels outside the experts (the router; Qwen2-MoE's shared-expert gate)."""
    hidden = first.in_features
    out = []
    for n, m in block.get_submodule(moe).named_modules():
        full = f"{moe}.{n}"
        w = getattr(m, "weight", None)
        if n and full not in names and isinstance(w, torch.Tensor) and w.dim() == 2 \
                and w.shape[1] == hidden and ".experts." not in f".{n}." \
                and "shared_expert." not in n and "shared_experts." not in n:
            out.append(full)
    return out


def _gqa_tie(block, fold: str, width: int, in_features: int) -> torch.Tensor | None:
    """(in_features,) the producer channel (v_proj row) behind each input channel of o_proj under
    grouped-query attention: channel h·d + i reads value head h // rep, row (h // rep)·d + i,
    with d the attention module's head_dim and rep = in_features / width. None if the shapes
    do not fit that pattern."""
    attn = block.get_submodule(fold.rpartition(".")[0]) if "." in fold else block
    d = getattr(attn, "head_dim", None)
    if not d or in_features % width or width % d or in_features % d:
        return None
    rep = in_features // width
    c = torch.arange(in_features)
    return (c // d // rep) * d + c % d


@torch.inference_mode()
def _collect(block, arch, todo: list, store: ActivationStore, kwargs: dict) -> list[_AWQStat]:
    stats, handles = [], []
    first = store[0]
    rows = len(store) * first.shape[0] * (first.shape[1] if first.dim() > 2 else 1)
    stride = max(1, -(-rows // HESSIAN_ROWS))
    keep = max(1, -(-rows // INSPECT_ROWS))
    for names, _, _, inspect, passengers in todo:
        mod = block.get_submodule(names[0])
        stat = _AWQStat(mod.in_features, mod.weight.device, stride, keep if inspect else None,
                        inspect in arch.awq_mixing)
        if passengers is None:
            handles.append(mod.register_forward_hook(lambda _m, inp, _o, s=stat: s.update(inp[0])))
        else:  # a mixture's experts: every token's input, at the MoE module
            handles.append(block.get_submodule(inspect).register_forward_pre_hook(
                lambda _m, a, kw, s=stat: s.update(a[0] if a else kw["hidden_states"]),
                with_kwargs=True))
        stats.append(stat)
    replay(block, store, kwargs, handles)
    return stats


def _module_loss(block, inspect: str, names: list[str], stat: _AWQStat, kwargs: dict,
                 batched: bool = False):
    """The search's loss: mean squared error of module `inspect`'s output on the kept inputs
    when linears `names` (inside it) hold the candidate weights, vs its float output. Whole
    kept windows (attention) are run with the block's keyword arguments (mask, positions)."""
    from torch.func import functional_call

    mod = block.get_submodule(inspect)
    xs = stat.kept if stat.whole else [torch.cat(stat.kept)]  # [(rows, in)] or [(b, t, in)]
    if batched:  # a mixture-of-experts module wants (batch, tokens, in)
        xs = [x[None] for x in xs]
    kw = {k: v for k, v in kwargs.items() if k != "hidden_states"} if stat.whole else {}
    keys = [n[len(inspect) + 1:] + ".weight" for n in names]
    dtype = block.get_submodule(names[0]).weight.dtype
    rows = sum(x[..., 0].numel() for x in xs)
    run = lambda out: (out[0] if isinstance(out, tuple) else out).float()
    with torch.no_grad():
        refs = [run(mod(x, **kw)) for x in xs]

    @torch.no_grad()
    def loss(w_hat: list[torch.Tensor]) -> float:
        params = {k: w.to(dtype) for k, w in zip(keys, w_hat)}
        return sum(float(((run(functional_call(mod, params, (x,), kw)) - ref) ** 2).sum())
                   for x, ref in zip(xs, refs)) / rows
    return loss


@torch.no_grad()
def fold_(src: torch.nn.Module, linears: list[torch.nn.Linear], s: torch.Tensor,
          src_s: torch.Tensor | None = None, norm_offset: float = 0.0) -> None:
    """Divide the producer's output channels by `src_s` (default s), multiply the linears' input
    columns by s (s = src_s[tie] when channels are tied). A norm that scales by
    (norm_offset + weight) (Gemma: 1 + w) gets (norm_offset + w) / s - norm_offset."""
    src_s = s if src_s is None else src_s
    if isinstance(src, torch.nn.Linear):
        src.weight.copy_(src.weight.float() / src_s[:, None])
    else:
        src.weight.copy_((src.weight.float() + norm_offset) / src_s - norm_offset)
    if getattr(src, "bias", None) is not None:
        src.bias.copy_(src.bias.float() / src_s)
    for lin in linears:
        lin.weight.copy_(lin.weight.float() * s)


def awq_block_(block, arch, specs: dict, store: ActivationStore, kwargs: dict) -> list[dict]:
    """Search and fold the AWQ scales of every group of `block` whose specs ask for it, in
    place; -> log entries (alpha, output errors, or why a group was skipped)."""
    todo, skipped = _plan(block, arch, specs, tied=True, merge=True)
    log = [{"modules": names, "awq": {"skipped": why}, "error": None} for names, why in skipped]
    stats = _collect(block, arch, todo, store, kwargs) if todo else []
    for (names, fold, tie, inspect, passengers), stat in zip(todo, stats):
        if stat.rows == 0:  # an expert no calibration token reached (memfit.moe)
            log.append({"modules": names, "awq": {"skipped": "no calibration token reached "
                                                              "these experts"}, "error": None})
            continue
        spec = next(_awq_spec(specs.get(n)) for n in names if _awq_spec(specs.get(n)))
        quantized = [n for n in names if _awq_spec(specs.get(n))]
        weights = [(block.get_submodule(n).weight.detach().float(), specs[n].format)
                   for n in quantized]
        src = block.get_submodule(fold)
        # A mixture's experts are not clipped: their clip search inside the α search, over
        # every expert, made a block's AWQ 2.6x slower (benchmarks/RESULTS.md, session 33).
        clip_ok = spec.awq_clip and passengers is None
        clipped = [clip_ok and n not in arch.awq_no_clip for n in quantized]
        plain, joint = _quantizer(spec), JOINT and spec.awq_clip and _cheap(spec)
        loss = _module_loss(block, inspect, quantized, stat, kwargs,
                            batched=passengers is not None) if inspect else None

        def search(quantize, spec=spec, weights=weights, stat=stat, tie=tie, src=src, loss=loss):
            return search_scale(
                weights, stat.mean_abs, stat.h.hessian, alphas(spec.awq_grid, spec.awq_max_alpha),
                duo=spec.awq_duo, tie=tie, width=None if tie is None else src.out_features,
                quantize=quantize, patience=None if _cheap(spec) else WALK_PATIENCE, loss=loss)
        # joint: output errors are after the clip search, α = 0 included. The clip search
        # lowers each linear's own output error; a group scored on a module's output (gate/up
        # on the MLP's) keeps it only where that output is lower with it than without.
        res = search([clipped_rtn(TWO_SIDED) if c else plain for c in clipped] if joint else plain)
        clip = clip_ok
        if joint and inspect and any(clipped):
            unclipped = search(plain)
            if unclipped.error < res.error:
                res, clip = unclipped, False
        stat.kept.clear()
        if res.alpha > 0 or res.duo:
            fold_(src, [block.get_submodule(n) for n in names + (passengers or [])], res.scale,
                  res.source_scale, arch.norm_offset)
        entry = {"alpha": res.alpha, "duo": res.duo, "fold": fold, "tied": tie is not None,
                 "measured": inspect or "linear outputs", "clip_in_search": joint and clip,
                 "output_error": res.error, "rtn_output_error": res.rtn_error}
        if passengers is not None:
            entry["also_scaled"] = passengers
        if clip:
            s = res.scale
            entry["clip"] = _clip_(block, [n for n in quantized if n not in arch.awq_no_clip],
                                   specs, stat.h.hessian / (s[:, None] * s[None, :]))
        log.append({"modules": names, "error": None, "awq": entry})
    return log


@torch.no_grad()
def _clip_(block, names: list[str], specs: dict, hessian: torch.Tensor) -> dict:
    """Clamp each linear's (already scaled) weight to its searched per-group bound, in place;
    -> {name: [output error after, before]} (names with ragged groups are left alone)."""
    done = {}
    for n in names:
        lin, fmt = block.get_submodule(n), specs[n].format
        g, _ = fmt.groups(lin.in_features)
        if lin.in_features % g:
            continue
        w, after, before = search_clip(lin.weight.detach(), fmt, hessian, two_sided=TWO_SIDED)
        lin.weight.copy_(w)
        done[n] = [after, before]
    return done
