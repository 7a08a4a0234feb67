"""What loading a checkpoint folder needs before any model class: the `Loaded` bundle, dtype
names, a truncation check of safetensors files and the config reader. Both loaders (memfit.models
for transformers folders, memfit.io.save for memfit folders) build on it, so neither imports the
other's module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from memfit.archs import Arch
from memfit.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Loaded:
    """A loaded model with what every command needs beside it."""

    model: torch.nn.Module
    tokenizer: object
    arch: Arch
    source: str

    @property
    def kind(self) -> str:
        return self.arch.kind

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def check_safetensors(folder: Path) -> None:
    """Fail with one clear line on a truncated or corrupt checkpoint, before transformers does."""
    for f in sorted(folder.glob("*.safetensors")):
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
                if size < 8 or header_len > size - 8:
                    raise ValueError("header runs past the end of the file")
                header = json.loads(fh.read(header_len))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                      default=0)
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{f} is not a readable safetensors file ({e}); "
                            "it may be truncated: re-save or re-download it") from None
        if size < 8 + header_len + end:
            raise UserError(f"{f} is truncated ({size} bytes, its header promises "
                            f"{8 + header_len + end}); re-save or re-download it")


def check_device(device: str) -> torch.device:
    """The torch device named by `device`, or a UserError naming what this machine has."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: this torch has no usable CUDA "
                            f"({'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'})"
                            "; use --device cpu, or install a CUDA build of torch (README: GPU)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type not in ("cpu", "mps"):
        raise UserError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    return dev


def pick_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_config(location, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise UserError(f"{location} needs remote code; pass --trust-remote-code if you trust it")
        raise UserError(f"{location}: unknown or unreadable model config ({e})") from None
    except OSError as e:
        raise UserError(f"could not load {location!r}: {str(e).splitlines()[0]} "
                        "(offline? use a local folder or a .gguf, or set HF_HUB_OFFLINE=0 with "
                        "network access)") from None
