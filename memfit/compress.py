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
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from memfit.api import compress_
from memfit.calib.data import calibration_windows, token_windows
from memfit.encoders import side_files
from memfit.errors import UserError
from memfit.eval.memory import rss_peak_bytes
from memfit.eval.smoke import Reference
from memfit.models import load_model
from memfit.recipe import Recipe, load_recipe


class SmokeCheckFailed(UserError):
    """The compressed model collapsed (NaN/Inf, KLD over the threshold, or for an encoder a mean
    embedding cosine under it); nothing was written."""


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


@dataclass(frozen=True, kw_only=True)
class CompressOptions:
    """How `compress_to` runs. Calibration fields left None take the recipe's `calib` values."""

    data: str | None = None          # calibration text: builtin, wikitext2, c4 or a file
    samples: int | None = None       # calibration windows
    seq_len: int | None = None       # calibration window length
    offload: str | None = None       # calibration activations in "memory" or on "disk"
    bos: str | None = None           # windows start with BOS: auto, always, never
    overwrite: bool = False          # replace an existing output folder (a model folder only)
    max_kld: float = 1.0             # smoke check: refuse to write above this KL divergence
    min_cosine: float = 0.8          # encoders: refuse below this mean embedding cosine
    smoke_sentences: int = 64        # encoders: held-apart sentences of the smoke check
    smoke_windows: int = 4
    smoke_seq_len: int = 256
    keep_partial: bool = False       # keep DIR.partial after a failed smoke check
    dtype: str | None = None
    device: str = "cpu"
    progress: bool = True
    format: str = "memfit"           # the folder's format: memfit, compressed-tensors or auto
    low_memory: bool | None = None   # one block at a time (memfit.stream); None: when needed


def _say(options: CompressOptions, text: str) -> None:
    """One progress line on stderr for a phase that shows no bar (stdout stays for --json)."""
    if options.progress:
        print(f"memfit: {text}", file=sys.stderr, flush=True)


def _refuse_unexportable(meta_model, arch, plan: list[dict], recipe: Recipe) -> None:
    """--format compressed-tensors: refuse, before any work, a recipe whose modules it could
    not hold (memfit.io.export_ct), naming the first such module and why."""
    from memfit.archs import block_list
    from memfit.io.export_ct import check_representable, spec_why_not

    if recipe.embeddings is not None:
        raise UserError("compressed-tensors cannot represent the quantized embedding table "
                        "(recipe `embeddings:`); use --format memfit; nothing written")
    blocks = block_list(meta_model, arch)
    prefix = next(n for n, m in meta_model.named_modules() if m is blocks)
    bad = {f"{prefix}.{i}.{n}": why for i, specs in enumerate(plan) for n, spec in specs.items()
           if (why := spec_why_not(spec, blocks[i].get_submodule(n), n,
                                   getattr(meta_model.config, "model_type", None)))}
    if bad:
        check_representable(None, bad)


def _preflight(model: str, recipe: Recipe, fmt: str = "memfit") -> int | None:
    """What can be checked from the config alone, before the weights load; -> the model's
    positions (max_position_embeddings), None where the config gives none."""
    from memfit.api import plan_specs
    from memfit.archs import check_positions, text_config
    from memfit.models import skeleton

    meta_model, arch, meta = skeleton(model)
    method = quant_method(model) if meta is None else None
    if method:
        made = Path(model).expanduser() / "memfit_recipe.json"  # memfit's compressed-tensors
        source = json.loads(made.read_text()).get("source") if made.is_file() else None
        if source:
            raise UserError(f"{model} is already compressed by memfit (compressed-tensors; "
                            f"recipe in its memfit_recipe.json); compress the dense model "
                            f"instead: {source}")
        raise UserError(f"{model} is already quantized ({method} in its "
                        "config.json); compress its dense source instead")
    if meta is not None:
        source = meta.get("source") or "its dense source"
        raise UserError(f"{model} is already compressed by memfit (recipe in its memfit.json); "
                        f"compress the dense model instead: {source}")
    if arch.kind == "encoder":
        from memfit.encoders import check_recipe
        check_recipe(recipe, model, arch)
    elif recipe.needs_data:  # calibration windows past the positions: ones never learned
        check_positions(meta_model.config, recipe.calib.seq_len, "--seq-len")
    plan = plan_specs(meta_model, recipe, arch)
    if fmt == "compressed-tensors":
        _refuse_unexportable(meta_model, arch, plan, recipe)
    return getattr(text_config(meta_model.config), "max_position_embeddings", None)


def quant_method(model: str) -> str | None:
    """quant_method of a local folder's config.json (e.g. a compressed-tensors export), or None."""
    path = Path(model).expanduser() / "config.json"
    if not path.is_file():
        return None
    try:
        q = json.loads(path.read_text()).get("quantization_config")
    except (OSError, ValueError):
        return None
    return q.get("quant_method", "quantized") if isinstance(q, dict) else None


def gentler(recipe: Recipe) -> str:
    """What to change in `recipe` when its result failed the smoke check: one hint for each
    part it has (most damaging first: structured, pruning or low rank, quantization)."""
    from memfit.configs import GPTQ, SVD, Magnitude

    hints = []
    st = recipe.structured
    if st is not None:
        hints += [h for h, on in (("drop fewer blocks", st.drop_blocks),
                                  ("keep more MLP channels", st.mlp_keep is not None),
                                  ("keep more heads", st.heads_keep is not None)) if on]
    if recipe.prune is not None:
        p = recipe.prune
        hints.append("a lower sparsity" + (" or a calibrated method (wanda, sparsegpt)"
                                           if isinstance(p, Magnitude) else "")
                     if p.nm is None else "unstructured sparsity instead of N:M")
    if recipe.lowrank is not None:
        hints.append("keep more of each matrix (a higher keep)" + (
            " or the activation-whitened SVD (wsvd)" if isinstance(recipe.lowrank, SVD) else ""))
    q = recipe.quant
    if q is not None and getattr(q, "act_bits", None):  # W8A8: the activations' rounding
        hints.append("weight-only int8 (w8)" if getattr(q, "smoothquant", False)
                     else "SmoothQuant (w8a8-sq) or weight-only int8 (w8)")
    elif q is not None:
        more = ["more bits"] if q.format.bits < 8 else []
        hints.append(" or ".join(more + ([] if isinstance(q, GPTQ) else ["GPTQ"])) or "")
    return "; ".join(h for h in hints if h) or "a gentler recipe"


def _decoder_failure(check: dict, o: CompressOptions, recipe: Recipe) -> str | None:
    if math.isfinite(check["kld"]) and check["kld"] <= o.max_kld:
        return None
    return (f"KLD {check['kld']:.4f} vs the original (limit {o.max_kld}), perplexity "
            f"{check['perplexity']:.3f} vs {check['ref_perplexity']:.3f}; nothing written. Try: "
            f"{gentler(recipe)}. Or raise --max-kld to accept it")


def _refuse_collapse(check: dict, o: CompressOptions, recipe: Recipe) -> None:
    """The streamed path's smoke check verdict (memfit.stream): nothing is written yet."""
    failed = _decoder_failure(check, o, recipe)
    if failed:
        raise SmokeCheckFailed(f"smoke check failed: {failed}")


def _encoder_failure(check: dict, o: CompressOptions, recipe: Recipe) -> str | None:
    if math.isfinite(check["cosine_mean"]) and check["cosine_mean"] >= o.min_cosine:
        return None
    return (f"mean embedding cosine {check['cosine_mean']:.4f} vs the original (limit "
            f"{o.min_cosine}, min {check['cosine_min']:.4f} over {check['sentences']} sentences); "
            f"nothing written. Try: {gentler(recipe)}. Or lower --min-cosine to accept it")


def _encoder_inputs(loaded, recipe: Recipe, o: CompressOptions, smoke_src: str):
    """-> (recipe with the window length used, calibration windows or None, the smoke
    reference, its description) for an encoder (memfit.encoders)."""
    from memfit.calib.data import sentence_windows, sentences
    from memfit.encoders import EmbeddingReference, used_length

    longest = used_length(loaded)
    calib = recipe.calib
    if o.seq_len is None and calib.seq_len > longest:
        calib = replace(calib, seq_len=longest)
        recipe = replace(recipe, calib=calib)
    windows = None
    if recipe.needs_data:
        windows = sentence_windows(loaded.tokenizer, calib.data, "calib", seq_len=calib.seq_len,
                                   max_windows=calib.samples, seed=calib.seed)
        if len(windows) < calib.samples:
            print(f"memfit: warning: the {calib.data} calibration sentences fill {len(windows)} "
                  f"windows of {calib.seq_len} tokens, fewer than the {calib.samples} asked; "
                  f"using {len(windows)}", file=sys.stderr, flush=True)
    sents = sentences(smoke_src, "eval", limit=o.smoke_sentences)
    reference = EmbeddingReference.capture(loaded.model, loaded.tokenizer, sents, longest)
    return recipe, windows, reference, f"embeddings of {len(sents)} sentences"


FORMATS = ("auto", "compressed-tensors", "memfit")


def pick_format(model, fmt: str) -> tuple[str, str]:
    """-> (the format to write, a one-line note why when `auto` fell back to memfit's).
    `compressed-tensors` on a model it cannot represent is a UserError naming the module."""
    from memfit.formats.quant_linear import QuantLinear
    from memfit.io.export_ct import check_representable, unrepresentable

    if fmt == "compressed-tensors":
        check_representable(model)
    if fmt != "auto":
        return fmt, ""
    bad = unrepresentable(model)
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        return "memfit", ("memfit's format because no layer is quantized (nothing for "
                          "compressed-tensors to hold)")
    if not bad:
        return "compressed-tensors", ""
    name, why = next(iter(bad.items()))
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    return "memfit", f"memfit's format because compressed-tensors cannot hold {name}{more}: {why}"


def _streams(model: str, recipe: Recipe, o: CompressOptions) -> bool:
    """--low-memory asked, or (not refused) the weights would not fit: memfit.stream."""
    if o.low_memory is not None:
        return o.low_memory
    from memfit.io.checkpoint import pick_dtype
    from memfit.stream import should_stream

    if o.format == "compressed-tensors" or torch.device(o.device).type != "cpu" \
            or recipe.structured:
        return False
    stream, why = should_stream(model, pick_dtype(o.dtype, o.device))
    if not stream:
        return False
    from memfit.api import plan_specs
    from memfit.models import skeleton
    from memfit.stream import whole_model_reason

    meta_model, arch, _ = skeleton(model)
    whole = whole_model_reason(recipe, plan_specs(meta_model, recipe, arch))
    if whole or arch.kind != "decoder":
        _say(o, f"{why.split(':')[0]}, but {whole or 'an encoder is not streamed'}; loading "
                "the whole model")
        return False
    _say(o, why)
    return True


def compress_to(model: str, recipe: str | Recipe, out: str | Path,
                options: CompressOptions | None = None) -> dict:
    """Compress `model` with `recipe` into the folder `out`; return the report."""
    from memfit.io.checkpoint import check_device
    from memfit.io.export_ct import save_ct
    from memfit.io.folders import check_output
    from memfit.io.save import save

    o = options or CompressOptions()
    if o.format not in FORMATS:
        raise UserError(f"unknown format {o.format!r}; use one of {', '.join(FORMATS)}")
    out = Path(out)
    check_output(out, o.overwrite, (model,))  # refuse early, before any work
    check_device(o.device)
    recipe = load_recipe(recipe)
    calib = replace(recipe.calib, **{k: getattr(o, k) for k in ("data", "samples", "seq_len",
                                                              "offload", "bos")
                                     if getattr(o, k) is not None})
    recipe = replace(recipe, calib=calib)
    positions = _preflight(model, recipe, o.format)
    if positions and o.smoke_seq_len > positions:  # a model of few positions: shorter windows
        o = replace(o, smoke_seq_len=positions)
    if _streams(model, recipe, o):
        from memfit.stream import stream_compress
        return stream_compress(model, recipe, out, o, say=lambda text: _say(o, text),
                               refuse=lambda check: _refuse_collapse(check, o, recipe))
    loaded = load_model(model, dtype=o.dtype, device=o.device)
    smoke_src = calib.data if calib.data in ("builtin", "wikitext2", "c4") else "builtin"
    encoder = loaded.kind == "encoder"
    if encoder:
        recipe, windows, reference, smoke_text = _encoder_inputs(loaded, recipe, o, smoke_src)
    else:
        windows = None
        if recipe.needs_data:
            windows = calibration_windows(loaded.tokenizer, calib)
        smoke = token_windows(loaded.tokenizer, smoke_src, "eval", seq_len=o.smoke_seq_len,
                              max_windows=o.smoke_windows, bos=calib.bos)
        reference = Reference.capture(loaded.model, smoke)
        smoke_text = f"{len(smoke)} windows x {o.smoke_seq_len} tokens"
    partial = _partial_dir(out, loaded.source, recipe)
    t0 = time.perf_counter()
    try:
        report = compress_(loaded.model, recipe, windows, checkpoint_dir=partial / "blocks",
                           progress=o.progress)
    except UserError:  # the same input fails again: nothing to resume (a killed run keeps it)
        shutil.rmtree(partial, ignore_errors=True)
        raise
    report["compress_seconds"] = time.perf_counter() - t0
    _say(o, f"smoke check: {smoke_text} against the original")
    check = reference.check(loaded.model)
    limit = {"min_cosine": o.min_cosine} if encoder else {"max_kld": o.max_kld}
    report["smoke"] = {**check, "data": f"{smoke_src}:eval", **limit}
    failed = (_encoder_failure if encoder else _decoder_failure)(check, o, recipe)
    if failed:
        if not o.keep_partial:
            shutil.rmtree(partial, ignore_errors=True)
        raise SmokeCheckFailed(
            f"smoke check failed: {failed}"
            + (f" (finished blocks kept in {partial})" if o.keep_partial else ""))
    # only run-independent facts go into the folder, so a resumed run writes identical bytes
    stable = ("bytes_before", "bytes_after", "modules", "kept_blocks", "calib_windows",
              "calib_seq_len", "smoke")
    fmt, note = pick_format(loaded.model, o.format)
    if encoder and o.format == "auto" and fmt != "memfit" and "modules.json" in side_files(
            loaded.source):
        # sentence-transformers fails on a compressed-tensors encoder at its first forward
        # (benchmarks/RESULTS.md, issue 14); memfit's format loads there with identical output
        fmt, note = "memfit", ("memfit's format because sentence-transformers cannot run a "
                               "compressed-tensors encoder (pass --format compressed-tensors "
                               "to write one for plain transformers)")
    _say(o, f"writing {out} ({fmt}{'; ' + note if note else ''})")
    writer = save if fmt == "memfit" else save_ct
    writer(loaded.model, loaded.tokenizer, out, recipe=recipe.to_dict(), overwrite=o.overwrite,
           extra={"source": loaded.source, "report": {k: report[k] for k in stable}},
           side_files=side_files(loaded.source) if encoder else None)
    report["format"], report["format_note"] = fmt, note
    report["artifact_bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    report["peak_rss_bytes"] = rss_peak_bytes()  # the whole run: load, compress, smoke check, save
    report["out"] = str(out)
    shutil.rmtree(partial, ignore_errors=True)
    return report
