"""Where FSDP2 (world 1, fp32 master, bf16 compute, 8-bit AdamW, full AC) spends CUDA memory."""
import json, sys, time, torch
sys.path.insert(0, "benchmarks")
from train_big import build, LLAMA3_8B
from memfit.train.comm import ByteCounter
from memfit.train.engine import init_distributed
from memfit.train.memory import model_shape
from memfit.train.run import TrainOptions, _build, _dtypes, _predicted
layers = int(sys.argv[1]) if len(sys.argv) > 1 else 32
cfg = dict(LLAMA3_8B, num_hidden_layers=layers)
G = 2**30
dev = torch.device("cuda")
o = TrainOptions(steps=2, seq_len=2048, batch_size=1, ac="full", optim="adamw8bit", precision="bf16", device="cuda")
init_distributed("cuda")
compute, red = _dtypes(o, dev)
model = build(cfg, dev, torch.float32)
shape = model_shape(model)
pred = _predicted(shape, o, 1, "fsdp2", compute, dev)
a = lambda: round(torch.cuda.memory_allocated() / G, 3)
def phase(name, t0=[None]):
    torch.cuda.synchronize()
    print(json.dumps({"phase": name, "allocated_gib": a(), "peak_since_last_gib": round(torch.cuda.max_memory_allocated() / G, 3)}), flush=True)
    torch.cuda.reset_peak_memory_stats()
phase("built fp32 model")
net, opt, _, eng = _build(o, model, None, dev, compute, red, ByteCounter())
phase("after fully_shard")
trace = []
from memfit.train.engine import blocks_of
for i, b in enumerate(blocks_of(net.student)):
    b.register_forward_pre_hook(lambda m, x, i=i: trace.append(("fwd", i, a())))
    b.register_full_backward_pre_hook(lambda m, g, i=i: trace.append(("bwd", i, a())))
net.train()
gen = torch.Generator().manual_seed(0)
for step in range(2):
    ids = torch.randint(0, cfg["vocab_size"], (1, 2048), generator=gen).to(dev)
    trace.clear()
    loss = net(ids); phase(f"step {step} forward")
    loss.backward(); phase(f"step {step} backward")
    print(json.dumps({"trace_first": trace[:4], "trace_bwd_sample": [t for t in trace if t[0]=="bwd"][::max(1, layers//6)]}), flush=True)
    grads = sum(p.grad.to_local().numel() * p.grad.to_local().element_size() for p in net.parameters() if p.grad is not None)
    print(json.dumps({"grad_gib": round(grads / G, 3), "grad_dtypes": sorted({str(p.grad.dtype) for p in net.parameters() if p.grad is not None})}))
    opt.step(); phase(f"step {step} optimizer step")
    opt.zero_grad(set_to_none=True); phase(f"step {step} zero_grad")
print(json.dumps({"params": shape.params, "predicted_gib": {k: round(v / G, 3) for k, v in pred.items() if k.endswith("bytes")}}))
print(torch.cuda.memory_summary(abbreviated=True))
