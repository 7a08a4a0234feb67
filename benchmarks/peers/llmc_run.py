#!/usr/bin/env python
"""Run llm-compressor (vLLM project) as a *peer* baseline for memfit benchmarks.

Run with the peer environment, never with memfit's:
    /work/venv-peer/bin/python benchmarks/peers/llmc_run.py \
        --model DIR --calib FILE.safetensors --method {rtn,gptq,awq,wanda,sparsegpt} \
        [--bits 4|8|3] [--group 64|none] [--sym|--asym] [--sparsity 0.5] [--nm 2:4] \
        [--act-order] [--block-size 128] [--dampening 0.01] \
        --out DIR --report FILE.json

The calibration file holds one int64 tensor 'input_ids' of shape (n_windows, seq_len);
each window is fed as one batch of size 1, in file order (no shuffling, no
re-tokenization, no truncation/padding).

Outputs:
    OUT/artifact/  llm-compressor's compressed-tensors checkpoint (save_compressed=True)
                   + tokenizer, exactly as llm-compressor writes it
    OUT/dense/     plain HF folder: config.json (no quantization_config), float32
                   model.safetensors holding the dequantized (fake-quantized) or
                   pruned-with-zeros weights, tokenizer files; loadable by plain
                   transformers in memfit's venv
    REPORT         JSON with method/bits/group/sym/sparsity/nm, compress_seconds,
                   peak_rss_bytes, artifact_bytes, versions, ...

This script only *calls* llm-compressor; it is not a memfit dependency.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time


def rss_now() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # pragma: no cover
        return -1


def peak_rss() -> int:
    # VmHWM: this process's peak since exec (model load included). ru_maxrss would carry the
    # parent's peak over into a subprocess (it survives execve).
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def dir_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="local HF model folder (float weights)")
    ap.add_argument("--calib", required=True, help="safetensors file with int64 'input_ids' (n, seq_len)")
    ap.add_argument("--method", required=True, choices=["rtn", "gptq", "awq", "wanda", "sparsegpt"])
    ap.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 5, 6, 7, 8])
    ap.add_argument("--group", default="64", help="group size (int) or 'none' for per-output-channel")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--sym", dest="sym", action="store_true", default=False)
    g.add_argument("--asym", dest="sym", action="store_false")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nm", default=None, help="N:M semi-structured mask, e.g. 2:4 (pruning only)")
    ap.add_argument("--act-order", action="store_true",
                    help="GPTQ activation ordering ('weight'/static: column order only, "
                         "groups stay contiguous; llm-compressor removed g_idx 'group' ordering)")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--dampening", type=float, default=0.01)
    ap.add_argument("--n-windows", type=int, default=None, help="use only the first N windows")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where the model is loaded")
    ap.add_argument("--out", required=True)
    ap.add_argument("--report", required=True)
    a = ap.parse_args(argv)
    if a.group.lower() in ("none", "channel", "-1", "0"):
        a.group_size = None
    else:
        a.group_size = int(a.group)
    if a.nm is not None:
        n, m = (int(x) for x in a.nm.split(":"))
        a.nm_n, a.nm_m = n, m
    return a


def build_modifier(a):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    ignore = ["lm_head"]  # tied with embed_tokens on SmolLM2; never touched
    if a.method in ("rtn", "gptq", "awq"):
        wargs = dict(num_bits=a.bits, type="int", symmetric=a.sym)
        if a.group_size is None:
            wargs.update(strategy="channel")
        else:
            wargs.update(strategy="group", group_size=a.group_size)
        scheme = QuantizationScheme(
            targets=["Linear"], weights=QuantizationArgs(**wargs),
            input_activations=None, output_activations=None,
        )
        groups = {"group_0": scheme}
        if a.method == "rtn":
            from llmcompressor.modifiers.quantization import QuantizationModifier

            return QuantizationModifier(config_groups=groups, ignore=ignore)
        if a.method == "awq":  # its own defaults (grid 20, duo scaling, Llama mappings)
            from llmcompressor.modifiers.awq import AWQModifier

            return AWQModifier(config_groups=groups, ignore=ignore)
        from llmcompressor.modifiers.gptq import GPTQModifier

        return GPTQModifier(
            config_groups=groups, ignore=ignore, block_size=a.block_size,
            dampening_frac=a.dampening, actorder=("weight" if a.act_order else None),
        )
    # Sparsity modifiers match ignore against "<layer>.<sub>" where the Linear itself is
    # the "layer" (targets=["Linear"]), i.e. "lm_head." -- plain "lm_head" does NOT match
    # and lm_head (= the tied embedding table!) would get pruned. Use a regex.
    ignore = ["lm_head", "re:.*lm_head"]
    mask = a.nm if a.nm else "0:0"
    sparsity = a.sparsity
    if a.nm:
        sparsity = 1.0 - a.nm_n / a.nm_m  # the N:M mask fixes the sparsity
    if a.method == "wanda":
        from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

        return WandaPruningModifier(sparsity=sparsity, mask_structure=mask,
                                    targets=["Linear"], ignore=ignore)
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    return SparseGPTModifier(sparsity=sparsity, mask_structure=mask, targets=["Linear"],
                             ignore=ignore, block_size=a.block_size,
                             dampening_frac=a.dampening)


def dense_state_dict(model, keep_keys):
    """Dequantized (fake-quantized) / pruned float32 weights, keyed like the source ckpt."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    fq = {}
    for name, mod in model.named_modules():
        scheme = getattr(mod, "quantization_scheme", None)
        if scheme is None or scheme.weights is None or not hasattr(mod, "weight"):
            continue
        with torch.no_grad():
            fq[name + ".weight"] = forward_quantize(mod, mod.weight.detach(), "weight",
                                                    scheme.weights).float().cpu().clone()
    sd = model.state_dict()
    out = {}
    for k in keep_keys:
        t = fq.get(k)
        if t is None:
            if k not in sd:
                raise KeyError(f"{k} missing from compressed model state_dict")
            t = sd[k].detach().float().cpu().clone()
        out[k] = t.contiguous()
    return out, sorted(fq)


def main(argv=None):
    a = parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    import torch
    import transformers
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmcompressor
    if a.device == "cpu" and not torch.cuda.is_available():
        # llm-compressor 0.14's sequential pipeline pins its cached activations, which torch
        # refuses without an accelerator: on a CPU-only machine they stay in pageable memory
        torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    from llmcompressor import oneshot

    os.makedirs(a.out, exist_ok=True)
    art_dir = os.path.join(a.out, "artifact")
    dense_dir = os.path.join(a.out, "dense")
    for d in (art_dir, dense_dir):
        if os.path.exists(d):
            shutil.rmtree(d)

    # ---- calibration windows (exactly as given) ----
    ids = load_file(a.calib)["input_ids"]
    if ids.dtype != torch.int64 or ids.dim() != 2:
        raise SystemExit(f"calib input_ids must be int64 (n, seq_len), got {ids.dtype} {tuple(ids.shape)}")
    if a.n_windows:
        ids = ids[: a.n_windows]
    windows = [{"input_ids": ids[i: i + 1].clone(), "attention_mask": torch.ones_like(ids[i: i + 1])}
               for i in range(ids.shape[0])]
    # a plain DataLoader is used as-is by oneshot: batch size 1, file order
    loader = DataLoader(windows, batch_size=None, shuffle=False)

    # ---- model ----
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).to(a.device)
    tok = AutoTokenizer.from_pretrained(a.model)
    load_s = time.perf_counter() - t0
    rss_after_load = rss_now()

    modifier = build_modifier(a)
    uses_data = a.method != "rtn"  # RTN (QuantizationModifier, weight-only) is data-free

    # ---- compression ----
    t0 = time.perf_counter()
    oneshot(
        model=model,
        processor=tok,
        recipe=modifier,
        dataset=loader if uses_data else None,
        num_calibration_samples=ids.shape[0],
        shuffle_calibration_samples=False,
        max_seq_length=ids.shape[1],
        output_dir=None,  # saved below so that save time is not counted as compression
    )
    compress_s = time.perf_counter() - t0
    peak_after_compress = peak_rss()

    # ---- dense export snapshot (before compress_model packs weights in place) ----
    src_st = os.path.join(a.model, "model.safetensors")
    with safe_open(src_st, "pt") as f:
        keep_keys = list(f.keys())
    dense_sd, fq_names = dense_state_dict(model, keep_keys)

    # ---- compressed artifact ----
    t0 = time.perf_counter()
    model.save_pretrained(art_dir, save_compressed=True)
    tok.save_pretrained(art_dir)
    save_s = time.perf_counter() - t0
    art_total = dir_bytes(art_dir)
    art_weights = sum(os.path.getsize(os.path.join(art_dir, f)) for f in os.listdir(art_dir)
                      if f.endswith(".safetensors"))
    qcfg = None
    try:
        with open(os.path.join(art_dir, "config.json")) as f:
            qcfg = json.load(f).get("quantization_config")
    except Exception:
        pass

    # ---- dense plain-HF folder ----
    os.makedirs(dense_dir)
    save_file(dense_sd, os.path.join(dense_dir, "model.safetensors"), metadata={"format": "pt"})
    for fn in os.listdir(a.model):
        if fn.endswith(".safetensors") or fn.endswith(".index.json"):
            continue
        p = os.path.join(a.model, fn)
        if os.path.isfile(p):
            shutil.copy2(p, os.path.join(dense_dir, fn))
    with open(os.path.join(dense_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "float32"
    with open(os.path.join(dense_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)

    # guard: everything that is not a targeted Linear must be bit-identical to the source
    # (catches e.g. lm_head -- tied to embed_tokens -- being compressed by mistake)
    src_sd = load_file(src_st)
    lin_suffix = ("_proj.weight", "fc1.weight", "fc2.weight", "dense.weight")
    changed = sorted(k for k in keep_keys if not k.endswith(lin_suffix)
                     and not torch.equal(src_sd[k].float(), dense_sd[k]))
    del src_sd
    if changed:
        print(f"WARNING: non-Linear tensors changed by compression: {changed}", file=sys.stderr)

    # simple stats on the dense weights of the compressed layers
    zeros = numel = 0
    for k in fq_names or [k for k in keep_keys if k.endswith("proj.weight")]:
        if k in dense_sd:
            zeros += int((dense_sd[k] == 0).sum())
            numel += dense_sd[k].numel()

    report = {
        "tool": "llm-compressor",
        "method": a.method,
        "bits": a.bits if a.method in ("rtn", "gptq", "awq") else None,
        "group": a.group_size if a.method in ("rtn", "gptq", "awq") else None,
        "sym": a.sym if a.method in ("rtn", "gptq", "awq") else None,
        "sparsity": (1.0 - a.nm_n / a.nm_m if a.nm else a.sparsity) if a.method in ("wanda", "sparsegpt") else None,
        "nm": a.nm if a.method in ("wanda", "sparsegpt") else None,
        "act_order": bool(a.act_order) if a.method == "gptq" else None,
        "block_size": a.block_size if a.method in ("gptq", "sparsegpt") else None,
        "dampening": a.dampening if a.method in ("gptq", "sparsegpt") else None,
        "n_windows": int(ids.shape[0]) if uses_data else 0,
        "seq_len": int(ids.shape[1]),
        "calib_file": os.path.abspath(a.calib),
        "model": os.path.abspath(a.model),
        "load_seconds": round(load_s, 3),
        "compress_seconds": round(compress_s, 3),
        "save_seconds": round(save_s, 3),
        "total_seconds": round(time.perf_counter() - t_start, 3),
        "peak_rss_bytes": peak_after_compress,
        "peak_gpu_bytes": (torch.cuda.max_memory_allocated() if a.device.startswith("cuda")
                           else None),
        "rss_after_load_bytes": rss_after_load,
        "peak_rss_total_bytes": peak_rss(),
        "artifact_bytes": art_total,
        "artifact_weights_bytes": art_weights,
        "artifact_format": (qcfg or {}).get("format"),
        "compressed_zero_fraction": (zeros / numel) if numel else None,
        "non_linear_changed": changed,
        "artifact_dir": os.path.abspath(art_dir),
        "dense_dir": os.path.abspath(dense_dir),
        "torch_threads": torch.get_num_threads(),
        "llmcompressor_version": getattr(llmcompressor, "__version__", None),
        "compressed_tensors_version": _version("compressed-tensors"),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.report)), exist_ok=True)
    with open(a.report, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return 0


def _version(dist):
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
