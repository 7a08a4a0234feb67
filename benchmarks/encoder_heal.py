"""One healing try on a compressed encoder, in process, for comparing healing settings (issue 14).

    python benchmarks/encoder_heal.py STUDENT STEPS LR SCHEDULE HIDDEN_MSE [BATCH]

STUDENT is a folder written by `memfit compress default-encoder ...`; SCHEDULE is `cosine` or
`constant` (memfit.distill.encoder). Trains on every sentence of builtin:calib, then prints one
JSON line: mean cosine before/after, minimum, nearest-neighbour agreement (all queries, clear
queries) on the 256 held-apart builtin:eval sentences (memfit.eval.encoder.held_apart), training
seconds and the mean loss of the last 20 steps. Run with OMP_NUM_THREADS=1 on a shared CPU.
"""

import json
import sys

import torch

from memfit.calib.data import sentences
from memfit.distill.encoder import distill_encoder_
from memfit.distill.losses import matched_layers
from memfit.eval.encoder import compare, embed, held_apart
from memfit.models import load_model


def main() -> None:
    torch.set_num_threads(1)
    student_dir, steps, lr, schedule, hmse = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), \
        sys.argv[4], float(sys.argv[5])
    batch = int(sys.argv[6]) if len(sys.argv) > 6 else 16
    t, s = load_model("default-encoder"), load_model(student_dir)
    held = held_apart("builtin", "eval", 256)
    ref = embed(t.model, t.tokenizer, held)
    before = compare(embed(s.model, s.tokenizer, held), ref)
    train = sentences("builtin", "calib", limit=None)
    n = t.model.config.num_hidden_layers
    rep = distill_encoder_(s.model, t.model, s.tokenizer, train, steps=steps, lr=lr,
                           batch_size=batch, max_length=256, hidden_mse=hmse,
                           layer_map=matched_layers(n, n) if hmse > 0 else None,
                           schedule=schedule)
    after = compare(embed(s.model, s.tokenizer, held), ref)
    print(json.dumps({"args": sys.argv[1:], "train_sentences": len(train),
                      "seconds": round(rep["seconds"], 1),
                      "before": round(before["cosine_mean"], 5),
                      "after": round(after["cosine_mean"], 5),
                      "min": round(after["cosine_min"], 5),
                      "nn": after["neighbour_agreement"],
                      "nn_clear": after["neighbour_agreement_clear"],
                      "loss_end": sum(rep["loss"][-20:]) / 20}), flush=True)


if __name__ == "__main__":
    main()
