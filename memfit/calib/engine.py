"""The sequential, layer-by-layer calibration engine.

1. Capture the inputs of the first block for every calibration window (the model runs up to the
   first block, then stops), plus the keyword arguments the model passes to each block (attention
   mask, rotary embeddings...; they differ between sliding-window and global layers), identical
   for equal-length windows without padding.
2. For each block: hook the linears of one group at a time (true-sequential order from the arch
   table), run the block over all windows to accumulate the statistics they need, let the caller
   compress them, then move on to the next group, so later groups see the compressed outputs of
   earlier ones. Finally run the block once more: its outputs are the next block's inputs.

Peak memory is the model, one block's worth of calibration activations (N x T x hidden floats),
and the statistics of one group. With offload="disk" the activations live in a temporary folder
as safetensors and only one batch is in memory at a time.
"""

from __future__ import annotations

import inspect
import tempfile
import torch
from safetensors.torch import load_file, save_file

from memfit.calib.stats import HessianStat, InputNormStat
from memfit.configs import Needs


class _Stop(Exception):
    """Raised by the capture hook to end the forward pass at the first block."""


class ActivationStore:
    """Calibration activations (N, T, H), split in batches, in memory or on disk."""

    def __init__(self, offload: str = "memory", batch: int = 8):
        self.offload, self.batch = offload, batch
        self._mem: list[torch.Tensor] = []
        self._count = 0
        self._dir = tempfile.TemporaryDirectory(prefix="memfit-act-") if offload == "disk" else None

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._dir is None:
            return self._mem[i]
        return load_file(f"{self._dir.name}/{i}.st")["x"]

    def __setitem__(self, i: int, x: torch.Tensor) -> None:
        assert i <= self._count, "batches are stored in order"
        self._count = max(self._count, i + 1)
        if self._dir is None:
            if i == len(self._mem):
                self._mem.append(x)
            else:
                self._mem[i] = x
        else:
            save_file({"x": x.detach().cpu().contiguous()}, f"{self._dir.name}/{i}.st")

    def nbytes(self) -> int:
        """Bytes held in memory (0 when offloaded to disk)."""
        return 0 if self._dir is not None else sum(x.numel() * x.element_size() for x in self._mem)


def module_device(module: torch.nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    return next(module.buffers()).device


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


_DROP = ("past_key_values", "past_key_value", "use_cache", "output_attentions")


@torch.inference_mode()
def capture_inputs(model, blocks, windows: torch.Tensor, *, batch: int = 8,
                   offload: str = "memory", device=None) -> tuple[ActivationStore, list[dict]]:
    """Run `model` on (N, T) token windows up to blocks[0]; return its inputs, and for every
    block the keyword arguments the model really passes to it.

    Blocks may differ (Gemma 2/3 alternate sliding-window and global attention, each with its
    own mask and rotary embeddings), so one forward of a single window runs through every block
    with pre-hooks recording their kwargs. Recorded at batch 1, masks and position embeddings
    broadcast over any batch (the last batch may be smaller than the others). `device`: where
    the tokens go (default: the first parameter's; memfit.stream's blocks sit on meta)."""
    device = device or next(model.parameters()).device
    store, captured = ActivationStore(offload, batch), {}

    def first(_module, args, kwargs):
        captured["x"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(first, with_kwargs=True)
    try:
        for b, start in enumerate(range(0, len(windows), batch)):
            ids = windows[start:start + batch].to(device)
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
            store[b] = captured["x"].detach()
    finally:
        handle.remove()
    return store, block_kwargs(model, blocks, windows[:1].to(device))


@torch.inference_mode()
def block_kwargs(model, blocks, ids: torch.Tensor) -> list[dict]:
    """The arguments (minus the hidden states and cache flags) each block receives when `model`
    runs on `ids`, by name (those passed by position too); the forward stops at the last
    block's input."""
    found: list[dict | None] = [None] * len(blocks)

    def record(i):
        def hook(module, args, kwargs):
            # arguments after the hidden states passed by position (DeBERTa's attention mask)
            # are kept by name, so that a replay can pass everything as keywords
            named = dict(zip(list(inspect.signature(module.forward).parameters)[1:], args[1:]))
            found[i] = {k: v for k, v in {**named, **kwargs}.items()
                        if k != "hidden_states" and k not in _DROP}
            if i == len(blocks) - 1:
                raise _Stop
        return hook

    handles = [b.register_forward_pre_hook(record(i), with_kwargs=True)
               for i, b in enumerate(blocks)]
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    assert all(k is not None for k in found), "a block was not called by the model's forward"
    return found


def _input_stat(kind, in_features: int, device):
    """The statistic object for a memfit.configs.Needs value."""
    return {Needs.HESSIAN: HessianStat, Needs.NORMS: InputNormStat}[kind](in_features, device=device)


@torch.inference_mode()
def collect_stats(block, modules: dict[str, torch.nn.Module] | list[dict[str, torch.nn.Module]],
                  needs: dict[str, Needs | None], store: ActivationStore, kwargs: dict) -> dict:
    """Run `block` over all stored batches with hooks on `modules`; return {name: statistic}.

    `modules` is one group, or a list of groups collected in the same passes (for statistics of
    the block as it is, e.g. sequential "block"). The members of a group see the same input: one
    statistic per kind is accumulated (on the first member that needs it) and shared by all.
    `needs[name]` is a memfit.configs.Needs (NOTHING or None: the module is skipped).
    """
    groups = [modules] if isinstance(modules, dict) else modules
    stats, shared, handles = {}, {}, []
    for gi, group in enumerate(groups):
        for name, mod in group.items():
            kind = needs.get(name)
            if kind is None or kind is Needs.NOTHING:
                continue
            if (gi, kind) not in shared:
                in_features = mod.weight.shape[1] if isinstance(mod, torch.nn.Linear) \
                    else mod.weight.shape[0]
                stat = shared[gi, kind] = _input_stat(kind, in_features, mod.weight.device)
                handles.append(mod.register_forward_hook(
                    lambda _m, inp, _o, s=stat: s.update(inp[0])))
            stats[name] = shared[gi, kind]
    if not stats:
        return stats
    replay(block, store, kwargs, handles)
    return stats


def replay(block, store: ActivationStore, kwargs: dict, handles: list) -> None:
    """Run every stored batch through `block` (its hooks collect statistics), then remove the
    hook `handles`, also when the forward fails."""
    try:
        for b in range(len(store)):
            block(store[b].to(module_device(block)), **kwargs)
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def propagate(block, store: ActivationStore, kwargs: dict) -> None:
    """Replace every stored batch by the block's output on it (inputs of the next block)."""
    device = module_device(block)
    for b in range(len(store)):
        store[b] = _block_output(block(store[b].to(device), **kwargs)).detach()
