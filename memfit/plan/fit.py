"""`memfit.fit(model, budget=...)`: the plan that loses least within a memory budget.

    plan = memfit.fit("default", budget="300MB", context=2048)   # measures, calibrates, solves
    plan.build("out")        # writes only if a fresh process measures it within the budget
    plan.report("out")       # JSON + HTML + PNG (Pareto curve, per-layer choices)

Steps: (1) sensitivities from one forward/backward pass (memfit.plan.sensitivity) and every
candidate of every linear built with the real algorithms (memfit.plan.menu); (2) one factor per
family of choices fitted on measured probe plans, so predicted KL matches measured KL; (3) the
Lagrangian solve (memfit.plan.solve), with the KV precision chosen alongside when the KV cache
weighs; (4) re-check: the chosen plan's KL is measured (weights swapped in, memfit.plan.probe)
and, when it departs from the prediction by more than 25%, the factors are refitted on every
measured plan and the plan solved again (at most twice); (5) `build`: the artifact is written
to a temporary folder, loaded again, its peak memory measured in a fresh process and its KL on
the evaluation split measured; it replaces `out` only if both pass.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from memfit.archs import block_list, check_positions, text_config
from memfit.encoders import used_length
from memfit.errors import UserError
from memfit.plan.build import say as _say
from memfit.plan.measure import in_fresh_process
from memfit.plan.menu import (
    TABLE_MENU,
    Option,
    Unit,
    group_options,
    head_module,
    linear_menu,
    resident_bytes,
    table_modules,
)
from memfit.plan.probe import (
    ProbeReference,
    calib_windows,
    probe_protocol,
    probe_reference,
)
from memfit.plan.sensitivity import sensitivity_pass
from memfit.plan.plan import FitOptions, Plan
from memfit.plan.solve import Solution, smallest
from memfit.plan.target import (
    Target,
    check_floor,
    estimate_activation,
    kv_bytes,
    kv_format,
    kv_options,
    parse_size,
)

DEFAULT_SHARE = 0.4  # no budget given: the model's memory cut to 40% of the unmodified model's
KV_WINDOWS = 2  # calibration windows (up to 1024 tokens) a quantized KV cache is measured on
TOLERANCE = 0.25  # predicted vs measured KL: re-solve beyond this relative departure


def _table_units(model, sens_tables: dict, cands: dict, tied: bool, device, dtype) -> list[Unit]:
    """The embedding table (with a tied head) and an untied head as units."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    units = []
    kinds = ["embeddings"] + ([] if tied or head is None else ["head"])
    for kind in kinds:
        w = emb.weight if kind == "embeddings" else head.weight
        opts = [Option("fp16", "keep", stored=w.numel() * 2, resident=w.numel() * dtype.itemsize)]
        for name, fmt in TABLE_MENU[1:]:
            mod = cands[kind][name]
            damage = sens_tables.get(f"{kind}/{name}", 0.0)
            resident = mod.nbytes()
            if kind == "embeddings" and tied:
                damage += sens_tables.get(f"head/{name}", 0.0)
                resident = resident_bytes(cands["head"][name], device, dtype) \
                    - cands["head"][name].nbytes() + mod.nbytes()
            elif kind == "head":
                resident = resident_bytes(mod, device, dtype)
            opts.append(Option(name, "table", stored=mod.nbytes(), resident=resident,
                               damage=damage, module=mod, fmt=fmt))
        units.append(Unit(kind, None, opts, w.numel()))
    return units


def _fixed_bytes(model, units: list[Unit], dtype: torch.dtype) -> dict:
    """Bytes of every tensor the plan does not choose for (norms, biases, ...)."""
    from memfit.eval.memory import _leaf_owner

    total = floats = 0
    for _, _, _, t in _leaf_owner(model):
        total += t.numel()
        floats += t.numel() if t.is_floating_point() else 0
    chosen = sum(u.weights for u in units)
    return {"stored": (floats - chosen) * 2 + (total - floats) * 8,
            "resident": (floats - chosen) * dtype.itemsize + (total - floats) * 8}


def _family_probe(plan: Plan, family: str, probe: ProbeReference) -> None:
    """Measure the plan that stores a share of the units in `family` (its least-damaging
    option), everything else untouched; set that family's factor to measured / predicted."""
    n = len(plan.drop_damage)
    choice = {u.key: 0 for u in plan.units}  # option 0 is always "fp16"
    dropped: list[int] = []
    if family == "drop":
        k = max(1, n // 15)
        dropped = sorted(sorted(range(n), key=plan.drop_damage.__getitem__)[:k])
        raw = sum(plan.drop_damage[b] for b in dropped)
    else:
        raw = 0.0
        for u in plan.units:
            if family != "table" and (u.block is None or (family != "int8" and u.block % 3)):
                continue
            js = [j for j, o in enumerate(u.options) if o.family == family]
            if js:
                choice[u.key] = min(js, key=lambda j: u.options[j].damage)
                raw += u.options[choice[u.key]].damage
    if raw <= 0:
        return
    sol = Solution(choice=choice, dropped=dropped, bytes=0, damage=raw)
    measured = plan.measure(sol, probe)
    plan.alpha[family] = measured / raw
    plan.points.append({"probe": family, "families": plan.family_damage(sol),
                        "measured_kld": measured, "raw_damage": raw})


def _refit(plan: Plan) -> None:
    """Refit the family factors on every measured plan: least squares on the relative error,
    pulled toward the probe factors (ridge), factors kept positive."""
    fams = sorted({f for p in plan.points for f in p["families"] if f != "keep"})
    if not fams:
        return
    rows, rhs = [], []
    for p in plan.points:
        m = max(p["measured_kld"], 1e-9)
        rows.append([p["families"].get(f, 0.0) / m for f in fams])
        rhs.append(1.0)
    prior = [plan.alpha.get(f, 1.0) for f in fams]
    for k, a in enumerate(prior):  # ridge toward the probe factor, weight 0.3
        rows.append([0.3 / a if j == k else 0.0 for j in range(len(fams))])
        rhs.append(0.3)
    sol = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64),
                             torch.tensor(rhs, dtype=torch.float64)[:, None]).solution[:, 0]
    for f, a, p in zip(fams, sol.tolist(), prior):
        plan.alpha[f] = max(a, 0.1 * p)


def _choose(plan: Plan, probe: ProbeReference) -> None:
    """Solve, measure, and re-solve with refitted factors while the prediction is off."""
    budget = plan.target.budget
    for attempt in range(3):
        sol, kv = plan._best(budget)
        measured = plan.measure(sol, probe)
        plan.points.append({"probe": f"plan-{attempt}", "families": plan.family_damage(sol),
                            "measured_kld": measured, "predicted_kld": sol.damage,
                            "bytes": sol.bytes, "solution": sol})
        plan.solution, plan.kv = sol, kv
        if abs(measured / max(sol.damage, 1e-12) - 1) <= TOLERANCE or attempt == 2:
            return
        _refit(plan)


def default_budget(units: list[Unit], fixed: dict, kind: str) -> int:
    """With no budget given: the model's own share (all but the runtime's memory) cut to
    DEFAULT_SHARE of what the unmodified model needs, for either kind of budget."""
    if kind == "weights":
        return int(DEFAULT_SHARE * (fixed["stored"] + sum(u.options[0].stored for u in units)))
    forward = fixed.get("forward", {}).get("none", fixed["activation"] + fixed["kv"]["none"])
    model = fixed["resident"] + sum(u.options[0].resident for u in units) + forward
    return int(fixed["overhead"] + DEFAULT_SHARE * model)


def fit(model="default", *, budget=None, kind: str = "memory", context: int | None = None, batch: int = 1,
        kv: str = "auto", options: FitOptions | None = None) -> Plan:
    """Plan `model` (a spec, or a memfit.models.Loaded) into `budget` (bytes or '300MB'; None:
    `default_budget`) at `context` tokens (None: the model's limit, at most 2048) x `batch`."""
    from memfit.calib.data import token_windows
    from memfit.eval.memory import keep_system_malloc
    from memfit.models import load_model

    keep_system_malloc()  # the planner's own process computes; the runtime is measured apart
    o = options or FitOptions()
    t0 = time.perf_counter()
    budget = parse_size(budget) if isinstance(budget, str) else budget
    target = Target(budget=int(budget or 1), kind=kind, device=o.device, context=context or 1,
                    batch=batch, kv=kv)
    loaded = model if hasattr(model, "model") else load_model(model, dtype=o.dtype,
                                                              device=o.device)
    m, arch = loaded.model, loaded.arch
    encoder = loaded.kind == "encoder"
    if context is None:
        context = used_length(loaded) if encoder else \
            min(2048, getattr(text_config(m.config), "max_position_embeddings", 2048))
        target = replace(target, context=context)
    check_positions(m.config, context, "--context")
    runtime = None
    if kind == "memory":
        # Measured, not estimated: with glibc's mmap threshold held (memfit.eval.memory.
        # steady_malloc) the unmodified model's forward growth predicts the packed model's
        # peak within 2% on the default model (benchmarks/RESULTS.md). Measured first: the
        # runtime's own bytes are part of the floor checked below.
        kvs = ["none"] if encoder else (["none", "int8", "int4"] if kv == "auto" else [kv])
        _say(o, f"runtime memory: measured in a fresh process ({', '.join(kvs)} KV cache)")
        runtime = in_fresh_process(loaded.source, "--overhead", "--forward", "--kv",
                                   ",".join(kvs), "--context", str(target.context),
                                   "--batch", str(target.batch), "--device", target.device)
    if budget is not None:  # seconds, not the calibration's minutes
        check_floor(m, arch, int(budget), o.max_drop,
                    runtime["baseline_bytes"] if runtime else 0)
    dtype = next(m.parameters()).dtype
    tok = loaded.tokenizer
    seq_len = min(o.seq_len, used_length(loaded)) if encoder else o.seq_len
    calib = calib_windows(loaded, o.data, seq_len, o.samples, o.seed)
    emb, head = m.get_input_embeddings(), m.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    cands = {"embeddings": {}, "head": {}}
    for name, fmt in TABLE_MENU[1:]:
        qe, qh = table_modules(m, fmt, tied)
        cands["embeddings"][name] = qe
        if head is not None:
            cands["head"][name] = qh if tied else head_module(m, fmt)
    _say(o, f"sensitivity: {len(calib)} windows x {seq_len} tokens, forward + backward")
    sens = sensitivity_pass(m, arch, calib, tables=cands, seed=o.seed, progress=o.progress,
                            encoder=encoder)
    t1 = time.perf_counter()
    blocks = block_list(m, arch)
    prefix = next(n for n, mod in m.named_modules() if mod is blocks)
    menu = linear_menu(o.methods)
    units = []
    from tqdm import tqdm

    from memfit.algos.hessian import shared_factors
    for i, block in enumerate(tqdm(blocks, desc="candidates", unit="block", disable=not o.progress)):
        for group in arch.block_groups(block):
            mods = {n: block.get_submodule(n) for n in group}
            keys = {n: f"{prefix}.{i}.{n}" for n in group}
            with shared_factors():  # one inverse-Hessian factor for every GPTQ format
                opts = group_options(mods, menu, sens.hessian[keys[group[0]]],
                                     {n: sens.fisher[keys[n]] for n in group}, device=o.device,
                                     dtype=dtype)
            units += [Unit(keys[n], i, opts[n], mods[n].weight.numel()) for n in group]
    linear_units = list(units)
    units += _table_units(m, sens.tables, cands, tied, o.device, dtype)
    t2 = time.perf_counter()
    fixed = _fixed_bytes(m, units, dtype)
    fixed["activation"] = estimate_activation(m.config, context, batch, dtype)
    fixed["kv"] = {"none": 0} if encoder else \
        {k: kv_bytes(m.config, context, batch, dtype, k) for k in ("none", "int8", "int4")}
    fixed["overhead"] = 0
    if runtime:
        fixed["overhead"], fixed["forward"] = runtime["baseline_bytes"], runtime["forward_bytes"]
    if budget is None:
        budget = default_budget(units, fixed, kind)
        target = replace(target, budget=budget)
    plan = Plan(loaded=loaded, target=target, options=o, units=units, drop_damage=sens.drop,
                fixed=fixed, alpha={"keep": 0.0}, kv_damage={"none": 0.0})
    n = len(sens.drop)
    least = smallest(units, max_drop=int(o.max_drop * n), blocks=n, size=plan.size)
    plan.kv_damage = {k: 0.0 for k in (["none"] if encoder else
                                       kv_options(kind, kv, fixed, budget, least))}
    if least + min(plan.runtime_bytes(k) for k in plan.kv_damage) > budget:
        raise UserError(plan.too_small_message(budget))  # before the probes' minutes
    probe = probe_reference(loaded, o, "calib")
    _say(o, f"probes: {probe_protocol(loaded, o, 'calib')} per measured plan")
    families = sorted({op.family for u in linear_units for op in u.options} - {"keep"})
    for fam in families + ["table", "drop"]:
        _family_probe(plan, fam, probe)
    measured_kv = [k for k in plan.kv_damage if k != "none"]
    if measured_kv:
        _say(o, f"KV cache: measuring {', '.join(measured_kv)} on {KV_WINDOWS} windows x "
                f"{min(context, 1024)} tokens")
        kv_ids = token_windows(tok, o.data, "calib", seq_len=min(context, 1024),
                               max_windows=KV_WINDOWS,
                               seed=o.seed + 2)
        kv_ref = ProbeReference(m, kv_ids)
        for name in measured_kv:
            plan.kv_damage[name] = kv_ref.kld(m, kv_format(name))["kld"]
    t3 = time.perf_counter()
    _choose(plan, probe)
    plan.timings = {"sensitivity_s": t1 - t0, "candidates_s": t2 - t1, "probes_s": t3 - t2,
                    "solve_s": time.perf_counter() - t3}
    return plan
