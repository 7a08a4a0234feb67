"""Recipes: what to do to which weights, as frozen typed configs that round-trip to dicts, YAML
and JSON. The algorithm chooses values, the format chooses bytes:

    Recipe(quant=GPTQ(format=IntFormat(bits=4, group_size=64)))

A recipe file (YAML or JSON) has the same shape:

    quant: {algo: gptq, bits: 4, group_size: 64, symmetric: false, act_order: true}
    ignore: [lm_head]
    overrides:
      "*.down_proj": {bits: 8, group_size: null}   # any Quant field; null = leave unquantized
    calib: {data: builtin, samples: 64, seq_len: 512}

Format fields (bits, group_size, symmetric, zero_point, scale_dtype) sit flat beside the
algorithm's own fields in files; in Python they live in `Quant.format`.

`quant` composes with `prune` (the kept values are quantized: Wanda 50% + GPTQ 4-bit, 2:4 +
int4) or with `lowrank` (both factors quantized); each module then gets a `Compose` spec. In a
composed recipe an override names the parts it changes, a part set to null is dropped:

    prune: {method: wanda, sparsity: 0.5}
    quant: {algo: gptq, bits: 4, group_size: 64}
    overrides:
      "*.down_proj": {quant: {bits: 8, group_size: null}}
      "*.o_proj": {quant: null}          # pruned only
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from memfit.configs import (GPTQ, SVD, LowRank, Magnitude, Prune, Quant, SparseGPT,
                            Wanda, WhitenedSVD)
from memfit.errors import UserError
from memfit.formats.grid import IntFormat

@dataclass(frozen=True, kw_only=True)
class Structured:
    """Structured pruning that makes matrices smaller, applied before any other method: drop the
    `drop_blocks` blocks whose output is closest to their input (angular distance), keep
    `mlp_keep` of the MLP channels and `heads_keep` query heads (whole GQA groups), each chosen
    by activation importance on the calibration windows."""

    drop_blocks: int = 0
    mlp_keep: float | None = None    # fraction (0, 1] or a channel count
    heads_keep: int | None = None    # number of query heads kept

    def __post_init__(self):
        if self.drop_blocks < 0:
            raise UserError(f"drop_blocks={self.drop_blocks} must be >= 0")

    @property
    def needs_data(self) -> bool:
        return True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, base=None) -> "Structured":
        _check_keys("structured", d, cls)
        return cls(**d)


def _check_keys(what: str, d: dict, cls) -> None:
    if not isinstance(d, dict):
        raise UserError(f"{what} must be a mapping of its fields")
    valid = {f.name for f in fields(cls)}
    if set(d) - valid:
        raise UserError(f"unknown {what} key(s) {sorted(set(d) - valid)}; valid: {sorted(valid)}")


@dataclass(frozen=True, kw_only=True)
class Calib:
    """Calibration text: source, number of windows, window length, seed, where activations live."""

    data: str = "builtin"
    samples: int = 64
    seq_len: int = 512
    seed: int = 0
    offload: str = "memory"       # "memory" or "disk" (calibration activations in a temp folder)
    sequential: str = "auto"      # "group": each linear group sees the block with the groups
                                  # before it compressed; "block": all see the block as it was;
                                  # "auto": block for Wanda alone, group otherwise
    bos: str = "auto"             # windows start with BOS: auto (as the tokenizer does), always, never

    def __post_init__(self):
        if self.samples < 1 or self.seq_len < 2:
            raise UserError("calib samples must be >= 1 and seq_len >= 2")
        if self.offload not in ("memory", "disk"):
            raise UserError(f"unknown offload {self.offload!r}; use 'memory' or 'disk'")
        if self.bos not in ("auto", "always", "never"):
            raise UserError(f"unknown bos {self.bos!r}; use 'auto', 'always' or 'never'")
        if self.sequential not in ("auto", "group", "block"):
            raise UserError(f"unknown sequential {self.sequential!r}; use 'auto', 'group' or "
                            "'block'")


@dataclass(frozen=True)
class Compose:
    """Prune or factorize, then quantize what is left: the kept values (stored with the sparse
    structure) or both low-rank factors. SparseGPT + GPTQ runs as one sweep (joint); other
    pruners fix the mask and GPTQ compensates around it."""

    first: Prune | LowRank
    quant: Quant

    def __post_init__(self):
        fmt = self.quant.format
        if self.quant.awq:
            raise UserError("awq scales the dense weight before quantization; it does not "
                            "compose with prune or lowrank yet: drop awq from quant")
        if isinstance(self.first, Prune) and not fmt.symmetric and fmt.zero_point == "float":
            raise UserError("pruning + quantization needs an integer or symmetric zero point (a "
                            "pruned weight must stay exactly 0); use algo rtn or gptq with "
                            "zero_point: int")
        if isinstance(self.first, SparseGPT) and isinstance(self.quant, GPTQ) \
                and (self.quant.act_order or self.quant.clip != "minmax"):
            raise UserError("SparseGPT + GPTQ runs as one joint sweep with min-max groups; drop "
                            "act_order/clip from quant, or prune with wanda for a masked GPTQ")

    @property
    def needs_data(self) -> bool:
        return self.first.needs_data or self.quant.needs_data

    @property
    def owl(self) -> bool:
        return getattr(self.first, "owl", False)

    def to_dict(self) -> dict:
        kind = "prune" if isinstance(self.first, Prune) else "lowrank"
        return {kind: self.first.to_dict(), "quant": self.quant.to_dict()}


_SPECS = {"quant": Quant, "prune": Prune, "lowrank": LowRank}


def _compose(first, quant):
    """The spec of a module: one of the parts alone, or both as a Compose (None if neither)."""
    if first is not None and quant is not None:
        return Compose(first, quant)
    return first if first is not None else quant


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """The methods for the selected linears: `quant`, `prune` or `lowrank`, or `quant` composed
    with one of the other two; module filters and per-module overrides."""

    quant: Quant | None = None
    prune: Prune | None = None
    lowrank: LowRank | None = None
    structured: Structured | None = None
    embeddings: IntFormat | None = None   # the input embedding table on the integer grid (RTN)
    head: IntFormat | None = None         # the output head (tied to the embeddings: same buffers)
    ignore: tuple[str, ...] = ("lm_head",)
    overrides: tuple[tuple[str, object], ...] = ()   # (glob pattern, spec or None = skip)
    calib: Calib = field(default_factory=Calib)

    def __post_init__(self):
        if self.prune is not None and self.lowrank is not None:
            raise UserError("a recipe takes prune or lowrank, not both (each composes with quant)")
        self.main  # noqa: B018 -- builds the Compose, so a bad combination fails here

    @property
    def main(self):
        return _compose(self.prune or self.lowrank, self.quant)

    def spec_for(self, name: str):
        """The spec of module `name` (last matching override wins), or None."""
        if any(fnmatch.fnmatchcase(name, p) or name.endswith("." + p) or name == p
               for p in self.ignore):
            return None
        spec = self.main
        for pattern, override in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                spec = override
        return spec

    @property
    def sequential(self) -> str:
        """calib.sequential with "auto" resolved: "block" when Wanda is the only data-driven
        method (its published order: every mask from the dense block's inputs; measured better
        than true-sequential at 50% and 2:4 in benchmarks/RESULTS.md), "group" otherwise (GPTQ,
        SparseGPT and whitened SVD compensate what the groups before them changed)."""
        if self.calib.sequential != "auto":
            return self.calib.sequential
        specs = [s for s in [self.main] + [s for _, s in self.overrides] if s is not None]
        wanda = lambda s: isinstance(s, Wanda)
        alone = any(map(wanda, specs)) and all(wanda(s) or not s.needs_data for s in specs)
        return "block" if alone else "group"

    @property
    def needs_data(self) -> bool:
        specs = [self.main, self.structured] + [s for _, s in self.overrides]
        return any(s is not None and s.needs_data for s in specs)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k).to_dict() for k in _SPECS if getattr(self, k) is not None}
        if self.structured is not None:
            d["structured"] = self.structured.to_dict()
        for k in ("embeddings", "head"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k).to_dict()
        return {**d, "ignore": list(self.ignore),
                "overrides": {p: self._override_dict(s) for p, s in self.overrides},
                "calib": asdict(self.calib)}

    def _override_dict(self, spec) -> dict | None:
        if spec is None or not isinstance(self.main, Compose):
            return None if spec is None else spec.to_dict()
        if isinstance(spec, Compose):
            return spec.to_dict()
        parts = {k: None for k in ("quant", "prune", "lowrank") if getattr(self, k) is not None}
        return {**parts, next(k for k, c in _SPECS.items() if isinstance(spec, c)): spec.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        if not isinstance(d, dict):
            raise UserError("a recipe must be a mapping with keys quant|prune|lowrank, ignore, "
                            "overrides, calib")
        valid = set(_SPECS) | {"structured", "embeddings", "head", "ignore", "overrides", "calib"}
        if set(d) - valid:
            raise UserError(f"unknown recipe key(s) {sorted(set(d) - valid)}; valid: {sorted(valid)}")
        specs = {k: _SPECS[k].from_dict(d[k]) for k in _SPECS if d.get(k)}
        if "prune" in specs and "lowrank" in specs:
            raise UserError("a recipe takes prune or lowrank, not both (each composes with quant)")
        overrides = tuple((p, _override(specs, o)) for p, o in (d.get("overrides") or {}).items())
        calib = d.get("calib") or {}
        _check_keys("calib", calib, Calib)
        structured = Structured.from_dict(d["structured"]) if d.get("structured") else None
        tables = {k: _int_format(k, d[k]) for k in ("embeddings", "head") if d.get(k)}
        return cls(**specs, structured=structured, **tables, ignore=tuple(d.get("ignore", ("lm_head",))),
                   overrides=overrides, calib=Calib(**calib))


def _int_format(what: str, d) -> IntFormat:
    """An `embeddings:`/`head:` entry: IntFormat fields, e.g. {bits: 8, group_size: null,
    symmetric: true} (int8 per row) or {bits: 4, group_size: 64}."""
    _check_keys(what, d, IntFormat)
    return IntFormat(**d)


def _override(specs: dict, o):
    """An override's spec: null skips the module; in a one-method recipe the dict holds that
    method's fields; in a composed one it maps part names to field dicts (null drops a part)."""
    if o is None:
        return None
    if len(specs) < 2:
        kind, base = next(iter(specs.items()), ("quant", None))
        return _SPECS[kind].from_dict(o, base=base)
    if not isinstance(o, dict) or set(o) - set(specs):
        raise UserError(f"an override of a {'+'.join(specs)} recipe maps parts "
                        f"({', '.join(specs)}) to their fields or null, got {o!r}")
    parts = {k: (None if o[k] is None else _SPECS[k].from_dict(o[k], base=specs[k]))
             if k in o else specs[k] for k in specs}
    return _compose(parts.get("prune") or parts.get("lowrank"), parts.get("quant"))


def _preset(algo: str, bits: int, group: int | None, *, symmetric: bool | None = None,
            gguf_exact: bool = False, **kw) -> Recipe:
    sym = group is None and bits == 8 if symmetric is None else symmetric
    zero = "float" if algo == "hqq" else "int"
    fmt = IntFormat(bits=bits, group_size=group, symmetric=sym, zero_point=zero,
                    gguf_exact=gguf_exact)
    return Recipe(quant=Quant.methods()[algo](format=fmt, **kw))


# GPTQ presets use act-order and MSE-searched clipping: on the default model at 4-bit g64 they
# cut plain GPTQ's perplexity gap to fp32 by ~3.5x for ~1.5x the time (benchmarks/RESULTS.md).
_BEST = dict(act_order=True, clip="mse")
_GGUF8 = IntFormat(bits=8, group_size=32, symmetric=True, gguf_exact=True)  # GGUF Q8_0
PRESETS: dict[str, Recipe] = {
    "w8": _preset("rtn", 8, None),
    "w8-gptq": _preset("gptq", 8, None, **_BEST),
    "w4g64": _preset("rtn", 4, 64),
    "w4g64-mse": _preset("rtn", 4, 64, clip="mse"),
    "w4g64-hqq": _preset("hqq", 4, 64),
    "w4g64-gptq": _preset("gptq", 4, 64, **_BEST),
    "w4g128-gptq": _preset("gptq", 4, 128, **_BEST),
    "w4g32-gptq": _preset("gptq", 4, 32, **_BEST),
    "w3g64": _preset("rtn", 3, 64),
    "w3g64-mse": _preset("rtn", 3, 64, clip="mse"),
    "w3g64-gptq": _preset("gptq", 3, 64, **_BEST),
    # AWQ: activation-aware input-channel scales folded into the norms, then RTN or GPTQ
    "w4g64-awq": _preset("rtn", 4, 64, awq=True),
    "w4g64-awq-gptq": _preset("gptq", 4, 64, awq=True, awq_clip=False, **_BEST),
    "w3g64-awq": _preset("rtn", 3, 64, awq=True),
    "w3g64-awq-gptq": _preset("gptq", 3, 64, awq=True, awq_clip=False, **_BEST),
    "w2g32-gptq": _preset("gptq", 2, 32, **_BEST),
    # W8A8: int8 weights per channel x int8 activations per token, multiplied in int8
    "w8a8": _preset("rtn", 8, None, act_bits=8),
    "w8a8-sq": _preset("rtn", 8, None, act_bits=8, smoothquant=0.5),
    "magnitude-50": Recipe(prune=Magnitude(sparsity=0.5)),
    "wanda-50": Recipe(prune=Wanda(sparsity=0.5)),
    "sparsegpt-50": Recipe(prune=SparseGPT(sparsity=0.5)),
    "wanda-50-owl": Recipe(prune=Wanda(sparsity=0.5, owl=True)),
    "wanda-2of4": Recipe(prune=Wanda(sparsity=None, nm="2:4")),
    "sparsegpt-2of4": Recipe(prune=SparseGPT(sparsity=None, nm="2:4")),
    "svd-80": Recipe(lowrank=SVD(keep=0.8)),
    "wsvd-80": Recipe(lowrank=WhitenedSVD(keep=0.8)),
    "drop2": Recipe(structured=Structured(drop_blocks=2)),
    # composed: the kept values / both factors quantized
    "wanda-50-w4g64": Recipe(prune=Wanda(sparsity=0.5),
                             quant=_preset("gptq", 4, 64, **_BEST).quant),
    "sparsegpt-50-w4g64": Recipe(prune=SparseGPT(sparsity=0.5),
                                 quant=_preset("gptq", 4, 64).quant),
    "sparsegpt-2of4-w4g64": Recipe(prune=SparseGPT(sparsity=None, nm="2:4"),
                                   quant=_preset("gptq", 4, 64).quant),
    # the embedding table and (tied) head in int8 per row as well
    "w4g64-gptq-e8": replace(_preset("gptq", 4, 64, **_BEST),
                             embeddings=IntFormat(bits=8, group_size=None, symmetric=True),
                             head=IntFormat(bits=8, group_size=None, symmetric=True)),
    # GGUF-exact: every matrix and the embedding table (the tied head) on a grid that GGUF
    # blocks hold bit for bit, so `memfit export --format gguf` rounds nothing again
    "w8g32-gguf": replace(_preset("rtn", 8, 32, symmetric=True, gguf_exact=True),
                          embeddings=_GGUF8, head=_GGUF8),
    "w4g32-gguf": replace(_preset("gptq", 4, 32, gguf_exact=True, **_BEST),
                          embeddings=_GGUF8, head=_GGUF8),
    "wsvd-80-w8": Recipe(lowrank=WhitenedSVD(keep=0.8), quant=_preset("gptq", 8, None).quant),
}


def load_recipe(spec: str | Recipe) -> Recipe:
    """A preset name, a .yaml/.yml/.json file, or a Recipe -> Recipe."""
    if isinstance(spec, Recipe):
        return spec
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if not path.exists():
        raise UserError(f"unknown recipe {spec!r}: not a preset ({', '.join(PRESETS)}) "
                        "and not a file")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e})") from None
    else:
        import yaml
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    return Recipe.from_dict(d)
