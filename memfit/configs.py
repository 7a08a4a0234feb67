"""One frozen config class per method: what a recipe asks for, typed.

    GPTQ(format=IntFormat(bits=4, group_size=64), act_order=True)
    Wanda(sparsity=0.5)            SparseGPT(nm="2:4")            WhitenedSVD(keep=0.8)

Three families share their validation and their file syntax: `Quant` (RTN, HQQ, GPTQ: an
algorithm and the `IntFormat` it targets), `Prune` (Magnitude, Wanda, SparseGPT: a sparsity or an
N:M pattern) and `LowRank` (SVD, WhitenedSVD, RandomizedSVD: a kept share, an energy or a rank).
In a recipe file a family's mapping names its method (`quant: {algo: gptq, bits: 4, ...}`,
`prune: {method: wanda, sparsity: 0.5}`, `lowrank: {method: wsvd, keep: 0.8}`) and
`Family.from_dict` builds that method's class; `to_dict` writes the same shape back.

`needs` says what calibration statistic a method reads (`Needs.HESSIAN`, `Needs.NORMS`,
`Needs.NOTHING`); memfit.methods.METHODS maps each class to its function. Adding a method is one
algorithm function in memfit/algos/, one class here (with its `name`) and one entry there.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, fields, replace
from typing import ClassVar

from memfit.errors import UserError
from memfit.formats.grid import IntFormat

_FORMAT_KEYS = tuple(f.name for f in fields(IntFormat))
_ACT_KEYS = ("act_bits", "act_static", "smoothquant")  # written only for W8A8


class Needs(enum.Enum):
    """The calibration statistic a method reads from its layer's inputs."""

    NOTHING = "nothing"
    NORMS = "norms"        # per-input-column squared norms (Wanda)
    HESSIAN = "hessian"    # 2/n XᵀX (GPTQ, SparseGPT, whitened SVD); its diagonal gives norms


class _Family:
    """Shared by the three families: the method classes by name, dict round trips."""

    family: ClassVar[str]
    key: ClassVar[str]             # "algo" or "method": the field naming the method in files
    name: ClassVar[str]
    needs: ClassVar[Needs] = Needs.NOTHING

    @classmethod
    def methods(cls) -> dict[str, type]:
        """{name: class} of this family's methods (the table at the end of this module)."""
        return next(METHODS[c] for c in cls.__mro__ if c in METHODS)

    @property
    def needs_data(self) -> bool:
        return self.needs is not Needs.NOTHING

    def to_dict(self) -> dict:
        return {self.key: self.name, **asdict(self)}

    @classmethod
    def _resolve(cls, d: dict, base) -> tuple[type, dict]:
        """The method class named by `d` (else `base`'s, else the family default) and the field
        values: `base`'s own fields that the class has, then `d`'s."""
        if not isinstance(d, dict):
            raise UserError(f"{cls.family} must be a mapping of its fields")
        methods = cls.methods()
        name = d.get(cls.key, base.name if base is not None else cls.default)
        if name not in methods:
            raise UserError(f"unknown {cls.key} {name!r} for {cls.family}; use one of "
                            f"{', '.join(methods)}")
        sub = methods[name]
        valid = {f.name for f in fields(sub)}
        unknown = set(d) - valid - {cls.key} - set(cls.extra_keys())
        if unknown:
            raise UserError(f"unknown {cls.family} key(s) {sorted(unknown)} for {cls.key} {name}; "
                            f"valid: {sorted(valid | set(cls.extra_keys()))}")
        inherited = {} if base is None else {k: v for k, v in asdict(base).items() if k in valid}
        if base is not None and "format" in inherited:
            inherited["format"] = base.format  # asdict flattened it
        return sub, {**inherited, **{k: v for k, v in d.items() if k != cls.key}}

    @classmethod
    def extra_keys(cls) -> tuple[str, ...]:
        return ()


# ----- quantization ---------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Quant(_Family):
    """Weight quantization: an algorithm and the packed format it targets. Files write the
    format's fields flat beside the algorithm's (`{algo: gptq, bits: 4, group_size: 64}`)."""

    family: ClassVar[str] = "quant"
    key: ClassVar[str] = "algo"
    default: ClassVar[str] = "rtn"

    format: IntFormat = field(default_factory=IntFormat)
    awq: bool = False              # AWQ: search per-input-channel scales first (memfit.awq)
    awq_grid: int = 20             # AWQ: exponents α tried, evenly from 0 to awq_max_alpha
    awq_max_alpha: float = 1.0     # AWQ: the largest α, in (0, 1]
    awq_clip: bool = True          # AWQ: search a clipping bound per (row, group) (with RTN:
                                   # inside the α search, memfit.awq)
    awq_duo: bool = False          # AWQ: also try mean|x|^α / mean|w|^(1-α) scales
    act_bits: int | None = None    # 8: W8A8, int8 activations too (memfit.formats.w8a8)
    act_static: bool = False       # W8A8: one calibrated per-tensor activation scale, not per token
    smoothquant: float | None = None  # W8A8: SmoothQuant's α in (0, 1] (memfit.smoothquant)

    def __post_init__(self):
        assert type(self) is not Quant, "Quant is a family: use RTN, HQQ or GPTQ"
        self._check_activations()
        clip = getattr(self, "clip", "minmax")
        if clip not in ("minmax", "mse"):
            raise UserError(f"unknown clip {clip!r}; use 'minmax' or 'mse'")
        for key in ("awq", "awq_clip", "awq_duo"):
            if not isinstance(getattr(self, key), bool):
                raise UserError(f"{key}={getattr(self, key)!r} must be true or false")
        if self.awq:
            from memfit.algos.awq import alphas
            alphas(self.awq_grid, self.awq_max_alpha)  # UserError naming the bad option

    def _check_activations(self) -> None:
        if self.act_bits is None:
            if self.act_static or self.smoothquant is not None:
                raise UserError("act_static and smoothquant quantize activations: add act_bits: 8")
            return
        if self.act_bits != 8:
            raise UserError(f"act_bits={self.act_bits!r} is not supported; use 8 (W8A8) or null")
        from memfit.formats.w8a8 import check_w8_format
        check_w8_format(self.format)
        if not isinstance(self.act_static, bool):
            raise UserError(f"act_static={self.act_static!r} must be true or false")
        sq = self.smoothquant
        if sq is not None and (isinstance(sq, bool) or not isinstance(sq, (int, float))
                               or not 0 < sq <= 1):
            raise UserError(f"smoothquant={sq!r} is outside (0, 1]: SmoothQuant's α, the share "
                            "of activation outliers moved into the weights (e.g. 0.5)")
        if self.awq and sq is not None:
            raise UserError("awq and smoothquant both rescale input channels; choose one")

    @property
    def needs_data(self) -> bool:  # AWQ/SmoothQuant/static scales measure the activations
        return self.needs is not Needs.NOTHING or self.awq or self.act_static \
            or self.smoothquant is not None

    @property
    def algo(self) -> str:
        return self.name

    def to_dict(self) -> dict:
        d = {k: v for k, v in super().to_dict().items()
             if k != "format" and (self.awq or not k.startswith("awq"))
             and (self.act_bits is not None or k not in _ACT_KEYS)}
        return {**d, **self.format.to_dict()}

    @classmethod
    def extra_keys(cls) -> tuple[str, ...]:
        return _FORMAT_KEYS

    @classmethod
    def from_dict(cls, d: dict, base: "Quant | None" = None) -> "Quant":
        sub, values = cls._resolve(d, base)
        fmt_fields = {k: values.pop(k) for k in _FORMAT_KEYS if k in values}
        fmt = values.pop("format", None) or IntFormat()
        fmt = IntFormat(**{**fmt.to_dict(), **fmt_fields})
        if sub is HQQ and "zero_point" not in d and not fmt.symmetric:
            fmt = replace(fmt, zero_point="float")  # HQQ's refinement needs a real-valued zero
        return sub(format=fmt, **values)


@dataclass(frozen=True, kw_only=True)
class RTN(Quant):
    """Round to nearest on min-max groups, or MSE-searched clipping (`clip: mse`)."""

    name: ClassVar[str] = "rtn"
    clip: str = "minmax"


@dataclass(frozen=True, kw_only=True)
class HQQ(Quant):
    """Half-quadratic refinement of a real-valued zero point, data-free."""

    name: ClassVar[str] = "hqq"
    iters: int = 20

    def __post_init__(self):
        super().__post_init__()
        if self.format.symmetric:
            raise UserError("hqq refines a zero point; use symmetric: false with algo hqq")
        if self.iters < 1:
            raise UserError(f"iters={self.iters} must be >= 1")


@dataclass(frozen=True, kw_only=True)
class GPTQ(Quant):
    """Column-by-column quantization that compensates each rounding error on later columns."""

    name: ClassVar[str] = "gptq"
    needs: ClassVar[Needs] = Needs.HESSIAN
    clip: str = "minmax"          # "mse": searched clipping per group
    block_size: int = 128         # columns per lazy-update block
    damp: float = 0.01            # damping, a fraction of mean(diag H)
    act_order: bool = False       # quantize columns by decreasing Hessian diagonal

    def __post_init__(self):
        super().__post_init__()
        if self.damp <= 0 or self.block_size < 1:
            raise UserError("gptq damp must be > 0 and block_size >= 1")


# ----- pruning --------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Prune(_Family):
    """Pruning: which weights to zero. Exactly one of `sparsity` (unstructured, per row) or `nm`
    ("2:4": keep N of every M consecutive inputs). Stored as a bitmask, or in the 2:4 layout."""

    family: ClassVar[str] = "prune"
    key: ClassVar[str] = "method"
    default: ClassVar[str] = "wanda"

    sparsity: float | None = 0.5
    nm: str | None = None
    owl: bool = False              # OWL: per-block sparsity from outlier ratios, mean = sparsity
    owl_lambda: float = 0.08       # OWL: each block's sparsity stays within sparsity ± owl_lambda
    owl_m: float = 5.0             # OWL: an outlier scores above owl_m x the block's mean

    def __post_init__(self):
        assert type(self) is not Prune, "Prune is a family: use Magnitude, Wanda or SparseGPT"
        if self.owl and self.sparsity is None:
            raise UserError("owl sets per-block sparsities around `sparsity`; it does not apply "
                            "to an N:M pattern")
        if (self.sparsity is None) == (self.nm is None):
            raise UserError("give exactly one of prune sparsity (e.g. 0.5) or nm (e.g. '2:4')")
        if self.sparsity is not None and not 0 <= self.sparsity < 1:
            raise UserError(f"sparsity={self.sparsity} is outside [0, 1); e.g. 0.5 prunes half")
        if self.nm is not None:
            n, _, m = str(self.nm).partition(":")
            if not (n.isdigit() and m.isdigit()) or int(n) >= int(m) or int(n) < 1:
                raise UserError(f"nm={self.nm!r} is invalid; use 'N:M' with 1 <= N < M, e.g. '2:4'")

    @property
    def method(self) -> str:
        return self.name

    @property
    def pattern(self) -> tuple[int, int] | None:
        if self.nm is None:
            return None
        n, _, m = self.nm.partition(":")
        return int(n), int(m)

    @property
    def needs_data(self) -> bool:  # OWL measures outliers on the dense model's activations
        return self.needs is not Needs.NOTHING or self.owl

    @classmethod
    def from_dict(cls, d: dict, base: "Prune | None" = None) -> "Prune":
        if isinstance(d, dict) and "nm" in d and "sparsity" not in d:
            d = {**d, "sparsity": None}
        sub, values = cls._resolve(d, base)
        return sub(**values)


@dataclass(frozen=True, kw_only=True)
class Magnitude(Prune):
    """Smallest |w| per row (or per N:M group); no data."""

    name: ClassVar[str] = "magnitude"


@dataclass(frozen=True, kw_only=True)
class Wanda(Prune):
    """Smallest |w| x input norm per row (Wanda)."""

    name: ClassVar[str] = "wanda"
    needs: ClassVar[Needs] = Needs.NORMS


@dataclass(frozen=True, kw_only=True)
class SparseGPT(Prune):
    """Mask by the Hessian-weighted error, compensated on later columns (SparseGPT)."""

    name: ClassVar[str] = "sparsegpt"
    needs: ClassVar[Needs] = Needs.HESSIAN
    block_size: int = 128
    damp: float = 0.01


# ----- low-rank -------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class LowRank(_Family):
    """Low-rank factorization W ≈ A·B. The rank of each matrix comes from exactly one of `keep`
    (the fraction of its parameters kept: a byte budget), `energy` (smallest rank holding that
    share of Σσ², of the whitened spectrum for wsvd) or `rank` (the same for every matrix)."""

    family: ClassVar[str] = "lowrank"
    key: ClassVar[str] = "method"
    default: ClassVar[str] = "wsvd"

    keep: float | None = 0.8
    energy: float | None = None
    rank: int | None = None

    def __post_init__(self):
        assert type(self) is not LowRank, "LowRank is a family: use SVD, WhitenedSVD or RandomizedSVD"
        if sum(x is not None for x in (self.keep, self.energy, self.rank)) != 1:
            raise UserError("give exactly one of lowrank keep (e.g. 0.8), energy (e.g. 0.95) "
                            "or rank (e.g. 256)")
        if self.keep is not None and not 0 < self.keep < 1:
            raise UserError(f"keep={self.keep} must be in (0, 1): the fraction of parameters kept")
        if self.energy is not None and not 0 < self.energy < 1:
            raise UserError(f"energy={self.energy} must be in (0, 1): the share of Σσ² kept")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise UserError(f"rank={self.rank!r} must be a positive integer")

    @property
    def method(self) -> str:
        return self.name

    @classmethod
    def from_dict(cls, d: dict, base: "LowRank | None" = None) -> "LowRank":
        if isinstance(d, dict) and {"energy", "rank"} & set(d) and "keep" not in d:
            d = {"keep": None, "energy": None, "rank": None, **d}  # the given one replaces keep
        sub, values = cls._resolve(d, base)
        return sub(**values)


@dataclass(frozen=True, kw_only=True)
class SVD(LowRank):
    """Truncated SVD of the weight."""

    name: ClassVar[str] = "svd"


@dataclass(frozen=True, kw_only=True)
class WhitenedSVD(LowRank):
    """SVD of W·S with S the Cholesky factor of the input Gram matrix (activation-aware)."""

    name: ClassVar[str] = "wsvd"
    needs: ClassVar[Needs] = Needs.HESSIAN
    damp: float = 0.01             # Cholesky damping of XᵀX


@dataclass(frozen=True, kw_only=True)
class RandomizedSVD(LowRank):
    """Randomized SVD through a QR range finder (fast on wide matrices)."""

    name: ClassVar[str] = "rsvd"


METHODS: dict[type, dict[str, type]] = {
    Quant: {c.name: c for c in (RTN, HQQ, GPTQ)},
    Prune: {c.name: c for c in (Magnitude, Wanda, SparseGPT)},
    LowRank: {c.name: c for c in (SVD, WhitenedSVD, RandomizedSVD)},
}
