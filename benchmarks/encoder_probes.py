"""Why int8 moves nearest neighbours on the embedded encoder, and what int8 variants change
(issue 14). Prints one JSON line per probe; quality against the fp32 model on two sentence sets:
`held` (256 held-apart sentences, memfit.eval.encoder.held_apart) and `run1` (the first 256
sentence-like lines of builtin:eval, run 1's set).

1. Noise floor: the same fp32 weights embedded in batches of 1 instead of 32, and under
   bfloat16 autocast: how many neighbours move with no compression at all.
2. The int8 RTN flips: for each moved query, its reference margin (top-1 minus top-2 cosine).
3. int8 variants: RTN per channel (the `w8` preset), groups of 128 and 64, GPTQ (`w8-gptq`), and
   RTN with one kind of linear left in float (which linear the error comes from).

    OMP_NUM_THREADS=1 python benchmarks/encoder_probes.py
"""

import copy
import json

import torch

import memfit
from memfit.calib.data import sentences
from memfit.eval.encoder import _similarities, compare, embed, held_apart
from memfit.models import load_model
from memfit.recipe import Recipe

W8 = {"algo": "rtn", "bits": 8, "group_size": None, "symmetric": True}
KINDS = ("*.query", "*.key", "*.value", "*.attention.output.dense", "*.intermediate.dense",
         "*.[0-9].output.dense")


def _row(probe: str, embs: dict, refs: dict) -> dict:
    row = {"probe": probe}
    for name in refs:
        q = compare(embs[name], refs[name])
        row[name] = {k: round(q[k], 6) for k in ("cosine_mean", "cosine_min",
                                                  "neighbour_agreement",
                                                  "neighbour_agreement_clear")}
        row[name]["clear_queries"] = q["clear_queries"]
    print(json.dumps(row), flush=True)
    return row


def _flips(emb: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """Reference margins (top-1 - top-2 cosine) of the queries whose neighbour moved."""
    r, e = _similarities(ref), _similarities(emb)
    top2 = r.topk(2, dim=1).values
    moved = (r.argmax(1) != e.argmax(1)).nonzero().flatten()
    return sorted(round((top2[i, 0] - top2[i, 1]).item(), 5) for i in moved)


def main() -> None:
    torch.set_num_threads(1)
    m = load_model("default-encoder")
    sets = {"held": held_apart("builtin", "eval", 256),
            "run1": sentences("builtin", "eval", limit=256)}
    run = lambda model, **kw: {k: embed(model, m.tokenizer, v, **kw) for k, v in sets.items()}
    refs = run(m.model)
    _row("fp32, batches of 1 (noise floor)", run(m.model, batch_size=1), refs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embs = run(m.model)
    _row("fp32 weights, bfloat16 autocast (noise floor)", embs, refs)  # compared in float32
    variants = {"int8 RTN per channel (w8)": "w8",
                "int8 RTN g128": Recipe.from_dict({"quant": {**W8, "group_size": 128}}),
                "int8 RTN g64": Recipe.from_dict({"quant": {**W8, "group_size": 64}}),
                "int8 GPTQ per channel (w8-gptq)": "w8-gptq"}
    variants.update({f"int8 RTN, {k} left float": Recipe.from_dict(
        {"quant": W8, "overrides": {k: None}}) for k in KINDS})
    for name, recipe in variants.items():
        model = copy.deepcopy(m.model)
        memfit.compress_(model, recipe, tokenizer=m.tokenizer, progress=False)
        embs = run(model)
        _row(name, embs, refs)
        if recipe == "w8":
            print(json.dumps({"probe": "w8 moved queries: reference margins",
                              **{k: _flips(embs[k], refs[k]) for k in sets}}), flush=True)


if __name__ == "__main__":
    main()
