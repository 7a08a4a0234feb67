"""`compress_(model, recipe, data)`: the one orchestration loop.

Walks the blocks in order. Within a block it visits the linear groups in true-sequential order
(q/k/v, then o, then gate/up, then down); for a group whose algorithms need data it collects the
statistics with hooks over the calibration activations (memfit.calib), then replaces each linear
by its packed module. After a block is done its outputs become the next block's inputs.

Algorithms are pure functions (memfit.algos); the dispatch below is a literal dict. A checkpoint
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

from memfit.algos.gptq import gptq
from memfit.algos.hqq import hqq
from memfit.algos.rtn import rtn
from memfit.archs import Arch, arch_for, block_list
from memfit.calib import capture_inputs, collect_stats, propagate
from memfit.errors import UserError
from memfit.eval.memory import rss_peak_bytes, weight_table
from memfit.formats.grid import IntFormat
from memfit.formats.intq import PackedIntWeight
from memfit.formats.quant_linear import QuantLinear
from memfit.recipe import Quant, Recipe, load_recipe

# algorithm name -> (statistic it needs, function(weight (out, in) fp32, spec, statistic))
ALGORITHMS = {
    "rtn": (None, lambda w, q, s: rtn(w, q.format, clip=q.clip)),
    "hqq": (None, lambda w, q, s: hqq(w, q.format, iters=q.iters)),
    "gptq": ("hessian", lambda w, q, s: gptq(w, s.hessian, q.format, block_size=q.block_size,
                                            damp=q.damp, act_order=q.act_order, clip=q.clip)),
}


def weight_2d(mod: torch.nn.Module) -> torch.Tensor:
    """A linear's weight as (out, in) float32 (GPT-2's Conv1D stores it transposed)."""
    w = mod.weight if isinstance(mod, torch.nn.Linear) else mod.weight.t()
    return w.detach().float()


def _quantize_group(mods: list[torch.nn.Module], spec: Quant, stat) -> tuple[list[QuantLinear], float | None]:
    """Quantize linears that share one input (and so one statistic) with one algorithm call.

    Every algorithm here treats output rows independently given the input statistic, so the
    weights are stacked along rows, quantized once (one Cholesky, one sweep) and split again.
    """
    ws = [weight_2d(m) for m in mods]
    res = ALGORITHMS[spec.algo][1](torch.cat(ws), spec, stat)
    fmt, out = spec.format, []
    rows = [w.shape[0] for w in ws]
    parts = zip(res.codes.split(rows), res.scale.split(rows), res.zero.split(rows))
    for mod, w, (codes, scale, zero) in zip(mods, ws, parts):
        bias = mod.bias is not None
        ql = QuantLinear(w.shape[1], w.shape[0], fmt, bias, device=mod.weight.device,
                         dtype=mod.weight.dtype)
        packed = PackedIntWeight.from_codes(codes, scale, None if fmt.symmetric else zero, fmt)
        ql.load_packed(packed, bias=mod.bias.detach() if bias else None)
        out.append(ql)
    return out, res.error


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
    tmp = ckpt / f"block_{i}.tmp"
    save_file(tensors, str(tmp) + ".st")
    (ckpt / f"block_{i}.json").write_text(json.dumps(done))
    Path(str(tmp) + ".st").rename(ckpt / f"block_{i}.safetensors")


def _restore_block(ckpt: Path, i: int, block: torch.nn.Module) -> dict[str, dict] | None:
    st, js = ckpt / f"block_{i}.safetensors", ckpt / f"block_{i}.json"
    if not (st.exists() and js.exists()):
        return None
    done = json.loads(js.read_text())
    tensors = load_file(str(st), device=str(next(block.parameters()).device))
    for n, d in done.items():
        old = block.get_submodule(n)
        ql = QuantLinear(d["in"], d["out"], IntFormat.from_dict(d["fmt"]), d["bias"],
                         device=old.weight.device, dtype=old.weight.dtype)
        ql.load_state_dict({k[len(n) + 1:]: v for k, v in tensors.items() if k.startswith(n + ".")})
        block.set_submodule(n, ql)
    return done


def _compress_block(block, arch: Arch, specs: dict[str, Quant], store, kwargs, log) -> dict:
    done = {}
    for group in arch.groups:
        names = [n for n in group if specs.get(n) is not None]
        if not names:
            continue
        mods = {n: block.get_submodule(n) for n in names}
        needs = {n: ALGORITHMS[specs[n].algo][0] for n in names}
        stats = collect_stats(block, mods, needs, store, kwargs) if store is not None else {}
        batches: dict[tuple, list[str]] = {}  # same spec and same statistic -> one call
        for n in names:
            batches.setdefault((specs[n], id(stats.get(n))), []).append(n)
        for (spec, _), members in batches.items():
            qls, err = _quantize_group([mods[n] for n in members], spec, stats.get(members[0]))
            for n, ql in zip(members, qls):
                block.set_submodule(n, ql)
                done[n] = {"in": ql.in_features, "out": ql.out_features,
                           "bias": ql.bias is not None, "fmt": spec.format.to_dict()}
            log.append({"modules": members, "algo": spec.algo, "error": err})
        stats.clear()
    return done


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
    blocks = block_list(model, arch)
    prefix = _module_prefix(model, blocks)
    before = weight_table(model)["weight_bytes"]
    plan = []
    for i, block in enumerate(blocks):
        specs = {n: recipe.spec_for(f"{prefix}.{i}.{n}") for g in arch.groups for n in g}
        for n, s in specs.items():
            if s is not None:
                _check_finite(f"{prefix}.{i}.{n}", block.get_submodule(n))
        plan.append(specs)
    if not any(s for specs in plan for s in specs.values()):
        raise UserError("the recipe selects no module to compress; check quant/ignore/overrides")

    t0 = time.perf_counter()
    store = kwargs = None
    if recipe.needs_data:
        if data is None:
            if tokenizer is None:
                raise UserError("this recipe needs calibration data: pass data= or tokenizer=")
            from memfit.data import token_windows
            c = recipe.calib
            data = token_windows(tokenizer, c.data, "calib", seq_len=c.seq_len,
                                 max_windows=c.samples, seed=c.seed)
        store, kwargs = capture_inputs(model, blocks, data, offload=recipe.calib.offload)
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
            done = _compress_block(block, arch, plan[i], store, kwargs, log)
            if ckpt:
                _save_block(ckpt, i, block, done)
        if store is not None and any(s is not None and s.needs_data for p in plan[i + 1:]
                                     for s in p.values()):
            propagate(block, store, kwargs)
    after = weight_table(model)["weight_bytes"]
    errors = [e["error"] for e in log if e["error"] is not None and math.isfinite(e["error"])]
    return {"recipe": recipe.to_dict(), "modules": sum(len(p) for p in plan if p),
            "seconds": time.perf_counter() - t0, "bytes_before": before, "bytes_after": after,
            "calib_windows": 0 if data is None else int(data.shape[0]),
            "calib_seq_len": 0 if data is None else int(data.shape[1]),
            "resumed_blocks": resumed, "peak_rss_bytes": rss_peak_bytes(),
            "peak_gpu_bytes": _peak_gpu(model),
            "mean_layer_error": sum(errors) / len(errors) if errors else None, "layers": log}
