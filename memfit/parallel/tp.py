"""Tensor-parallel inference: `parallelize_(model, rank, world)` splits every block of a loaded
model by its architecture's plan (memfit.parallel.plans) and `tp_session` runs it under torchrun.

Layout. Attention is split by KV-head groups: rank r holds a contiguous run of whole KV heads and
the query heads that read them, so q/k/v are column-parallel and o_proj row-parallel on the same
head range. When the KV-head count does not divide by the world size the split is uneven (the
default model, 3 KV heads on 2 ranks: 2 groups on rank 0, 1 on rank 1). The MLP is split by
intermediate channels (gate/up column-parallel, down row-parallel) as evenly as a row-parallel
down_proj allows (a cut by input columns must fall on its group boundary: 2:4, low-rank with a
quantized factor; a packed down_proj is split by output rows, below). The embedding, the
norms and the LM head are replicated on every rank; each rank's KV cache holds only its heads.

Why plain all-reduces and not DTensor's `parallelize_module`: DTensor shards a dimension evenly
(or by its own uneven rule for the remainder), which cannot express "2 KV-head groups here, 1
there" with the query heads following their KV head, and it does not know memfit's packed
buffers (codes, scales, zero points live in one tensor per field with a group axis). Here each
shard is an ordinary module of the same class on its slice, so the single-device kernels run it
unchanged, and the only communication is one `torch.distributed.all_reduce` (sum) after each
row-parallel layer: two per block.
Transformers 5 attention reshapes projections with -1 heads and reads `num_key_value_groups`
(query heads per KV head, unchanged by this split); any head-count attribute the plan lists that
a module does keep is set to the rank's count.

Packed int layers (QuantLinear) in a row-parallel place are split by output rows instead
(GatherParallel): the input slices are all-gathered and each rank computes its rows over the
whole input. At decode memfit's CPU int kernels round activations to bfloat16 and run torch's
weight-only kernels, which return bfloat16 sums (memfit.kernels.cpu); split by input columns, each
rank's partial sum was rounded on its own, and on the default model in w4g64 RTN the TP=2 greedy
text left TP=1's at token 49 (logits up to 0.79 apart, the size of those kernels' own rounding).
Split by output rows, every output is the same kernel call's sum as on one device: the decode
step's logits are bit-identical (tests/parallel). The price is two all-gathers in place of one
all-reduce for those layers (input and output rows, a few KB per token at decode). Float
layers keep the row split: their float32 partial sums differ from one device's by ~1e-6.

Memory: a float safetensors folder is read block by block and each block split as it is read
(memfit.parallel.tp_load), so a rank's peak while loading is its shard, the replicated tensors
and one whole block. memfit's packed folders still load whole on every rank and are then split
(one full copy of the packed model per rank while loading).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from memfit.archs import arch_for, block_list, kv_shape, text_config
from memfit.errors import UserError
from memfit.formats.quant_linear import QuantLinear
from memfit.parallel.plans import COLWISE, plan_for
from memfit.parallel.shard import group_size, shard_colwise, shard_rowwise

ROW_UNIT = 16  # a gathered layer's output rows per rank: multiples of 16 (torch's int4 CPU kernel)


def split_even(n_units: int, world: int) -> list[tuple[int, int]]:
    """[start, end) unit ranges, contiguous, the first `n_units % world` ranks one unit larger."""
    base, extra = divmod(n_units, world)
    out, start = [], 0
    for r in range(world):
        end = start + base + (1 if r < extra else 0)
        out.append((start, end))
        start = end
    return out


def partition(config, world: int, mlp_align: int | dict = 1,
              sizes: dict[str, int] | None = None) -> list[dict[str, tuple[int, int]]]:
    """Per rank, {unit: (start, end) channel range} for units "q", "kv" and each channel unit of
    `sizes` ({unit: channels}; default {"mlp": intermediate_size}), cut on multiples of
    `mlp_align` (one number, or {unit: align})."""
    c = text_config(config)
    _, kv_heads, head_dim = kv_shape(config)
    heads = c.num_attention_heads
    per_kv = heads // kv_heads
    if kv_heads < world:
        raise UserError(
            f"--tp {world} cannot split attention: the model has {kv_heads} KV heads and each "
            f"rank needs at least one whole KV head (with its {per_kv} query heads); use --tp "
            f"{kv_heads} or fewer")
    parts = [{"kv": (k0 * head_dim, k1 * head_dim),
              "q": (k0 * per_kv * head_dim, k1 * per_kv * head_dim)}
             for k0, k1 in split_even(kv_heads, world)]
    for unit, inter in (sizes or {"mlp": c.intermediate_size}).items():
        align = mlp_align.get(unit, 1) if isinstance(mlp_align, dict) else mlp_align
        n = -(-inter // align)
        if n < world:
            what = {"mlp": "the MLP", "expert": "the experts", "shared": "the shared expert"}
            raise UserError(f"--tp {world} cannot split {what[unit]}: {inter} intermediate "
                            f"channels make only {n} groups of {align}; use --tp {n} or fewer")
        for part, (m0, m1) in zip(parts, split_even(n, world)):
            part[unit] = (m0 * align, min(m1 * align, inter))
    return parts


class RowParallel(nn.Module):
    """A row-parallel shard: y = all_reduce_sum(local(x)) + bias (the bias added once)."""

    def __init__(self, local: nn.Module, bias: torch.Tensor | None, group=None):
        super().__init__()
        self.local, self.group = local, group
        self.register_buffer("bias", bias)
        self.in_features = getattr(local, "in_features", None)
        self.out_features = getattr(local, "out_features", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce_sum(self.local(x), self.group)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class GatherParallel(nn.Module):
    """A row-parallel layer split by output rows instead: the rank's input slices are gathered,
    its rows [start, end) computed over the whole input, and the rows gathered again. Each output
    is then one kernel call's sum over all inputs, as on one device: bit-identical where the
    kernel rounds partial sums to 16 bits (packed int layers), at the cost of two all-gathers
    instead of one all-reduce. Same weight bytes per rank as the row split."""

    def __init__(self, local: nn.Module, in_sizes: list[int], out_sizes: list[int], group=None):
        super().__init__()
        self.local, self.group = local, group
        self.in_sizes, self.out_sizes = in_sizes, out_sizes
        self.in_features, self.out_features = sum(in_sizes), sum(out_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather_last(self.local(all_gather_last(x, self.in_sizes, self.group)),
                               self.out_sizes, self.group)


def all_gather_last(x: torch.Tensor, sizes: list[int], group=None) -> torch.Tensor:
    """Concatenate every rank's `x` along the last dimension (rank r holds sizes[r] columns);
    padded to the widest, moved as raw bits (gloo gathers no 16-bit floats)."""
    if not dist.is_initialized():
        return x
    width = max(sizes)
    pad = torch.nn.functional.pad(x, (0, width - x.shape[-1])).contiguous()
    bits = pad.view(torch.int16) if pad.element_size() == 2 else pad
    parts = [torch.empty_like(bits) for _ in sizes]
    dist.all_gather(parts, bits, group=group)
    return torch.cat([t.view(x.dtype)[..., :n] for t, n in zip(parts, sizes)], dim=-1)


def all_reduce_sum(y: torch.Tensor, group=None) -> torch.Tensor:
    """Sum `y` over the group (identity outside torch.distributed). gloo reduces no 16-bit
    floats on the CPU, so those are summed in float32 there."""
    if not dist.is_initialized():
        return y
    if dist.get_backend(group) == "gloo" and y.dtype in (torch.float16, torch.bfloat16):
        y32 = y.float()
        dist.all_reduce(y32, group=group)
        return y32.to(y.dtype)
    y = y.contiguous()
    dist.all_reduce(y, group=group)
    return y


def parallelize_(model: nn.Module, rank: int, world: int, group=None) -> dict:
    """Replace, in place, every linear named by the plan with this rank's shard. Returns what the
    rank holds: heads, MLP channels, weight bytes and KV-cache bytes per token."""
    plan = plan_for(text_config(model.config))
    part = None
    for block in block_list(model, arch_for(model.config)):
        part = shard_block_(block, plan, model.config, rank, world, group)
    return rank_report(model, rank, world, part)


def shard_block_(block: nn.Module, plan, config, rank: int, world: int, group=None) -> dict:
    """Replace one block's planned linears with this rank's shards -> the rank's part
    ({unit: (start, end)})."""
    # only a split by input columns must fall on group boundaries (packed layers are split by
    # output rows, GatherParallel)
    items = plan.expand(block)
    sizes, align = {}, {}
    for path, style, unit in items:
        m = block.get_submodule(path)
        if unit in ("q", "kv"):
            continue
        if style == COLWISE:
            sizes.setdefault(unit, m.out_features)
        elif not isinstance(m, QuantLinear):
            align[unit] = max(align.get(unit, 1), group_size(m))
    parts = partition(config, world, align, sizes)
    part = parts[rank]
    for path, style, unit in items:
        parent_path, _, name = path.rpartition(".")
        parent = block.get_submodule(parent_path) if parent_path else block
        start, end = part[unit]
        m = getattr(parent, name)
        if style == COLWISE:
            setattr(parent, name, shard_colwise(m, start, end))
        elif isinstance(m, QuantLinear):  # its kernels round partial sums: split by rows
            unit_rows = ROW_UNIT if m.out_features >= ROW_UNIT * world else 1
            outs = [(b - a) * unit_rows
                    for a, b in split_even(m.out_features // unit_rows, world)]
            outs[-1] += m.out_features % unit_rows
            o0 = sum(outs[:rank])
            ins = [p[unit][1] - p[unit][0] for p in parts]
            setattr(parent, name, GatherParallel(shard_colwise(m, o0, o0 + outs[rank]), ins,
                                                 outs, group))
        else:
            local, bias = shard_rowwise(m, start, end)
            setattr(parent, name, RowParallel(local, bias, group))
    _set_head_attrs(block.get_submodule(plan.attention), plan.head_attrs, part, config)
    return part


def _set_head_attrs(attn: nn.Module, attrs: dict[str, str], part, config) -> None:
    _, _, head_dim = kv_shape(config)
    for attr, unit in attrs.items():
        if isinstance(getattr(attn, attr, None), int):
            start, end = part[unit]
            setattr(attn, attr, (end - start) // head_dim)


def rank_report(model: nn.Module, rank: int, world: int, part: dict | None) -> dict:
    """Per-rank holdings: weight bytes (every distinct parameter and buffer) and the KV cache."""
    seen, weight_bytes = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        weight_bytes += t.numel() * t.element_size()
    layers, kv_heads, head_dim = kv_shape(model.config)
    local_kv = kv_heads if part is None else (part["kv"][1] - part["kv"][0]) // head_dim
    elem = next(model.parameters()).element_size()
    out = {"rank": rank, "world": world, "kv_heads": local_kv, "weight_bytes": weight_bytes,
           "kv_bytes_per_token": 2 * layers * local_kv * head_dim * elem}
    if part is not None:
        out["q_heads"] = (part["q"][1] - part["q"][0]) // head_dim
        a, b = part.get("mlp", part.get("expert", (0, 0)))  # a mixture's last block: its experts'
        out["mlp_channels"] = b - a
    return out


@dataclass
class TPSession:
    rank: int = 0
    world: int = 1
    device: str = "cpu"

    def load(self, spec: str, dtype, load_whole):
        """This rank's model: on one rank `load_whole()`; on several, a float safetensors folder
        read and split block by block (memfit.parallel.tp_load: one whole block in memory at a
        time), anything else `load_whole()` and then split. Every rank checks that all loaded
        the same weights, and rank 0 prints each rank's holdings to stderr."""
        if self.world == 1:
            return load_whole()
        from memfit.parallel.tp_load import checksums, load_rank

        def split(block, config):
            return shard_block_(block, plan_for(text_config(config)), config, self.rank,
                                self.world)
        got = load_rank(spec, split, dtype=dtype, device=self.device)
        if got is None:
            m = load_whole()
            if m.kind != "decoder":
                return m  # the caller refuses it
            sums = checksums(list(m.model.parameters()) + list(m.model.buffers()))  # packed
            check_same_model(sums, m.model)                            # codes are buffers
            report = parallelize_(m.model, self.rank, self.world)
        else:
            m, part, sums = got
            check_same_model(sums, m.model)
            report = rank_report(m.model, self.rank, self.world, part)
        reports = [None] * self.world
        dist.all_gather_object(reports, report)
        if self.rank == 0:
            for r in reports:
                print(f"tp rank {r['rank']}/{r['world']}: {r['q_heads']} query heads, "
                      f"{r['kv_heads']} KV heads, {r['mlp_channels']} MLP channels; weights "
                      f"{r['weight_bytes'] / 2**20:.1f} MiB, KV cache {r['kv_bytes_per_token']:,} "
                      "bytes/token", file=sys.stderr)
        return m

    def stream(self):
        """The generate() stream callback: the terminal on rank 0, nothing elsewhere."""
        return None if self.rank == 0 else (lambda piece: None)


@contextlib.contextmanager
def tp_session(tp: int, device: str = "cpu", timeout_s: float = 300.0):
    """Join the torchrun world for `--tp tp` (or stay single-process for tp 1 outside torchrun);
    the process group is torn down on exit. CUDA ranks use cuda:LOCAL_RANK and NCCL."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp != world:
        hint = (f"launch with `torchrun --nproc-per-node {tp} -m memfit generate ... --tp {tp}`"
                if tp > 1 else "drop torchrun, or pass --tp equal to --nproc-per-node")
        raise UserError(f"--tp {tp} does not match the world size {world}; {hint}")
    if world == 1:
        yield TPSession(device=device)
        return
    rank = int(os.environ.get("RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        torch.cuda.set_device(device)
    from memfit.parallel.world import join_world

    join_world("nccl" if device.startswith("cuda") else "gloo", timedelta(seconds=timeout_s))
    try:
        yield TPSession(rank, world, device)
    finally:
        dist.destroy_process_group()


def check_same_model(sums: torch.Tensor, model: nn.Module) -> None:
    """Refuse (on every rank) when ranks loaded different weights: their checksums (float64
    sums of every tensor read, memfit.parallel.tp_load.checksums)."""
    from memfit.parallel.world import same_on_every_rank

    if not same_on_every_rank(sums, next(model.parameters()).device):
        raise UserError("the ranks loaded different weights (checksums differ); give every rank "
                        "the same MODEL")
