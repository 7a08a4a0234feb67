"""Split a model that does not fit one device: whole blocks placed over the devices the user
names, in that order, the rest offloaded to CPU RAM or to disk, sized by memfit's memory model
and run by accelerate's hooks (`accelerate.dispatch_model`, no home-made engine).

    memfit inspect  MODEL --place cuda:0=20GB,cuda:1=20GB,cpu   # what each device will hold
    memfit eval     MODEL --place cpu=300MB,disk                # CPU only, blocks read from disk
    memfit generate MODEL --place cpu=300MB,disk

A GPU in the description keeps at least one part (the first): with every part offloaded,
accelerate would leave the model where its weights are and the CPU would compute it. Verified on
one H200 (benchmarks/RESULTS.md, issue 13 part 2): a 1.2B bf16 Llama split cuda:0/cpu and
cuda:0/cpu/disk generated the whole model's tokens.

The description is a comma-separated list, filled in order: `cuda:N=SIZE` (or `cuda=SIZE` for
cuda:0), `cpu=SIZE` or `cpu` (what this process may still use), `disk` (last; an offload
folder, read again at every forward). The model's parts go in their forward order (embeddings,
blocks, final norm and head) to the first device with room. Accelerators compute their own
blocks; blocks on `cpu` (when an accelerator is listed) or on `disk` are offloaded: they stay
there and are copied to the first listed compute device, one module at a time, for their
forward. With no accelerator the CPU computes everything.

A device's share, as the plan prints it: the tensors of the parts it holds (packed modules at
their stored size; on a CPU that computes them, plus the prepared kernel layout their forward
caches), the KV cache of the layers it computes at `context` x `batch` (exact, as
`memfit inspect`), on a computing device the prefill's activation peak (the estimate of
`memfit inspect`), and on the device that computes offloaded parts the largest of them, staged
there during its forward. The runtime itself (Python, torch, the CUDA context) is outside it.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from memfit.archs import arch_for, block_list
from memfit.errors import UserError
from memfit.eval.memory import (
    activation_peak_estimate,
    available_memory,
    cached_tokens,
    cpu_layout_bytes,
    human_bytes,
    kv_bytes_per_token,
)


@dataclass(frozen=True)
class Device:
    name: str               # "cuda:0", "cpu" or "disk"
    budget: int | None      # bytes; None: no limit (disk)

    @property
    def computes(self) -> bool:
        return self.name.startswith("cuda")


def parse_devices(text: str) -> list[Device]:
    """'cuda:0=20GB,cpu=64GB,disk' -> [Device, ...] (checked against this machine)."""
    from memfit.plan.target import parse_size

    out: list[Device] = []
    for item in (t.strip() for t in str(text).split(",")):
        if not item:
            continue
        name, _, size = item.partition("=")
        name = name.strip().lower()
        if name == "cuda":
            name = "cuda:0"
        if name == "disk":
            if size:
                raise UserError(f"--place: disk takes no size ({item!r}); write just 'disk'")
            budget = None
        elif name == "cpu":
            budget = parse_size(size) if size else available_memory()
            if budget is None:
                raise UserError("--place: cannot tell how much memory this process may use; "
                                "give the CPU a size, e.g. cpu=16GB")
        elif name.startswith("cuda:") and name[5:].isdigit():
            if not size:
                raise UserError(f"--place: give {name} a size, e.g. {name}=20GB")
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if int(name[5:]) >= n:
                raise UserError(f"--place names {name} but this machine has {n} CUDA device(s); "
                                "name only devices torch can see")
            budget = parse_size(size)
        else:
            raise UserError(f"--place: cannot read {item!r}; use cuda:N=SIZE, cpu[=SIZE] or "
                            "disk, comma-separated, e.g. cuda:0=20GB,cpu")
        if any(d.name == name for d in out):
            raise UserError(f"--place names {name} twice; name each device once")
        if out and out[-1].name == "disk":
            raise UserError("--place: disk must come last (it holds whatever fits nowhere else)")
        out.append(Device(name, budget))
    if not out:
        raise UserError("--place is empty; e.g. --place cuda:0=20GB,cpu or --place cpu=2GB,disk")
    return out


@dataclass
class Share:
    device: Device
    parts: list[str] = field(default_factory=list)
    weights: int = 0
    kv: int = 0
    activations: int = 0
    staging: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.activations + self.staging


@dataclass
class Placement:
    shares: list[Share]
    device_map: dict[str, str]     # part name -> device name, as accelerate takes it
    main: str                       # the device that computes offloaded parts (and the input)
    context: int
    batch: int

    def table(self) -> str:
        head = f"{'device':<8}{'budget':>11}{'weights':>11}{'KV':>11}{'activ.':>11}" \
               f"{'staging':>11}{'total':>11}  parts"
        rows = [head]
        for s in self.shares:
            budget = "-" if s.device.budget is None else human_bytes(s.device.budget)
            role = "" if not s.parts else (
                " (computes)" if s.device.name == self.main else
                (" (offloaded to " + self.main + ")" if not s.device.computes else ""))
            rows.append(f"{s.device.name:<8}{budget:>11}{human_bytes(s.weights):>11}"
                        f"{human_bytes(s.kv):>11}{human_bytes(s.activations):>11}"
                        f"{human_bytes(s.staging):>11}{human_bytes(s.total):>11}  "
                        f"{_span(s.parts)}{role}")
        rows.append(f"at context {self.context} x batch {self.batch}; the runtime itself (Python, "
                    "torch, CUDA context) is not counted")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {"main": self.main, "context": self.context, "batch": self.batch,
                "devices": [{"device": s.device.name, "budget": s.device.budget,
                             "parts": s.parts, "weights": s.weights, "kv": s.kv,
                             "activations": s.activations, "staging": s.staging,
                             "total": s.total} for s in self.shares]}


def _span(parts: list[str]) -> str:
    if len(parts) <= 3:
        return ", ".join(parts) or "-"
    return f"{parts[0]} ... {parts[-1]} ({len(parts)} parts)"


def _parts(model: nn.Module) -> tuple[list[str], dict[str, int]]:
    """The model's parts in forward order (every module beside the block list on the way down
    to it, then each block) and {part: block index}."""
    blocks = block_list(model, arch_for(model.config))
    path = next(n for n, m in model.named_modules() if m is blocks)
    before, after, index = [], [], {}

    def walk(mod: nn.Module, prefix: str, seen_blocks: bool) -> bool:
        for name, child in mod.named_children():
            full = f"{prefix}{name}"
            if child is blocks:
                for i, _ in enumerate(child):
                    index[f"{full}.{i}"] = i
                seen_blocks = True
            elif path.startswith(full + "."):
                seen_blocks = walk(child, full + ".", seen_blocks)
            elif any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
                (after if seen_blocks else before).append(full)
        return seen_blocks

    walk(model, "", False)
    return before + list(index) + after, index


def _tensors(mod: nn.Module):
    return list(mod.parameters()) + list(mod.buffers())


def kv_per_layer(config, context: int, batch: int, dtype: torch.dtype, kv_format=None) -> list[int]:
    """Exact KV-cache bytes of each layer at `context` x `batch` (memfit inspect's figures):
    sliding-window layers counted at the whole prompt, which they hold right after a prefill."""
    from memfit.archs import kv_shape

    n, kv_heads, head_dim = kv_shape(config)
    per_token = kv_bytes_per_token(config, dtype) // n
    out = []
    for t in cached_tokens(config, context):
        if t == context and kv_format is not None:
            from memfit.kvcache import quantized_kv_bytes
            out.append(quantized_kv_bytes(kv_format, tokens=context, batch=batch,
                                          kv_heads=kv_heads, head_dim=head_dim,
                                          dtype_bytes=dtype.itemsize))
        else:
            out.append(per_token * batch * (context if t else 0))
    return out


def plan_placement(model: nn.Module, devices: list[Device], *, context: int = 2048,
                   batch: int = 1, kv_format=None) -> Placement:
    """Assign the model's parts to `devices` in order (see the module docstring)."""
    parts, index = _parts(model)
    dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.float32)
    kv_layer = kv_per_layer(model.config, context, batch, dtype, kv_format)
    kv = {p: kv_layer[i] for p, i in index.items()}
    act = activation_peak_estimate(model.config, context, batch, dtype)
    accelerators = [d for d in devices if d.computes]
    main = accelerators[0].name if accelerators else "cpu"

    def computes(d: Device) -> bool:
        return d.computes or (not accelerators and d.name == "cpu")

    seen: set[int] = set()
    size, prepared = {}, {}
    for p in parts:  # a tied tensor counts once, with the first part that holds it
        mod = model.get_submodule(p)
        size[p] = sum(t.nbytes for t in _tensors(mod) if id(t) not in seen)
        seen.update(id(t) for t in _tensors(mod))
        prepared[p] = cpu_layout_bytes(mod)
    tied = _tied_parts(model, parts)

    # the device computing offloaded parts also holds their KV cache and stages the largest of
    # them, so the more it keeps itself the more room offloading leaves it: try the most parts
    # it could hold first, then one fewer, until its whole share fits
    def assign(cap: int):
        shares = [Share(d) for d in devices]
        where: dict[str, int] = {}
        i = 0
        for p in parts:
            if p in tied:  # a head tied to the embeddings goes where they are
                where[p] = where[tied[p]]
                shares[where[p]].parts.append(p)
                continue
            while i < len(shares):
                s, d = shares[i], shares[i].device
                w = size[p] + (prepared[p] if computes(d) and d.name == "cpu" else 0)
                k = kv.get(p, 0) if computes(d) else 0
                a = act if computes(d) and not s.parts else 0
                full = d.name == main and len(s.parts) >= cap
                if not full and (d.budget is None or s.total + w + k + a <= d.budget):
                    s.weights, s.kv, s.activations = s.weights + w, s.kv + k, s.activations + a
                    s.parts.append(p)
                    where[p] = i
                    break
                i += 1
            else:
                return None
        m = next(s for s in shares if s.device.name == main)
        off = [p for p in parts if p not in tied and not computes(shares[where[p]].device)]
        m.activations = act
        m.kv += sum(kv.get(p, 0) for p in off)
        m.staging = max((size[p] for p in off), default=0)  # offloaded: no layout (_finish)
        if m.device.budget is not None and m.total > m.device.budget:
            return None
        return shares, where

    if not any(d.name == main for d in devices):
        raise UserError("--place lists no device that computes; add cpu or a cuda device")
    found = None
    # an accelerator keeps at least one part: with none, accelerate would run the model where
    # its weights are (the CPU), not on the accelerator the plan counted on
    for cap in range(len(parts), -1 if main == "cpu" else 0, -1):
        found = assign(cap)
        if found is not None:
            break
    if found is None:
        if assign(len(parts) + 1) is None and "disk" not in [d.name for d in devices]:
            raise UserError(_no_room(size, devices, sum(kv_layer), act))
        least = sum(kv_layer) + act + max(size[p] for p in parts)
        own = "" if main == "cpu" else " and its first part"
        least += 0 if main == "cpu" else size[parts[0]]
        raise UserError(f"--place: {main} computes the offloaded parts and needs at least "
                        f"{human_bytes(least)} for the KV cache, activations, the largest "
                        f"part staged{own} at --context {context}: give {main} more memory or "
                        "use a shorter --context")
    shares, where = found
    return Placement(shares=shares, device_map={p: shares[where[p]].device.name for p in parts},
                     main=main, context=context, batch=batch)


def _tied_parts(model: nn.Module, parts: list[str]) -> dict[str, str]:
    """{part: earlier part} for parts whose every tensor an earlier part holds (a tied head)."""
    owner: dict[int, str] = {}
    out = {}
    for p in parts:
        ts = [t for t in model.get_submodule(p).parameters()]
        if ts and all(id(t) in owner for t in ts):
            out[p] = owner[id(ts[0])]
        for t in ts:
            owner.setdefault(id(t), p)
    return out


def _no_room(size: dict, devices: list[Device], kv: int, act: int) -> str:
    need = sum(size.values()) + kv + act
    have = sum(d.budget for d in devices if d.budget is not None)
    return (f"--place: the model does not fit on the devices: it needs about {human_bytes(need)} "
            f"(weights, KV cache and activations) and they give {human_bytes(have)}: give more "
            "memory, add 'disk' at the end, or compress the model")


def _offload_dir(placement: Placement) -> str | None:
    """A temporary offload folder (removed at exit) when `placement` puts parts on disk, else
    None; also quiets accelerate's note that offloaded parameters sit on the meta device."""
    import logging

    logging.getLogger("accelerate.big_modeling").setLevel(logging.ERROR)
    if "disk" not in placement.device_map.values():
        return None
    d = tempfile.mkdtemp(prefix="memfit-offload-")
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


def place_model(model: nn.Module, placement: Placement) -> nn.Module:
    """Dispatch `model` (loaded on the CPU) by `placement` with accelerate's hooks. Parts on
    `disk` are written to a temporary offload folder, removed when the process exits."""
    from accelerate import dispatch_model

    dispatch_model(model, device_map=_hf_map(placement), main_device=placement.main,
                   offload_dir=_offload_dir(placement),
                   offload_buffers=True)  # packed codes are buffers: offload them too
    return _finish(model, placement)


def _hf_map(placement: Placement) -> dict:
    """The device map as transformers and accelerate spell it: a GPU by its index."""
    return {p: int(d[5:]) if d.startswith("cuda:") else d for p, d in placement.device_map.items()}


def _finish(model: nn.Module, placement: Placement) -> nn.Module:
    """Mark `model` as placed; offloaded packed modules prepare no kernel layout (it would stay
    resident after their weights went back to the store; made and dropped at each call, it cost
    several times the tiled path it saves): they take the tiled path."""
    for name, dev in placement.device_map.items():
        if dev == "disk" or (dev == "cpu" and placement.main != "cpu"):
            for m in model.get_submodule(name).modules():
                if hasattr(m, "keep_layout"):
                    m.keep_layout = False
    model.memfit_placement = placement
    return model.eval()


def load_placed(spec: str, devices: list[Device], *, dtype=None, context: int = 2048,
                batch: int = 1, kv_format=None, trust_remote_code: bool = False,
                dispatch: bool = True):
    """Load model `spec` split over `devices` -> (memfit.models.Loaded or None, Placement).

    A transformers folder (or hub id, or a converted GGUF) is planned on its meta-device
    skeleton and then loaded by transformers straight onto the planned devices (disk parts
    into the offload folder), so the whole model never sits in RAM. A memfit folder is loaded
    on the CPU first (its packed modules are memfit's own) and then dispatched: its packed
    bytes must fit in RAM once. With `dispatch=False` nothing is loaded beyond what planning
    needs and the first item is None."""
    from transformers import AutoModel, AutoModelForCausalLM

    from memfit.eval.memory import steady_malloc
    from memfit.io.checkpoint import Loaded, check_safetensors, pick_dtype
    from memfit.io.export_ct import is_memfit_ct
    from memfit.models import _convert_gguf, checked_tokenizer, load_model, resolve, skeleton

    main = next((d.name for d in devices if d.computes), "cpu")
    torch_dtype = pick_dtype(dtype, main)
    steady_malloc()  # offloaded weights come and go every forward: give their pages back
    kind, location = resolve(spec)
    if kind == "gguf":
        location = _convert_gguf(location)
    plan = {"context": context, "batch": batch, "kv_format": kv_format}
    if kind != "hub" and ((Path(location) / "memfit.json").exists()
                          or is_memfit_ct(Path(location))):
        m = load_model(str(location), dtype=torch_dtype, device="cpu",
                       trust_remote_code=trust_remote_code)
        placement = plan_placement(m.model, devices, **plan)
        if not dispatch:
            return None, placement
        place_model(m.model, placement)  # in place: m.model is now dispatched
        return m, placement
    if kind != "hub":
        check_safetensors(Path(location))  # a truncated file, or pickles only: one line
    skel, arch, _ = skeleton(str(location) if kind != "hub" else spec,
                             trust_remote_code=trust_remote_code, dtype=torch_dtype)
    cls = AutoModelForCausalLM if arch.kind == "decoder" else AutoModel
    placement = plan_placement(skel, devices, **plan)
    if not dispatch:
        return None, placement
    tokenizer = checked_tokenizer(location, spec, skel.config, local=kind != "hub",
                                  trust_remote_code=trust_remote_code)
    try:
        model = cls.from_pretrained(location, dtype=torch_dtype, use_safetensors=True,
                                    device_map=_hf_map(placement),
                                    offload_folder=_offload_dir(placement),
                                    offload_buffers=True, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UserError(f"could not load {spec!r}: {str(e).splitlines()[0]}") from None
    return Loaded(model=_finish(model, placement), tokenizer=tokenizer, arch=arch,
                  source=str(location)), placement


def measured_peaks(placement: Placement) -> dict[str, int]:
    """Peak bytes each computing CUDA device allocated (torch's allocator) and this process's
    peak RSS, for comparing with the plan."""
    from memfit.eval.memory import rss_peak_bytes

    out = {d.device.name: torch.cuda.max_memory_allocated(d.device.name)
           for d in placement.shares if d.device.computes}
    out["cpu (process peak RSS)"] = rss_peak_bytes()
    return out
