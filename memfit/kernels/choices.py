"""The per-shape kernel choice of memfit.kernels.triton_int, kept on disk between processes.

Why: in a fresh process the first forward of each layer shape times every candidate launch
shape (and Triton compiles each): the first decode of a packed Llama-3-8B-shaped model ran at
0.59 tok/s against 5.32 once warm (H200, benchmarks/RESULTS.md, session 7). What the timing
finds depends on the GPU and the software, not on the weights, so the winner is kept in
$MEMFIT_CACHE/kernel_choices.json (default ~/.cache/memfit) under a key naming the GPU (name,
compute capability, multiprocessor count) and the torch, Triton and memfit versions. A later
process takes it only if it is still one of the candidates and its output agrees with
dequantize + cuBLAS (checked once, as every candidate is before timing); otherwise it times
again and overwrites the entry. MEMFIT_KERNEL_CHOICES=0 neither reads nor writes the file.
JSON only; a file that does not parse is ignored (and replaced at the next write).

Before a first timing, `shortlisted` narrows the candidates with the table memfit ships
(shortlists.json, made by benchmarks/choice_table.py from a full search per key on a GPU): on a
GPU of the architecture the table was measured on, only the key's few launch shapes that came
within a margin of the best there are checked and timed (at most 4, against 51-111 for the
Llama-3-8B shapes: a 1-layer 8B-shaped int4 model's first generate on an H200 took 14.0 s
against 68.7 s, the same picks; benchmarks/RESULTS.md, session 24). Keys the table lacks, other
architectures and MEMFIT_KERNEL_SEARCH=full search everything.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import torch

FILE = "kernel_choices.json"
TABLE = Path(__file__).with_name("shortlists.json")


def enabled() -> bool:
    return os.environ.get("MEMFIT_KERNEL_CHOICES", "1") != "0"


def path() -> Path:
    """The file (MEMFIT_CACHE as memfit.models.cache_dir reads it)."""
    return Path(os.environ.get("MEMFIT_CACHE", Path.home() / ".cache" / "memfit")) / FILE


def device_key(device: torch.device) -> str:
    """The GPU and the software a timing holds for."""
    import triton
    try:
        ours = metadata.version("memfit")
    except metadata.PackageNotFoundError:  # a source tree that is not installed
        ours = "source"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        dev = f"{p.name} sm{p.major}{p.minor} x{p.multi_processor_count}"
    else:
        dev = device.type
    return f"{dev} | torch {torch.__version__} | triton {triton.__version__} | memfit {ours}"


def shape_key(key: tuple) -> str:
    """A choice key (M bucket, shape, bits, group, zero point, dtype, tile rows) as text."""
    return "|".join("x".join(map(str, k)) if isinstance(k, tuple) else str(k) for k in key)


def _read() -> dict:
    try:
        data = json.loads(path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load(device: torch.device, key: tuple) -> dict | None:
    """The stored launch shape (Config fields) for this device and key, or None."""
    if not enabled():
        return None
    hit = _read().get(device_key(device), {}).get(shape_key(key))
    return hit if isinstance(hit, dict) else None


def store(device: torch.device, key: tuple, fields: dict) -> None:
    """Record a choice (merged into the file; written to a temporary name, then renamed)."""
    if not enabled():
        return
    data = _read()
    data.setdefault(device_key(device), {})[shape_key(key)] = fields
    out = path()
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(out)
    except OSError:
        tmp.unlink(missing_ok=True)  # a read-only cache: the choice is only lost, not wrong


def arch(device: torch.device) -> str:
    """"sm90" for a compute capability 9.0 GPU ("" off CUDA): what the shipped table is keyed by."""
    if device.type != "cuda":
        return ""
    p = torch.cuda.get_device_properties(device)
    return f"sm{p.major}{p.minor}"


def _table() -> dict:
    try:
        data = json.loads(TABLE.read_text())
    except (OSError, ValueError):
        return {}
    return data.get("arch", {}) if isinstance(data, dict) else {}


def shortlisted(device_arch: str, key: tuple, cands: list) -> list:
    """The candidates the shipped table keeps for this architecture and key, in its order (best
    first); [] when it has none of them, or with MEMFIT_KERNEL_SEARCH=full."""
    if os.environ.get("MEMFIT_KERNEL_SEARCH", "") == "full" or not device_arch:
        return []
    entry = _table().get(device_arch, {}).get(shape_key(key))
    if not isinstance(entry, dict):
        return []
    by_fields = {json.dumps(asdict(c), sort_keys=True): c for c in cands}
    out = []
    for fields in entry.get("configs", []):
        try:  # fields added since the table was built take their defaults
            fields = asdict(type(cands[0])(**fields)) if cands else fields
        except TypeError:  # a field this version does not have: not a candidate
            continue
        c = by_fields.get(json.dumps(fields, sort_keys=True))
        if c is not None and c not in out:
            out.append(c)
    return out
