"""The plan object of `memfit.fit` (memfit.plan.fit builds and calibrates it): its candidate
units and measured factors, the bytes and predicted KL of any solution, the solve for a budget,
and its results (choices, summary, build, report).

    plan.predicted_total(), plan.expected_kld()   # of the chosen solution
    plan.solve_for(budget, kv)                     # another budget, same factors
    plan.build("out"); plan.report("out")
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from memfit.archs import block_list
from memfit.errors import UserError
from memfit.eval.memory import human_bytes
from memfit.plan.build import build_plan
from memfit.plan.menu import Option, Unit
from memfit.plan.probe import ProbeReference, swapped
from memfit.plan.solve import Solution, smallest, solve
from memfit.plan.target import Target


@dataclass(frozen=True, kw_only=True)
class FitOptions:
    data: str = "builtin"          # calibration/probe text (calib split) and evaluation text
    samples: int = 16              # calibration windows for the sensitivity pass
    seq_len: int = 512
    probe_windows: int = 4         # held calibration windows the probe plans are measured on
    probe_seq_len: int = 512       # (as long as the evaluation windows: KL depends on length)
    eval_windows: int = 16         # evaluation-split windows of the final check
    eval_seq_len: int = 512
    methods: str = "gptq"          # linear candidates: "gptq" (default) or "rtn" (fast)
    max_kld: float | None = None   # refuse to write above this KL on the evaluation windows
    max_drop: float = 0.1          # at most this share of the blocks may be dropped
    dtype: str | None = None
    device: str = "cpu"
    seed: int = 0
    progress: bool = True


@dataclass(repr=False)  # the generated repr prints every unit's menu: pages in a notebook
class Plan:
    loaded: object
    target: Target
    options: FitOptions
    units: list[Unit]
    drop_damage: list[float]
    fixed: dict                    # bytes outside the units: stored, resident, overhead, ...
    alpha: dict[str, float]
    kv_damage: dict[str, float]
    solution: Solution | None = None
    kv: str = "none"
    points: list[dict] = field(default_factory=list)   # every measured plan
    timings: dict = field(default_factory=dict)
    built: dict | None = None

    # ----- bytes ---------------------------------------------------------------------------
    def size(self, o: Option) -> int:
        return o.resident if self.target.kind == "memory" else o.stored

    def runtime_bytes(self, kv: str) -> int:
        """Bytes outside the units at the target: fixed tensors, and for a memory budget the
        runtime, the KV cache and the activation peak."""
        if self.target.kind == "weights":
            return self.fixed["stored"] + self.fixed.get("calibration", 0)
        return (self.fixed["resident"] + self.fixed["overhead"] + self.forward_bytes(kv)
                + self.fixed.get("calibration", 0))  # a built plan's measured miss, if any

    def forward_bytes(self, kv: str) -> int:
        """The activation, workspace and KV-cache peak at the target: measured in the runtime's
        fresh process where it could be, else the estimates."""
        measured = self.fixed.get("forward", {})
        return measured[kv] if kv in measured else self.fixed["activation"] + self.fixed["kv"][kv]

    def predicted_total(self, sol: Solution | None = None, kv: str | None = None) -> int:
        sol = sol or self.solution
        return sol.bytes + self.runtime_bytes(kv or self.kv)

    def predicted_kld(self, sol: Solution | None = None, kv: str | None = None) -> float:
        """The proxy model's KL: calibrated per-unit damage, plus the KV cache's measured one."""
        sol = sol or self.solution
        return sol.damage + self.kv_damage.get(kv or self.kv, 0.0)

    def expected_kld(self, sol: Solution | None = None) -> float:
        """The KL this plan is expected to have on unseen text: for the plan the re-check
        measured on the calibration probe windows, that measurement (+ the KV cache's measured
        damage); for any other plan, the proxy model's prediction."""
        sol = sol or self.solution
        for p in reversed(self.points):
            if p.get("solution") is sol:
                return p["measured_kld"] + self.kv_damage.get(self.kv, 0.0)
        return self.predicted_kld(sol)

    # ----- solving --------------------------------------------------------------------------
    def solve_for(self, budget: int, kv: str) -> Solution | None:
        n = len(self.drop_damage)
        return solve(self.units, budget - self.runtime_bytes(kv), alpha=self.alpha,
                     drop_damage=self.drop_damage, max_drop=int(self.options.max_drop * n),
                     size=self.size)

    def _best(self, budget: int) -> tuple[Solution, str]:
        kvs = list(self.kv_damage)
        found = [(s, kv) for kv in kvs if (s := self.solve_for(budget, kv)) is not None]
        if not found:
            raise UserError(self.too_small_message(budget))
        return min(found, key=lambda p: self.predicted_kld(*p))

    def too_small_message(self, budget: int) -> str:
        kv = min(self.kv_damage, key=self.runtime_bytes)  # the smallest cache it may take
        n = len(self.drop_damage)
        least = smallest(self.units, max_drop=int(self.options.max_drop * n), blocks=n,
                         size=self.size) + self.runtime_bytes(kv)
        parts = {"the weights at their smallest": least - self.runtime_bytes(kv)}
        if self.target.kind == "memory":
            parts.update({"the runtime (Python, torch, transformers)": self.fixed["overhead"],
                          f"the KV cache and activation peak at {self.target.context} x "
                          f"{self.target.batch} ({kv})": self.forward_bytes(kv),
                          "norms, biases and other fixed tensors": self.fixed["resident"]})
        else:
            parts["norms, biases and other fixed tensors"] = self.fixed["stored"]
        big = max(parts, key=parts.get)
        return (f"the budget {budget / 1e6:.1f} MB is below the smallest possible plan, "
                f"{least / 1e6:.1f} MB, dominated by {big} ({parts[big] / 1e6:.1f} MB); raise "
                "the budget" + (", or shorten --context / --batch" if self.target.kind == "memory"
                                else ""))

    def measure(self, sol: Solution, probe: ProbeReference) -> float:
        model = self.loaded.model
        blocks = block_list(model, self.loaded.arch)
        assignment, tables = {}, {}
        for u in self.units:
            o = u.options[sol.choice[u.key]]
            if o.module is None or (u.block is not None and u.block in sol.dropped):
                continue
            if u.block is None:
                tables[u.key] = o.module
            else:
                assignment[u.key] = o.module
        with swapped(model, blocks, assignment, sol.dropped, tables,
                     conv1d=self.loaded.arch.conv1d):
            return probe.kld(model)["kld"]

    def family_damage(self, sol: Solution) -> dict[str, float]:
        out: dict[str, float] = {}
        for u in self.units:
            if u.block is not None and u.block in sol.dropped:
                continue
            o = u.options[sol.choice[u.key]]
            out[o.family] = out.get(o.family, 0.0) + o.damage
        if sol.dropped:
            out["drop"] = sum(self.drop_damage[b] for b in sol.dropped)
        return out

    # ----- results --------------------------------------------------------------------------
    def choices(self) -> dict[str, str]:
        sol = self.solution
        return {u.key: ("dropped" if u.block is not None and u.block in sol.dropped
                        else u.options[sol.choice[u.key]].name) for u in self.units}

    def choices_line(self) -> str:
        """'int4-g64 x12, fp16 x4; dropped blocks [3]': how many units took each option."""
        counts = Counter(self.choices().values())
        return (", ".join(f"{k} x{v}" for k, v in counts.most_common())
                + (f"; dropped blocks {self.solution.dropped}" if self.solution.dropped else ""))

    def __repr__(self) -> str:
        t = self.target
        head = f"Plan({self.loaded.source!r}, {t.kind} budget {human_bytes(t.budget)}"
        if self.solution is None:
            return head + ", not solved)"
        return (f"{head}: predicted {human_bytes(self.predicted_total())}, KLD "
                f"~{self.expected_kld():.3g}, KV {self.kv}; {self.choices_line()})")

    def summary(self) -> dict:
        sol = self.solution
        return {"model": self.loaded.source, "target": vars(self.target).copy(),
                "kv": self.kv, "dropped_blocks": sol.dropped,
                "predicted_bytes": self.predicted_total(), "predicted_unit_bytes": sol.bytes,
                "predicted_kld": self.expected_kld(), "proxy_predicted_kld": self.predicted_kld(),
                "alpha": self.alpha, "kv_damage": self.kv_damage, "fixed": self.fixed,
                "points": [{k: v for k, v in p.items() if k != "solution"} for p in self.points],
                "choices": self.choices(), "timings": self.timings, "built": self.built}

    def build(self, out, *, overwrite: bool = False) -> dict:
        self.built = build_plan(self, out, overwrite=overwrite)
        return self.built

    def report(self, folder, *, curve: bool = True) -> dict:
        from memfit.plan.report import write_report
        return write_report(self, folder, curve=curve)
