"""`memfit compress` as a function: load, compress block by block (resumable), smoke-check, save.

Nothing is written to `out` unless the whole run succeeded and the smoke check passed. Finished
blocks are kept in `<out>.partial/` so a killed run started again with the same model and recipe
resumes there and writes the same bytes; the partial folder is removed once `out` is complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

from memfit.api import compress_
from memfit.calib.data import token_windows
from memfit.errors import UserError
from memfit.eval.memory import rss_peak_bytes
from memfit.eval.smoke import Reference
from memfit.models import load_model
from memfit.recipe import Recipe, load_recipe


class SmokeCheckFailed(UserError):
    """The compressed model collapsed (NaN/Inf or KLD over the threshold); nothing was written."""


def _partial_dir(out: Path, model_source: str, recipe: Recipe) -> Path:
    """The resume folder; reset when it belongs to another model or recipe."""
    partial = out.with_name(out.name + ".partial")
    key = hashlib.sha1(json.dumps([model_source, recipe.to_dict()], sort_keys=True)
                       .encode()).hexdigest()
    stamp = partial / "run.json"
    if partial.exists() and (not stamp.exists() or json.loads(stamp.read_text()).get("key") != key):
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"key": key, "model": model_source, "recipe": recipe.to_dict()}))
    return partial


def compress_to(model: str, recipe: str | Recipe, out: str | Path, *, data: str | None = None,
                samples: int | None = None, seq_len: int | None = None, offload: str | None = None,
                bos: str | None = None,
                overwrite: bool = False, max_kld: float = 1.0, smoke_windows: int = 4,
                smoke_seq_len: int = 256, dtype=None, device: str = "cpu",
                progress: bool = True) -> dict:
    """Compress `model` with `recipe` into the folder `out`; return the report."""
    from memfit.io.save import _check_target, save

    out = Path(out)
    _check_target(out, overwrite)  # refuse early, before any work
    recipe = load_recipe(recipe)
    calib = recipe.calib
    calib = replace(calib, **{k: v for k, v in dict(data=data, samples=samples, seq_len=seq_len,
                                                     offload=offload, bos=bos).items()
                                    if v is not None})
    recipe = replace(recipe, calib=calib)
    loaded = load_model(model, dtype=dtype, device=device)
    if loaded.kind != "decoder":
        raise UserError(f"{model} is an encoder; memfit compress handles decoder LLMs for now "
                        "(encoder blocks are supported by the Python API compress_)")
    windows = None
    if recipe.needs_data:
        windows = token_windows(loaded.tokenizer, calib.data, "calib", seq_len=calib.seq_len,
                                max_windows=calib.samples, seed=calib.seed, bos=calib.bos)
    smoke_src = calib.data if calib.data in ("builtin", "wikitext2", "c4") else "builtin"
    smoke = token_windows(loaded.tokenizer, smoke_src, "eval", seq_len=smoke_seq_len,
                          max_windows=smoke_windows, bos=calib.bos)
    reference = Reference.capture(loaded.model, smoke)
    partial = _partial_dir(out, loaded.source, recipe)
    t0 = time.perf_counter()
    report = compress_(loaded.model, recipe, windows, checkpoint_dir=partial / "blocks",
                       progress=progress)
    report["compress_seconds"] = time.perf_counter() - t0
    check = reference.check(loaded.model)
    report["smoke"] = {**check, "data": f"{smoke_src}:eval", "max_kld": max_kld}
    if not (math.isfinite(check["kld"]) and check["kld"] <= max_kld):
        raise SmokeCheckFailed(
            f"smoke check failed: KLD {check['kld']:.4f} vs the original (limit {max_kld}), "
            f"perplexity {check['perplexity']:.3f} vs {check['ref_perplexity']:.3f}; nothing "
            "written. Use a gentler recipe (more bits, GPTQ) or raise --max-kld to accept it")
    # only run-independent facts go into the folder, so a resumed run writes identical bytes
    stable = ("bytes_before", "bytes_after", "modules", "kept_blocks", "calib_windows",
              "calib_seq_len", "smoke")
    save(loaded.model, loaded.tokenizer, out, recipe=recipe.to_dict(), overwrite=overwrite,
         extra={"source": loaded.source, "report": {k: report[k] for k in stable}})
    report["artifact_bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    report["peak_rss_bytes"] = rss_peak_bytes()  # the whole run: load, compress, smoke check, save
    report["out"] = str(out)
    shutil.rmtree(partial, ignore_errors=True)
    return report
