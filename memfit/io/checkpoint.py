"""What loading a checkpoint folder needs before any model class: the `Loaded` bundle, dtype
names, a truncation check of safetensors files, the config and tokenizer readers. Both loaders
(memfit.models for transformers folders, memfit.io.save for memfit folders) build on it, so
neither imports the other's module.
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


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def check_safetensors(folder: Path) -> None:
    """Fail with one clear line on a truncated or corrupt checkpoint, before transformers does,
    and on a folder whose weights are pickles only (loading one can run any code it holds)."""
    files = sorted(folder.glob("*.safetensors"))
    pickles = sorted(f.name for pattern in PICKLE_WEIGHTS for f in folder.glob(pattern))
    if not files and pickles:
        raise UserError(f"{folder} holds its weights as pickles ({', '.join(pickles[:3])}), which "
                        "memfit does not load (loading one can run any code in it); where you "
                        "trust the file, save the model again as safetensors "
                        "(save_pretrained writes model.safetensors)")
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index} is not a readable shard index ({e}); re-save or "
                            "re-download the model") from None
        missing = sorted(n for n in shards if not (folder / n).is_file())
        if missing:
            raise UserError(f"{folder} lacks {len(missing)} of the {len(shards)} weight files "
                            f"its {index.name} lists ({', '.join(missing[:2])}"
                            f"{', ...' if len(missing) > 2 else ''}); re-download or re-save it")
    for f in files:
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


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool, "U16": torch.uint16,
              "U32": torch.uint32, "U64": torch.uint64, "F8_E4M3": torch.float8_e4m3fn,
              "F8_E5M2": torch.float8_e5m2}


CAST_CHUNK = 1 << 22  # bytes read at a time into the staging buffer of a cast tensor


def read_safetensors(path: Path, cast=None) -> dict[str, torch.Tensor] | None:
    """Every tensor of a safetensors file read into memory the process owns (CPU), one tensor at
    a time with plain reads, or None for a dtype this reader does not know.

    safetensors' `load_file` maps the file and hands out views of the mapping: a tensor the
    loader then casts (a 16-bit table computed in float32) keeps its stored pages mapped, and
    resident, next to the copy for as long as the model lives (57 MB for the default model's
    embedding, measured with /proc/self/smaps). Reading into owned tensors makes the resident
    bytes exactly the tensors' bytes.

    `cast(name, dtype) -> dtype or None`: a tensor to be computed in another dtype is read
    CAST_CHUNK bytes at a time through one staging buffer straight into its final dtype, so no
    stored-dtype copy of a whole tensor is ever allocated (freed copies of the default model's
    16-bit linears stayed in the heap as 3% of the peak resident set, measured)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        if any(v["dtype"] not in _ST_DTYPES for v in header.values()):
            return None
        out, staging = {}, None
        for name, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = v["data_offsets"]
            stored = _ST_DTYPES[v["dtype"]]
            to = cast(name, stored) if cast is not None else None
            f.seek(8 + n + begin)
            if to is None or to == stored or end == begin:
                t = torch.empty(v["shape"], dtype=stored)
                if end > begin and f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) \
                        != end - begin:
                    raise ValueError(f"{name} is truncated")
            else:
                t = torch.empty(v["shape"], dtype=to)
                flat, size = t.view(-1), stored.itemsize
                step = max(1, CAST_CHUNK // size)
                if staging is None:
                    staging = torch.empty(CAST_CHUNK, dtype=torch.uint8)
                for i in range(0, flat.numel(), step):
                    k = min(step, flat.numel() - i)
                    buf = staging[:k * size]
                    if f.readinto(memoryview(buf.numpy())) != k * size:
                        raise ValueError(f"{name} is truncated")
                    flat[i:i + k] = buf.view(stored)
            out[name] = t
    return out


def read_tensors(path: Path, device: str, cast=None) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors on `device` (CPU: owned memory, `read_safetensors`), or a
    UserError naming the damaged file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise UserError(f"{path} is missing; re-save the model")
    try:
        if torch.device(device).type == "cpu":
            owned = read_safetensors(path, cast)
            if owned is not None:
                return owned
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({e}); re-save the model") from None


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


def offline_unless_hub_reachable(timeout_s: float = 3.0) -> None:
    """Switch huggingface_hub to offline mode (its cache only) when its endpoint cannot be reached:
    without network a hub id otherwise costs ~25 s of retries and a page of warnings before the
    same error. A no-op when offline mode is already on, or behind a proxy (a direct connection
    says nothing about the proxy's)."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    proxies = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in proxies):
        return
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
    except OSError:
        constants.HF_HUB_OFFLINE = True  # read at each request by huggingface_hub and transformers


def read_config(location, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise UserError(f"{location} needs remote code; pass --trust-remote-code if you trust it")
        raise UserError(f"{location}: unknown or unreadable model config ({e})") from None
    except OSError as e:
        why = str(e).splitlines()[0].rstrip(".")
        if Path(location).exists():  # a local folder: no download was involved
            raise UserError(f"could not load {location}: {why}; fix the folder's config.json or "
                            "pass another model") from None
        from huggingface_hub import constants
        if constants.HF_HUB_OFFLINE:
            raise UserError(f"{str(location)!r} is not a local folder or file, and the hub "
                            f"({constants.ENDPOINT}) cannot be reached (or HF_HUB_OFFLINE is set) "
                            "and its cache lacks it; check the path, or use a local folder or a "
                            ".gguf") from None
        raise UserError(f"could not load {str(location)!r}: {why}; check the hub id, or use a "
                        "local folder or a .gguf") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "sentencepiece.bpe.model", "spiece.model", "tokenizer.model")


def has_tokenizer_files(folder) -> bool:
    return any((Path(folder) / f).exists() for f in TOKENIZER_FILES)


def load_tokenizer(location, spec: str, *, local: bool, trust_remote_code: bool = False):
    """The tokenizer of a hub id or folder; None for a local folder without tokenizer files.
    Files that do not load (a missing sentencepiece, a broken tokenizer.json) or that load into
    a tokenizer that cannot tokenize (a tokenizer_config.json alone, a GGUF without tokenizer
    metadata) are a one-line error naming the cause, not transformers' traceback."""
    from transformers import AutoTokenizer

    if local and not has_tokenizer_files(location):
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as e:
        why = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise UserError(f"could not load the tokenizer of {spec!r}: {why}; fix its files or save "
                        "it again (tokenizer.save_pretrained(folder))") from None
    try:
        ids = tokenizer("The quick brown fox", add_special_tokens=False)["input_ids"]
    except Exception:  # noqa: BLE001 -- the tokenizers library raises plain Exceptions
        ids = []
    if not ids or all(i == tokenizer.unk_token_id for i in ids):
        raise UserError(f"the tokenizer of {spec!r} turns text into no tokens (its vocabulary is "
                        "missing); a folder needs its whole tokenizer "
                        "(tokenizer.save_pretrained(folder)), a GGUF its tokenizer metadata")
    return tokenizer
