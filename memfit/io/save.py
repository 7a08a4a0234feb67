"""Save a compressed model as a folder, and load it back without a full-precision copy.

On disk (everything written into `<out>.tmp-<pid>` and renamed to `<out>` once complete):

    config.json                  the transformers config, plus `quantization_config`
                                 {"quant_method": "memfit", "format": "memfit/1", "modules": {...}}
    model.safetensors            the state dict as stored: packed buffers (qdata/scale/zero, ...)
                                 as they are, every other weight dense; a tied tensor saved once
    memfit_buffers.safetensors   non-persistent buffers (e.g. rotary `inv_freq`), so memfit's own
                                 loader restores them exactly instead of recomputing them
    memfit.json                  {"format", "memfit_version", "arch", "recipe", "modules",
                                  "tied": {target: source}, **extra}
    tokenizer files, generation_config.json

`modules` maps each replaced module's name to a description (`describe_modules`); the kinds and
their meta-device builders live in memfit.io.modules.

Two ways to load, both supported and tested to give bit-identical logits:

- `memfit.io.save.load(folder)` (what `memfit.models.load_model` uses): build the transformers
  model on the meta device from config.json, swap in the described modules (also on meta), assign
  the safetensors tensors, set the non-persistent buffers from memfit_buffers.safetensors, re-tie.
  No dense weight of a compressed layer ever exists. `dtype=None` keeps the stored dtypes of a
  folder saved with `dense_dtype="keep"` and otherwise computes in `pick_dtype("auto")`; a
  dtype casts the dense floating tensors but never a format's own fields (scale, zero).
- `transformers.AutoModelForCausalLM.from_pretrained(folder)` (`AutoModel` for encoders) after
  `import memfit` (which calls `memfit.io.hf.register_with_transformers()`): a registered
  quantizer swaps the modules in on meta, transformers loads the weights, recomputes the
  non-persistent buffers and re-ties from its own declarations (memfit.json is not read).
  Caveats: it leans on transformers' quantizer interface (written against 5.24; it changes
  between releases); a missing packed tensor is an error, but a missing dense one is only
  transformers' warning; `save_pretrained` on such a model is refused (save with `save`).

Dense floating tensors memfit did not compress (embeddings, norms, an uncompressed head) are stored
at 16 bits by default (`dense_dtype="auto"`): float16 where the tensor fits its range (3 more
mantissa bits than bfloat16), bfloat16 where it would overflow. A float32 copy of the default
model's tied embedding alone is 113 MB, two thirds of its 4-bit artifact. memfit.json records the
choice and the dtype the model computed in; loading casts the dense tensors to the requested
compute dtype (`auto`: float32 on CPU, bfloat16 on CUDA). `dense_dtype="float32"` (or "keep")
stores them as they are, for bit-exact round trips. A format's own fields (scale, zero) and the
non-persistent buffers are never cast.

config.json records `dtype` (that of the dense weights), else from_pretrained(dtype="auto")
would guess it from the first floating tensor on disk, possibly a float16 `scale`. A tie whose
target was replaced (a quantized lm_head under tied embeddings) is written as
`tie_word_embeddings: false`, so no loader ties the packed module back to the embedding.
"""

from __future__ import annotations

import copy
import json
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch import nn

from memfit.errors import UserError
from memfit.io.folders import check_output, write_folder
from memfit.io.checkpoint import read_tensors as _read_tensors  # noqa: F401 -- export_ct uses it
from memfit.io.modules import (MODULE_KINDS, build_module, describe_modules,  # noqa: F401
                               replace_modules)

FORMAT = "memfit/1"
WEIGHTS = "model.safetensors"
BUFFERS = "memfit_buffers.safetensors"
META = "memfit.json"
QUANT_METHOD = "memfit"
_RESERVED = ("format", "memfit_version", "arch", "recipe", "modules", "tied", "guards", "dense_dtype",
             "compute_dtype")


# ----- save -----------------------------------------------------------------------------------

def _split_state(model: nn.Module, skip: str | None = None) -> tuple[dict, dict, dict]:
    """-> (persistent tensors to save, non-persistent buffers, tied {target: source}).

    A tensor that aliases an earlier one (same storage, offset, shape, stride) is saved once and
    recorded as tied; transformers' declared tie targets come last, so their sources are the
    ones kept (what from_pretrained expects). A partial overlap is saved as its own copy.
    Keys starting with `skip` are left out (the streaming compress writes its blocks itself)."""
    state = {k: v for k, v in model.state_dict().items() if not skip or not k.startswith(skip)}
    declared = getattr(model, "all_tied_weights_keys", None) or {}
    seen, storages, tensors, tied = {}, set(), {}, {}
    for key in sorted(state, key=lambda k: k in declared):  # stable: declared targets last
        t = state[key]
        sig = (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape),
               t.stride())
        if t.numel() and sig in seen:
            tied[key] = seen[sig]
            continue
        seen[sig] = key
        shares = sig[0] in storages and t.numel() > 0
        storages.add(sig[0])
        tensors[key] = t.detach().clone() if shares else t.detach().contiguous()
    persistent = set(state)
    extra = {n: b.detach().contiguous() for n, b in model.named_buffers()
             if n not in persistent and b is not None and not (skip and n.startswith(skip))}
    return tensors, extra, tied


def plain_config(config):
    """A copy of a transformers config without its quantization markers."""
    config = copy.deepcopy(config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    return config


def write_config(model: nn.Module, folder: Path, dropped_tie: bool, quantization: dict) -> None:
    """config.json: the model's config without transformers' quantization markers, the
    dtype of the dense weights, and `quantization` as its quantization_config."""
    config = plain_config(model.config)
    if dropped_tie:
        config.tie_word_embeddings = False
    # from_pretrained(dtype="auto") otherwise guesses from the first floating tensor on disk,
    # which may be a float16 `scale`: record the dtype of the dense weights.
    dense = [p.dtype for p in model.parameters() if p.is_floating_point()]
    if dense:
        config.dtype = max(set(dense), key=dense.count)
    config.save_pretrained(folder)
    path = folder / "config.json"
    d = json.loads(path.read_text())
    d["quantization_config"] = quantization
    path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def _guards(model: nn.Module, modules: dict) -> list[str]:
    """An empty `<module>.weight` for every packed module, the embedding table and head too:
    transformers without memfit's quantizer (no
    `import memfit`) then stops with a size-mismatch error instead of silently building those
    layers from random weights. Both loaders drop these keys (listed in memfit.json and in
    config.json's quantization_config)."""
    return [f"{n}.weight" for n in modules]


DENSE_DTYPES = ("auto", "keep", "float32", "float16", "bfloat16")


def _fixed_keys(modules: dict) -> set[str]:
    """State-dict keys whose dtype belongs to a format (scale, zero): never cast."""
    return {f"{n}.{f}" for n, d in modules.items() for f in MODULE_KINDS[d["kind"]].fixed}


def _store_dense(tensors: dict, fixed: set[str], dense_dtype: str) -> dict:
    """Cast the dense floating tensors (not the formats' own fields) to the storage dtype."""
    if dense_dtype not in DENSE_DTYPES:
        raise UserError(f"unknown dense_dtype {dense_dtype!r}; use one of {', '.join(DENSE_DTYPES)}")
    if dense_dtype == "keep":
        return tensors
    out = {}
    for k, t in tensors.items():
        if not t.is_floating_point() or k in fixed or t.element_size() <= 2 and dense_dtype == "auto":
            out[k] = t
        elif dense_dtype != "auto":
            out[k] = t.to(getattr(torch, dense_dtype))
        else:
            fits = t.numel() == 0 or float(t.abs().max()) < torch.finfo(torch.float16).max
            out[k] = t.to(torch.float16 if fits else torch.bfloat16)
    return out


def save(model: nn.Module, tokenizer, out_dir, *, recipe: dict, extra: dict | None = None,
         overwrite: bool = False, dense_dtype: str = "auto",
         side_files: dict[str, Path] | None = None) -> Path:
    """Write `model` (with its memfit modules) and `tokenizer` to the folder `out_dir`; dense
    floating tensors are stored per `dense_dtype` (see the module docstring). `side_files`
    {name in the folder: file or folder} are copied in as they are (e.g. an encoder's
    sentence-transformers description), before the folder appears."""
    from safetensors.torch import save_file

    check_output(Path(out_dir), overwrite)
    modules = describe_modules(model)
    tensors, buffers, tied = _split_state(model)
    tensors = _store_dense(tensors, _fixed_keys(modules), dense_dtype)
    keys = set(tensors)  # the model's own tensors: a tie target left out is a dropped tie
    guards = _guards(model, modules)
    tensors.update({g: torch.zeros(0) for g in guards})
    return write_model_folder(
        model, tokenizer, out_dir, lambda path: save_file(tensors, str(path),
                                                          metadata={"format": "pt"}),
        keys=keys, buffers=buffers, modules=modules, tied=tied, guards=guards,
        recipe=recipe, extra=extra, overwrite=overwrite, dense_dtype=dense_dtype,
        side_files=side_files)


def write_model_folder(model: nn.Module, tokenizer, out_dir, write_weights, *, keys: set[str],
                       buffers: dict, modules: dict, tied: dict, guards: list[str], recipe: dict,
                       extra: dict | None, overwrite: bool, dense_dtype: str,
                       side_files: dict | None) -> Path:
    """The folder of `save` around weights that `write_weights(path)` writes (`keys`: the
    stored tensor names): shared by `save` and the streaming compress (memfit.stream), whose
    model holds no weights by the time it is written (its tensors are on the meta device)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    check_output(out, overwrite)
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise UserError(f"extra keys {clash} are reserved in memfit.json; rename them")
    dense = [p.dtype for p in model.parameters() if p.is_floating_point()]
    compute_dtype = str(max(set(dense), key=dense.count) if dense else torch.float32)
    declared = getattr(model, "all_tied_weights_keys", None) or {}
    dropped_tie = any(t not in keys and t not in tied for t in declared)
    try:
        memfit_version = version("memfit")
    except PackageNotFoundError:
        memfit_version = "unknown"
    meta = {"format": FORMAT, "memfit_version": memfit_version,
            "arch": getattr(model.config, "model_type", None), "recipe": recipe,
            "modules": modules, "tied": tied, "guards": guards,
            "dense_dtype": dense_dtype, "compute_dtype": compute_dtype.replace("torch.", ""),
            **extra}
    try:
        meta_text = json.dumps(meta, indent=2)
    except (TypeError, ValueError) as e:
        raise UserError(f"recipe/extra cannot be written as JSON ({e}); pass plain dicts, "
                        "lists, strings and numbers") from None

    def fill(tmp: Path) -> None:
        write_weights(tmp / WEIGHTS)
        save_file(buffers, str(tmp / BUFFERS), metadata={"format": "pt"})
        write_config(model, tmp, dropped_tie,
                     {"quant_method": QUANT_METHOD, "format": FORMAT, "modules": modules,
                      **({"tied": tied} if tied else {}), **({"guards": guards} if guards else {})})
        write_side_files(model, tokenizer, tmp, side_files)
        (tmp / META).write_text(meta_text + "\n")

    return write_folder(out, fill)


def write_side_files(model: nn.Module, tokenizer, tmp: Path, side_files: dict | None) -> None:
    """generation_config.json, the tokenizer and any `side_files` into the folder `tmp`."""
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for name, src in (side_files or {}).items():
        (shutil.copytree if Path(src).is_dir() else shutil.copyfile)(src, tmp / name)


# ----- load -----------------------------------------------------------------------------------

def read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / META).read_text())
    except FileNotFoundError:
        raise UserError(f"{folder} has no {META}; it is not a memfit output folder") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{folder / META} is unreadable ({e}); re-save the model") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise UserError(f"{folder} was written in format {got!r}, this memfit reads {FORMAT}; "
                        "upgrade memfit or re-save the model")
    if not isinstance(meta.get("modules"), dict):
        raise UserError(f"{folder / META} has no 'modules' table; re-save the model")
    return meta


def retie(model: nn.Module, tied: dict[str, str]) -> None:
    """Point every tied target at its source tensor (a tensor saved once for several keys)."""
    for target, source in tied.items():
        _set_tensor(model, target, _get_tensor(model, source))


def _get_tensor(model: nn.Module, key: str) -> torch.Tensor:
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    return owner._parameters[attr] if attr in owner._parameters else owner._buffers[attr]


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    if attr in owner._parameters:
        if not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=owner._parameters[attr].requires_grad)
        owner._parameters[attr] = value
    else:
        owner._buffers[attr] = value


def _build_skeleton(folder: Path, modules: dict):
    """The model of config.json on the meta device with the described modules swapped in."""
    from transformers import AutoModel, AutoModelForCausalLM

    from memfit.archs import arch_for
    from memfit.io.checkpoint import read_config
    from memfit.moe import unfuse_experts_

    config = read_config(folder, trust_remote_code=False)
    quant = getattr(config, "quantization_config", None)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # build the plain model; memfit swaps the modules itself
    arch = arch_for(config)
    cls = AutoModelForCausalLM if arch.kind == "decoder" else AutoModel
    with torch.device("meta"):
        model = cls.from_config(config)
    unfuse_experts_(model)
    replace_modules(model, modules)
    if quant is not None:
        model.config.quantization_config = quant  # keep the truth in the loaded config
    return model, arch


def load(path, *, dtype=None, device: str = "cpu", with_tokenizer: bool = True):
    """Load a memfit folder -> `memfit.models.Loaded`, never materialising dense weights."""
    from memfit.io.checkpoint import check_safetensors

    if device == "cpu":
        from memfit.eval.memory import steady_malloc
        steady_malloc()
    folder = Path(path)
    meta = read_meta(folder)
    check_safetensors(folder)
    state = _read_tensors(folder / WEIGHTS, device, _load_cast(meta, dtype, device))
    for g in meta.get("guards", []):
        state.pop(g, None)
    return assemble(folder, meta["modules"], meta.get("tied", {}), state,
                    _read_tensors(folder / BUFFERS, device), meta.get("dense_dtype", "keep"),
                    dtype=dtype, device=device, with_tokenizer=with_tokenizer)


def _embeddings_follow(model) -> None:
    """Packed embedding tables return rows in the dtype the model computes in (its dense
    weights'): they were built in the meta skeleton's float32, and a model loaded in bfloat16
    would otherwise run its whole residual stream in float32 from the first layer on."""
    from memfit.formats.embedding import QuantEmbedding

    dense = [p.dtype for p in model.parameters() if p.is_floating_point()]
    if dense:
        compute = max(set(dense), key=dense.count)
        for m in model.modules():
            if isinstance(m, QuantEmbedding):
                m.dtype = compute


def _load_cast(meta: dict, dtype, device: str):
    """The per-tensor cast `assemble` will apply, known from memfit.json before reading (so the
    reader can cast while it reads): dense floating tensors, never a format's own fields."""
    from memfit.io.checkpoint import pick_dtype

    if dtype is None and meta.get("dense_dtype", "keep") == "keep":
        return None
    to, fixed = pick_dtype(dtype, device), _fixed_keys(meta["modules"])
    return lambda name, stored: to if stored.is_floating_point and name not in fixed else None


def assemble(folder: Path, modules: dict, tied: dict, state: dict, buffers: dict,
             dense_dtype: str, *, dtype=None, device: str = "cpu", with_tokenizer: bool = True):
    """The model of `folder`'s config.json built on meta with the described `modules` swapped
    in, given its stored tensors (`state`, in memfit's field names) and non-persistent
    `buffers` -> `memfit.models.Loaded`. Shared by memfit's format and compressed-tensors
    folders memfit wrote (memfit.io.export_ct.load_ct). `with_tokenizer=False` leaves the
    tokenizer None (memfit.models.load_model reads and checks it itself)."""
    from memfit.io.checkpoint import Loaded, load_tokenizer, pick_dtype

    model, arch = _build_skeleton(folder, modules)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state) - set(tied))
    unexpected = sorted((set(state) | set(tied) | set(tied.values())) - expected)
    if missing or unexpected:
        what = f"missing tensors {missing[:3]}" if missing else f"unknown tensors {unexpected[:3]}"
        raise UserError(f"{folder / WEIGHTS} does not match its config and {META}: {what}; "
                        "the folder is damaged or mixed up: re-save the model")
    if dtype is not None or dense_dtype != "keep":
        # stored 16-bit (or a requested dtype): compute in the requested / device's dtype
        cast_to = pick_dtype(dtype, device)
        fixed = _fixed_keys(modules)
        for k, v in state.items():  # in place: one tensor's two copies at a time
            if v.is_floating_point() and k not in fixed:
                state[k] = v.to(cast_to)
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise UserError(f"{folder / WEIGHTS} does not match its description "
                        f"({str(e).splitlines()[-1].strip()}); re-save the model") from None
    for name, buf in list(model.named_buffers()):
        if name not in expected:
            if name not in buffers:
                raise UserError(f"{folder / BUFFERS} lacks the buffer {name!r}; re-save the model")
            _set_tensor(model, name, buffers[name])
    retie(model, tied)
    _embeddings_follow(model)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t is not None and t.is_meta]
    assert not left, f"tensors left on the meta device after loading: {left[:5]}"
    model.to(device).eval()
    tokenizer = load_tokenizer(folder, str(folder), local=True) if with_tokenizer else None
    return Loaded(model=model, tokenizer=tokenizer, arch=arch, source=str(folder))
