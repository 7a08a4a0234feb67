"""llama.cpp's own logits of memfit's GGUF export, family by family, against memfit's.

Two steps, because llama-cpp-python lives in its own virtual environment (no torch, no memfit;
how it was built: benchmarks/RESULTS.md, "GGUF without a second rounding"):

    python benchmarks/gguf_families.py make DIR                                   # memfit's venv
    OMP_NUM_THREADS=1 /tmp/llamavenv/bin/python benchmarks/gguf_families.py check DIR

`make` builds the tiny random model of each family the GGUF export takes (the configs of
tests/export/test_export_gguf_families.py, with a 512-token byte-level BPE tokenizer trained on
pydoc's topics so the file loads on its own), writes it as F32 (`FAMILY-F32.gguf`) and, for
the mixtures of experts and Qwen2, with every matrix on GGUF's Q4_0 and Q8_0 grids (RTN, int4 /
int8 symmetric groups of 32: the codes go into the file as they are, `--exact`), plus 24 token
ids and memfit's logits of each model. `check` runs every file in llama.cpp (n_ctx 64, every
position's logits) and prints one JSON line per file: the largest |logit difference| from
memfit's and the largest |logit| for scale; for the packed files also memfit's own float model
against its compressed one, the size of a difference that wrong codes would make.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make(out: Path) -> None:
    import numpy as np
    import torch

    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "export")]
    from pydoc_data.topics import topics

    from conftest import tiny_config
    from test_export_gguf_families import FAMILIES, VOCAB, _tiny
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from memfit.api import compress_
    from memfit.configs import RTN
    from memfit.formats.grid import IntFormat
    from memfit.io.export_gguf import export_gguf
    from memfit.recipe import Recipe
    out.mkdir(parents=True, exist_ok=True)
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(list(topics.values())[:40], vocab_size=VOCAB, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    bpe = PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>")
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    np.save(out / "ids.npy", ids.numpy())

    def save(model, name: str, qtype: str, **kw) -> None:
        with torch.no_grad():
            np.save(out / f"{name}.npy", model(ids).logits[0].numpy())
        export_gguf(model, out / f"{name}.gguf", qtype, tokenizer=bpe, overwrite=True, **kw)

    for family in ("llama", *FAMILIES):
        save(_tiny(tiny_config, family), f"{family}-F32", "F32")
        if family not in ("mixtral", "qwen2_moe", "qwen3_moe", "qwen2"):
            continue
        for qtype, bits in (("Q4_0", 4), ("Q8_0", 8)):
            fmt = IntFormat(bits=bits, group_size=32, symmetric=True)
            # whole Q8_0 blocks for the shared expert's down projection too
            model = _tiny(tiny_config, family, **({"shared_expert_intermediate_size": 64}
                                                   if family == "qwen2_moe" else {}))
            with torch.no_grad():
                np.save(out / f"{family}-{qtype}.float.npy", model(ids).logits[0].numpy())
            compress_(model, Recipe(quant=RTN(format=fmt), embeddings=fmt, head=fmt), None,
                      progress=False)
            save(model, f"{family}-{qtype}", qtype, exact=True)


def check(folder: Path) -> None:
    import numpy as np
    from llama_cpp import Llama

    ids = np.load(folder / "ids.npy")[0].tolist()
    for f in sorted(glob.glob(str(folder / "*.gguf"))):
        name = Path(f).stem
        ref = np.load(folder / f"{name}.npy")
        llm = Llama(model_path=f, n_ctx=64, logits_all=True, n_threads=1, verbose=False)
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
        row = {"file": Path(f).name, "max_abs_diff": float(np.abs(got - ref).max()),
               "max_abs_logit": float(np.abs(ref).max())}
        flt = folder / f"{name}.float.npy"
        if flt.exists():
            row["memfit_float_vs_compressed"] = float(np.abs(np.load(flt) - ref).max())
        print(json.dumps(row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("make").add_argument("dir", type=Path)
    sub.add_parser("check").add_argument("dir", type=Path)
    a = p.parse_args()
    make(a.dir) if a.cmd == "make" else check(a.dir)


if __name__ == "__main__":
    main()
