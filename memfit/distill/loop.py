"""`distill_(student, teacher, windows)`: the one readable distillation loop, and an 8-bit AdamW.

The loop: make the student trainable (memfit.distill.trainable), then for each step draw
`batch_size × grad_accum` windows from a fixed-seed order, run the teacher without gradients
(no_grad rather than inference_mode: its tensors enter the student's loss graph, which inference
tensors may not), run the student with activation checkpointing (the transformers switch, when
the model supports it), and minimise KL(teacher || student) × T² (+ an optional scale-free hidden
MSE on matched layers). bf16 autocast is used on CUDA where supported; the CPU runs in float32.
At the end the student is packed back into its formats (`repack_`), frozen and in eval mode.

`AdamW8bit` keeps Adam's two moments block-wise quantized: m as int8 with one float32 absmax per
block of 256, and v as uint8 codes of sqrt(v) (sqrt halves v's dynamic range in bits, so small
second moments don't round to zero) with one float32 max per block. Each step dequantizes both,
does the exact AdamW update in float32 with the fresh gradient, then re-quantizes: the current
step always sees v >= (1 - beta2) g², so no step divides by a rounded-away moment. State: ~2.03
bytes per parameter against 8 for float32 AdamW (~0.25x).
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn
from tqdm import tqdm

from memfit.distill.losses import hidden_mse, hidden_states, logit_kl
from memfit.distill.trainable import make_trainable_, repack_
from memfit.errors import UserError
from memfit.eval.memory import PeakMemory

BLOCK = 256
OPTIMIZERS = ("adamw", "adamw8bit")


# ----- 8-bit AdamW -------------------------------------------------------------------------------

def quantize_blockwise(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat float tensor -> (codes (n_blocks, BLOCK) int8/uint8, absmax (n_blocks,) float32)."""
    n = x.numel()
    padded = torch.zeros(-(-n // BLOCK) * BLOCK, dtype=torch.float32, device=x.device)
    padded[:n] = x.flatten()
    blocks = padded.view(-1, BLOCK)  # (n_blocks, BLOCK)
    absmax = blocks.abs().amax(dim=1).clamp_min(1e-30)
    levels = 127 if signed else 255
    codes = torch.round(blocks / absmax[:, None] * levels)
    return codes.to(torch.int8 if signed else torch.uint8), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_blockwise, shaped like `like` (float32)."""
    levels = 127 if codes.dtype == torch.int8 else 255
    flat = (codes.float() * (absmax[:, None] / levels)).flatten()[: like.numel()]
    return flat.view(like.shape)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose moments are stored block-wise quantized (see the module docstring)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    m, v = torch.zeros_like(g), torch.zeros_like(g)
                else:
                    m = dequantize_blockwise(st["m"], st["m_absmax"], g)
                    v = dequantize_blockwise(st["sqrt_v"], st["v_absmax"], g).square()
                st["step"] += 1
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                step_size = group["lr"] / (1 - beta1 ** st["step"])
                denom = (v / (1 - beta2 ** st["step"])).sqrt_().add_(group["eps"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_((m / denom * -step_size).to(p.dtype))
                st["m"], st["m_absmax"] = quantize_blockwise(m, signed=True)
                st["sqrt_v"], st["v_absmax"] = quantize_blockwise(v.sqrt(), signed=False)
        return loss


def state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in an optimizer's per-parameter state tensors."""
    return sum(t.numel() * t.element_size() for st in optimizer.state.values()
               for t in st.values() if isinstance(t, torch.Tensor))


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")
    params = list(params)
    if name == "adamw8bit":
        return AdamW8bit(params, lr=lr, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


# ----- the loop ----------------------------------------------------------------------------------

def _autocast(device: torch.device, bf16) -> contextlib.AbstractContextManager:
    if bf16 not in ("auto", True, False):
        raise UserError(f"bf16={bf16!r} is invalid; use 'auto', True or False")
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if bf16 is True and not cuda_bf16:
        raise UserError(f"bf16 autocast needs a CUDA device that supports it, not {device}; "
                        "use bf16='auto' or False")
    if bf16 is not False and cuda_bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _set_checkpointing(model: nn.Module, on: bool) -> bool:
    if not getattr(model, "supports_gradient_checkpointing", False):
        return False
    # transformers 5 renamed the switch (the old name warns); use whichever this version has
    if hasattr(model, "activation_checkpointing_enable"):
        enable, disable = model.activation_checkpointing_enable, model.activation_checkpointing_disable
        kwargs = {"activation_checkpointing_kwargs": {"use_reentrant": False}}
    else:
        enable, disable = model.gradient_checkpointing_enable, model.gradient_checkpointing_disable
        kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    if on:
        enable(**kwargs)
    else:
        disable()
    return on


def _batches(windows: torch.Tensor, batch_size: int, seed: int):
    """Endless (batch_size, T) batches: fixed-seed permutations of the windows, one per epoch."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(windows.shape[0], generator=gen)
        for b in range(0, len(order) - batch_size + 1, batch_size):
            yield windows[order[b:b + batch_size]]


def _check_args(windows, steps, lr, batch_size, grad_accum, hidden_mse_weight, layer_map) -> None:
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise UserError(f"windows must be (n, seq_len) token ids, got {tuple(windows.shape)}")
    if min(steps, batch_size, grad_accum) < 1 or lr <= 0:
        raise UserError("steps, batch_size and grad_accum must be at least 1 and lr positive")
    if batch_size > windows.shape[0]:
        raise UserError(f"batch_size={batch_size} exceeds the {windows.shape[0]} windows; "
                        "use more --samples or a smaller batch")
    if hidden_mse_weight < 0:
        raise UserError(f"hidden_mse_weight={hidden_mse_weight} must be >= 0 (0 = logit KL only)")
    if hidden_mse_weight > 0 and not layer_map:
        raise UserError("hidden_mse_weight > 0 needs a layer_map {teacher layer: student layer}")


def distill_(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, *, steps: int = 200,
             lr: float = 1e-4, temperature: float = 1.0, batch_size: int = 4, grad_accum: int = 1,
             hidden_mse_weight: float = 0.0, layer_map: dict[int, int] | None = None,
             checkpointing: bool = True, bf16="auto", optimizer: str = "adamw", seed: int = 0,
             freeze: tuple[str, ...] = (), chunk: int = 256,
             progress: bool = False) -> dict:
    """Distill `teacher` into `student` in place on (n, seq_len) token `windows`; -> report.

    The student keeps its formats (it is packed back at the end); see the module docstring."""
    _check_args(windows, steps, lr, batch_size, grad_accum, hidden_mse_weight, layer_map)
    layer_map = dict(layer_map or {}) if hidden_mse_weight > 0 else {}
    torch.manual_seed(seed)
    device = next(student.parameters()).device
    teacher.eval().requires_grad_(False)
    trained = make_trainable_(student, skip=freeze)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise UserError("the student has no linear or compressed module to train")
    opt = make_optimizer(optimizer, params, lr)
    ckpt = _set_checkpointing(student, checkpointing)
    student.train()
    autocast = _autocast(device, bf16)
    batches = _batches(windows, batch_size, seed)
    losses, kls = [], []
    t0 = time.perf_counter()
    with PeakMemory(device) as peak:
        bar = tqdm(range(steps), desc="distill", unit="step", disable=not progress)
        for step in bar:
            step_loss = step_kl = 0.0
            for _ in range(grad_accum):
                ids = next(batches).to(device)
                with autocast:
                    with torch.no_grad():
                        h_t, hid_t = hidden_states(teacher, ids, tuple(layer_map))
                    h_s, hid_s = hidden_states(student, ids, tuple(layer_map.values()))
                    kl = logit_kl(student, teacher, h_s, h_t, temperature=temperature, chunk=chunk)
                    loss = kl
                    if layer_map:
                        loss = loss + hidden_mse_weight * hidden_mse(hid_s, hid_t, layer_map)
                (loss / grad_accum).backward()
                step_loss += loss.item() / grad_accum
                step_kl += kl.item() / grad_accum
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(step_loss)
            kls.append(step_kl)
            bar.set_postfix(loss=f"{step_loss:.5f}", refresh=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        report = peak.report()
    opt_bytes = state_nbytes(opt)
    del opt
    _set_checkpointing(student, False)
    repack_(student)
    student.eval()
    return {"steps": steps, "loss": losses, "kl": kls, "seconds": seconds,
            "tokens": steps * grad_accum * batch_size * windows.shape[1],
            "trained_modules": len(trained), "trainable_parameters": sum(p.numel() for p in params),
            "optimizer": optimizer, "optimizer_state_bytes": opt_bytes,
            "activation_checkpointing": ckpt, "autocast_bf16": not isinstance(autocast, contextlib.nullcontext),
            "config": {"steps": steps, "lr": lr, "temperature": temperature,
                       "batch_size": batch_size, "grad_accum": grad_accum,
                       "hidden_mse_weight": hidden_mse_weight,
                       "layer_map": {str(k): v for k, v in layer_map.items()},
                       "optimizer": optimizer, "seed": seed, "seq_len": int(windows.shape[1])},
            **report}
