"""Packed module kinds as data: how a saved folder's `modules` table describes each replaced
module (the module's own `describe()`), and how each kind is built back on the meta device for
loading. `MODULE_KINDS` is the one dispatch table from a kind to its class, builder and the
tensors whose dtype belongs to the format (never cast on load).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from memfit.errors import UserError
from memfit.formats.embedding import QuantEmbedding
from memfit.formats.grid import IntFormat
from memfit.formats.intq import field_specs
from memfit.formats.lowrank import LowRankLinear
from memfit.formats.quant_linear import QuantLinear
from memfit.formats.sparse import SparseLinear
from memfit.formats.w8a8 import W8A8Linear


# ----- module kinds: describe a replaced module as JSON, build it back on the meta device -----

def _build_int(d: dict, dtype: torch.dtype) -> QuantLinear:
    return QuantLinear(d["in_features"], d["out_features"], IntFormat.from_dict(d["fmt"]),
                       d["bias"], device="meta", dtype=dtype)


def _build_sparse(d: dict, dtype: torch.dtype) -> SparseLinear:
    if d["layout"] not in ("bitmask", "2:4"):
        raise UserError(f"sparse layout {d['layout']!r} is unknown to this memfit; upgrade memfit")
    fmt = None if d.get("fmt") is None else IntFormat.from_dict(d["fmt"])
    dtypes = {"shape": torch.int64, "bitmask": torch.uint8, "indices": torch.uint8,
              "qdata": torch.uint8, "values": dtype}
    if fmt is not None:  # scale / zero as the int format stores them
        dtypes |= {n: dt for n, (_, dt) in field_specs(fmt, d["out_features"],
                                                        d["in_features"]).items() if n != "qdata"}
    described = d["shapes"] if "shapes" in d else {  # folders written before int values existed
        "values": d["values_shape"], {"bitmask": "bitmask", "2:4": "indices"}[d["layout"]]:
        [-(-d["out_features"] * d["in_features"] // 8)], "shape": [2]}
    shapes = {n: (tuple(s), dtypes[n]) for n, s in described.items()}
    if d["bias"]:
        shapes["bias"] = ((d["out_features"],), dtype)
    return SparseLinear.empty(d["layout"], fmt, d["out_features"], d["in_features"], shapes)


def _build_lowrank(d: dict, dtype: torch.dtype) -> LowRankLinear:
    m = LowRankLinear(d["in_features"], d["out_features"], d["rank"], bias=d["bias"],
                      dtype=dtype, device="meta")
    if d.get("fmt") is not None:
        fmt = IntFormat.from_dict(d["fmt"])
        m.down = QuantLinear(d["in_features"], d["rank"], fmt, False, device="meta", dtype=dtype)
        m.up = QuantLinear(d["rank"], d["out_features"], fmt, d["bias"], device="meta", dtype=dtype)
    return m


def _build_w8a8(d: dict, dtype: torch.dtype) -> W8A8Linear:
    return W8A8Linear(d["in_features"], d["out_features"], IntFormat.from_dict(d["fmt"]),
                      bias=d["bias"], static=d["static"], device="meta", dtype=dtype)


def _build_embedding(d: dict, dtype: torch.dtype) -> QuantEmbedding:
    return QuantEmbedding(d["num_embeddings"], d["embedding_dim"], IntFormat.from_dict(d["fmt"]),
                          padding_idx=d["padding_idx"], embed_scale=d["embed_scale"], dtype=dtype,
                          device="meta")


class Kind(NamedTuple):
    cls: type  # describes itself: cls.describe(module) (the packed-module protocol)
    build: Callable[[dict, torch.dtype], nn.Module]
    fixed: tuple[str, ...]  # tensors whose dtype belongs to the format: never cast on load


MODULE_KINDS: dict[str, Kind] = {
    "int": Kind(QuantLinear, _build_int, ("scale", "zero")),
    "sparse": Kind(SparseLinear, _build_sparse, ("scale", "zero")),
    "embedding": Kind(QuantEmbedding, _build_embedding, ("scale", "zero")),
    "w8a8": Kind(W8A8Linear, _build_w8a8, ("scale", "input_scale")),
    "lowrank": Kind(LowRankLinear, _build_lowrank,
                    ("down.scale", "down.zero", "up.scale", "up.zero")),
}


def describe_modules(model: nn.Module) -> dict[str, dict]:
    """{module name: JSON-able description} for every module memfit replaced in `model` (the
    outermost one: a low-rank layer's quantized factors belong to its description)."""
    by_class = {k.cls: (name, k) for name, k in MODULE_KINDS.items()}
    out = {}
    for name, m in model.named_modules():
        if type(m) in by_class and not any(name.startswith(n + ".") for n in out):
            kind, k = by_class[type(m)]
            out[name] = {"kind": kind, **m.describe()}
    return out


def build_module(desc: dict, dtype: torch.dtype) -> nn.Module:
    """A described module with empty meta tensors, ready for `load_state_dict(assign=True)`."""
    kind = desc.get("kind") if isinstance(desc, dict) else None
    if kind not in MODULE_KINDS:
        raise UserError(f"unknown module kind {kind!r} (this memfit knows "
                        f"{', '.join(MODULE_KINDS)}); upgrade memfit or re-save the model")
    try:
        return MODULE_KINDS[kind].build(desc, dtype)
    except (KeyError, TypeError) as e:
        raise UserError(f"a {kind!r} module description is incomplete ({e!r}); "
                        "re-save the model with this memfit") from None


def replace_modules(model: nn.Module, modules: dict[str, dict]) -> None:
    """Swap each described module into `model` (on meta), in the dtype of the module it replaces."""
    for name, desc in modules.items():
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            old = getattr(parent, attr)
        except AttributeError:
            raise UserError(f"module {name!r} of the saved description is not in the model built "
                            "from config.json; the folder is inconsistent: re-save it") from None
        ref = next(old.parameters(), None)
        dtype = ref.dtype if ref is not None else torch.get_default_dtype()
        setattr(parent, attr, build_module(desc, dtype))
