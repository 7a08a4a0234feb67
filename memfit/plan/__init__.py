"""The planner: fit a model into a memory budget, measured (memfit.plan.fit)."""

from memfit.plan.build import FitFailed
from memfit.plan.fit import FitOptions, Plan, fit
from memfit.plan.target import Target, parse_size

__all__ = ["FitFailed", "FitOptions", "Plan", "Target", "fit", "parse_size"]
