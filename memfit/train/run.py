"""`train_to(model, out, options)`: check the options, join the process group, load, shard, train,
gather and save; -> a report with per-rank predicted and measured memory and bytes on the wire.

Every rank runs this function with the same options (torchrun), so every rank raises the same
UserError for bad input before any collective: no rank waits on a peer that already quit.
Training reads the data's `calib` split by default (the split evaluation does not use).

Measured memory: on CUDA torch.cuda.max_memory_allocated over the training steps (the states
allocated before count, as they are live); on the CPU the process's peak RSS over the training
steps (VmHWM reset right before the first step, after the freed heap of loading and sharding is
handed back; the Python runtime and gloo's buffers included), reported with the RSS at that
point: the rise (peak - that) compares with the prediction less the weights already resident
(`total_bytes - weights_bytes`); the prediction counts tensors only.
"""

from __future__ import annotations

import gc
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from memfit.errors import UserError
from memfit.train.comm import ENGINE, GRAD_COMM
from memfit.train.memory import AC_MODES
from memfit.train.optim import OPTIMIZERS

PRECISIONS = ("auto", "fp32", "bf16")
WEIGHTS = ("fp32", "bf16")


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    """How `train_to` runs (defaults: 10 steps of 4 x 128 tokens, AdamW at lr 1e-4, fp32 on CPU)."""

    steps: int = 10
    lr: float = 1e-4
    seq_len: int = 128
    batch_size: int = 4          # global windows per step, split across ranks
    samples: int | None = None   # training windows drawn from the split (None: all)
    data: str = "builtin"
    split: str = "calib"
    ac: str = "none"             # none | full | selective (every other block)
    optim: str = "adamw"         # adamw | adamw8bit
    offload_optimizer: bool = False
    grad_comm: str = "fp32"      # fp32 | bf16 | int8 | powersgd
    powersgd_rank: int = 4
    precision: str = "auto"      # auto: bf16 on CUDA, fp32 on CPU
    weights: str = "fp32"        # fp32 master weights, or bf16 (stochastically rounded updates)
    step_in_backward: bool = False  # one rank: step each parameter as its gradient completes
    teacher: str | None = None
    temperature: float = 1.0
    device: str = "cpu"
    seed: int = 0
    bos: str = "auto"
    overwrite: bool = False
    progress: bool = False


def check_options(o: TrainOptions, out: Path | None, model: str) -> None:
    """Every bad option as a UserError, before any process-group call."""
    from memfit.io.checkpoint import check_device
    from memfit.io.folders import check_output

    for name, value, allowed in (("--ac", o.ac, AC_MODES), ("--optim", o.optim, OPTIMIZERS),
                                 ("--grad-comm", o.grad_comm, GRAD_COMM),
                                 ("--precision", o.precision, PRECISIONS),
                                 ("--weights", o.weights, WEIGHTS)):
        if value not in allowed:
            raise UserError(f"{name} {value!r} is unknown; use one of {', '.join(allowed)}")
    if o.steps < 1:
        raise UserError(f"--steps {o.steps}: train at least 1 step")
    if o.batch_size < 1 or o.seq_len < 2:
        raise UserError(f"--batch-size {o.batch_size} must be >= 1 and --seq-len {o.seq_len} >= 2")
    if o.lr <= 0 or o.temperature <= 0:
        raise UserError(f"--lr {o.lr} and --temperature {o.temperature} must be positive")
    if o.grad_comm == "powersgd" and o.powersgd_rank < 1:
        raise UserError(f"--powersgd-rank {o.powersgd_rank}: the low-rank approximation needs "
                        "rank >= 1")
    if o.precision == "bf16" and o.grad_comm == "powersgd" and o.device == "cpu":
        raise UserError("--precision bf16 with --grad-comm powersgd autocasts on CUDA only; "
                        "use --precision fp32 on the CPU")
    if o.weights == "bf16" and o.optim != "adamw8bit":
        raise UserError("--weights bf16 needs --optim adamw8bit: its update rounds stochastically "
                        "into bfloat16 weights (torch's AdamW would round most updates away)")
    if o.weights == "bf16" and o.precision == "fp32":
        raise UserError("--weights bf16 computes in bfloat16; drop --precision fp32")
    if o.step_in_backward and (o.grad_comm != "fp32" or o.offload_optimizer):
        raise UserError("--step-in-backward steps each parameter on one rank as its gradient "
                        "completes: drop --grad-comm and --offload-optimizer")
    check_device(o.device)
    if out is not None:
        check_output(Path(out), o.overwrite, (model, o.teacher))


def _dtypes(o: TrainOptions, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """-> (compute dtype, gradient reduce dtype)."""
    bf16 = o.precision == "bf16" or o.weights == "bf16" or \
        (o.precision == "auto" and device.type == "cuda")
    compute = torch.bfloat16 if bf16 else torch.float32
    return compute, torch.bfloat16 if o.grad_comm == "bf16" else torch.float32


def _load(spec: str, o: TrainOptions, device, dtype, *, trained: bool = True):
    """The student (`trained`: dense weights only) or the teacher (any format: forward only)."""
    from memfit.io.modules import describe_modules
    from memfit.models import load_model

    m = load_model(spec, dtype=dtype, device=str(device))
    if m.kind != "decoder":
        raise UserError(f"{spec} is an encoder; memfit train trains causal LMs (decoders)")
    if not trained:
        return m
    kinds = sorted({d["kind"] for d in describe_modules(m.model).values()})
    if kinds or any(not p.is_floating_point() for p in m.model.parameters()):
        what = f"memfit's compressed modules (kind {', '.join(kinds)})" if kinds else \
            "packed (quantized) weights"
        raise UserError(f"{spec} holds {what}; memfit train fine-tunes dense models (use memfit "
                        "distill to heal a compressed one)")
    return m


def _build(o: TrainOptions, student, teacher, device, compute, reduce_dtype, counter):
    """-> (engine model, optimizer, AC block indices, engine name)."""
    from memfit.train import comm
    from memfit.train.engine import Objective, apply_checkpointing_, replicate, shard_
    from memfit.train.optim import StepInBackward, make_optimizer

    ac_blocks = apply_checkpointing_(student, o.ac)
    objective = Objective(student, teacher, temperature=o.temperature)
    engine = "single" if o.step_in_backward else ENGINE[o.grad_comm]
    if engine == "single":  # no wrapper: the hooks step every parameter in the backward pass
        return objective, StepInBackward(o.optim, objective.parameters(), o.lr), ac_blocks, engine
    if engine == "ddp":
        model = replicate(objective, device)
        if o.grad_comm == "powersgd":
            comm.attach_powersgd(model, o.powersgd_rank, counter)
    else:
        factory = (lambda: comm.Int8ReduceScatter(counter)) if o.grad_comm == "int8" \
            else (lambda: comm.CountingReduceScatter(counter))
        shard_(objective, device=device, param_dtype=compute, reduce_dtype=reduce_dtype,
               offload=o.offload_optimizer and device.type == "cuda", comm_factory=factory)
        model = objective
    return model, make_optimizer(o.optim, model.parameters(), o.lr), ac_blocks, engine


def _save(model, engine: str, spec_model, tokenizer, out, o: TrainOptions, rank: int, entry: dict):
    """Gather the full state dict (every rank), rebuild a plain model on rank 0 and save it."""
    from transformers import AutoModelForCausalLM

    from memfit.io.save import save
    from memfit.moe import unfuse_experts_
    from memfit.train.engine import full_state_dict

    sd = full_state_dict(model, fsdp=engine == "fsdp2")
    if rank != 0:
        return
    fresh = AutoModelForCausalLM.from_config(spec_model.config, dtype=torch.float32)
    unfuse_experts_(fresh)  # the trained model's own layout (memfit.moe)
    fresh.load_state_dict(sd, strict=True)
    # float32 as trained ("keep"): memfit's 16-bit default would round away updates of ~lr
    save(fresh.eval(), tokenizer, out, recipe={}, overwrite=o.overwrite, extra={"train": entry},
         dense_dtype="keep")


def _inputs(model: str, o: TrainOptions, device, compute, world: int):
    """-> (student, teacher or None, (n, seq_len) training windows); checks them on every rank."""
    from memfit.archs import check_positions
    from memfit.calib.data import token_windows
    from memfit.train.engine import check_same_model

    if o.batch_size % world:
        raise UserError(f"--batch-size {o.batch_size} does not split over {world} ranks; "
                        f"use a multiple of {world}")
    if o.step_in_backward and world > 1:
        raise UserError(f"--step-in-backward runs on one rank (FSDP2 steps whole shards after "
                        f"its reduce-scatter); run it without torchrun, not on {world} ranks")
    # float32 master weights (FSDP2 casts to the compute dtype), or bfloat16 ones (--weights bf16)
    s = _load(model, o, device, torch.bfloat16 if o.weights == "bf16" else torch.float32)
    t = _load(o.teacher, o, device, compute, trained=False) if o.teacher else None
    if t is not None:
        from memfit.distill.run import check_same_tokenizer
        check_same_tokenizer(t, s, o.teacher, model)
        t.model.eval().requires_grad_(False)
    check_same_model(s.model)
    check_positions(s.model.config, o.seq_len, "--seq-len")
    windows = token_windows(s.tokenizer, o.data, o.split, seq_len=o.seq_len,
                            max_windows=o.samples, seed=o.seed, bos=o.bos)
    if windows.shape[0] < o.batch_size:
        raise UserError(f"{o.data} {o.split} holds {windows.shape[0]} windows of {o.seq_len} "
                        f"tokens, fewer than --batch-size {o.batch_size}")
    return s, t, windows


def _predicted(shape, o: TrainOptions, world: int, engine: str, compute, device) -> dict:
    from memfit.train.memory import activation_bytes, predict

    cbytes = 2 if compute == torch.bfloat16 else 4
    act = activation_bytes(shape, batch=o.batch_size // world, seq_len=o.seq_len, ac=o.ac,
                           compute_bytes=cbytes)
    return predict(shape, world=world, engine=engine, optimizer=o.optim,
                   offload=o.offload_optimizer and device.type == "cuda", compute_bytes=cbytes,
                   act_bytes=act, grad_comm=o.grad_comm,
                   param_bytes=2 if o.weights == "bf16" else 4)


def train_to(model: str, out: str | Path | None, options: TrainOptions | None = None,
             on_step=None) -> dict:
    """Train `model` (fine-tune, or distill `options.teacher` into it) and save it to `out`
    (None: do not save); -> report (see the module docstring)."""
    import torch.distributed as dist

    from memfit.eval.memory import reset_peak_rss, trim_heap
    from memfit.train.comm import ByteCounter
    from memfit.train.engine import init_distributed
    from memfit.train.loop import global_batches, rss_now, train_loop
    from memfit.train.memory import model_shape
    from memfit.train.optim import state_nbytes

    o = options or TrainOptions()
    check_options(o, Path(out) if out is not None else None, model)
    rss_start = rss_now()
    rank, world, device, created = init_distributed(o.device)
    try:
        compute, reduce_dtype = _dtypes(o, device)
        s, t, windows = _inputs(model, o, device, compute, world)
        shape = model_shape(s.model)
        torch.manual_seed(o.seed)
        counter = ByteCounter()
        engine_model, opt, ac_blocks, engine = _build(o, s.model, t.model if t else None, device,
                                                      compute, reduce_dtype, counter)
        s.model.train()
        gc.collect()  # the load's and the sharding's freed memory: back to the system, so the
        trim_heap()   # RSS rise over the steps is what training adds, and the peak is its own
        reset_peak_rss()
        rss_train = rss_now()
        rep = train_loop(engine_model, opt, global_batches(windows, o.batch_size, o.seed, rank, world),
                         steps=o.steps, device=device, counter=counter,
                         autocast_bf16=engine in ("ddp", "single") and compute == torch.bfloat16
                         and o.weights == "fp32",
                         progress=o.progress and rank == 0, on_step=on_step)
        entry = {"model": model, **{k: v for k, v in asdict(o).items() if k != "progress"},
                 "world_size": world}
        tokens = o.steps * o.batch_size * o.seq_len
        report = {"model": model, "out": str(out) if out is not None else None, "rank": rank,
                  "world_size": world, "engine": engine, "device": str(device),
                  "compute_dtype": str(compute).replace("torch.", ""),
                  "reduce_dtype": {"int8": "int8", "powersgd": f"powersgd rank {o.powersgd_rank}"}.get(
                      o.grad_comm, str(reduce_dtype).replace("torch.", "")),
                  "ac_blocks": ac_blocks, "parameters": shape.params,
                  "optimizer_state_bytes": state_nbytes(opt),
                  "predicted": _predicted(shape, o, world, engine, compute, device),
                  "rss_start_bytes": rss_start, "rss_before_training_bytes": rss_train,
                  "tokens": tokens, "tokens_per_second": tokens / rep["seconds"], **rep,
                  "options": entry}
        if out is not None:
            if rank == 0 and o.progress:
                print(f"memfit: gathering the weights and writing {out}", file=sys.stderr, flush=True)
            _save(engine_model, engine, s.model, s.tokenizer, out, o, rank, entry)
        return report
    finally:
        if created:
            gc.collect()  # a DDP model (a cycle through its comm hook) goes before its group
            dist.destroy_process_group()
