"""The plan's report: JSON, and an HTML page with two PNG plots.

- Pareto: bytes against KL divergence. The planner's curve (the plan solved at several budgets,
  each plan's KL measured on the probe windows, weights swapped in) beside uniform baselines
  measured the same way (every linear int8; int4 at groups 128/64/32 and int3 g64 with the
  same algorithm as the plan's candidates; each with 16-bit, int8 and int4 tables), and the
  chosen plan.
- Layers: a block x matrix heatmap of the bits per weight chosen (dropped blocks marked).
Every point is measured in the same run on the same windows (protocol in the JSON).
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from memfit.plan.solve import Solution


def _uniform(plan, name: str, table: str) -> Solution | None:
    choice = {}
    for u in plan.units:
        want = table if u.block is None else name
        idx = [j for j, o in enumerate(u.options) if o.name == want]
        if not idx:
            return None
        choice[u.key] = idx[0]
    total = sum(plan.size(u.options[choice[u.key]]) for u in plan.units)
    return Solution(choice=choice, dropped=[], bytes=total, damage=0.0)


def pareto(plan, probe) -> dict:
    """Measured (bytes, KL) of uniform baselines and of plans at budgets spanning them."""
    base = []
    for name in ("int8", "int4-g128", "int4-g64", "int4-g32", "int3-g64"):
        for table in ("fp16", "int8", "int4-g64"):
            sol = _uniform(plan, name, table)
            if sol is not None:
                base.append({"name": f"{name} + tables {table}",
                             "bytes": sol.bytes + plan.runtime_bytes(plan.kv),
                             "kld": plan.measure(sol, probe)})
    curve = []
    if base:
        lo, hi = min(b["bytes"] for b in base), max(b["bytes"] for b in base)
        for k in range(6):
            budget = int(lo * 0.85 + (hi - lo * 0.85) * k / 5)
            sol = plan.solve_for(budget, plan.kv)
            if sol is not None:
                curve.append({"budget": budget, "bytes": sol.bytes + plan.runtime_bytes(plan.kv),
                              "predicted_kld": plan.predicted_kld(sol, plan.kv),
                              "kld": plan.measure(sol, probe)})
    return {"baselines": base, "plans": curve}


def _plot_pareto(data: dict, chosen: dict, path: Path, metric: str = "KL divergence") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if data["plans"]:
        pts = sorted(data["plans"], key=lambda p: p["bytes"])
        ax.plot([p["bytes"] / 1e6 for p in pts], [p["kld"] for p in pts], "o-",
                label="memfit fit (measured)")
    for b in data["baselines"]:
        ax.plot(b["bytes"] / 1e6, b["kld"], "s", color="gray")
        ax.annotate(b["name"], (b["bytes"] / 1e6, b["kld"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    ax.plot(chosen["bytes"] / 1e6, chosen["kld"], "*", color="red", markersize=14,
            label="chosen plan")
    ax.set_xlabel("bytes (MB, the budget's kind)")
    ax.set_ylabel(f"{metric} to the original (probes, calibration text)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_layers(plan, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sol = plan.solution
    names = sorted({u.key.rsplit(".", 2)[-2] + "." + u.key.rsplit(".", 1)[-1]
                    for u in plan.units if u.block is not None})
    blocks = sorted({u.block for u in plan.units if u.block is not None})
    grid = [[float("nan")] * len(names) for _ in blocks]
    for u in plan.units:
        if u.block is None:
            continue
        o = u.options[sol.choice[u.key]]
        col = names.index(u.key.rsplit(".", 2)[-2] + "." + u.key.rsplit(".", 1)[-1])
        grid[u.block][col] = 0.0 if u.block in sol.dropped else 8 * o.stored / u.weights
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(names), 1.2 + 0.22 * len(blocks)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(blocks)), [f"{b}{' (dropped)' if b in sol.dropped else ''}"
                                       for b in blocks], fontsize=6)
    fig.colorbar(im, ax=ax, label="stored bits per weight (0 = dropped)")
    ax.set_title("chosen storage per matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(plan, folder, *, curve: bool = True) -> dict:
    """Write fit_report.json, fit_report.html and the PNGs into `folder`; -> their paths."""
    from memfit.plan.probe import probe_reference

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary = plan.summary()
    summary["metric"] = _metric(plan)
    chosen = plan.points[-1] if plan.points else {}
    paths = {"json": folder / "fit_report.json", "html": folder / "fit_report.html",
             "layers": folder / "fit_layers.png"}
    if curve:
        data = pareto(plan, probe_reference(plan.loaded, plan.options, "calib"))
        summary["pareto"] = data
        paths["pareto"] = folder / "fit_pareto.png"
        _plot_pareto(data, {"bytes": plan.predicted_total(),
                            "kld": chosen.get("measured_kld", plan.predicted_kld())},
                     paths["pareto"], _metric(plan))
    _plot_layers(plan, paths["layers"])
    _atomic_write(paths["json"], json.dumps(summary, indent=1, default=str))
    _atomic_write(paths["html"], _html(summary, paths))
    return {k: str(v) for k, v in paths.items()}


def _metric(plan) -> str:
    return "1 - cosine" if plan.loaded.kind == "encoder" else "KL divergence"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def _html(s: dict, paths: dict) -> str:
    from collections import Counter

    counts = Counter(s["choices"].values())
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>"
                   for k, v in counts.most_common())
    built = s.get("built") or {}
    facts = {"model": s["model"], "budget (bytes)": s["target"]["budget"],
             "budget kind": s["target"]["kind"], "context x batch":
             f"{s['target']['context']} x {s['target']['batch']}", "KV cache": s["kv"],
             "predicted bytes": s["predicted_bytes"], "measured bytes": built.get("measured_bytes"),
             f"predicted {s['metric']}": f"{s['predicted_kld']:.5f}",
             f"measured {s['metric']} (eval split)": built.get("measured_kld"),
             "perplexity / original": f"{built.get('perplexity')} / {built.get('ref_perplexity')}",
             "dropped blocks": s["dropped_blocks"]}
    frows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                    for k, v in facts.items())
    imgs = "".join(f'<p><img src="{Path(paths[k]).name}" alt="{k}"></p>'
                   for k in ("pareto", "layers") if k in paths)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>memfit fit report</title>"
            f"</head><body><h1>memfit fit</h1><table>{frows}</table><h2>choices</h2>"
            f"<table><tr><th>storage</th><th>matrices</th></tr>{rows}</table>{imgs}"
            f"<p>Details: fit_report.json</p></body></html>\n")
