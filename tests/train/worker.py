"""Run by the tests under torchrun (or plainly; not a test module): joins the process group once,
runs train_to for each named option set, and writes each rank's reports to PREFIX.rank<r>.json
as {name: report}.

usage: worker.py MODEL[,MODEL...] PREFIX RUNS_JSON   (rank r trains the r-th model of the list,
cyclically: a way to give ranks different copies) with RUNS_JSON = [{"name": ..., "options": {...},
                                                           "out": folder or null}, ...]
"""

import gc
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    import torch.distributed as dist

    from memfit.train import TrainOptions, train_to
    from memfit.train.engine import init_distributed

    model, prefix, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    rank, _, _, _ = init_distributed(runs[0]["options"].get("device", "cpu"))
    models = model.split(",")
    model = models[rank % len(models)]
    reports = {r["name"]: train_to(model, r.get("out"), TrainOptions(**r["options"]))
               for r in runs}
    with open(f"{prefix}.rank{rank}.json", "w") as f:
        json.dump(reports, f)
    gc.collect()  # a DDP model (a cycle through its comm hook) goes before the group
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
