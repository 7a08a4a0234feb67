"""The planner: fit a model into a memory budget, measured (memfit.plan.fit builds the plan,
memfit.plan.plan is the plan object)."""

from memfit.plan.build import FitFailed
from memfit.plan.fit import fit
from memfit.plan.plan import FitOptions, Plan
from memfit.plan.target import Target, parse_size

__all__ = ["FitFailed", "FitOptions", "Plan", "Target", "fit", "parse_size"]
