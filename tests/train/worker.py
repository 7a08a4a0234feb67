"""Run by the tests under torchrun (or plainly): train_to with options from JSON, every rank's
report written to OUT.rank<r>.json. Not a test module itself.

usage: worker.py MODEL OUT_PREFIX OPTIONS_JSON [SAVE_DIR]
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    from memfit.train import TrainOptions, train_to

    model, prefix, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    out = sys.argv[4] if len(sys.argv) > 4 else None
    rep = train_to(model, out, TrainOptions(**opts))
    with open(f"{prefix}.rank{rep['rank']}.json", "w") as f:
        json.dump(rep, f)


if __name__ == "__main__":
    main()
