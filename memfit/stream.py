"""`memfit compress --low-memory`: compress a model larger than memory, one block at a time.

The model is built from its config with every parameter on the meta device (buffers such as the
rotary frequencies are computed as usual). The embedding, the final norm and the head are read
from the checkpoint; then for each block: read only its tensors (memfit.io.stream, from the
safetensors file or its shards), compress it with the same calls and the same calibration flow
as `memfit.api.compress_` (capture, statistics, replacement, propagation), append its stored
tensors to the output, move it back to the meta device. The smoke check runs along: its windows
go through each original block and through the compressed block before the block is freed, and
the two final hidden states are scored as `memfit.eval.smoke.Reference` does.

Peak memory: the non-block tensors (embedding, head), one block in the compute dtype with the
algorithm's working set (a GPTQ Hessian, ...), the calibration activations (on disk with
`--offload disk`) and the smoke windows' hidden states; not the model. The artifact is the
normal path's, byte for byte (tests/core/test_stream.py).

Not streamed: recipes that need the whole model at once (structured block dropping and width
pruning rank every block first; OWL measures every block before choosing sparsities), encoders,
the compressed-tensors format (written from a whole model), hub ids (download the folder
first), and the resume folder (a killed run starts again). A GGUF source is converted once into
memfit's safetensors cache as for any command (one tensor at a time: memfit.io.stream); the
compression then streams from that cache.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from memfit.errors import UserError
from memfit.moe import unfuse_experts_

AUTO_FRACTION = 0.6  # stream when the weights exceed this share of the memory available
DENSE = "auto"  # dense tensors stored as memfit.io.save.save stores them by default


def whole_model_reason(recipe, plan) -> str | None:
    """Why `recipe` cannot be compressed one block at a time, or None."""
    from memfit.api import _owl_part

    if recipe.structured:
        return ("structured pruning ranks every block (or channel) of the whole model before "
                "it removes any")
    if any(_owl_part(s) for p in plan for s in p.values()):
        return "OWL measures the outliers of every block before it picks any block's sparsity"
    return None


def local_folder(spec: str) -> Path | None:
    """The safetensors folder a model spec streams from (a GGUF's converted cache), or None
    for a hub id or a memfit/compressed folder."""
    from memfit.models import _convert_gguf, resolve

    kind, location = resolve(spec)
    if kind == "hub":
        return None
    if kind == "gguf":
        location = _convert_gguf(location)
    return Path(location)


def should_stream(spec: str, dtype: torch.dtype) -> tuple[bool, str]:
    """The automatic choice: stream when the weights (in the compute dtype) exceed
    AUTO_FRACTION of the memory available -> (stream?, a one-line reason)."""
    from memfit.eval.memory import available_memory
    from memfit.io.stream import CheckpointIndex

    folder = local_folder(spec)
    free = available_memory()
    if folder is None or free is None or not any(folder.glob("*.safetensors")):
        return False, ""
    need = CheckpointIndex(folder).nbytes(dtype)
    if need <= AUTO_FRACTION * free:
        return False, ""
    return True, (f"the weights take {need / 2**30:.2f} GiB, more than {AUTO_FRACTION:.0%} of "
                  f"the {free / 2**30:.2f} GiB available: compressing one block at a time "
                  "(--low-memory)")


@contextlib.contextmanager
def params_on_meta():
    """Every parameter registered inside goes to the meta device; buffers stay where they are
    made (rotary frequencies are computed, not read)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


@contextlib.contextmanager
def passthrough(blocks):
    """Blocks whose forward returns its input: the model's forward runs to the last block's
    input (block_kwargs) or past it (the final norm) with every block still on meta."""
    def identity(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    for b in blocks:
        b.forward = identity
    try:
        yield
    finally:
        for b in blocks:
            del b.forward


def _build(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, GenerationConfig

    from memfit.archs import arch_for
    from memfit.io.checkpoint import read_config

    config = read_config(folder, trust_remote_code=False)
    arch = arch_for(config)
    if arch.kind != "decoder":
        raise UserError(f"--low-memory compresses decoders; {folder} is an encoder (small "
                        "enough to compress without it)")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # what from_pretrained(dtype=...) builds in
    try:
        with params_on_meta():
            model = AutoModelForCausalLM.from_config(config)
            unfuse_experts_(model)  # memfit.moe: one linear per expert
    finally:
        torch.set_default_dtype(default)
    if (folder / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval(), arch


def _load(model, index, keys: list[str], dtype, folder: Path) -> None:
    from memfit.io.save import _set_tensor

    found = {k: index.find(k) for k in keys}
    missing = [k for k, n in found.items() if n is None]
    if missing:
        raise UserError(f"{folder} has no tensor {missing[0]} (of {len(missing)} the model "
                        "expects); its names differ from the model's: --low-memory reads "
                        "checkpoints whose tensor names are the model's own")
    for k, n in found.items():
        _set_tensor(model, k, index.read(n, dtype))


def _tensor_keys(model, under: str, tied: dict) -> list[str]:
    return [k for k in model.state_dict() if k.startswith(under) and k not in tied]


def _final_hidden(model, blocks, x: torch.Tensor) -> torch.Tensor:
    """The base model's output (final norm applied) for hidden states `x` leaving the last
    block: the forward with every block passing its input through and the first given `x`."""
    from memfit.eval.lm import final_hidden

    handle = blocks[0].register_forward_pre_hook(lambda _m, args, kw: ((x, *args[1:]), kw)
                                                 if args else (args, {**kw, "hidden_states": x}),
                                                 with_kwargs=True)
    ids = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
    try:
        with passthrough(blocks):
            h = final_hidden(model, ids)
    finally:
        handle.remove()
    assert h.shape == x.shape, "the model's forward changed the passed-through hidden states"
    return h


class _Smoke:
    """The smoke windows' hidden states through the original blocks and the compressed ones."""

    def __init__(self, model, blocks, windows, offload: str):
        from memfit.calib import capture_inputs

        self.windows = windows
        with passthrough(blocks):
            self.ref, self.kwargs = capture_inputs(model, blocks, windows, batch=1,
                                                   offload=offload, device="cpu")
        self.head = model.get_output_embeddings()  # the original head object (compression
        self.offload = offload                     # replaces modules, never mutates them)
        self.new = None

    def start_compressed(self, model, blocks) -> None:
        """Capture the compressed model's inputs (after a quantized embedding, if any)."""
        from memfit.calib import capture_inputs

        with passthrough(blocks):
            self.new, _ = capture_inputs(model, blocks, self.windows, batch=1,
                                         offload=self.offload, device="cpu")

    @torch.inference_mode()
    def check(self, model, blocks) -> dict:
        import math

        from memfit.eval.smoke import window_sums

        sums = {"nll": 0.0, "ref_nll": 0.0, "kld": 0.0, "tokens": 0}
        for i in range(len(self.windows)):
            got = window_sums(model, self.windows[i:i + 1], _final_hidden(model, blocks, self.new[i]),
                              self.head, _final_hidden(model, blocks, self.ref[i]))
            for k in sums:
                sums[k] += got[k]
        nll, kld, tokens = sums["nll"], sums["kld"], sums["tokens"]
        finite = math.isfinite(nll) and math.isfinite(kld)
        return {"perplexity": math.exp(nll / tokens) if finite else float("nan"),
                "ref_perplexity": math.exp(sums["ref_nll"] / tokens),
                "kld": kld / tokens if finite else float("nan"), "tokens": tokens,
                "windows": len(self.windows), "seq_len": int(self.windows.shape[1])}


@dataclass
class _Source:
    """The streamed model: its checkpoint, the meta-device model with its non-block tensors
    read, and the plan."""

    folder: Path
    index: object
    dtype: torch.dtype
    model: nn.Module
    arch: object
    blocks: nn.ModuleList
    prefix: str
    plan: list[dict]
    tied: dict
    bytes_before: int


def meta_model(folder: Path, dtype: torch.dtype):
    """The checkpoint's index and its model built on meta -> (index, model, arch, blocks,
    prefix of the block keys, tied {target: source} not stored apart). Nothing read yet."""
    from memfit.api import _module_prefix
    from memfit.archs import block_list
    from memfit.io.checkpoint import check_safetensors
    from memfit.io.stream import CheckpointIndex

    check_safetensors(folder)
    index = CheckpointIndex(folder)
    model, arch = _build(folder, dtype)
    blocks = block_list(model, arch)
    prefix = _module_prefix(model, blocks) + "."
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    tied = {t: s for t, s in tied.items() if t not in index}  # stored twice: read both
    return index, model, arch, blocks, prefix, tied


def read_outer(model, index, prefix: str, tied: dict, dtype, folder: Path) -> list[str]:
    """Read the tensors outside the blocks (embeddings, norm, head), retie -> their keys."""
    from memfit.io.save import retie

    outer = [k for k in model.state_dict() if not k.startswith(prefix) and k not in tied]
    _load(model, index, outer, dtype, folder)
    retie(model, tied)
    return outer


def _open(spec: str, recipe, o) -> _Source:
    """Refuse what cannot stream, then build the model on meta and read its non-block tensors."""
    from memfit.api import plan_specs
    from memfit.eval.memory import weight_table
    from memfit.io.checkpoint import pick_dtype

    if o.format == "compressed-tensors":
        raise UserError("--low-memory writes memfit's format only (compressed-tensors is written "
                        "from a whole model); use --format memfit or auto")
    if torch.device(o.device).type != "cpu":
        raise UserError("--low-memory runs on the CPU (one block at a time in RAM); use "
                        "--device cpu, or drop --low-memory")
    folder = local_folder(spec)
    if folder is None:
        raise UserError(f"--low-memory reads a local folder; download {spec} first "
                        "(huggingface-cli download) and pass its folder")
    dtype = pick_dtype(o.dtype, o.device)
    index, model, arch, blocks, prefix, tied = meta_model(folder, dtype)
    plan = plan_specs(model, recipe, arch)
    why = whole_model_reason(recipe, plan)
    if why:
        raise UserError(f"--low-memory cannot run this recipe: {why}; drop --low-memory "
                        "(the model must then fit in memory)")
    src = _Source(folder, index, dtype, model, arch, blocks, prefix, plan, tied,
                  weight_table(model)["weight_bytes"])
    read_outer(model, index, prefix, tied, dtype, folder)
    return src


def _compress_blocks(src: _Source, recipe, store, kwargs, smoke: _Smoke, writer, o) -> dict:
    """Read, compress, write and free every block -> {"modules", "buffers", "log", "bytes",
    "seconds"}."""
    from tqdm import tqdm

    from memfit.api import _check_finite, _compress_block
    from memfit.calib import propagate
    from memfit.eval.memory import trim_heap
    from memfit.io.save import _fixed_keys, _store_dense

    got = {"modules": {}, "buffers": {}, "log": [], "bytes": 0}
    t0 = time.perf_counter()
    plan = src.plan
    for i, block in tqdm(list(enumerate(src.blocks)), desc="compress", unit="block",
                         disable=not o.progress):
        under = f"{src.prefix}{i}."
        _load(src.model, src.index, _tensor_keys(src.model, under, src.tied), src.dtype,
              src.folder)
        for n, s in plan[i].items():
            if s is not None:
                _check_finite(f"{under}{n}", block.get_submodule(n))
        propagate(block, smoke.ref, smoke.kwargs[i])
        done = _compress_block(block, src.arch, plan[i], store, kwargs[i], got["log"],
                               recipe.sequential)
        propagate(block, smoke.new, smoke.kwargs[i])
        if store is not None and any(s is not None and s.needs_data for p in plan[i + 1:]
                                     for s in p.values()):
            propagate(block, store, kwargs[i])
        got["bytes"] += _tensor_bytes(block)
        mine = {f"{under}{n}": d for n, d in done.items()}
        got["modules"].update(mine)
        state = {f"{under}{k}": v for k, v in block.state_dict().items()}
        for k, t in _store_dense(state, _fixed_keys(mine), DENSE).items():
            writer.add(k, t)
        persistent = set(block.state_dict())
        got["buffers"].update({f"{under}{n}": b.detach().contiguous()
                               for n, b in block.named_buffers() if n not in persistent})
        block.to("meta")  # free: the block keeps its structure, not its tensors
        del state
        trim_heap()  # the freed block's holes would stay resident under small live objects
    got["seconds"] = time.perf_counter() - t0
    return got


def stream_compress(spec: str, recipe, out: Path, o, *, say, refuse) -> dict:
    """compress_to's work one block at a time (see the module docstring); `recipe` has the
    options' calibration settings already, `o` is the CompressOptions; `say(text)` prints a
    progress line, `refuse(check)` raises when the smoke check failed (memfit.compress owns
    both). -> the report."""
    from memfit.calib import capture_inputs
    from memfit.calib.data import calibration_windows, token_windows
    from memfit.eval.memory import rss_peak_bytes, steady_malloc
    from memfit.io.save import describe_modules
    from memfit.io.stream import StreamWriter
    from memfit.methods import quantize_embeddings_
    from memfit.models import checked_tokenizer

    steady_malloc()  # as memfit's loaders do: each large tensor its own mapping, given back
    src = _open(spec, recipe, o)
    model, blocks, plan = src.model, src.blocks, src.plan
    tokenizer = checked_tokenizer(src.folder, spec, model.config)
    calib = recipe.calib
    windows = calibration_windows(tokenizer, calib) if recipe.needs_data else None
    smoke_src = calib.data if calib.data in ("builtin", "wikitext2", "c4") else "builtin"
    smoke = _Smoke(model, blocks, token_windows(tokenizer, smoke_src, "eval",
                                                seq_len=o.smoke_seq_len,
                                                max_windows=o.smoke_windows, bos=calib.bos),
                   calib.offload)
    store, kwargs = None, [None] * len(blocks)
    if any(s is not None and s.needs_data for p in plan for s in p.values()):
        with passthrough(blocks):
            store, kwargs = capture_inputs(model, blocks, windows, offload=calib.offload,
                                           device="cpu")
    tables = recipe.embeddings is not None or recipe.head is not None
    embedding_bytes = quantize_embeddings_(model, recipe.embeddings, recipe.head) if tables \
        else None
    smoke.start_compressed(model, blocks)
    outer = describe_modules(model)  # a quantized embedding or head; the blocks are on meta
    writer = StreamWriter(out.with_name(f"{out.name}.stream-{os.getpid()}.data"))
    try:
        got = _compress_blocks(src, recipe, store, kwargs, smoke, writer, o)
        say(f"smoke check: {len(smoke.windows)} windows x {o.smoke_seq_len} tokens against "
                "the original")
        check = smoke.check(model, blocks)
        report = {"recipe": recipe.to_dict(), "bytes_before": src.bytes_before,
                  "bytes_after": got["bytes"] + _tensor_bytes(model, skip=src.prefix),
                  "modules": sum(s is not None for p in plan for s in p.values()),
                  "blocks": len(blocks), "kept_blocks": None, "owl_sparsities": None,
                  "calib_windows": 0 if windows is None else int(windows.shape[0]),
                  "calib_seq_len": 0 if windows is None else int(windows.shape[1]),
                  "resumed_blocks": 0, "embedding_bytes": embedding_bytes,
                  "compress_seconds": got["seconds"], "layers": got["log"],
                  "mean_layer_error": _mean_error(got["log"]), "low_memory": True,
                  "smoke": {**check, "data": f"{smoke_src}:eval", "max_kld": o.max_kld}}
        refuse(check)
        note = "" if o.format == "memfit" else "memfit's format because --low-memory writes it"
        say(f"writing {out} (memfit{'; ' + note if note else ''})")
        _write(src, tokenizer, out, writer, {**got["modules"], **outer}, got["buffers"],
               recipe, report, o)
    finally:
        writer.close()
    report["format"], report["format_note"] = "memfit", note
    report["artifact_bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    report["peak_rss_bytes"] = rss_peak_bytes()
    report["out"] = str(out)
    return report


def _write(src: _Source, tokenizer, out: Path, writer, modules: dict, buffers: dict, recipe,
           report: dict, o) -> None:
    """The non-block tensors after the blocks', then the folder around them (as `save`)."""
    from memfit.io.save import (_fixed_keys, _guards, _split_state, _store_dense,
                                write_model_folder)

    model = src.model
    rest, rest_buffers, tied = _split_state(model, skip=src.prefix)
    modules = _ordered(model, modules)
    fixed = _fixed_keys(modules)
    for k in list(rest):  # one stored (cast) copy at a time
        writer.add(k, _store_dense({k: rest.pop(k)}, fixed, DENSE)[k])
    guards = _guards(model, modules)
    for g in guards:
        writer.add(g, torch.zeros(0))
    stable = ("bytes_before", "bytes_after", "modules", "kept_blocks", "calib_windows",
              "calib_seq_len", "smoke")
    write_model_folder(model, tokenizer, out, lambda path: writer.finish(path, {"format": "pt"}),
                       keys=writer.keys() - set(guards), buffers={**buffers, **rest_buffers},
                       modules=modules,
                       tied=tied, guards=guards, recipe=recipe.to_dict(),
                       extra={"source": str(src.folder),
                              "report": {k: report[k] for k in stable}},
                       overwrite=o.overwrite, dense_dtype=DENSE, side_files=None)


def _ordered(model, modules: dict) -> dict:
    """`modules` in the model's module order, as describe_modules lists them."""
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return {n: modules[n] for n in sorted(modules, key=order.__getitem__)}


def _mean_error(log: list[dict]) -> float | None:
    import math

    errors = [e["error"] for e in log if e["error"] is not None and math.isfinite(e["error"])]
    return sum(errors) / len(errors) if errors else None


def _tensor_bytes(module, skip: str | None = None) -> int:
    """The stored bytes of `module`'s distinct tensors (weight_table's weight_bytes), leaving
    out the modules under `skip`: what a meta-device block can no longer be asked."""
    from memfit.eval.memory import _leaf_owner

    return sum(t.numel() * t.element_size() for name, _, _, t in _leaf_owner(module)
               if not (skip and (name + ".").startswith(skip)))
