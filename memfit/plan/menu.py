"""What the planner may choose, per matrix and per block, and what each choice costs in bytes.

An `Option` is one way to store one unit (a linear, the embedding table, the output head): keep
it 16-bit, or a memfit packed format built by a real algorithm (the module is built here, by the
same code `memfit compress` runs, and kept: the plan's model is assembled from these very
modules, so what was measured is what is written). Its `family` groups options whose predicted
damage shares one calibration factor (memfit.plan.sensitivity).

Bytes are counted two ways: `stored` (what the artifact holds for the unit: 16-bit dense, or the
packed module's `nbytes()`), and `resident` (what the unit occupies when running on the target:
dense weights in the compute dtype, packed modules plus any prepared kernel layout their forward
caches, measured by running the module once on the target device).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from memfit.configs import GPTQ, RTN, SparseGPT, WhitenedSVD
from memfit.formats.grid import IntFormat
from memfit.recipe import Compose


@dataclass(frozen=True)
class Choice:
    """A named storage choice for a linear: `spec` is a memfit config (None: keep 16-bit)."""

    name: str
    family: str
    spec: object = None

    def fits(self, out_features: int, in_features: int) -> bool:
        """Whether the choice can represent an (out, in) weight."""
        spec = getattr(self.spec, "quant", self.spec)
        fmt = getattr(spec, "format", None)
        first = getattr(self.spec, "first", None)
        if fmt is not None and fmt.group_size is not None and in_features % fmt.group_size:
            return False  # ragged groups work, but cost more than they save here: skip
        return not (first is not None and getattr(first, "pattern", None) and in_features % 4)


def _gptq(bits: int, group: int | None) -> GPTQ:
    return GPTQ(format=IntFormat(bits=bits, group_size=group, symmetric=False), act_order=True)


def linear_menu(methods: str = "gptq") -> tuple[Choice, ...]:
    """The candidates for every linear.

    - "gptq" (default): 16-bit; int8 RTN per channel; GPTQ (act-order) int4 at groups
      128/64/32, int3 g64, int2 g32;
    - "all": those, plus SparseGPT 2:4 with int4 g64 values and a whitened SVD keeping half the
      parameters with int8 factors (both per matrix, several times slower to build than the
      quantizers, which share one inverse-Hessian factor per layer group);
    - "rtn": 16-bit, int8, RTN int4 g128/64/32 and int3 g64/32 (no Hessian-based algorithm).
    """
    int8 = RTN(format=IntFormat(bits=8, group_size=None, symmetric=True))
    menu = [Choice("fp16", "keep"), Choice("int8", "int8", int8)]
    if methods == "rtn":
        rtn = lambda b, g: RTN(format=IntFormat(bits=b, group_size=g))
        return tuple(menu + [Choice("int4-g128", "int4", rtn(4, 128)),
                             Choice("int4-g64", "int4", rtn(4, 64)),
                             Choice("int4-g32", "int4", rtn(4, 32)),
                             Choice("int3-g64", "int3", rtn(3, 64)),
                             Choice("int3-g32", "int3", rtn(3, 32))])
    menu += [Choice("int4-g128", "int4", _gptq(4, 128)),
             Choice("int4-g64", "int4", _gptq(4, 64)),
             Choice("int4-g32", "int4", _gptq(4, 32)),
             Choice("int3-g64", "int3", _gptq(3, 64)),
             Choice("int2-g32", "int2", _gptq(2, 32))]
    if methods == "all":
        menu += [Choice("2:4+int4-g64", "sparse",
                        Compose(SparseGPT(sparsity=None, nm="2:4"),
                                GPTQ(format=IntFormat(bits=4, group_size=64)))),
                 Choice("wsvd50+int8", "lowrank",
                        Compose(WhitenedSVD(keep=0.5), int8))]
    return tuple(menu)


# the embedding table and the output head: RTN on the integer grid (memfit.methods)
TABLE_MENU = (
    ("fp16", None),
    ("int8", IntFormat(bits=8, group_size=None, symmetric=True)),
    ("int4-g64", IntFormat(bits=4, group_size=64)),
    ("int4-g32", IntFormat(bits=4, group_size=32)),
)


@dataclass
class Option:
    """One way to store one unit: its bytes and its predicted damage (raw, before the family's
    calibration factor). `module` is the built replacement (None: keep the original)."""

    name: str
    family: str
    stored: int
    resident: int
    damage: float = 0.0
    module: torch.nn.Module | None = field(default=None, repr=False)
    fmt: IntFormat | None = None  # tables: the IntFormat, for memfit.methods.quantize_embeddings_


@dataclass
class Unit:
    """A unit the plan chooses for: a linear inside block `block`, or a table (block None)."""

    key: str
    block: int | None
    options: list[Option]
    weights: int = 0


def dense_bytes(t: torch.Tensor, dtype: torch.dtype) -> int:
    return t.numel() * dtype.itemsize


def resident_bytes(mod: torch.nn.Module, device: str, dtype: torch.dtype) -> int:
    """Bytes `mod` (a memfit packed module) holds once it has run on `device`: its tensors plus
    the prepared kernel layouts its forward caches (QuantLinear.cache_nbytes)."""
    with torch.inference_mode():
        mod(torch.zeros(1, mod.in_features, dtype=dtype, device=device))
    total = mod.nbytes()
    for m in mod.modules():
        cache = getattr(m, "cache_nbytes", None)
        if callable(cache):
            total += cache()
    return total


def drop_caches(mod: torch.nn.Module) -> None:
    for m in mod.modules():
        if callable(getattr(m, "_drop_cache", None)):
            m._drop_cache()


class _Stat:
    """The statistic object memfit.methods reads (its Hessian and the input norms)."""

    def __init__(self, hessian: torch.Tensor):
        self.hessian = hessian

    @property
    def norms(self) -> torch.Tensor:
        return (self.hessian.diagonal() / 2).sqrt()


def group_options(mods: dict[str, torch.nn.Module], menu: tuple[Choice, ...],
                  hessian: torch.Tensor, fisher: dict[str, torch.Tensor], *, device: str,
                  dtype: torch.dtype) -> dict[str, list[Option]]:
    """Every choice of `menu` that fits, built for the linears `mods` that share one input (and
    so one Hessian): quantizers run once on the stacked rows (rows are independent given the
    Hessian), pruning and factorization per matrix. -> {name: options}, each with its bytes
    and its K-FAC damage under that linear's own output Fisher."""
    from memfit.methods import replace_group, weight_2d
    from memfit.plan.sensitivity import kfac_damage

    names = list(mods)
    ws = {n: weight_2d(m) for n, m in mods.items()}
    out = {n: [] for n in names}
    stat = _Stat(hessian)
    for choice in menu:
        fit = [n for n in names if choice.fits(*ws[n].shape)]
        if not fit:
            continue
        if choice.spec is None:
            for n in fit:
                out[n].append(Option(choice.name, choice.family, stored=ws[n].numel() * 2,
                                     resident=ws[n].numel() * dtype.itemsize))
            continue
        built, _ = replace_group([mods[n] for n in fit], choice.spec, stat)
        for n, new in zip(fit, built):
            dw = new.dequantize(torch.float32).to(ws[n].device) - ws[n]
            resident = resident_bytes(new, device, dtype)
            drop_caches(new)
            out[n].append(Option(choice.name, choice.family, stored=new.nbytes(),
                                 resident=resident, damage=kfac_damage(dw, hessian, fisher[n]),
                                 module=new))
    return out


def table_modules(model, fmt: IntFormat, tied: bool):
    """(QuantEmbedding, head QuantLinear or None) for `fmt`, built like
    memfit.methods.quantize_embeddings_ (RTN), without touching `model`. A tied head reads the
    embedding's own buffers."""
    from memfit.algos.rtn import rtn
    from memfit.formats.embedding import QuantEmbedding
    from memfit.formats.intq import PackedIntWeight
    from memfit.formats.quant_linear import QuantLinear

    emb = model.get_input_embeddings()
    res = rtn(emb.weight.detach().float(), fmt)
    packed = PackedIntWeight.from_codes(res.codes, res.scale, None if fmt.symmetric else res.zero,
                                        fmt)
    qe = QuantEmbedding.from_packed(packed, emb)
    head = None
    if tied:
        head = QuantLinear(qe.embedding_dim, qe.num_embeddings, fmt, bias=False,
                           device=qe.qdata.device, dtype=emb.weight.dtype)
        for name in list(head._buffers):
            if name in qe._buffers:
                head._buffers[name] = qe._buffers[name]
    return qe, head


def head_module(model, fmt: IntFormat):
    """An untied output head on the integer grid (RTN), without touching `model`."""
    from memfit.configs import RTN as _RTN
    from memfit.methods import replace_group

    (ql,), _ = replace_group([model.get_output_embeddings()], _RTN(format=fmt), None)
    return ql
