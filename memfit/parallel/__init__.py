"""Model parallelism on torch.distributed: tensor-parallel inference (`tp.py`, plans as data in
`plans.py`, the per-format slicing in `shard.py`) and ring attention (`ring.py`)."""

from memfit.parallel.plans import PLANS, TPPlan, plan_for
from memfit.parallel.ring import (
    full_attention,
    ring_attention,
    shard_sequence,
    tiled_attention,
    unshard_sequence,
)
from memfit.parallel.tp import parallelize_, rank_report, tp_session

__all__ = ["PLANS", "TPPlan", "full_attention", "parallelize_", "plan_for", "rank_report",
           "ring_attention", "shard_sequence", "tiled_attention", "tp_session", "unshard_sequence"]
