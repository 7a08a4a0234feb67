"""Greedy decode with a static KV cache, one CUDA graph per step on CUDA.

Two steps can be captured: memfit's own (memfit.fastdecode, the default for Llama-family models:
~8 launches a layer, fused q/k/v and gate/up matmuls; on one H200 the 8B-shaped model decodes at
233 tok/s in bf16 against 135 through transformers' forward, benchmarks/RESULTS.md), or
transformers' forward with a StaticCache (every other model, and `native=False`), described
below.

transformers' eager `generate` launches every kernel of every layer from Python at each step, so a
batch-1 decode on a GPU is bound by launch overhead (29 tok/s for an 8B model whose weights stream
in ~6 ms). Here the step is captured once as a CUDA graph and replayed:

- the cache is transformers' `StaticCache`, sized to exactly prompt + new tokens
  (`max_cache_len`), so its tensors never move;
- positions are explicit: the prompt is run at positions 0..P-1, each step at its own position,
  held in a device tensor that the graph itself advances (with `cache_position` too on
  transformers versions whose forward takes it);
- before capture, the step runs twice eagerly on a side stream (kernel choice, compilation, the
  cache's lazy allocation); that writes states at positions P and P+1, so afterwards the position,
  the cache's own write cursor (`cumulative_length`, where it has one) and the input token are
  set back. Stale states past the current position are never read: the causal mask covers them,
  and each step writes its own position before attending.

The previous attempt failed with `index_copy_(): index out of bounds` inside StaticCache's update:
its warm-up and capture runs advanced the cache's write cursor past `max_cache_len`; resetting
the cursor (above) is the fix.

`fuse=True` also compiles the small element-wise pieces of each layer with torch.compile (the
RMSNorm and MLP modules' forward, and the family's `apply_rotary_pos_emb`), each compiled once
and shared by every layer; packed linears stay memfit's kernels (the `memfit::int_linear` custom
op). A graph step then launches about half as many kernels. It costs a compile on first use.

Greedy only (argmax); sampling goes through transformers' `generate`. With a quantized KV cache
(`kv`), memfit's own step holds it in fixed buffers (memfit.kvstatic), so the step is
still one graph; formats or models it cannot take stay on transformers' `generate`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import time
import warnings

import torch
import torch._dynamo


def _forward_kwargs(model):
    """(cache keyword, whether forward takes cache_position, whether it takes logits_to_keep)."""
    from memfit.kvcache import cache_kwarg
    params = inspect.signature(model.forward).parameters
    return cache_kwarg(model), "cache_position" in params, "logits_to_keep" in params


@contextlib.contextmanager
def fused(model):
    """Within: RMSNorm/MLP forwards and `apply_rotary_pos_emb` of `model` run torch.compile'd
    (one compiled function per class, shared by all its instances); restored on exit."""
    patched = []  # (object, attribute, old value or _MISSING)
    compiled: dict = {}
    for mod in model.modules():
        name = type(mod).__name__
        if name.endswith("RMSNorm") or name.endswith("MLP"):
            fn = compiled.setdefault(type(mod), torch.compile(type(mod).forward, dynamic=False))
            patched.append((mod, "forward", mod.__dict__.get("forward", _MISSING)))
            mod.forward = functools.partial(fn, mod)
        if name.endswith("Attention"):
            family = sys.modules[type(mod).__module__]
            rope = getattr(family, "apply_rotary_pos_emb", None)
            if rope is not None and not any(o is family for o, _, _ in patched):
                patched.append((family, "apply_rotary_pos_emb", rope))
                family.apply_rotary_pos_emb = torch.compile(rope, dynamic=False)
    limits = {k: getattr(torch._dynamo.config, k) for k in
              ("cache_size_limit", "accumulated_cache_size_limit")
              if hasattr(torch._dynamo.config, k)}
    for k, v in limits.items():  # in case a compiled function guards on each layer's identity
        setattr(torch._dynamo.config, k, max(v, 4 * len(patched) + 64))
    try:
        yield
    finally:
        for k, v in limits.items():
            setattr(torch._dynamo.config, k, v)
        for obj, attr, old in reversed(patched):
            if old is _MISSING:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)


_MISSING = object()


def _reset_cursor(cache, position: int) -> None:
    """Set the write cursor of every static layer that keeps one to `position`."""
    for layer in getattr(cache, "layers", []):
        cur = getattr(layer, "cumulative_length", None)
        if isinstance(cur, torch.Tensor):
            cur.fill_(position)


@torch.inference_mode()
def greedy_static(model, input_ids: torch.Tensor, max_new_tokens: int, *, graph: bool | None = None,
                  on_token=None, eos_token_id=None, timings: dict | None = None,
                  fuse: bool = False, native: bool | None = None, kv=None) -> torch.Tensor:
    """(B, P) prompt ids -> (B, max_new_tokens) greedy continuation (fewer when `eos_token_id`
    ends every row). `graph` (default: on CUDA) replays one captured CUDA graph per step;
    `on_token(ids (B,))` is called after each step (it forces a device sync per step);
    `timings`, when given, gets `steps` and `decode_s`, the synchronized wall time of the steps
    after the first token (capture and warm-up excluded). `native` (default: where the model
    is eligible) runs memfit.fastdecode's own step instead of transformers' forward; otherwise
    `fuse` runs transformers' forward inside `fused(model)` (torch.compile'd element-wise
    pieces). `kv` (a memfit.kvcache.KVFormat): memfit's step with a quantized cache
    (memfit.kvstatic; `kv_ineligibility` says where it cannot)."""
    from memfit import fastdecode

    b, p = input_ids.shape
    if kv is not None:
        why = kv_ineligibility(model, kv)
        if why is not None:
            raise ValueError(f"memfit.decode: no static quantized KV cache here: {why}")
        native = True
    if native is None:
        native = fastdecode.ineligibility(model) is None
    if native:
        step = fastdecode.NativeStep(model, b, p + max_new_tokens, kv=kv)
        with step.packed_groups():
            return _greedy(step, lambda position: None, input_ids, max_new_tokens, graph=graph,
                           on_token=on_token, eos_token_id=eos_token_id, timings=timings)
    with fused(model) if fuse else contextlib.nullcontext(), \
            fastdecode.tiled_linears(model, fastdecode.Tiling(model, b),
                                     untiled=_expert_ids(model)):
        forward, reset = _hf_forward(model, b, p + max_new_tokens)
        return _greedy(forward, reset, input_ids, max_new_tokens, graph=graph,
                       on_token=on_token, eos_token_id=eos_token_id, timings=timings)


def _expert_ids(model) -> frozenset:
    """The experts' linears (memfit.moe), kept untiled (3-bit ones widened to 4 bits): the
    routed kernels read the stored layout (memfit.kernels.triton_moe)."""
    from memfit.moe import is_expert_linear

    return frozenset(id(m) for n, m in model.named_modules() if is_expert_linear(n))


def kv_ineligibility(model, kv) -> str | None:
    """Why `greedy_static` cannot decode `model` with the quantized KV format `kv` (None when it
    can): memfit's own step takes the model, and memfit.kvstatic the format."""
    from memfit import fastdecode, kvstatic
    why = fastdecode.ineligibility(model)
    if why is not None:
        return why
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return kvstatic.ineligibility(kv, head_dim)


def _hf_forward(model, b: int, max_len: int):
    """(forward(ids (B, q), pos (q,)) -> (B,) next ids, reset(position)) through transformers'
    forward and a StaticCache of `max_len` positions."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_len)
    ckw, has_cp, has_keep = _forward_kwargs(model)

    def forward(ids, pos):
        kw = {ckw: cache, "position_ids": pos.unsqueeze(0).expand(b, -1), "use_cache": True}
        if has_cp:
            kw["cache_position"] = pos
        if has_keep:
            kw["logits_to_keep"] = 1
        return model(input_ids=ids, **kw).logits[:, -1].argmax(-1)

    return forward, lambda position: _reset_cursor(cache, position)


def _greedy(forward, reset, input_ids, max_new_tokens, *, graph, on_token, eos_token_id,
            timings):
    b, p = input_ids.shape
    dev = input_ids.device
    graph = dev.type == "cuda" if graph is None else graph

    out = torch.empty(b, max_new_tokens, dtype=torch.long, device=dev)
    tok = forward(input_ids, torch.arange(p, device=dev))
    out[:, 0] = tok
    pos = torch.full((1,), p, dtype=torch.long, device=dev)
    done = _emit(on_token, tok, eos_token_id)

    def step():
        nxt = forward(tok[:, None], pos)
        out.index_copy_(1, pos - (p - 1), nxt[:, None])
        tok.copy_(nxt)
        pos.add_(1)

    replay = step
    if graph and max_new_tokens > 1 and not done:
        first = tok.clone()

        def rewind():  # back to the state after the first token
            tok.copy_(first)
            pos.fill_(p)
            reset(p)
        s = torch.cuda.Stream(device=dev)
        s.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(s):
            for _ in range(min(2, max_new_tokens - 1)):
                step()
        torch.cuda.current_stream(dev).wait_stream(s)
        rewind()
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                step()
            replay = g.replay
        except RuntimeError as e:  # an op the family's forward runs cannot be captured
            # (Falcon copies a CPU tensor in its forward): the same step, launched eagerly
            warnings.warn("memfit: this model's decode step cannot be captured as a CUDA graph "
                          f"({str(e).splitlines()[0][:160]}); decoding without one",
                          stacklevel=2)
            rewind()
    n = 1
    if timings is not None:
        _sync(dev)
        t0 = time.perf_counter()
    while n < max_new_tokens and not done:
        replay()
        n += 1
        done = _emit(on_token, tok, eos_token_id)
    if timings is not None:
        _sync(dev)
        timings.update(steps=n - 1, decode_s=time.perf_counter() - t0)
    return out[:, :n]


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _emit(on_token, tok, eos_token_id) -> bool:
    """Call on_token; True when every row just produced the end-of-sequence token."""
    if on_token is not None:
        on_token(tok)
    if eos_token_id is None:
        return False
    eos = torch.as_tensor(eos_token_id, device=tok.device).view(-1)
    return bool(torch.isin(tok, eos).all())
