"""Read a checkpoint one tensor at a time and write a safetensors file without holding its tensors.

- `CheckpointIndex(folder)`: where every tensor of a transformers folder lives (one
  `model.safetensors`, or the shards named by `model.safetensors.index.json`), read tensor by
  tensor into memory the process owns (plain reads, as memfit.io.checkpoint.read_safetensors:
  a memory-mapped view would keep the file's pages resident and counted in RSS).
- `StreamWriter(path)`: tensors are appended to a data file as they are produced; `finish`
  writes the safetensors header, then copies each tensor's bytes after it in the order
  safetensors itself uses (dtype, then name), so the file is byte for byte what
  `safetensors.torch.save_file` writes for the same tensors, while memory holds one copy
  buffer. The order is taken from safetensors (a save of empty tensors with the same names
  and dtypes), not re-derived here.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from memfit.errors import UserError
from memfit.io.checkpoint import _ST_DTYPES

_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_COPY = 16 << 20  # bytes per copy step


def _header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


class CheckpointIndex:
    """{tensor name: (file, its header entry, where its data starts)} of a safetensors folder."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise UserError(f"{folder} holds no safetensors weights; streaming reads only "
                            "safetensors checkpoints (re-save the model with safe_serialization)")
        self.where: dict[str, tuple[Path, dict, int]] = {}
        for f in files:
            start, header = _header(f)
            for name, entry in header.items():
                if entry["dtype"] not in _ST_DTYPES:
                    raise UserError(f"{f}: tensor {name} has dtype {entry['dtype']}, which the "
                                    "streaming reader does not know")
                self.where[name] = (f, entry, start)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def find(self, name: str) -> str | None:
        """The name a model tensor is stored under here: its own, or another name transformers
        renames on load (memfit.moe.checkpoint_names: Mixtral-era experts); None if absent."""
        from memfit.moe import checkpoint_names

        return next((n for n in checkpoint_names(name) if n in self.where), None)

    def nbytes(self, dtype: torch.dtype) -> int:
        """Bytes of all tensors once floating ones are cast to `dtype` (what loading holds)."""
        total = 0
        for _, entry, _ in self.where.values():
            t = _ST_DTYPES[entry["dtype"]]
            numel = 1
            for d in entry["shape"]:
                numel *= d
            size = dtype.itemsize if t.is_floating_point else t.itemsize
            total += numel * size
        return total

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor in owned memory; floating ones cast to `dtype` when given."""
        path, entry, start = self.where[name]
        begin, end = entry["data_offsets"]
        t = torch.empty(entry["shape"], dtype=_ST_DTYPES[entry["dtype"]])
        with open(path, "rb") as f:
            f.seek(start + begin)
            if end > begin and f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) \
                    != end - begin:
                raise UserError(f"{path}: tensor {name} is truncated; re-save or re-download it")
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t


class StreamWriter:
    """A safetensors file written from tensors added one at a time (see the module docstring)."""

    def __init__(self, data_path: Path):
        self.data_path = Path(data_path)
        self._data = open(self.data_path, "w+b")
        self._entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        self._end = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        assert name not in self._entries, f"{name} written twice"
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if nbytes:
            self._data.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        self._entries[name] = (t.dtype, list(t.shape), self._end, nbytes)
        self._end += nbytes

    def keys(self) -> set[str]:
        return set(self._entries)

    def _order(self, metadata: dict) -> list[str]:
        from safetensors.torch import save

        blob = save({n: torch.empty(0, dtype=e[0]) for n, e in self._entries.items()}, metadata)
        n = int.from_bytes(blob[:8], "little")
        return [k for k in json.loads(blob[8:8 + n]) if k != "__metadata__"]

    def finish(self, path: Path, metadata: dict | None = None) -> None:
        """Write the safetensors file `path` and remove the data file."""
        header: dict = {"__metadata__": metadata} if metadata else {}
        order, offset = self._order(metadata), 0
        for name in order:
            dtype, shape, _, nbytes = self._entries[name]
            header[name] = {"dtype": _NAMES[dtype], "shape": shape,
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        self._data.flush()
        with open(path, "wb") as out:
            out.write(len(text).to_bytes(8, "little"))
            out.write(text)
            for name in order:
                _, _, begin, nbytes = self._entries[name]
                self._data.seek(begin)
                while nbytes:
                    chunk = self._data.read(min(nbytes, _COPY))
                    out.write(chunk)
                    nbytes -= len(chunk)
        self.close()

    def close(self) -> None:
        if not self._data.closed:
            self._data.close()
        if self.data_path.exists():
            os.unlink(self.data_path)


def gguf_tensors(path: Path, model, reader=None):
    """(transformers name, tensor) of a GGUF file, one tensor at a time: dequantized by `gguf`
    and renamed and processed (e.g. Llama's rotary permutation undone) by transformers' own GGUF
    name map and tensor processors, as its whole-file loader does, so the values are the ones
    `from_pretrained(gguf_file=...)` holds. `model`: the model of the file's config (meta is
    fine; only its names are read). A processor that assembles tensors itself (mixtures of
    experts stack theirs) leaves them for the end. `reader`: the file's GGUFReader, if open."""
    import numpy as np
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import (
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    from memfit.io.gguf_families import processor as gguf_processor

    parsed = load_gguf_checkpoint(str(path), return_tensors=False)  # the metadata only
    parsed["tensors"] = {}
    reader = reader or GGUFReader(str(path))  # parsing a 49k-token vocabulary takes seconds
    arch = read_field(reader, "general.architecture")[0]
    processor = gguf_processor(arch, {**parsed.get("config", {}), **model.config.to_dict()})
    mixtral = model.config.model_type == "mixtral"  # written as llama.cpp's llama with experts
    mapping = get_gguf_hf_weights_map(model, processor, model_type="llama" if mixtral else None)
    for tensor in reader.tensors:
        result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type),
                                   name=tensor.name, tensor_key_mapping=mapping,
                                   parsed_parameters=parsed)
        if result.name in mapping:
            yield mapping[result.name], torch.from_numpy(np.copy(result.weights))
    yield from parsed["tensors"].items()


def convert_gguf(path: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A GGUF file -> a transformers folder `out` (config, generation config, tokenizer,
    model.safetensors in `dtype`), one tensor in memory at a time; written to a temporary folder
    of this call's own beside `out` and renamed when complete (memfit.io.folders.write_folder: two
    processes converting the same file at once each write their own; the first copy stays)."""
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM

    from memfit.io.folders import write_folder
    from memfit.io.gguf_families import gguf_config

    path = Path(path)
    kw = {"gguf_file": path.name}
    reader = GGUFReader(str(path))
    config = gguf_config(reader, AutoConfig.from_pretrained(path.parent, **kw))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    _drop_stale(out.parent.glob(out.name + ".tmp-*"))
    return write_folder(out, lambda tmp: _write_converted(path, model, tied, tmp, dtype, kw,
                                                          reader),
                        keep_existing=True)


STALE_S = 600  # a temporary folder nothing was written into for this long is a killed run's


def _drop_stale(folders) -> None:
    """Remove the temporary folders of conversions that were killed (no file in them written to
    for STALE_S seconds); a live conversion keeps writing its data file, so it is left alone."""
    now = time.time()
    for f in folders:
        try:  # another process may be removing it (its own, renamed or stale) right now
            newest = max([p.stat().st_mtime for p in f.rglob("*")] + [f.stat().st_mtime])
        except OSError:
            continue
        if now - newest > STALE_S:
            shutil.rmtree(f, ignore_errors=True)


def _write_converted(path: Path, model, tied: set, tmp: Path, dtype: torch.dtype,
                     kw: dict, reader) -> None:
    """convert_gguf's files, written into `tmp`."""
    from transformers import AutoTokenizer

    writer = StreamWriter(tmp / "weights.data")
    try:
        for name, t in gguf_tensors(path, model, reader):
            if name not in tied:
                writer.add(name, t.to(dtype) if t.is_floating_point() else t)
        writer.finish(tmp / "model.safetensors", {"format": "pt"})
    finally:
        writer.close()
    model.config.dtype = dtype
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    model.config.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    if "tokenizer.ggml.model" in reader.fields:  # else a folder without one, as a GGUF without
        try:                                      # one stands (memfit's exports of such models)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
        except (OSError, ValueError, KeyError) as e:
            why = " ".join(str(e).split())
            raise UserError(f"could not read the tokenizer of {path.name}: {why}; "
                            "convert the model again with its tokenizer") from None
        tokenizer.save_pretrained(tmp)
    (tmp / "memfit_source.json").write_text(json.dumps({"gguf": str(path.resolve())}))
