"""Recipes: what to do to which weights, as frozen typed configs that round-trip to dicts, YAML
and JSON. The algorithm chooses values, the format chooses bytes:

    Recipe(quant=Quant(algo="gptq", format=IntFormat(bits=4, group_size=64)))

A recipe file (YAML or JSON) has the same shape:

    quant: {algo: gptq, bits: 4, group_size: 64, symmetric: false, act_order: true}
    ignore: [lm_head]
    overrides:
      "*.down_proj": {bits: 8, group_size: null}   # any Quant field; null = leave unquantized
    calib: {data: builtin, samples: 64, seq_len: 512}

Format fields (bits, group_size, symmetric, zero_point, scale_dtype) sit flat beside the
algorithm's own fields in files; in Python they live in `Quant.format`.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from memfit.errors import UserError
from memfit.formats.grid import IntFormat

ALGOS = ("rtn", "hqq", "gptq")
_FORMAT_KEYS = tuple(f.name for f in fields(IntFormat))


@dataclass(frozen=True, kw_only=True)
class Quant:
    """Weight quantization: an algorithm and the packed format it targets."""

    algo: str = "rtn"
    format: IntFormat = field(default_factory=IntFormat)
    clip: str = "minmax"          # rtn/gptq: "minmax" or "mse" (searched clipping)
    block_size: int = 128         # gptq: columns per lazy-update block
    damp: float = 0.01            # gptq: damping, a fraction of mean(diag H)
    act_order: bool = False       # gptq: quantize columns by decreasing Hessian diagonal
    iters: int = 20               # hqq: half-quadratic iterations

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise UserError(f"unknown algo {self.algo!r}; use one of {', '.join(ALGOS)}")
        if self.clip not in ("minmax", "mse"):
            raise UserError(f"unknown clip {self.clip!r}; use 'minmax' or 'mse'")
        if self.algo == "hqq" and self.format.symmetric:
            raise UserError("hqq refines a zero point; use symmetric: false with algo hqq")
        if self.damp <= 0 or self.block_size < 1 or self.iters < 1:
            raise UserError("damp must be > 0, block_size and iters >= 1")

    @property
    def needs_data(self) -> bool:
        return self.algo == "gptq"

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "format"}
        return {**d, **self.format.to_dict()}

    @classmethod
    def from_dict(cls, d: dict, base: "Quant | None" = None) -> "Quant":
        own = {f.name for f in fields(cls)} - {"format"}
        unknown = set(d) - own - set(_FORMAT_KEYS)
        if unknown:
            raise UserError(f"unknown quant key(s) {sorted(unknown)}; valid: "
                            f"{sorted(own | set(_FORMAT_KEYS))}")
        base = base or cls(format=IntFormat())
        fmt = IntFormat(**{**base.format.to_dict(), **{k: v for k, v in d.items() if k in _FORMAT_KEYS}})
        if d.get("algo") == "hqq" and "zero_point" not in d and not fmt.symmetric:
            fmt = replace(fmt, zero_point="float")  # HQQ's refinement needs a real-valued zero
        return replace(base, format=fmt, **{k: v for k, v in d.items() if k in own})


@dataclass(frozen=True, kw_only=True)
class Calib:
    """Calibration text: source, number of windows, window length, seed, where activations live."""

    data: str = "builtin"
    samples: int = 64
    seq_len: int = 512
    seed: int = 0
    offload: str = "memory"       # "memory" or "disk" (calibration activations in a temp folder)

    def __post_init__(self):
        if self.samples < 1 or self.seq_len < 2:
            raise UserError("calib samples must be >= 1 and seq_len >= 2")
        if self.offload not in ("memory", "disk"):
            raise UserError(f"unknown offload {self.offload!r}; use 'memory' or 'disk'")


@dataclass(frozen=True, kw_only=True)
class Recipe:
    quant: Quant | None = None
    ignore: tuple[str, ...] = ("lm_head",)
    overrides: tuple[tuple[str, Quant | None], ...] = ()   # (glob pattern, spec or None = skip)
    calib: Calib = field(default_factory=Calib)

    def spec_for(self, name: str) -> Quant | None:
        """The quantization spec of module `name` (last matching override wins), or None."""
        if any(fnmatch.fnmatchcase(name, p) or name.endswith("." + p) or name == p
               for p in self.ignore):
            return None
        spec = self.quant
        for pattern, override in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                spec = override
        return spec

    @property
    def needs_data(self) -> bool:
        specs = [self.quant] + [s for _, s in self.overrides]
        return any(s is not None and s.needs_data for s in specs)

    def to_dict(self) -> dict:
        return {
            "quant": self.quant.to_dict() if self.quant else None,
            "ignore": list(self.ignore),
            "overrides": {p: (s.to_dict() if s else None) for p, s in self.overrides},
            "calib": asdict(self.calib),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        if not isinstance(d, dict):
            raise UserError("a recipe must be a mapping with keys quant, ignore, overrides, calib")
        valid = {"quant", "ignore", "overrides", "calib"}
        if set(d) - valid:
            raise UserError(f"unknown recipe key(s) {sorted(set(d) - valid)}; valid: {sorted(valid)}")
        quant = Quant.from_dict(d["quant"]) if d.get("quant") else None
        overrides = tuple((p, None if o is None else Quant.from_dict(o, base=quant))
                          for p, o in (d.get("overrides") or {}).items())
        calib = d.get("calib") or {}
        unknown = set(calib) - {f.name for f in fields(Calib)}
        if unknown:
            raise UserError(f"unknown calib key(s) {sorted(unknown)}; valid: "
                            f"{sorted(f.name for f in fields(Calib))}")
        return cls(quant=quant, ignore=tuple(d.get("ignore", ("lm_head",))), overrides=overrides,
                   calib=Calib(**calib))


def _preset(algo: str, bits: int, group: int | None, **kw) -> Recipe:
    sym = group is None and bits == 8
    zero = "float" if algo == "hqq" else "int"
    return Recipe(quant=Quant(algo=algo, format=IntFormat(bits=bits, group_size=group,
                                                          symmetric=sym, zero_point=zero), **kw))


# GPTQ presets use act-order and MSE-searched clipping: on the default model at 4-bit g64 they
# cut plain GPTQ's perplexity gap to fp32 by ~3.5x for ~1.5x the time (benchmarks/RESULTS.md).
_BEST = dict(act_order=True, clip="mse")
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
    "w2g32-gptq": _preset("gptq", 2, 32, **_BEST),
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
