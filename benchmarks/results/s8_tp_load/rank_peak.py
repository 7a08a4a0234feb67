"""Per-rank load peak of `generate --tp 2`'s loader on the default model: each rank's VmHWM
growth over its imports after TPSession.load, block by block (the loader since session 8) or
whole-then-split (MEMFIT_TP_WHOLE=1: what every rank did before). Run under
`torchrun --standalone --nproc-per-node 2 rank_peak.py`."""
import json
import os
import sys

import memfit.parallel.tp_load as tl
from memfit.models import load_model
from memfit.parallel.tp import tp_session
import transformers.models.llama.modeling_llama  # noqa: F401  imports first


def hwm() -> int:
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) << 10


if os.environ.get("MEMFIT_TP_WHOLE"):
    tl.streamable = lambda spec: False
base = hwm()
with tp_session(2) as tp:
    m = tp.load("default", None, lambda: load_model("default"))
    kept = sum(t.numel() * t.element_size() for t in m.model.state_dict().values())
    print(json.dumps({"rank": tp.rank, "how": "whole" if os.environ.get("MEMFIT_TP_WHOLE")
                      else "streamed", "load_peak_growth_MiB": round((hwm() - base) / 2**20, 1),
                      "state_MiB": round(kept / 2**20, 1)}), file=sys.stderr)
