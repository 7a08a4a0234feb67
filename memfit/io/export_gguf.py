"""Write a memfit model as a GGUF file with the `gguf` package:
`memfit export DIR --format gguf --type Q8_0 --out model.gguf [--exact]`.

Three GGUF block types are memfit grids in another byte order (memfit.io.gguf_blocks): int8
symmetric groups of 32 are Q8_0, int4 symmetric groups of 32 are Q4_0, int4 with integer zeros
and groups of 32 are Q4_1. A packed weight in one of these layouts keeps memfit's codes and
float16 scales bit for bit, in its own type whatever `--type` says (a lossless file is worth more
than a uniform one; the export prints how many matrices kept their codes, by type). Every other
matrix -- float ones, and memfit grids GGUF has no block for (groups of 64, per channel, 2/3 bits,
float zeros) -- is dequantized to float32 and quantized to `--type` by `gguf.quants.quantize`,
a second rounding the export names (what it costs is measured: benchmarks/RESULTS.md, GGUF);
`--exact` refuses, writing nothing, unless every weight of the file is exactly memfit's.
Norms and other 1-D tensors are stored as F32, as llama.cpp's converter does.

Scope: the families of memfit.io.gguf_families -- llama, mistral, qwen2, qwen3 and the
mixtures of experts mixtral, qwen2_moe, qwen3_moe -- with the names of `gguf.get_tensor_name_map`;
for the `llama` architecture q_proj/k_proj rows are permuted into llama.cpp's rotary layout (the
inverse of what transformers' GGUF loader undoes). A mixture of experts' per-expert matrices are
stacked into one GGUF tensor per projection (experts first); packed experts on a block grid keep
their codes there too. The types are those `gguf.quants` can
quantize: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, and F16/BF16/F32, plus Q4_K, which memfit quantizes itself
(memfit.io.gguf_kquants). A K-quant stores rows in 256-wide super-blocks; a tensor whose rows are
not a whole number of them (every 576-wide row of SmolLM2-135M: all but down_proj) is stored as
the fallback type of K_FALLBACK instead (Q4_K -> Q5_0, the choice llama.cpp's own quantizer makes
for such rows), and the export says how many tensors fell back and why. Other K-quants are
refused. Rows that are not whole blocks of the type they would be stored as (32 weights for
Q8_0 .. Q5_1) are stored as F16, as llama.cpp's quantizer does, and said.

The tokenizer is embedded when it is a byte-level BPE (the `gpt2` tokenizer model of GGUF:
tokens, their types, merges, special ids, chat template), so transformers' GGUF loader and
llama.cpp get it from the file; no `tokenizer.ggml.pre` is written (llama.cpp then warns and
pre-tokenizes with its default rules; token ids given directly are unaffected). Other
tokenizers are left out and the export says so.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from memfit.errors import UserError
from memfit.formats.embedding import QuantEmbedding
from memfit.formats.intq import PackedIntWeight
from memfit.formats.quant_linear import QuantLinear
from memfit.io import gguf_families
from memfit.io.folders import check_output_file, raise_write_error
from memfit.io.gguf_blocks import EXACT_TYPES, block_type, layout, to_blocks, why_not
from memfit.io.modules import describe_modules

GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "F16", "BF16", "F32")
K_FALLBACK = {"Q4_K": "Q5_0"}  # rows that are not whole 256-wide super-blocks
_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
              "Q4_K": 14, "BF16": 32}  # llama.cpp's LlamaFileType (Q4_K: MOSTLY_Q4_K_S)


@torch.no_grad()  # low-rank factors are parameters: their product would carry a graph
def weights(model: nn.Module) -> dict[str, torch.Tensor | PackedIntWeight]:
    """The model's weights under transformers' names: an integer-grid memfit module (QuantLinear,
    QuantEmbedding) as its `PackedIntWeight`, every other memfit module dequantized to float32
    (its bias beside it), the other tensors as float32; a tensor tied to another (a tied head's
    shared buffers included) appears once, under the first name."""
    packed = describe_modules(model)
    out, seen = {}, set()
    for name in packed:
        m = model.get_submodule(name)
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            if id(m.qdata) in seen:
                continue
            seen.add(id(m.qdata))
            out[f"{name}.weight"] = m.packed()
        else:
            out[f"{name}.weight"] = m.dequantize(torch.float32)
        if getattr(m, "bias", None) is not None:
            out[f"{name}.bias"] = m.bias.detach().float()
    for key, t in model.state_dict(keep_vars=True).items():
        owner = key.rpartition(".")[0]
        if any(owner == n or owner.startswith(n + ".") for n in packed) or id(t) in seen:
            continue
        seen.add(id(t))
        out[key] = t.detach().float()
    return out


def _permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q/k rows from transformers' rotary layout (two halves per head) to llama.cpp's
    (interleaved pairs): (n_head * 2 * d, in) viewed (n_head, 2, d, in) -> (n_head, d, 2, in)."""
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, d, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@dataclass
class Notes:
    """What the export did to each matrix (GGUF names)."""

    kept: dict[str, int] = field(default_factory=dict)  # type -> matrices keeping memfit's codes
    min_rounded: list[tuple[str, float]] = field(default_factory=list)  # Q4_1, float16 m rounded
    scale_rounded: list[tuple[str, float]] = field(default_factory=list)  # bfloat16 scales
    again: list[tuple[str, str]] = field(default_factory=list)  # memfit-quantized, re-quantized
    floats: list[str] = field(default_factory=list)  # float matrices whose values were rounded
    fell: list[tuple[str, str]] = field(default_factory=list)  # (name, type) stored instead

    def rounded(self) -> list[str]:
        """Why the file's weights are not exactly memfit's (empty: they are)."""
        out = []
        if self.again:
            name, why = self.again[0]
            what = _n(self.again, "memfit-quantized matrix is", "memfit-quantized matrices are")
            out.append(f"{what} not on a GGUF block grid and quantized again, e.g. {name} ({why})")
        if self.min_rounded:
            name, err = max(self.min_rounded, key=lambda x: x[1])
            what = _n(self.min_rounded, "Q4_1 matrix keeps", "Q4_1 matrices keep")
            out.append(f"{what} memfit's codes but their float16 minimum -zero*scale is rounded "
                       f"(max weight change {err:.2g} in {name}); compress with gguf_exact: true "
                       "(e.g. --recipe w4g32-gguf)")
        if self.scale_rounded:
            name, err = max(self.scale_rounded, key=lambda x: x[1])
            what = _n(self.scale_rounded, "matrix keeps", "matrices keep")
            out.append(f"{what} memfit's codes but their bfloat16 scales are rounded to GGUF's "
                       f"float16 (max weight change {err:.2g} in {name}); compress with "
                       "scale_dtype: float16")
        if self.floats:
            out.append(f"{_n(self.floats, 'float matrix is', 'float matrices are')} rounded to "
                       f"the requested type, e.g. {self.floats[0]}")
        return out


def _n(items: list, one: str, many: str) -> str:
    return f"{len(items)} {one if len(items) == 1 else many}"


def _tensors(model: nn.Module, qtype, notes: Notes) -> list[tuple[str, np.ndarray, object]]:
    """[(GGUF name, array, raw type)] in GGUF names, q/k permuted where the family's rotary
    needs it, matrices quantized: a packed weight on a GGUF block grid keeps its codes
    (memfit.io.gguf_blocks), any other matrix is quantized to `qtype`; experts are stacked into
    one tensor per projection; `notes` records which was which."""
    import gguf

    config = model.config
    fam = gguf_families.family(config)
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == fam.arch)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    heads = {"q_proj.weight": config.num_attention_heads,
             "k_proj.weight": config.num_key_value_heads or config.num_attention_heads}
    out, stacks = [], {}
    for key, t in weights(model).items():
        expert = gguf_families.expert_key(key)
        if expert is not None:
            stacks.setdefault(expert[0], {})[expert[1]] = t
            continue
        gname = _name(names, key)
        if gname is None:
            continue
        if gname.endswith(("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")):
            # routers stay float32, as llama.cpp keeps them; the shared expert's gate a vector
            t = t.dequantize(torch.float32) if isinstance(t, PackedIntWeight) else t
            arr = t.reshape(-1) if "shexp" in gname else t
            out.append((gname, arr.contiguous().numpy(), gguf.GGMLQuantizationType.F32))
            continue
        if fam.norm_plus_one and "norm" in gname and not isinstance(t, PackedIntWeight):
            t = t + 1  # Gemma: the norm scales by 1 + w, llama.cpp reads the factor itself
        n_head = next((n for sfx, n in heads.items() if key.endswith(sfx)), None)
        out.append((gname, *_matrix(gname, [t], qtype, notes,
                                    n_head if fam.rotary_rows else None)))
    for key, by_index in stacks.items():
        gname = _name(names, key)
        experts = [by_index[i] for i in sorted(by_index)]
        if sorted(by_index) != list(range(len(experts))):
            raise UserError(f"{key}: experts {sorted(by_index)} are not 0..{len(experts) - 1}")
        out.append((gname, *_matrix(gname, experts, qtype, notes, None)))
    out += [(n, a, gguf.GGMLQuantizationType.F32) for n, a in gguf_families.extra_tensors(config)]
    return out


def _name(names, key: str) -> str | None:
    """The GGUF name of a transformers key; None for buffers GGUF does not store; a refusal for
    anything else."""
    gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if gname is None and not key.endswith("rotary_emb.inv_freq"):
        raise UserError(f"GGUF has no name for {key}; this architecture is not exportable")
    return gname


def _matrix(gname: str, parts: list, qtype, notes: Notes, n_head: int | None):
    """One GGUF tensor from `parts` (one matrix, or a layer's experts stacked first) -> (data,
    raw type): memfit's own blocks when every part is packed on the same GGUF block grid, else
    float32 (1-D, or `qtype` F32) or quantized to `qtype`. `n_head`: permute rows for rotary."""
    import gguf

    floats = qtype.name in ("F32", "F16", "BF16")
    kinds = {None if floats or not isinstance(t, PackedIntWeight) else block_type(t)
             for t in parts}
    kind = kinds.pop() if len(kinds) == 1 else None
    if kind is not None:
        rows = None if n_head is None else _permute_rotary(torch.arange(parts[0].shape[0]), n_head)
        blocks = [to_blocks(t, kind, rows) for t in parts]
        notes.kept[kind] = notes.kept.get(kind, 0) + 1
        change = max(c for _, c in blocks)
        if change:
            bf16 = parts[0].fmt.scale_dtype != "float16"
            (notes.scale_rounded if bf16 else notes.min_rounded).append((gname, change))
        data = blocks[0][0] if len(parts) == 1 else np.stack([d for d, _ in blocks])
        return data, gguf.GGMLQuantizationType[kind]
    packed = [t for t in parts if isinstance(t, PackedIntWeight)]
    again = bool(packed) and not floats
    if again:
        t = packed[0]
        notes.again.append((gname, why_not(t, qtype.name) if qtype.name in EXACT_TYPES
                            else f"{layout(t.fmt)} is no GGUF block type"))
    dense = [p.dequantize(torch.float32) if isinstance(p, PackedIntWeight) else p for p in parts]
    t = dense[0] if len(dense) == 1 else torch.stack(dense)
    if t.ndim >= 2 and not again and _rounds(t, qtype.name):
        notes.floats.append(gname)
    if n_head is not None:
        t = _permute_rotary(t, n_head)
    arr = t.contiguous().numpy()
    if arr.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return arr.astype(np.float32), gguf.GGMLQuantizationType.F32
    data, raw = _quantize(gname, arr.reshape(-1, arr.shape[-1]), qtype)
    if raw != qtype:
        notes.fell.append((gname, raw.name))
    return data.reshape(*arr.shape[:-1], data.shape[-1]), raw


def _rounds(t: torch.Tensor, qtype: str) -> bool:
    """Whether storing the float32 matrix `t` as `qtype` changes any of its values."""
    cast = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(qtype)
    return cast is None or not torch.equal(t.to(cast).float(), t)


def _quantize(key: str, arr: np.ndarray, qtype) -> tuple[np.ndarray, object]:
    """One 2-D tensor -> (bytes or array, the type it is stored as): `qtype`; for a K-quant with
    rows that are not whole super-blocks its K_FALLBACK type; rows that are not whole blocks of
    that type F16 (what llama.cpp's own quantizer falls back to)."""
    import gguf

    from memfit.io.gguf_kquants import QK_K, quantize_q4_k

    if qtype.name in K_FALLBACK:
        if arr.shape[-1] % QK_K == 0:
            return quantize_q4_k(arr), qtype
        qtype = gguf.GGMLQuantizationType[K_FALLBACK[qtype.name]]
    if arr.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = gguf.GGMLQuantizationType.F16
    try:
        return gguf.quants.quantize(arr, qtype), qtype
    except gguf.QuantError as e:
        raise UserError(f"cannot store {key} {tuple(arr.shape)} as {qtype.name} ({e}); choose "
                        f"another --type ({', '.join(GGUF_TYPES)}); nothing written") from None


def _tokenizer_metadata(writer, tokenizer) -> bool:
    """Embed a byte-level BPE tokenizer (GGUF's `gpt2` model); -> False for any other kind."""
    import json

    back = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(back.to_str()) if back is not None else {}
    if spec.get("model", {}).get("type") != "BPE" or \
            (spec.get("decoder") or {}).get("type") != "ByteLevel":
        return False
    vocab = tokenizer.get_vocab()
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens, types = [f"[PAD{i}]" for i in range(max(vocab.values()) + 1)], []
    for tok, i in vocab.items():
        tokens[i] = tok
    ids = set(vocab.values())
    for i in range(len(tokens)):  # 1 normal, 3 control, 4 user-defined, 5 unused
        a = added.get(i)
        types.append(5 if i not in ids else 1 if a is None else 3 if a.get("special") else 4)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for what, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                      ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if tid is not None:
            getattr(writer, f"add_{what}_token_id")(tid)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    return True


def export_gguf(model: nn.Module, out_file, qtype: str = "Q8_0", *, tokenizer=None,
                overwrite: bool = False, exact: bool = False) -> Path:
    """Write `model` and `tokenizer` (when given and byte-level BPE) as a GGUF file, through a
    temporary name renamed when complete. Packed weights whose layout is a GGUF block type keep
    memfit's codes (and scales) in that type; every other matrix is quantized to `qtype`.
    `exact`: refuse (nothing written) unless the file's weights are exactly memfit's. What was
    kept and what was rounded is printed to stderr. -> the file."""
    import gguf

    if qtype not in GGUF_TYPES:
        raise UserError(f"GGUF type {qtype!r} is not supported; use one of {', '.join(GGUF_TYPES)} "
                        "(of the K-quants memfit writes Q4_K only)")
    fam = gguf_families.family(model.config)
    gguf_families.check(model, fam)
    out = Path(out_file).expanduser()
    check_output_file(out, overwrite)
    notes = Notes()
    tensors = _tensors(model, gguf.GGMLQuantizationType[qtype], notes)
    if exact and notes.rounded():
        raise UserError(f"--exact: the GGUF would not hold memfit's weights exactly: "
                        f"{'; '.join(notes.rounded())}; nothing written")
    for line in gguf_families.caveats(model.config, fam):
        print(f"memfit: {line}", file=sys.stderr, flush=True)
    _say(notes, qtype, sum(d.ndim >= 2 and "ffn_gate_inp" not in n for n, d, _ in tensors))
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        writer = gguf.GGUFWriter(str(tmp), fam.arch)
        gguf_families.metadata(writer, model.config, fam)
        if tokenizer is None:
            print("memfit: the model has no tokenizer; the GGUF holds none",
                  file=sys.stderr, flush=True)
        elif not _tokenizer_metadata(writer, tokenizer):
            print("memfit: the tokenizer is not a byte-level BPE; the GGUF holds no tokenizer",
                  file=sys.stderr, flush=True)
        writer.add_file_type(_FILE_TYPE[_main_type(tensors, qtype)])
        for name, data, raw in tensors:
            writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.rename(out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise_write_error(out, e)
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _main_type(tensors: list, qtype: str) -> str:
    """The type most matrices are stored as (llama.cpp's "file type"; `qtype` on a tie)."""
    counts = {qtype: 0}
    for _, data, raw in tensors:
        if data.ndim >= 2 and raw.name in _FILE_TYPE:
            counts[raw.name] = counts.get(raw.name, 0) + 1
    return max(counts, key=lambda t: (counts[t], t == qtype))


def _say(notes: Notes, qtype: str, n_matrices: int) -> None:
    """One stderr line per thing the user should know about the file's matrices."""
    lines = []
    if notes.kept:
        kinds = ", ".join(f"{n} {t}" for t, n in notes.kept.items())
        lines.append(f"{sum(notes.kept.values())} of {n_matrices} matrices keep memfit's codes "
                     f"and scales as GGUF blocks ({kinds})")
    lines += notes.rounded()
    for kind in dict.fromkeys(t for _, t in notes.fell):
        fell = [n for n, t in notes.fell if t == kind]
        why = "a multiple of 256" if kind == K_FALLBACK.get(qtype) else "whole blocks"
        lines.append(f"GGUF {qtype}: {len(fell)} of {n_matrices} matrices stored as {kind} "
                     f"(rows not {why} of {qtype}), e.g. {fell[0]}")
    for line in lines:
        print(f"memfit: {line}", file=sys.stderr, flush=True)
