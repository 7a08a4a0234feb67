"""Build a plan, prove it, then write it.

The dense model is loaded again from its source (the planner's copy stays intact for a re-plan),
the plan's own packed modules are put in, the tables quantized, the dropped blocks removed, and
the result saved to a temporary folder next to `out`. A fresh process then loads that folder and
measures its peak memory at the target context and batch (memfit.plan.measure); memfit's loader
reads it again here and its KL divergence to the original is measured on the evaluation split.
Only when the memory is within the budget (and the KL within --max-kld, if given) is the folder
renamed to `out`. When the measured memory overshoots the budget, or departs from the
prediction by more than RECALIBRATE_ABOVE, the memory model takes the measured difference as a
correction and the plan is solved again and rebuilt (at most MAX_BUILDS builds); if the last
build fails, nothing is written and the error says what failed and what would pass.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from memfit.archs import block_list
from memfit.errors import UserError


MAX_BUILDS = 3  # builds per `build`: the first, and re-solves after a measured miss
RECALIBRATE_ABOVE = 0.04  # |predicted / measured - 1| above which the plan is solved again


class FitFailed(UserError):
    """The built model did not pass its measured check; nothing was written."""


def say(o, text: str) -> None:
    """One progress line on stderr (stdout stays for --json)."""
    if o.progress:
        print(f"memfit: {text}", file=sys.stderr, flush=True)


def _assemble(plan, sol):
    """The dense model loaded again, with the plan's modules in place."""
    from memfit.methods import quantize_embeddings_
    from memfit.models import load_model
    from memfit.structured import drop_blocks_

    o = plan.options
    fresh = load_model(plan.loaded.source, dtype=o.dtype, device=o.device)
    model, arch = fresh.model, fresh.arch
    blocks = block_list(model, arch)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    fmts = {}
    for u in plan.units:
        opt = u.options[sol.choice[u.key]]
        if u.block is None:
            fmts[u.key] = opt.fmt
        elif opt.module is not None:
            parent, _, name = u.key[len(prefix) + 1:].partition(".")
            blocks[int(parent)].set_submodule(name, opt.module)
    emb = fmts.get("embeddings")
    head = fmts.get("head", emb if "head" not in fmts else None)
    if emb is not None or head is not None:
        quantize_embeddings_(model, emb, head)
    if sol.dropped:
        drop_blocks_(model, sol.dropped, arch=arch)
    return fresh


def _measure_memory(folder: Path, plan) -> dict:
    from memfit.plan.measure import in_fresh_process

    t = plan.target
    return in_fresh_process(str(folder), "--context", str(t.context), "--batch", str(t.batch),
                            "--kv", plan.kv, "--device", t.device)


def _stored_weight_bytes(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 -- safe_open is not a dict
                s = st.get_slice(k)
                n = 1
                for d in s.get_shape():
                    n *= d
                total += n * _itemsize(s.get_dtype())
    return total


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
            "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}.get(dtype, 1)


def _try(plan, sol, tmp: Path, eval_ref) -> dict:
    from memfit.io.save import load, save

    o, t = plan.options, plan.target
    fresh = _assemble(plan, sol)
    shutil.rmtree(tmp, ignore_errors=True)
    recipe = {"fit": {"choices": plan.choices(), "dropped_blocks": sol.dropped, "kv": plan.kv}}
    side = None
    if plan.loaded.kind == "encoder":  # the sentence-transformers files, as compress carries them
        from memfit.encoders import side_files
        side = side_files(plan.loaded.source)
    save(fresh.model, fresh.tokenizer, tmp, recipe=recipe, side_files=side,
         extra={"source": plan.loaded.source, "fit": {"target": vars(t).copy(),
                                                     "predicted_kld": plan.expected_kld(sol)}})
    del fresh
    res = {"predicted_bytes": plan.predicted_total(sol), "predicted_kld": plan.expected_kld(sol),
           "proxy_predicted_kld": plan.predicted_kld(sol),
           "stored_weight_bytes": _stored_weight_bytes(tmp)}
    if t.kind == "memory":
        mem = _measure_memory(tmp, plan)
        res.update(measured_peak_bytes=mem["peak_bytes"], memory=mem)
        res["memory_error"] = res["predicted_bytes"] / mem["peak_bytes"] - 1
        res["measured_bytes"] = mem["peak_bytes"]
    else:
        res["measured_bytes"] = res["stored_weight_bytes"]
        res["memory_error"] = res["predicted_bytes"] / res["stored_weight_bytes"] - 1
    reloaded = load(tmp, dtype=o.dtype, device=o.device)
    from memfit.plan.target import kv_format
    q = eval_ref.kld(reloaded.model, kv_format(plan.kv))
    res.update(measured_kld=q["kld"], perplexity=q["perplexity"], eval_tokens=q["tokens"])
    res["kld_error"] = res["predicted_kld"] / max(q["kld"], 1e-12) - 1
    return res


def build_plan(plan, out, *, overwrite: bool = False) -> dict:
    from memfit.io.folders import _swap_in, check_output
    from memfit.plan.probe import probe_protocol, probe_reference

    out = Path(out)
    check_output(out, overwrite, (plan.loaded.source,))
    o, t = plan.options, plan.target
    t0 = time.perf_counter()
    eval_ref = probe_reference(plan.loaded, o, "eval")
    ref_ppl = eval_ref.kld(plan.loaded.model)["perplexity"]
    tmp = out.with_name(f"{out.name}.fit-tmp")
    sol, tries = plan.solution, []
    for attempt in range(MAX_BUILDS):
        say(o, f"building and measuring the plan in a fresh process ({tmp})")
        res = _try(plan, sol, tmp, eval_ref)
        tries.append(res)
        off = res["measured_bytes"] - res["predicted_bytes"]
        holds = abs(res["memory_error"]) <= RECALIBRATE_ABOVE
        if attempt == MAX_BUILDS - 1 or (res["measured_bytes"] <= t.budget and holds):
            break
        # the memory model's offset is re-taken from this measurement and the plan solved again
        before = plan.fixed.get("calibration", 0)
        plan.fixed["calibration"] = before + off
        again = plan.solve_for(t.budget, plan.kv)
        if again is None or (again.choice == sol.choice and again.dropped == sol.dropped
                             and res["measured_bytes"] <= t.budget):
            plan.fixed["calibration"] = before  # nothing rebuilt: the prediction stays as made
            break
        say(o, f"measured {res['measured_bytes'] / 1e6:.1f} MB, predicted "
               f"{res['predicted_bytes'] / 1e6:.1f} MB (budget {t.budget / 1e6:.1f} MB): "
               f"memory model corrected by {off / 1e6:+.1f} MB, plan solved again")
        sol = again
    res = dict(tries[-1], ref_perplexity=ref_ppl, attempts=len(tries),
               builds=[{k: r[k] for k in ("predicted_bytes", "measured_bytes", "memory_error",
                                          "measured_kld")} for r in tries],
               eval=probe_protocol(plan.loaded, o, "eval"),
               build_s=time.perf_counter() - t0)
    failed = []
    if res["measured_bytes"] > t.budget:
        failed.append(f"measured {res['measured_bytes'] / 1e6:.1f} MB > budget "
                      f"{t.budget / 1e6:.1f} MB")
    if o.max_kld is not None and res["measured_kld"] > o.max_kld:
        failed.append(f"KLD {res['measured_kld']:.4f} > --max-kld {o.max_kld}")
    if failed:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FitFailed("the built plan failed its check: " + "; ".join(failed)
                        + "; nothing written. " + _closest(plan, res))
    plan.solution = sol
    _swap_in(tmp, out)
    res["out"] = str(out)
    return res


def _closest(plan, res: dict) -> str:
    """What would pass: the budget that holds this plan as measured, or the smallest budget
    whose predicted KL meets --max-kld."""
    t, o = plan.target, plan.options
    if res["measured_bytes"] > t.budget:
        need = t.budget + (res["measured_bytes"] - t.budget) * 1.05
        return f"A budget of {need / 1e6:.1f} MB would hold this plan as measured."
    lo, hi = t.budget, 4 * t.budget
    for _ in range(20):
        mid = (lo + hi) // 2
        s = plan.solve_for(mid, plan.kv)
        if s is not None and plan.predicted_kld(s) * (res["measured_kld"] /
                                                      max(res["predicted_kld"], 1e-12)) <= o.max_kld:
            hi = mid
        else:
            lo = mid
    return (f"The closest plan predicted to meet --max-kld {o.max_kld} needs a budget of about "
            f"{hi / 1e6:.1f} MB.")
