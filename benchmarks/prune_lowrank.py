"""Pruning, low-rank and healing vs plain quantization at equal bytes, beside llm-compressor.

Every row ("setting") compresses a fresh float32 copy of the model on the same calibration windows
(built-in calib split, seed 0), then is stored and scored as a copy in --store-dtype (float16 by
default: float values such as kept pruned weights or low-rank factors follow it, an int format's
codes and scales keep their own dtypes), against the float32 model on the same evaluation windows
(built-in eval split) by memfit's evaluator: perplexity, KLD, top-1 agreement; plus compress
seconds, the stored bytes of the decoder blocks' linear layers (the compressed ones) with their
bits per original weight, and the whole model's stored weight bytes. A dense row in the store
dtype is the baseline every technique must beat at fewer bytes.

- memfit rows: the recipes in SETTINGS (pruning with and without OWL, N:M, SVD / whitened SVD,
  plain quantization, the composed presets that memfit.recipe.PRESETS has), or any preset name
  or recipe file.
- llm-compressor rows (--peer-python): Wanda and SparseGPT at 50% and 2:4 through
  benchmarks/peers/llmc_run.py on the same windows; its dense output is scored here, its bytes are
  those of the artifact it writes (compressed-tensors 0.19 writes pruned weights dense). No peer
  OWL rows: llm-compressor 0.14.0.1's sparsity_profile="owl" stops with "Cannot invoke event
  before initializing".
- --distill-steps N: each sparse / low-rank memfit row (or those of --distill-settings) is also
  healed by distillation toward the float32 model for N steps and scored again ("+ heal N lr X"); N:M
  patterns are asserted after compression and after healing.

Each finished row is appended to --jsonl, so a full run splits over several short calls, and
--table renders the markdown tables (per row, and at equal bytes against plain quantization) from
those files; a row measured again replaces the earlier one:

    python benchmarks/prune_lowrank.py --device cuda --jsonl pl.jsonl --settings wanda-50,svd-80
    python benchmarks/prune_lowrank.py --device cuda --jsonl pl.jsonl --settings '' \
        --peer-python python3                  # llm-compressor rows only
    python benchmarks/prune_lowrank.py --device cuda --jsonl pl.jsonl --settings sparsegpt-2of4 \
        --distill-steps 200
    python benchmarks/prune_lowrank.py --table pl.jsonl
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shlex
import struct
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from memfit.api import compress_
from memfit.archs import arch_for, block_list
from memfit.calib.data import token_windows
from memfit.distill import distill_
from memfit.eval.lm import evaluate_lm
from memfit.eval.memory import weight_table
from memfit.formats.sparse import SparseLinear
from memfit.models import load_model
from memfit.recipe import PRESETS, Calib, LowRank, Prune, Recipe, load_recipe
from peers.llmc import run_llmc

QUANT_PRESETS = ("w8", "w4g64-gptq", "w3g64-gptq", "w2g32-gptq")
COMPOSED_PRESETS = ("wanda-50-w4g64", "sparsegpt-50-w4g64", "sparsegpt-2of4-w4g64", "wsvd-80-w8")


def _prune(method: str, *, nm: str | None = None, owl: bool = False,
           sequential: str = "auto") -> Recipe:
    return Recipe(prune=Prune(method=method, sparsity=None if nm else 0.5, nm=nm, owl=owl),
                  calib=Calib(sequential=sequential))


SETTINGS: dict[str, Recipe] = {
    **{f"{m}-50{'-owl' * owl}": _prune(m, owl=owl)
       for m in ("magnitude", "wanda", "sparsegpt") for owl in (False, True)},
    "wanda-2of4": _prune("wanda", nm="2:4"),
    "sparsegpt-2of4": _prune("sparsegpt", nm="2:4"),
    "sparsegpt-4of8": _prune("sparsegpt", nm="4:8"),
    # the other calibration order than the default (calib.sequential auto: block for Wanda,
    # group, i.e. true-sequential, for SparseGPT)
    **{f"wanda-{s}-group": _prune("wanda", nm=nm, owl=s.endswith("owl"), sequential="group")
       for s, nm in (("50", None), ("50-owl", None), ("2of4", "2:4"))},
    **{f"sparsegpt-{s}-block": _prune("sparsegpt", nm=nm, sequential="block") for s, nm in
       (("50", None), ("2of4", "2:4"))},
    **{f"{m}-{round(100 * keep)}": Recipe(lowrank=LowRank(method=m, keep=keep))
       for m in ("svd", "wsvd") for keep in (0.9, 0.8, 0.7)},
    **{name: PRESETS[name] for name in QUANT_PRESETS + COMPOSED_PRESETS if name in PRESETS},
}
# llm-compressor's pruners, named like the memfit rows they face (llmc_run.py arguments)
PEER_SETTINGS = {
    "wanda-50": ["--method", "wanda", "--sparsity", "0.5"],
    "sparsegpt-50": ["--method", "sparsegpt", "--sparsity", "0.5"],
    "wanda-2of4": ["--method", "wanda", "--nm", "2:4"],
    "sparsegpt-2of4": ["--method", "sparsegpt", "--nm", "2:4"],
}


# ----- measuring -----------------------------------------------------------------------------

def kind(recipe: Recipe) -> str:
    """'prune', 'lowrank', 'quant', 'prune+quant', ...: the methods a recipe applies."""
    d = recipe.to_dict()
    return "+".join(k for k in ("structured", "prune", "lowrank", "quant") if d.get(k)) or "none"


def linear_names(model) -> list[str]:
    """Full names of the linear layers inside the decoder blocks (those memfit compresses)."""
    arch = arch_for(model.config)
    blocks = block_list(model, arch)
    prefix = next(name for name, mod in model.named_modules() if mod is blocks)
    return [f"{prefix}.{i}.{n}" for i in range(len(blocks)) for g in arch.groups for n in g]


def stored_linear_bytes(model) -> int:
    """Bytes of the state-dict tensors of the decoder linears, as a saved model stores them."""
    return sum(t.numel() * t.element_size() for name in linear_names(model)
               for t in model.get_submodule(name).state_dict().values())


def artifact_linear_bytes(folder: Path, names: list[str]) -> int:
    """Bytes of the tensors of modules `names` in a folder's safetensors files (from headers)."""
    wanted, total = set(names), 0
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                     if k.rpartition(".")[0] in wanted)
    return total


def artifact_format(folder: Path) -> str:
    """What a compressed-tensors checkpoint says it stores (quantization / sparsity formats)."""
    config = json.loads((folder / "config.json").read_text())
    cfg = config.get("quantization_config") or {}
    formats = [cfg.get("format"), (cfg.get("sparsity_config") or {}).get("format")]
    return " + ".join(f for f in formats if f) or f"dense {config.get('dtype')}, no compression"


def check_pattern(model, recipe: Recipe) -> None:
    """Assert the recipe's N:M pattern in every SparseLinear (dequantize also rebuilds the int values)."""
    nm = (recipe.to_dict().get("prune") or {}).get("nm")
    if not nm:
        return
    n, m = (int(x) for x in nm.split(":"))
    for name, mod in model.named_modules():
        if isinstance(mod, SparseLinear):
            w = mod.dequantize()
            assert ((w.view(w.shape[0], -1, m) != 0).sum(-1) <= n).all(), f"{nm} broken in {name}"


def score(model, ref, windows) -> dict:
    r = evaluate_lm(model, windows, ref=ref, progress=False)
    return {"perplexity": r["perplexity"], "kld": r["kld"], "top1": r["top1_agreement"]}


def sizes(model, weights: int) -> dict:
    linear = stored_linear_bytes(model)
    return {"linear_bytes": linear, "linear_bits": 8 * linear / weights,
            "model_bytes": weight_table(model)["weight_bytes"]}


def memfit_note(model, report: dict) -> str:
    formats = [f["format"] for f in weight_table(model)["packed"]]
    owl = report.get("owl_sparsities")
    if owl:
        formats.append(f"OWL block sparsity {min(owl):.3f}-{max(owl):.3f}")
    return "; ".join(formats)


# ----- the rows ------------------------------------------------------------------------------

class Bench:
    """The reference model, the windows and the run's metadata shared by every row."""

    def __init__(self, args):
        self.args = args
        self.ref = load_model("default", device=args.device, dtype="float32")
        self.names = linear_names(self.ref.model)
        self.weights = sum(self.ref.model.get_submodule(n).weight.numel() for n in self.names)
        tok = self.ref.tokenizer
        self.calib = token_windows(tok, "builtin", "calib", seq_len=args.seq_len,
                                   max_windows=args.calib_windows, seed=0)
        self.evalw = token_windows(tok, "builtin", "eval", seq_len=args.seq_len,
                                   max_windows=args.eval_windows)
        self.run = run_meta(args, int(self.calib.shape[0]), int(self.evalw.shape[0]))

    def row(self, tool: str, setting: str, **fields) -> dict:
        return {"tool": tool, "setting": setting, "heal_steps": 0, "linear_weights": self.weights,
                **fields, "run": self.run}

    def fp32(self) -> dict:
        m = self.ref.model
        return self.row("fp32", "fp32", kind="fp32", **score(m, m, self.evalw),
                        **sizes(m, self.weights), note="the unquantized model")

    def dense(self) -> dict:
        """The uncompressed model stored in --store-dtype: the plain baseline."""
        m = self.stored(self.ref.model)
        return self.row("memfit", f"dense {self.args.store_dtype}", kind="dense",
                        **score(m, self.ref.model, self.evalw), **sizes(m, self.weights),
                        note=f"every weight in {self.args.store_dtype}")

    def stored(self, model):
        """The model as it is saved and served: a copy cast to --store-dtype."""
        dtype = getattr(torch, self.args.store_dtype)
        return model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)

    def memfit(self, setting: str, recipe: Recipe):
        """-> (row, compressed float32 model)."""
        m = load_model("default", device=self.args.device, dtype="float32").model
        rep = compress_(m, recipe, self.calib, progress=False)
        check_pattern(m, recipe)
        served = self.stored(m)
        row = self.row("memfit", setting, kind=kind(recipe), recipe=recipe.to_dict(),
                       compress_seconds=rep["seconds"], **score(served, self.ref.model, self.evalw),
                       **sizes(served, self.weights), note=memfit_note(served, rep))
        return row, m

    def heal(self, base: dict, model, recipe: Recipe) -> dict:
        a = self.args
        batch = min(a.distill_batch, self.calib.shape[0])
        rep = distill_(model, self.ref.model, self.calib, steps=a.distill_steps, lr=a.distill_lr,
                       batch_size=batch, progress=False)
        check_pattern(model, recipe)
        heal = {"steps": a.distill_steps, "lr": a.distill_lr, "batch_size": batch}
        served = self.stored(model)
        return {**base, "heal_steps": a.distill_steps, "heal_seconds": rep["seconds"], "heal": heal,
                "heal_final_kl": rep["kl"][-1], **score(served, self.ref.model, self.evalw),
                **sizes(served, self.weights)}

    def peer(self, setting: str, peer_args: list[str], calib_file: Path, work: Path) -> dict:
        a = self.args
        out, rep = run_llmc(a.peer_python, self.ref.source, calib_file, work, peer_args,
                            a.device, what=setting)
        dense = load_model(str(out / "dense"), device=a.device, dtype=a.store_dtype).model
        linear = artifact_linear_bytes(out / "artifact", self.names)
        zeros = 100 * rep["compressed_zero_fraction"]
        note = (f"{artifact_format(out / 'artifact')} as written from the float32 model (scored "
                f"in {a.store_dtype}); {zeros:.2f}% zeros")
        return self.row("llm-compressor", setting, kind="prune", peer_args=peer_args,
                        compress_seconds=rep["compress_seconds"],
                        **score(dense, self.ref.model, self.evalw), linear_bytes=linear,
                        linear_bits=8 * linear / self.weights,
                        model_bytes=rep["artifact_weights_bytes"],
                        artifact_bytes=rep["artifact_bytes"], note=note,
                        versions={k: rep[k] for k in ("llmcompressor_version",
                                                      "compressed_tensors_version",
                                                      "torch_version", "transformers_version")})


def run_meta(args, calib_n: int, eval_n: int) -> dict:
    cpu = platform.processor() or platform.machine()
    device = (torch.cuda.get_device_name() if args.device.startswith("cuda")
              else f"CPU ({cpu}, {os.cpu_count()} cores)")
    return {"command": "python benchmarks/prune_lowrank.py " + shlex.join(sys.argv[1:]),
            "device": device, "torch": torch.__version__, "date": str(datetime.date.today()),
            "model": "default", "calib_windows": calib_n, "eval_windows": eval_n,
            "seq_len": args.seq_len, "store_dtype": args.store_dtype}


def emit(row: dict, jsonl: str | None, rows: list[dict]) -> None:
    rows.append(row)
    if jsonl:
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
    print(f"{label(row)} [{row['tool']}]: perplexity {row['perplexity']:.4f}, KLD {row['kld']:.5f},"
          f" {row['linear_bits']:.3f} bits/weight", flush=True)


def resolve(setting: str) -> Recipe:
    """A SETTINGS name, a memfit preset or a recipe file -> Recipe."""
    if setting in SETTINGS:
        return SETTINGS[setting]
    if setting in PRESETS or Path(setting).is_file():
        return load_recipe(setting)
    raise SystemExit(f"unknown setting {setting!r}: use one of {', '.join(SETTINGS)}, a memfit "
                     "preset or a recipe file")


def heal_settings(args, recipes: dict[str, Recipe]) -> set[str]:
    """The memfit rows to heal: --distill-settings, else every sparse / low-rank one."""
    if not args.distill_steps:
        return set()
    if args.distill_settings is None:
        return {s for s, r in recipes.items() if {"prune", "lowrank"} & set(kind(r).split("+"))}
    chosen = set(args.distill_settings.split(","))
    if chosen - set(recipes):
        raise SystemExit(f"--distill-settings {sorted(chosen - set(recipes))} not in --settings")
    return chosen


def run(args) -> list[dict]:
    recipes = {s: resolve(s) for s in args.settings.split(",") if s}  # bad names fail first
    heal = heal_settings(args, recipes)
    peers = [s for s in args.peer_settings.split(",") if s] if args.peer_python else []
    if set(peers) - set(PEER_SETTINGS):
        raise SystemExit(f"unknown --peer-settings {sorted(set(peers) - set(PEER_SETTINGS))}; "
                         f"use {', '.join(PEER_SETTINGS)}")
    bench, rows = Bench(args), []
    emit(bench.fp32(), args.jsonl, rows)
    if args.store_dtype != "float32":
        emit(bench.dense(), args.jsonl, rows)
    for s, recipe in recipes.items():
        row, model = bench.memfit(s, recipe)
        emit(row, args.jsonl, rows)
        if s in heal:
            emit(bench.heal(row, model, recipe), args.jsonl, rows)
        del model
    with tempfile.TemporaryDirectory(prefix="memfit-prune-bench-") as tmp:
        calib_file = Path(tmp) / "calib.safetensors"
        save_file({"input_ids": bench.calib.contiguous()}, str(calib_file))
        for s in peers:
            work = Path(tmp) / s
            work.mkdir()
            emit(bench.peer(s, PEER_SETTINGS[s], calib_file, work), args.jsonl, rows)
    return rows


# ----- the tables ----------------------------------------------------------------------------

def label(row: dict) -> str:
    if not row["heal_steps"]:
        return row["setting"]
    return f"{row['setting']} + heal {row['heal_steps']} lr {row['heal']['lr']:g}"


def load_rows(paths: list[str]) -> list[dict]:
    """Rows of JSONL files; a row measured again (tool, setting, healing) replaces the earlier."""
    rows = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows[(r["tool"], r["setting"], r["heal_steps"], heal_lr(r))] = r
    return list(rows.values())


def heal_lr(row: dict) -> float:
    return row["heal"]["lr"] if row["heal_steps"] else 0.0


def ordered(rows: list[dict]) -> list[dict]:
    """fp32 first, then by setting (first seen), unhealed before healed, memfit before the peer."""
    first: dict[str, int] = {}
    for r in rows:
        first.setdefault(r["setting"], len(first))
    tools = {"fp32": 0, "memfit": 1, "llm-compressor": 2}
    return sorted(rows, key=lambda r: (r["tool"] != "fp32", first[r["setting"]], r["heal_steps"],
                                       heal_lr(r), tools[r["tool"]]))


def distinct(dicts) -> list[dict]:
    return [json.loads(s) for s in dict.fromkeys(json.dumps(d, sort_keys=True) for d in dicts)]


def seconds(row: dict, key: str) -> str:
    return f"{row[key]:.1f}" if key in row else "-"


def header(rows: list[dict], fp32: dict) -> list[str]:
    runs = {r["run"]["command"]: r["run"] for r in rows}
    windows = {(x["model"], x["calib_windows"], x["eval_windows"], x["seq_len"],
                x.get("store_dtype", "float32")) for x in runs.values()}
    if len(windows) > 1:
        raise SystemExit(f"rows measured on different windows/dtypes {sorted(windows)}: render apart")
    model, calib, evaln, seq, store = windows.pop()
    lines = [f"### Pruning, low-rank and healing vs plain quantization at equal bytes ({model} "
             "model)", "",
             f"Calibration: built-in calib split, {calib} x {seq} tokens, seed 0. Evaluation: "
             f"built-in eval split, {evaln} x {seq} tokens. Every row is compressed from the "
             f"float32 model, then stored and scored in {store} (float values follow that dtype; "
             "int codes and scales keep theirs); llm-compressor's dense output is loaded here and "
             "scored the same way, by memfit's evaluator, against the "
             f"float32 model: perplexity {fp32['perplexity']:.4f}, KLD (ref || row), top-1 "
             "agreement. Linear = the decoder blocks' linear layers, the compressed ones; "
             "bits/weight = 8 x their stored bytes / their original weight count. Model MB = "
             "every stored weight, embeddings included.", ""]
    lines += [f"- {x['date']}, {x['device']}, torch {x['torch']}: `{x['command']}`"
              for x in runs.values()]
    for v in distinct(r["versions"] for r in rows if "versions" in r):
        lines.append(f"- llm-compressor {v['llmcompressor_version']} (compressed-tensors "
                     f"{v['compressed_tensors_version']}, torch {v['torch_version']}, transformers "
                     f"{v['transformers_version']}): bytes are those of the artifact it writes "
                     "(save_compressed=True), as it writes them")
    for h in distinct(r["heal"] for r in rows if "heal" in r):
        lines.append(f"- heal {h['steps']}: {h['steps']} steps of KL(fp32 || student) distillation "
                     f"toward the float32 model (memfit.distill), lr {h['lr']}, batches of "
                     f"{h['batch_size']} calibration windows; pattern and format kept")
    return lines + [""]


def main_table(rows: list[dict], fp32: dict) -> list[str]:
    lines = ["| setting | tool | perplexity | vs fp32 | KLD | top-1 | compress s | heal s | "
             "linear MB | bits/weight | model MB | stored as |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {label(r)} | {r['tool']} | {r['perplexity']:.4f} | "
            f"{r['perplexity'] / fp32['perplexity']:.4f}x | {r['kld']:.5f} | "
            f"{100 * r['top1']:.2f}% | {seconds(r, 'compress_seconds')} | "
            f"{seconds(r, 'heal_seconds')} | {r['linear_bytes'] / 1e6:.2f} | "
            f"{r['linear_bits']:.3f} | {r['model_bytes'] / 1e6:.2f} | {r['note']} |")
    return lines


def quant_at_or_below(row: dict, quants: list[dict]) -> dict | None:
    """The plain-quantization row with the most bits at or below `row`'s (healed like it when
    such rows exist), the lower perplexity on a tie."""
    pool = ([q for q in quants if q["heal_steps"] == row["heal_steps"]]
            or [q for q in quants if not q["heal_steps"]])
    below = [q for q in pool if q["linear_bits"] <= row["linear_bits"] + 1e-9]
    return max(below, key=lambda q: (q["linear_bits"], -q["perplexity"]), default=None)


def equal_bytes_table(rows: list[dict]) -> list[str]:
    quants = [r for r in rows if r["tool"] == "memfit" and r["kind"] in ("quant", "dense")]
    lines = ["| bits/weight | setting | tool | perplexity | plain quantization at <= bytes | "
             "its bits/weight | its perplexity | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["linear_bits"]):
        if r in quants or r["tool"] == "fp32":
            cmp = "- | - | - | -"
        elif (q := quant_at_or_below(r, quants)) is None:
            cmp = "none measured | - | - | no quantization row at <= these bytes"
        else:
            verdict = "worth it" if r["perplexity"] < q["perplexity"] else "quantization wins"
            cmp = f"{label(q)} | {q['linear_bits']:.3f} | {q['perplexity']:.4f} | {verdict}"
        lines.append(f"| {r['linear_bits']:.3f} | {label(r)} | {r['tool']} | "
                     f"{r['perplexity']:.4f} | {cmp} |")
    return lines


def render(rows: list[dict]) -> str:
    rows = ordered(rows)
    fp32 = next((r for r in rows if r["tool"] == "fp32"), None)
    if fp32 is None:
        raise SystemExit("no fp32 row in these rows (every run writes one)")
    return "\n".join(header(rows, fp32) + main_table(rows, fp32) + [
        "", "At equal bytes: every row by bits per linear weight, each sparse / low-rank row "
        "against the plain-quantization row with the most bits at or below its own; \"worth "
        "it\" when its perplexity is lower.", ""] + equal_bytes_table(rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", "--presets", default=",".join(SETTINGS),
                   help="comma list of SETTINGS names, presets or recipe files ('' for none)")
    p.add_argument("--peer-python", help="python of the llm-compressor environment (omit to "
                   "run memfit alone)")
    p.add_argument("--peer-settings", default=",".join(PEER_SETTINGS))
    p.add_argument("--calib-windows", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=57)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--store-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the stored/scored copy of every row (default float16)")
    p.add_argument("--distill-steps", type=int, default=0)
    p.add_argument("--distill-settings", help="comma list of rows to heal (default: every "
                   "sparse / low-rank row)")
    p.add_argument("--distill-lr", type=float, default=1e-4)
    p.add_argument("--distill-batch", type=int, default=4)
    p.add_argument("--jsonl", help="append each finished row to this file")
    p.add_argument("--table", nargs="+", metavar="FILE", help="only render the tables of these "
                   "JSONL files")
    args = p.parse_args()
    if args.table:
        print(render(load_rows(args.table)))
        return
    print("\n" + render(run(args)))


if __name__ == "__main__":
    main()
