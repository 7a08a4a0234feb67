"""`memfit fit` against uniform recipes, side by side in one run.

For each budget (a share of the model's 16-bit weight bytes) the planner's plan is built and
measured; every uniform baseline is compressed with `memfit compress` (its best presets: GPTQ with
act-order and MSE clipping, true-sequential) and measured the same way: KL divergence to the
original and perplexity on the built-in evaluation split (the first `--eval-windows` windows of
512 tokens), stored weight bytes read from the artifact's safetensors. The plan is compared with
the best baseline whose bytes are at most the plan's.

    python benchmarks/fit.py                         # the embedded default model
    python benchmarks/fit.py --model gemma-tiny      # a Gemma-3-style model (sliding-window
                                                     # layers) built from a config, trained briefly

Writes benchmarks/results/fit_<model>_<date>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

BASELINES = ["w8", "w4g128-gptq", "w4g64-gptq", "w4g32-gptq", "w3g64-gptq", "w2g32-gptq",
             "@e8:w4g64-gptq", "@e8:w3g64-gptq", "@e8:w2g32-gptq", "@e4:w3g64-gptq",
             "@e4:w2g32-gptq"]


def gemma_tiny(steps: int = 300) -> str:
    """A Gemma-3-style decoder (alternating sliding-window and global layers) built from a config
    with the default model's tokenizer, trained `steps` steps on the built-in calibration split;
    cached under $MEMFIT_CACHE/bench/gemma-tiny-<steps>."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from memfit.calib.data import token_windows
    from memfit.models import cache_dir, load_model

    out = cache_dir() / "bench" / f"gemma-tiny-{steps}"
    if (out / "config.json").exists():
        return str(out)
    tok = load_model("default").tokenizer
    cfg = AutoConfig.for_model("gemma3_text", vocab_size=len(tok), hidden_size=256,
                               intermediate_size=768, num_hidden_layers=6,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                               sliding_window=64, max_position_embeddings=2048,
                               layer_types=["sliding_attention", "sliding_attention",
                                            "full_attention"] * 2,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id or 0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    data = token_windows(tok, "builtin", "calib", seq_len=256)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        ids = data[torch.randint(0, len(data), (8,), generator=gen)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"gemma-tiny step {step} loss {loss.item():.3f}", file=sys.stderr, flush=True)
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return str(out)


def _baseline(spec: str, model: str, folder: Path, dense):
    """A uniform recipe, '@e8:' / '@e4:' prefix = the same recipe's artifact (built earlier in
    the run) with the tables (embeddings + head) also in int8 per row / int4 g64, quantized from
    the original dense tables: the linears are not quantized twice."""
    from memfit.compress import CompressOptions, compress_to
    from memfit.recipe import PRESETS

    out = folder / spec.replace(":", "_").replace("@", "")
    if (out / "memfit.json").exists():  # built by an earlier run with the same --work
        return out
    if not spec.startswith("@e"):
        compress_to(model, PRESETS[spec], out, CompressOptions(progress=False, max_kld=100.0))
        return out
    from memfit.formats.grid import IntFormat
    from memfit.io.save import load, save
    from memfit.methods import quantize_embeddings_

    tag, name = spec[1:].split(":")
    fmt = IntFormat(bits=8, group_size=None, symmetric=True) if tag == "e8" \
        else IntFormat(bits=4, group_size=64)
    art = load(folder / name)
    m = art.model
    with torch.no_grad():
        m.get_input_embeddings().weight.copy_(dense.model.get_input_embeddings().weight)
        head, dense_head = m.get_output_embeddings(), dense.model.get_output_embeddings()
        if head is not None and head.weight is not m.get_input_embeddings().weight:
            head.weight.copy_(dense_head.weight)
    quantize_embeddings_(m, fmt, fmt)
    save(m, art.tokenizer, out, recipe={"base": name, "tables": fmt.to_dict()})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--shares", default="0.25,0.35,0.45,0.6")
    p.add_argument("--baselines", default=",".join(BASELINES))
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--methods", default="gptq")
    p.add_argument("--work", help="folder for the built models; baselines already built "
                   "there are reused (default: a new temporary folder)")
    p.add_argument("--train-steps", type=int, default=300, help="gemma-tiny's training steps")
    a = p.parse_args()

    from memfit.calib.data import token_windows
    from memfit.io.save import load
    from memfit.models import load_model
    from memfit.plan import FitOptions, fit
    from memfit.plan.build import _stored_weight_bytes
    from memfit.plan.fit import _choose
    from memfit.plan.probe import ProbeReference

    model = gemma_tiny(a.train_steps) if a.model == "gemma-tiny" else a.model
    dense = load_model(model)
    full = 2 * sum(p.numel() for p in dict.fromkeys(dense.model.parameters()))
    ids = token_windows(dense.tokenizer, "builtin", "eval", seq_len=512,
                        max_windows=a.eval_windows)
    ref = ProbeReference(dense.model, ids)
    rows, base = [], []
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="memfit-fit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    for spec in [s for s in a.baselines.split(",") if s]:
        t0 = time.perf_counter()
        folder = _baseline(spec, model, work, dense)
        q = ref.kld(load(folder).model)
        base.append({"name": spec, "bytes": _stored_weight_bytes(folder), **q,
                     "seconds": time.perf_counter() - t0})
        print(f"baseline {spec}: {base[-1]['bytes'] / 1e6:.2f} MB, KLD {q['kld']:.4f}",
              file=sys.stderr, flush=True)
    shares = [float(s) for s in a.shares.split(",")]
    t0 = time.perf_counter()
    opts = FitOptions(methods=a.methods, eval_windows=a.eval_windows)
    plan = fit(dense, budget=int(shares[0] * full), kind="weights", options=opts)
    plan_s = time.perf_counter() - t0
    probe = ProbeReference(dense.model, token_windows(dense.tokenizer, "builtin", "calib",
                                                       seq_len=256, max_windows=8, seed=1))
    for k, share in enumerate(shares):
        t1 = time.perf_counter()
        if k:
            plan.target = replace(plan.target, budget=int(share * full))
            _choose(plan, probe)
        built = plan.build(work / f"plan-{share}")
        fitting = [b for b in base if b["bytes"] <= built["stored_weight_bytes"]]
        best = min(fitting, key=lambda b: b["kld"]) if fitting else None
        rows.append({"share": share, "budget": plan.target.budget,
                     "bytes": built["stored_weight_bytes"], "kld": built["measured_kld"],
                     "perplexity": built["perplexity"], "predicted_kld": built["predicted_kld"],
                     "kld_error": built["kld_error"], "choices": dict(_count(plan.choices())),
                     "dropped": plan.solution.dropped,
                     "seconds": (plan_s if k == 0 else 0) + time.perf_counter() - t1,
                     "best_baseline": best})
        print(json.dumps(rows[-1], default=str), file=sys.stderr, flush=True)
    res = {"model": model, "device": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat(),
           "command": " ".join(sys.argv), "full_16bit_bytes": full,
           "ref_perplexity": plan.built["ref_perplexity"], "eval": plan.built["eval"],
           "baselines": base, "plans": rows}
    name = "gemma-tiny" if a.model == "gemma-tiny" else Path(str(model)).name
    out = Path(__file__).parent / "results" / f"fit_{name}_{res['date']}.json"
    out.write_text(json.dumps(res, indent=1, default=str))
    print(_markdown(res))


def _count(choices: dict):
    from collections import Counter
    return Counter(choices.values()).most_common()


def _markdown(res: dict) -> str:
    lines = ["| budget (share of 16-bit) | plan bytes | plan KLD | predicted KLD | plan ppl | "
             "best uniform at <= bytes | its bytes | its KLD | plan / baseline KLD | time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["plans"]:
        b = r["best_baseline"]
        lines.append(
            f"| {r['budget'] / 1e6:.1f} MB ({r['share']:.0%}) | {r['bytes'] / 1e6:.2f} MB | "
            f"{r['kld']:.4f} | {r['predicted_kld']:.4f} | {r['perplexity']:.3f} | "
            + (f"{b['name']} | {b['bytes'] / 1e6:.2f} MB | {b['kld']:.4f} | "
               f"{r['kld'] / b['kld']:.3f} |" if b else "none fits | | | |")
            + f" {r['seconds']:.0f} s |")
    lines.append("")
    lines.append("| baseline | bytes | KLD | perplexity |")
    lines.append("|---|---|---|---|")
    for b in sorted(res["baselines"], key=lambda b: b["bytes"]):
        lines.append(f"| {b['name']} | {b['bytes'] / 1e6:.2f} MB | {b['kld']:.4f} | "
                     f"{b['perplexity']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
