"""Write a memfit-compressed model as a compressed-tensors folder (`pack-quantized`), the format
llm-compressor writes, vLLM serves and transformers loads with the `compressed-tensors` package
and no memfit at all.

Mapping (memfit's grid is W = (q - z) * s with unsigned codes q, z in [0, 2**bits - 1];
compressed-tensors' is W = (x - zp) * scale with signed x, zp in [-2**(bits-1), 2**(bits-1) - 1]):

    x = q - 2**(bits-1),  zp = z - 2**(bits-1)   (symmetric: memfit's z = 2**(bits-1), so zp = 0)

so the weights are the same numbers and no code is re-rounded. compressed-tensors packs
`x + 2**(bits-1)` = q little-endian into int32 words (32 / bits codes per word for 2, 4 and 8
bits), which is byte for byte memfit's row packing (memfit.kernels.packing) padded to whole
words: `weight_packed` is memfit's `qdata` with each row padded to a multiple of 4 bytes, seen
as int32. Integer zero points are packed the same way along the output dimension
(`weight_zero_point`, (ceil(out * bits / 32), n_groups) int32). `weight_scale` keeps memfit's
scale dtype (float16 by default: the stored bytes stay the honest ones; compressed-tensors then
dequantizes in that dtype, so its weights differ from memfit's float32 dequantization by at
most half a float16 ulp; `scale_dtype=torch.float32` widens them exactly instead, and the
weights are then memfit's bit for bit). `weight_shape` is (out, in).

What compressed-tensors cannot represent (`unrepresentable` names each module and why; such a
model stays in memfit's own format, and an explicit compressed-tensors export of it is refused
with nothing written):
- 3-bit codes: the 3-bit packing of compressed-tensors changed between its releases (codes split
  across int32 words since 0.20, whole codes per word before) and vLLM has no 3-bit kernel;
- HQQ float zero points (compressed-tensors zero points are integers);
- a group size that does not divide the layer's input width (memfit's ragged last group;
  compressed-tensors requires whole groups);
- low-rank factors, and pruned layers (compressed-tensors >= 0.15, which transformers 5 needs,
  dropped its sparse-24-bitmask and sparse-bitmask formats);
- quantized embedding tables (and a head reading the embedding's packed buffers);
- a packed layer replacing something other than nn.Linear (GPT-2's Conv1D: compressed-tensors
  quantizes nn.Linear only).

Asymmetric formats also get `"dequantize": true`, a transformers loading attribute read from
config.json: transformers' default path (compressed-tensors 0.20.1 compressing the empty model on
the meta device) expects the zero point unpacked, (out, n_groups), while compressed-tensors'
own writer and vLLM use the packed layout above, so plain `from_pretrained` fails with a size
mismatch; with `dequantize` transformers decompresses each layer while loading, through the same
compressed-tensors decompressor (on a CPU the default path decompresses every layer on the first
forward anyway). Symmetric formats load through the default path.

One config group per distinct weight format: `targets: ["Linear"]` with the unquantized linears
in `ignore` when every packed layer shares one format, else the layers' exact names per group.

Mixtures of experts: memfit holds one linear per expert (memfit.moe), which is how the hub's
checkpoints of most families store them and how llm-compressor writes them, so each expert's
projections are written as their own compressed linears under the family's checkpoint names:
memfit's own for Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek (`mlp.experts.3.gate_proj`), the
Mixtral-era ones for Mixtral and PhiMoE (`block_sparse_moe.experts.3.w1`, w3, w2, the router as
`block_sparse_moe.gate`: memfit.moe.checkpoint_names), which transformers renames on load and
vLLM reads. gpt-oss and GraniteMoE keep their experts fused in their checkpoints, which a
per-linear format cannot express: refused. So are experts with zero points: transformers
(5.25 with compressed-tensors 0.20.1) stops loading them (its dequantize-on-load cannot feed
its fused experts); symmetric experts load (checked bit for bit against memfit's weights).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from memfit.errors import UserError
from memfit.formats.quant_linear import QuantLinear
from memfit.io.modules import describe_modules
from memfit.moe import is_expert_linear

CT_FORMAT = "pack-quantized"
CT_META = "memfit_recipe.json"  # how memfit made the folder: recipe, tied tensors, dense dtype
BUFFERS = "memfit_buffers.safetensors"  # non-persistent buffers, as memfit's format keeps them
CT_BITS = (2, 4, 8)
_WHY_KIND = {
    "lowrank": "low-rank factors (two thin matrices) have no compressed-tensors layout",
    "sparse": "compressed-tensors >= 0.15 (what transformers 5 loads) has no sparse formats "
              "(sparse-24-bitmask and sparse-bitmask were removed)",
    "embedding": "quantized embedding tables are not exported to compressed-tensors",
    "w8a8": "W8A8 layers (int8 activations) are not exported to compressed-tensors yet",
}


def _plain_model(model: nn.Module) -> nn.Module:
    """The same transformers class built from the config on meta: which module each packed
    layer replaced (nn.Linear or not)."""
    from memfit.io.save import plain_config
    from memfit.moe import unfuse_experts_

    config = plain_config(model.config)
    with torch.device("meta"):
        plain = type(model)(config)
    unfuse_experts_(plain)
    return plain


def _why_not_int(m: QuantLinear) -> str | None:
    return why_not_format(m.fmt, m.in_features)


def why_not_format(f, in_features: int) -> str | None:
    """Why compressed-tensors cannot hold an (out, in_features) weight in the IntFormat `f`."""
    if f.bits not in CT_BITS:
        return (f"{f.bits}-bit codes: compressed-tensors' {f.bits}-bit packing differs between "
                "its releases and vLLM has no kernel for it (2, 4 and 8 bits export)")
    if not f.symmetric and f.zero_point == "float":
        return "its zero points are floats (HQQ); compressed-tensors stores integer zero points"
    g, n = f.groups(in_features)
    if g * n != in_features:
        return (f"group_size {g} does not divide its input width {in_features} (a ragged last "
                "group); compressed-tensors needs whole groups")
    return None


_EXPERTS = ("an expert of a mixture-of-experts layer whose family's checkpoints hold the experts "
            "fused (gpt-oss, GraniteMoE), which compressed-tensors' one-linear-per-expert "
            "layout cannot express")
# families whose checkpoints hold one linear per expert: under memfit's names, or under the
# Mixtral-era names transformers renames on load (memfit.moe.checkpoint_names)
CT_EXPERT_NAMES = {"qwen2_moe": "own", "qwen3_moe": "own", "olmoe": "own", "deepseek_v3": "own",
                   "mixtral": "legacy", "phimoe": "legacy"}


_EXPERTS_ASYM = ("an expert with asymmetric (zero-point) codes: transformers (5.25, with "
                 "compressed-tensors 0.20.1) cannot dequantize those into its fused experts while "
                 "loading; quantize experts symmetric (symmetric: true)")


def _expert_refused(name: str, model_type: str | None) -> bool:
    return is_expert_linear(name) and model_type not in CT_EXPERT_NAMES


def checkpoint_key(key: str, model_type: str | None) -> str:
    """The name a tensor of the unfused model has in the family's checkpoints."""
    if CT_EXPERT_NAMES.get(model_type) != "legacy":
        return key
    from memfit.moe import checkpoint_names

    module, _, field = key.rpartition(".")
    return checkpoint_names(f"{module}.weight")[-1].rpartition(".")[0] + f".{field}"


def spec_why_not(spec, module: nn.Module, name: str = "",
                  model_type: str | None = None) -> str | None:
    """Why the module a recipe spec would build from `module` (the plain layer `name`, e.g. on
    meta, of a `model_type` model) cannot be exported; None when it can. Checked before any work
    (memfit.compress)."""
    from memfit.configs import LowRank, Prune, Quant

    if spec is None:
        return None
    if _expert_refused(name, model_type):
        return _EXPERTS
    if type(module) is not nn.Linear:
        return (f"it replaces a {type(module).__name__}; compressed-tensors quantizes nn.Linear "
                "only")
    part = getattr(spec, "first", spec)
    if isinstance(part, Prune):
        return _WHY_KIND["sparse"]
    if isinstance(part, LowRank):
        return _WHY_KIND["lowrank"]
    if isinstance(spec, Quant):
        if spec.act_bits:
            return _WHY_KIND["w8a8"]
        if is_expert_linear(name) and not spec.format.symmetric:
            return _EXPERTS_ASYM
        return why_not_format(spec.format, module.in_features)
    return None


def unrepresentable(model: nn.Module) -> dict[str, str]:
    """{module name: why compressed-tensors cannot hold it} for every memfit module of `model`
    that cannot be exported; empty when the whole model can."""
    modules = describe_modules(model)
    plain = _plain_model(model) if modules else None
    kind_of_model = getattr(model.config, "model_type", None)
    out = {}
    for name, desc in modules.items():
        m = model.get_submodule(name)
        kind = desc["kind"]
        if _expert_refused(name, kind_of_model):
            out[name] = _EXPERTS
        elif kind in _WHY_KIND:
            out[name] = _WHY_KIND[kind]
        elif kind == "int":
            orig = plain.get_submodule(name)
            if type(orig) is not nn.Linear:
                out[name] = (f"it replaces a {type(orig).__name__}; compressed-tensors quantizes "
                             "nn.Linear only")
            else:
                why = _why_not_int(m)
                if why:
                    out[name] = why
                elif is_expert_linear(name) and not m.fmt.symmetric:
                    out[name] = _EXPERTS_ASYM
        else:
            out[name] = f"memfit module kind {kind!r} has no compressed-tensors layout"
    return out


def check_representable(model: nn.Module | None, bad: dict[str, str] | None = None) -> None:
    """UserError naming the first modules compressed-tensors cannot hold, and why (those of
    `model`, or the given {name: why})."""
    bad = unrepresentable(model) if bad is None else bad
    if bad:
        shown = "; ".join(f"{n}: {why}" for n, why in list(bad.items())[:3])
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise UserError(f"compressed-tensors cannot represent {len(bad)} module(s): {shown}{more}; "
                        "save in memfit's format instead (--format memfit); nothing written")


# ----- tensors --------------------------------------------------------------------------------

def _bytes_to_int32(b: torch.Tensor) -> torch.Tensor:
    """(rows, n) uint8 -> (rows, ceil(n / 4)) int32, each word the little-endian bytes 4j..4j+3
    (zero-padded at the end of a row)."""
    rows, n = b.shape
    pad = -n % 4
    if pad:
        b = torch.nn.functional.pad(b, (0, pad))
    b = b.contiguous().view(rows, -1, 4)  # (rows, words, 4)
    if sys.byteorder == "big":
        b = b.flip(-1)
    return b.contiguous().view(torch.int32).view(rows, -1)


def ct_tensors(m: QuantLinear, scale_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A QuantLinear's compressed-tensors tensors: weight_packed, weight_scale (in
    `scale_dtype`, default the format's own), weight_zero_point (asymmetric only), weight_shape
    (and bias when it has one)."""
    from memfit.kernels.packing import pack

    p = m.packed()
    if scale_dtype is not None and torch.finfo(scale_dtype).bits < torch.finfo(p.scale.dtype).bits:
        raise UserError(f"scale_dtype {scale_dtype} would round the stored {p.scale.dtype} "
                        "scales; use the format's own or float32")
    out = {"weight_packed": _bytes_to_int32(p.qdata),  # (out, ceil(in * bits / 32))
           "weight_scale": p.scale.to(scale_dtype or p.scale.dtype).clone(),  # (out, n_groups)
           "weight_shape": torch.tensor([m.out_features, m.in_features], dtype=torch.int64)}
    if not m.fmt.symmetric:
        zeros = p.zeros().round().to(torch.uint8).t().contiguous()  # (n_groups, out)
        out["weight_zero_point"] = _bytes_to_int32(pack(zeros, m.fmt.bits)).t().contiguous()
    if m.bias is not None:
        out["bias"] = m.bias.detach().clone()
    return out


def _weights_args(m: QuantLinear) -> dict:
    f = m.fmt
    return {"num_bits": f.bits, "type": "int", "symmetric": f.symmetric,
            "strategy": "channel" if f.group_size is None else "group",
            "group_size": f.group_size, "dynamic": False, "actorder": None,
            "block_structure": None, "observer": "minmax", "observer_kwargs": {}}


def quantization_config(model: nn.Module) -> dict:
    """config.json's `quantization_config` for the QuantLinears of `model`."""
    qls = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    groups: dict[str, list[str]] = {}
    args: dict[str, dict] = {}
    for name, m in qls.items():
        key = json.dumps(_weights_args(m), sort_keys=True)
        groups.setdefault(key, []).append(name)
        args[key] = _weights_args(m)
    plain = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]  # routers too
    kind = getattr(model.config, "model_type", None)

    def both(names: list[str]) -> list[str]:
        """Each module under the model's name (transformers applies the config to its modules)
        and, where they differ, the family's checkpoint name (vLLM's modules keep those)."""
        out = [checkpoint_key(f"{n}.weight", kind).removesuffix(".weight") for n in names]
        return list(dict.fromkeys(x for pair in zip(names, out) for x in pair))

    plain = both(plain)
    groups = {k: both(names) for k, names in groups.items()}
    single = len(groups) == 1
    config_groups = {}
    for i, (key, names) in enumerate(groups.items()):
        config_groups[f"group_{i}"] = {"targets": ["Linear"] if single else names,
                                       "weights": args[key], "input_activations": None,
                                       "output_activations": None, "format": CT_FORMAT}
    config = {"quant_method": "compressed-tensors", "format": CT_FORMAT,
              "quantization_status": "compressed", "config_groups": config_groups,
              "ignore": plain if single else [], "kv_cache_scheme": None,
              "global_compression_ratio": None}
    if any(not a["symmetric"] for a in args.values()):
        config["dequantize"] = True  # see the module docstring: asymmetric zero points
    return config


# ----- the folder -----------------------------------------------------------------------------

def _state(model: nn.Module, dense_dtype: str, scale_dtype) -> tuple[dict, dict, dict, bool]:
    """-> (tensors to write, tied {target: source}, non-persistent buffers, whether a declared
    tie was dropped): memfit's state with each QuantLinear's fields replaced by
    compressed-tensors' names."""
    from memfit.io.save import _split_state, _store_dense

    tensors, buffers, tied = _split_state(model)
    tensors = _store_dense(tensors, set(), dense_dtype)  # QuantLinear fields are not in it below
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            for f in ("qdata", "scale", "zero", "bias"):
                tensors.pop(f"{name}.{f}", None)
            tensors.update({f"{name}.{k}": v for k, v in ct_tensors(m, scale_dtype).items()})
    declared = getattr(model, "all_tied_weights_keys", None) or {}
    dropped_tie = any(t not in tensors and t not in tied for t in declared)
    kind = getattr(model.config, "model_type", None)
    tensors = {checkpoint_key(k, kind): v for k, v in tensors.items()}
    return tensors, tied, buffers, dropped_tie


def save_ct(model: nn.Module, tokenizer, out_dir, *, recipe: dict | None = None,
            extra: dict | None = None, overwrite: bool = False, dense_dtype: str = "auto",
            side_files: dict | None = None, scale_dtype: torch.dtype | None = None) -> Path:
    """Write `model` as a compressed-tensors folder (config.json, model.safetensors, tokenizer,
    and for memfit's own loader `memfit_recipe.json` (recipe, tied tensors, dense dtype) and
    `memfit_buffers.safetensors` (non-persistent buffers)). Refuses, before writing anything, a
    model with a module compressed-tensors cannot represent (`unrepresentable`).
    `scale_dtype=torch.float32` stores the scales widened (exactly): compressed-tensors then
    dequantizes in float32 to memfit's weights bit for bit, at 16 more bits per group."""
    from safetensors.torch import save_file

    from memfit.io.folders import check_output, write_folder
    from memfit.io.save import write_config, write_side_files

    out = Path(out_dir)
    check_output(out, overwrite)
    check_representable(model)
    tensors, tied, buffers, dropped_tie = _state(model, dense_dtype, scale_dtype)
    provenance = json.dumps({"format": "compressed-tensors", "recipe": recipe, "tied": tied,
                             "dense_dtype": dense_dtype, **(extra or {})}, indent=2)

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_file(buffers, str(tmp / BUFFERS), metadata={"format": "pt"})
        write_config(model, tmp, dropped_tie, quantization_config(model))
        write_side_files(model, tokenizer, tmp, side_files)
        (tmp / CT_META).write_text(provenance + "\n")

    return write_folder(out, fill)


# ----- memfit's loader for the folders written above ---------------------------------------------

def is_memfit_ct(folder: Path) -> bool:
    """A compressed-tensors folder written by `save_ct` (memfit's loader reads it natively)."""
    try:
        q = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return (folder / CT_META).is_file() and q.get("quant_method") == "compressed-tensors" \
        and q.get("format") == CT_FORMAT


def _int32_to_bytes(t: torch.Tensor) -> torch.Tensor:
    """(rows, words) int32 -> (rows, 4 * words) uint8, the inverse of `_bytes_to_int32`."""
    b = t.contiguous().view(torch.uint8).view(t.shape[0], -1, 4)  # (rows, words, 4)
    if sys.byteorder == "big":
        b = b.flip(-1)
    return b.reshape(t.shape[0], -1)


def _to_memfit(state: dict, name: str, weights: dict) -> dict:
    """Replace `name`'s compressed-tensors tensors in `state` by memfit's QuantLinear fields;
    -> its module description."""
    from memfit.formats.grid import IntFormat
    from memfit.kernels.packing import pack, packed_width, unpack

    bits = weights["num_bits"]
    out_f, in_f = (int(v) for v in state.pop(f"{name}.weight_shape").tolist())
    scale = state.pop(f"{name}.weight_scale")
    fmt = IntFormat(bits=bits, group_size=weights.get("group_size"),
                    symmetric=weights["symmetric"], scale_dtype=str(scale.dtype).split(".")[-1])
    packed = state.pop(f"{name}.weight_packed")
    state[f"{name}.qdata"] = _int32_to_bytes(packed)[:, :packed_width(in_f, bits)].contiguous()
    state[f"{name}.scale"] = scale
    if not fmt.symmetric:
        zp = _int32_to_bytes(state.pop(f"{name}.weight_zero_point").t())  # (n_groups, bytes)
        zeros = unpack(zp[:, :packed_width(out_f, bits)].contiguous(), bits, out_f)  # (n, out)
        state[f"{name}.zero"] = pack(zeros.t().contiguous(), bits)
    return {"kind": "int", "fmt": fmt.to_dict(), "in_features": in_f, "out_features": out_f,
            "bias": f"{name}.bias" in state}


def _own_names(folder: Path, state: dict) -> dict:
    """`state` under memfit's names: a Mixtral or PhiMoE folder stores its experts under the
    checkpoint names `checkpoint_key` gave them."""
    from memfit.io.checkpoint import read_config

    kind = getattr(read_config(folder, trust_remote_code=False), "model_type", None)
    if CT_EXPERT_NAMES.get(kind) != "legacy":
        return state
    from memfit.io.save import _build_skeleton

    model, _ = _build_skeleton(folder, {})  # on meta: only its names
    own = {checkpoint_key(k, kind).rpartition(".")[0]: k.rpartition(".")[0]
           for k in model.state_dict()}
    out = {}
    for key, t in state.items():
        module, _, field = key.rpartition(".")
        out[f"{own.get(module, module)}.{field}"] = t
    return out


def load_ct(path, *, dtype=None, device: str = "cpu", with_tokenizer: bool = True):
    """Load a folder `save_ct` wrote back into memfit's QuantLinears (the same packed bytes, no
    dense copy) -> `memfit.models.Loaded`. Other compressed-tensors folders load through
    transformers (memfit.models.load_model)."""
    from memfit.io.checkpoint import check_safetensors
    from memfit.io.save import _read_tensors, assemble

    folder = Path(path)
    check_safetensors(folder)
    meta = json.loads((folder / CT_META).read_text())
    q = json.loads((folder / "config.json").read_text())["quantization_config"]
    state = _own_names(folder, _read_tensors(folder / "model.safetensors", device))
    names = [k.removesuffix(".weight_packed") for k in state if k.endswith(".weight_packed")]
    modules = {}
    for name in names:
        group = [g for g in q["config_groups"].values()
                 if name in g["targets"] or g["targets"] == ["Linear"]]
        if len(group) != 1:
            raise UserError(f"{folder}: module {name} is in {len(group)} config groups of "
                            "config.json; re-export the model")
        modules[name] = _to_memfit(state, name, group[0]["weights"])
    return assemble(folder, modules, meta.get("tied", {}), state,
                    _read_tensors(folder / BUFFERS, device), meta.get("dense_dtype", "auto"),
                    dtype=dtype, device=device, with_tokenizer=with_tokenizer)
