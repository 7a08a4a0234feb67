"""Loading one tensor-parallel rank's shard without a whole copy of the model in memory.

A float decoder in a local safetensors folder (a hub download, a converted GGUF) is built on the
meta device (memfit.stream's builder), its replicated tensors are read (embedding, final norm,
head), and then each block in turn: its tensors read (memfit.io.stream.CheckpointIndex, one
tensor at a time from the files' memory maps), checksummed, split by memfit.parallel.tp's plan
into this rank's shards, the whole tensors dropped. A rank's peak is then what it keeps plus one
whole block, not the whole model as with load-then-split (measured in benchmarks/RESULTS.md).

memfit's own packed folders and compressed-tensors folders still load whole and then split
(their modules are built by memfit.io.save from whole tensors; they are also 4-8x smaller), and
so does any spec this loader does not take: `load_rank` returns None for them.
"""

from __future__ import annotations

import torch

from memfit.models import Loaded, checked_tokenizer


def streamable(spec: str) -> bool:
    """True for a local folder of float safetensors weights of a decoder (not a memfit or
    compressed-tensors folder)."""
    from memfit.archs import arch_for
    from memfit.io.checkpoint import read_config
    from memfit.io.export_ct import is_memfit_ct
    from memfit.stream import local_folder

    folder = local_folder(spec)
    if folder is None or (folder / "memfit.json").exists() or is_memfit_ct(folder) \
            or not any(folder.glob("*.safetensors")):
        return False
    config = read_config(folder, trust_remote_code=False)
    return getattr(config, "quantization_config", None) is None \
        and arch_for(config).kind == "decoder"


def checksums(tensors) -> torch.Tensor:
    """(n,) float64 sums of `tensors`: what ranks compare to know they read the same model."""
    return torch.tensor([float(t.detach().double().sum()) for t in tensors], dtype=torch.float64)


@torch.no_grad()
def load_rank(spec: str, split_block, *, dtype=None,
              device: str = "cpu") -> tuple[Loaded, dict, torch.Tensor] | None:
    """This rank's model read block by block, each block passed to `split_block(block, config)`
    (which replaces its linears with this rank's shards and returns the rank's part:
    memfit.parallel.tp) as soon as it is read -> (Loaded, the part, checksums of every tensor
    read), or None when `spec` is not a folder this loader takes (`streamable`) or its tensor
    names are not the model's own (transformers' loader renames them)."""
    from memfit.eval.memory import steady_malloc, trim_heap
    from memfit.io.checkpoint import pick_dtype
    from memfit.stream import _load, _tensor_keys, local_folder, meta_model, read_outer

    if not streamable(spec):
        return None
    if device == "cpu":
        steady_malloc()  # each whole tensor its own mapping, handed back when dropped
    folder = local_folder(spec)
    torch_dtype = pick_dtype(dtype, device)
    index, model, arch, blocks, prefix, tied = meta_model(folder, torch_dtype)
    if any(k not in index for k in model.state_dict() if k not in tied):
        return None  # names transformers' loader would rename: let it load the whole model
    outer = read_outer(model, index, prefix, tied, torch_dtype, folder)
    state = model.state_dict()
    sums = [checksums(state[k] for k in outer)]
    part = None
    for i, block in enumerate(blocks):
        keys = _tensor_keys(model, f"{prefix}{i}.", tied)
        _load(model, index, keys, torch_dtype, folder)
        sums.append(checksums(block.state_dict().values()))
        part = split_block(block, model.config)
        block.to(device)
        trim_heap()  # the whole block's freed tensors
    model.to(device)
    tokenizer = checked_tokenizer(folder, spec, model.config)
    return Loaded(model=model, tokenizer=tokenizer, arch=arch, source=str(folder)), part, \
        torch.cat(sums)
