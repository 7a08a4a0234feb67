"""`compress_(model, recipe, data)`: the one orchestration loop.

Walks the blocks in order. Within a block it visits the linear groups in true-sequential order
(q/k/v, then o, then gate/up, then down); for a group whose algorithms need data it collects the
statistics with hooks over the calibration activations (memfit.calib), then replaces each linear
by its packed module. After a block is done its outputs become the next block's inputs.

Algorithms are pure functions (memfit.algos); memfit.methods maps a spec to them with literal
dicts and builds the replacement modules. Structured pruning, when asked, runs first. A checkpoint
folder, when given, receives each finished block (safetensors + json) so an interrupted run
resumes where it stopped and produces the same bytes.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from memfit.archs import Arch, arch_for, block_list
from memfit.calib import capture_inputs, collect_stats, propagate
from memfit.errors import UserError
from memfit.eval.memory import rss_peak_bytes, weight_table
from memfit.configs import Needs
from memfit.methods import needs, quantize_embeddings_, replace_group
from memfit.recipe import Recipe, load_recipe


def _check_finite(name: str, mod: torch.nn.Module) -> None:
    if not torch.isfinite(mod.weight).all():
        raise UserError(f"{name}.weight has NaN/Inf values; fix or re-export the model "
                        "before compressing")


def _module_prefix(model: torch.nn.Module, blocks: torch.nn.ModuleList) -> str:
    for name, mod in model.named_modules():
        if mod is blocks:
            return name
    raise AssertionError("block list not found in the model")


def _save_block(ckpt: Path, i: int, block: torch.nn.Module, done: dict[str, dict]) -> None:
    tensors = {f"{n}.{k}": v.contiguous() for n in done
               for k, v in block.get_submodule(n).state_dict().items()}
    tensors.update({f"_dense.{k}": v.detach().contiguous() for k, v in block.named_parameters()
                    if not any(k.startswith(n + ".") for n in done)})  # norms AWQ rescaled
    tmp = ckpt / f"block_{i}.tmp.st"
    save_file(tensors, str(tmp))
    (ckpt / f"block_{i}.json").write_text(json.dumps(done))
    tmp.rename(ckpt / f"block_{i}.safetensors")  # the block counts as done once this exists


def _restore_block(ckpt: Path, i: int, block: torch.nn.Module) -> dict[str, dict] | None:
    from memfit.io.save import build_module

    st, js = ckpt / f"block_{i}.safetensors", ckpt / f"block_{i}.json"
    if not (st.exists() and js.exists()):
        return None
    done = json.loads(js.read_text())
    device = next(block.parameters()).device
    tensors = load_file(str(st), device=str(device))
    for n, desc in done.items():
        old = block.get_submodule(n)
        new = build_module(desc, old.weight.dtype)
        new.load_state_dict({k[len(n) + 1:]: v for k, v in tensors.items()
                             if k.startswith(n + ".")}, assign=True)
        block.set_submodule(n, new.to(device))
    params = dict(block.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            if k.startswith("_dense."):
                params[k[len("_dense."):]].copy_(v)
    return done


def _compress_block(block, arch: Arch, specs: dict, store, kwargs, log,
                    sequential: str = "group") -> dict:
    """Replace the block's linears group by group. sequential="group": each group's statistics
    are collected after the groups before it were replaced (true-sequential); "block": every
    group's statistics come from the block as it was (the original Wanda/SparseGPT order)."""
    from memfit.io.save import describe_modules

    if store is not None and any(getattr(s, "awq", False) for s in specs.values()):
        from memfit.awq import awq_block_
        log.extend(awq_block_(block, arch, specs, store, kwargs))
    static = {}  # W8A8: SmoothQuant folds and calibrated activation bounds (memfit.smoothquant)
    if any(getattr(s, "smoothquant", None) is not None or getattr(s, "act_static", False)
           for s in specs.values()):
        from memfit.smoothquant import smooth_block_
        static = smooth_block_(block, arch, specs, store, kwargs, log)
    stages = []  # per stage, its groups with a spec: {name: module}
    for stage in arch.stages(block):
        groups = [{n: block.get_submodule(n) for n in g if specs.get(n) is not None} for g in stage]
        if groups := [g for g in groups if g]:
            stages.append(groups)
    needed = {n: needs(specs[n]) for groups in stages for mods in groups for n in mods}
    collect = lambda groups: (collect_stats(block, groups, needed, store, kwargs)
                              if store is not None else {})
    early = None
    if sequential == "block":  # one pass over the block as it is, for every group
        every = collect([mods for groups in stages for mods in groups])
        early = [{n: every[n] for mods in groups for n in mods if n in every} for groups in stages]
    for i, groups in enumerate(stages):
        stats = early[i] if early is not None else collect(groups)  # a stage's groups: one pass
        if arch.experts:
            _unreached_experts(stats, log)
        for mods in groups:
            batches: dict[tuple, list[str]] = {}  # same spec and same statistic -> one call
            for n in mods:
                batches.setdefault((specs[n], id(stats.get(n))), []).append(n)
            for (spec, _), members in batches.items():
                new, err = replace_group([mods[n] for n in members], spec, stats.get(members[0]))
                for n, mod in zip(members, new):
                    block.set_submodule(n, mod)
                log.append({"modules": members, "spec": spec.to_dict(), "error": err})
        stats.clear()
    for n, absmax in static.items():
        block.get_submodule(n).set_input_scale(absmax)
    described = describe_modules(block)
    return {n: described[n] for g in arch.block_groups(block) for n in g if n in described}


def _unreached_experts(stats: dict, log: list) -> None:
    """Experts no calibration token was routed to: compressed as if their inputs were
    isotropic (memfit.moe), logged by name."""
    empty = sorted({n for n, st in stats.items() if st.nsamples == 0})
    for n in empty:
        stats[n].isotropic()
    if empty:
        log.append({"modules": empty, "error": None,
                    "note": "no calibration token reached these experts: compressed as if "
                            "their inputs were isotropic"})


def _structured_(model, arch: Arch, spec, data, offload: str) -> list[int] | None:
    """Drop blocks, then narrow MLPs (a mixture's routed experts) and attention, each by
    activation importance; -> the original indices of the blocks kept (None when none is
    dropped)."""
    from memfit.algos.structured import choose_blocks_to_drop
    from memfit.structured import (channel_importance, drop_blocks_, measure_block_influence,
                                   prune_expert_width_, prune_heads_, prune_mlp_width_)

    if arch.experts and spec.heads_keep is not None:
        raise UserError("attention head pruning (heads_keep) of a mixture of experts is not "
                        "supported; mlp_keep narrows each routed expert, drop_blocks drops blocks")
    kept = None
    if spec.drop_blocks:
        scores = measure_block_influence(model, arch, data, offload=offload)
        kept = drop_blocks_(model, choose_blocks_to_drop(scores, spec.drop_blocks), arch=arch)
    if arch.experts and spec.mlp_keep is not None:
        prune_expert_width_(model, arch, data, spec.mlp_keep, offload=offload)
    elif spec.mlp_keep is not None or spec.heads_keep is not None:
        imp = channel_importance(model, arch, data, offload=offload)
        if spec.mlp_keep is not None:
            prune_mlp_width_(model, spec.mlp_keep, scores=imp.mlp, arch=arch)
        if spec.heads_keep is not None:
            prune_heads_(model, num_heads=spec.heads_keep, scores=imp.kv_groups, arch=arch)
    return kept


@torch.inference_mode()
def _owl_plan_(model, blocks, arch: Arch, plan: list[dict], data, offload: str) -> list[float]:
    """OWL: measure each block's outlier ratio on the dense model (Wanda scores above m x the
    block's mean, over all its linears), then give blocks with more outliers lower sparsity,
    keeping the mean; rewrites the Prune specs of `plan` in place. Returns the sparsities."""
    from dataclasses import replace

    from memfit.algos.prune import owl_sparsities, wanda_scores
    from memfit.methods import weight_2d
    from memfit.recipe import Compose

    store, block_kwargs = capture_inputs(model, blocks, data, offload=offload)
    ratios = {}
    spec = next(_owl_part(s) for p in plan for s in p.values() if _owl_part(s))
    for i, block in enumerate(blocks):
        outliers = total = 0
        groups = [{n: block.get_submodule(n) for n in group} for group in arch.block_groups(block)]
        stats = collect_stats(block, groups, {n: Needs.NORMS for g in groups for n in g}, store,
                              block_kwargs[i])  # the dense block: every group in the same passes
        for mods in groups:
            for n, mod in mods.items():
                if stats[n].nsamples == 0:  # an expert no token reached: no outliers seen
                    continue
                scores = wanda_scores(weight_2d(mod), stats[n].norms)
                outliers += int((scores > spec.owl_m * scores.mean()).sum())
                total += scores.numel()
        ratios[str(i)] = outliers / total
        propagate(block, store, block_kwargs[i])
    sparsity = owl_sparsities(ratios, spec.sparsity, spec.owl_lambda)
    for i, specs in enumerate(plan):
        for n, s in specs.items():
            part = _owl_part(s)
            if part:
                new = replace(part, sparsity=sparsity[str(i)], owl=False)
                specs[n] = Compose(new, s.quant) if isinstance(s, Compose) else new
    return [sparsity[str(i)] for i in range(len(blocks))]


def plan_specs(model, recipe: Recipe, arch: Arch) -> list[dict]:
    """Per block {linear name: spec or None}, after checking what a user can get wrong: an ignore
    or override pattern that matches no module (close names listed), a selection of nothing, an
    N:M pattern that does not divide a selected linear's input width. Works on a meta-device
    model, so `memfit compress` runs it before loading any weight."""
    import difflib
    import fnmatch

    blocks = block_list(model, arch)
    prefix = _module_prefix(model, blocks)
    names = [n for n, _ in model.named_modules() if n]
    default_ignore = Recipe.__dataclass_fields__["ignore"].default  # absent on encoders: fine
    for p in recipe.ignore + tuple(p for p, _ in recipe.overrides):
        if p not in default_ignore and not any(fnmatch.fnmatchcase(n, p) or n.endswith("." + p) or n == p for n in names):
            leaves = sorted({n.rpartition(".")[2] for n in names})
            close = difflib.get_close_matches(p.rpartition(".")[2].strip("*"), leaves, n=3,
                                              cutoff=0.5)
            raise UserError(f"the recipe pattern {p!r} matches no module of this model"
                            + (f"; did you mean {', '.join('*.' + c for c in close)}?" if close
                               else f"; module names look like {names[min(5, len(names) - 1)]!r}"))
    plan = []
    for i, block in enumerate(blocks):
        specs = {n: recipe.spec_for(f"{prefix}.{i}.{n}") for g in arch.block_groups(block)
                 for n in g}
        for n, spec in specs.items():
            pattern = getattr(getattr(spec, "first", spec), "pattern", None)
            if pattern is not None:
                mod = block.get_submodule(n)
                width = mod.in_features if isinstance(mod, torch.nn.Linear) else mod.weight.shape[0]
                if width % pattern[1]:
                    raise UserError(f"{prefix}.{i}.{n} has {width} inputs, not a multiple of "
                                    f"{pattern[1]}: the {pattern[0]}:{pattern[1]} pattern cannot "
                                    "apply; use another N:M, or unstructured sparsity")
        plan.append(specs)
    tables = recipe.embeddings is not None or recipe.head is not None
    if not (recipe.structured or tables) and not any(s for specs in plan for s in specs.values()):
        raise UserError("the recipe selects no module to compress; check quant/ignore/overrides")
    return plan


def _owl_part(spec):
    """The Prune spec asking for OWL inside `spec` (a Prune, or a Compose's first part), or None."""
    part = getattr(spec, "first", spec)
    return part if getattr(part, "owl", False) else None


def _peak_gpu(model) -> int | None:
    device = next(model.parameters()).device
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def compress_(model: torch.nn.Module, recipe: Recipe | str, data: torch.Tensor | None = None, *,
              tokenizer=None, checkpoint_dir: str | Path | None = None,
              progress: bool = True) -> dict:
    """Compress `model` in place following `recipe`; return a report.

    `data`: (N, T) calibration token windows; built from recipe.calib with `tokenizer` when None
    and some algorithm needs data.
    """
    recipe = load_recipe(recipe)
    arch = arch_for(model.config)
    before = weight_table(model)["weight_bytes"]
    t0 = time.perf_counter()
    if recipe.needs_data and data is None:
        if tokenizer is None:
            raise UserError("this recipe needs calibration data: pass data= or tokenizer=")
        from memfit.calib.data import calibration_windows
        data = calibration_windows(tokenizer, recipe.calib)
    kept_blocks = None
    if recipe.structured:
        kept_blocks = _structured_(model, arch, recipe.structured, data, recipe.calib.offload)
    blocks = block_list(model, arch)
    prefix = _module_prefix(model, blocks)
    plan = plan_specs(model, recipe, arch)
    for i, (block, specs) in enumerate(zip(blocks, plan)):
        for n, spec in specs.items():
            if spec is not None:
                _check_finite(f"{prefix}.{i}.{n}", block.get_submodule(n))
    tables = recipe.embeddings is not None or recipe.head is not None

    owl = None
    if any(_owl_part(s) for p in plan for s in p.values()):
        owl = _owl_plan_(model, blocks, arch, plan, data, recipe.calib.offload)
    store, block_kwargs = None, [None] * len(blocks)
    if any(s is not None and s.needs_data for p in plan for s in p.values()):
        store, block_kwargs = capture_inputs(model, blocks, data, offload=recipe.calib.offload)
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    if ckpt:
        ckpt.mkdir(parents=True, exist_ok=True)
    log, resumed = [], 0
    bar = tqdm(list(enumerate(blocks)), desc="compress", unit="block", disable=not progress)
    for i, block in bar:
        done = _restore_block(ckpt, i, block) if ckpt else None
        if done is not None:
            resumed += 1
        else:
            done = _compress_block(block, arch, plan[i], store, block_kwargs[i], log,
                                   recipe.sequential)
            if ckpt:
                _save_block(ckpt, i, block, done)
        if store is not None and any(s is not None and s.needs_data for p in plan[i + 1:]
                                     for s in p.values()):
            propagate(block, store, block_kwargs[i])
    embedding_bytes = quantize_embeddings_(model, recipe.embeddings, recipe.head) if tables else None
    after = weight_table(model)["weight_bytes"]
    errors = [e["error"] for e in log if e["error"] is not None and math.isfinite(e["error"])]
    return {"recipe": recipe.to_dict(), "modules": sum(s is not None for p in plan for s in p.values()),
            "seconds": time.perf_counter() - t0, "bytes_before": before, "bytes_after": after,
            "blocks": len(blocks), "kept_blocks": kept_blocks,
            "owl_sparsities": owl,
            "calib_windows": 0 if data is None else int(data.shape[0]),
            "calib_seq_len": 0 if data is None else int(data.shape[1]),
            "resumed_blocks": resumed, "embedding_bytes": embedding_bytes, "peak_rss_bytes": rss_peak_bytes(),
            "peak_gpu_bytes": _peak_gpu(model),
            "mean_layer_error": sum(errors) / len(errors) if errors else None, "layers": log}
