"""memfit's own decode step for Llama-family models: ~9 launches per layer, one CUDA graph a step.

Why: replaying transformers' forward as a CUDA graph still launches every small kernel of its
eager modules (RMSNorm alone is ~8 kernels, rotary ~10, the static cache's updates, the mask,
SDPA, SiLU, residual adds); at batch 1 those launches and gaps cost more than reading the
weights (benchmarks/RESULTS.md, issue 10 profile). This step computes the same function with:

    add_rmsnorm -> qkv linear -> rope + cache write + decode attention -> o linear
    -> add_rmsnorm -> gate_up linear -> silu_mul -> down linear        (next layer's norm fused)
    ... final norm -> lm_head -> argmax (two launches; torch's one-block reduction took 35 µs)

- Linears of one group (q/k/v, gate/up) run as one matmul over their rows concatenated, when
  they are the same kind: dense `nn.Linear`s of one dtype, or `QuantLinear`s of one format
  (memfit.kernels picks the kernel for the fused shape). `packed_groups` makes the concatenated
  tensor once and points the modules' own weights at row slices of it (no extra memory), and
  gives each module back a tensor of its own on exit, so the model is left as it was. Groups of
  mixed kinds (a planner's per-layer mix) run module by module and concatenate their outputs.
- The KV cache is a pair of static (B, KVH, max_len, D) tensors per layer; positions come from a
  device tensor, so the step holds no host value and is captured once (memfit.decode).
- The small pieces are memfit.kernels.triton_decode (Triton on CUDA and under TRITON_INTERPRET=1,
  their torch references elsewhere); the prompt (T > 1) attends through SDPA over the cache.
  Triton kernels (these and the int4 mma GEMV) launch with programmatic dependent launch
  (memfit.kernels.pdl), so each starts while the previous one finishes.

Measured on one H200 (random-weight Llama-3-8B shape, batch 1, benchmarks/decode_profile.py):
bf16 229-233 tok/s (transformers' forward in the same graph loop: 135), int4 g128 412 with the
weights tiled (`Tiling`; 374 in the stored layout), 440 with the lm_head in int4 too; 266-330
launches a step against 1569-1729.

Takes (`ineligibility` says why not): model_type llama (also mistral/qwen2 without sliding
windows or with q/k/v biases absent), SiLU MLP, no attention bias. Anything else goes through
transformers' forward (memfit.decode's generic path).
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from memfit.kernels import linear as kernel_linear
from memfit.kernels import prepare
from memfit.kernels import triton_decode as td
from memfit.kernels.weights import (
    narrow,
    row_slice,
    tile,
    tileable,
    untile,
    widen,
    widen_bytes,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_TYPES = ("llama", "mistral", "qwen2")


def ineligibility(model) -> str | None:
    """Why the native step cannot run `model` (None when it can)."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in _TYPES:
        return f"model_type {getattr(cfg, 'model_type', None)!r} is not one of {_TYPES}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} (the step fuses SiLU)"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return "biased attention/MLP projections"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "no model.layers / model.rotary_emb"
    for layer in inner.layers:
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            if getattr(getattr(attn, name), "bias", None) is not None:
                return f"{name} has a bias"
    return None


def _fusable(mods) -> str | None:
    """'dense' or 'int' when the modules can run as one matmul over their rows, else None."""
    from memfit.formats.quant_linear import QuantLinear
    if any(getattr(m, "bias", None) is not None for m in mods):
        return None
    if all(type(m) is nn.Linear for m in mods):
        same = len({(m.weight.dtype, m.in_features) for m in mods}) == 1
        return "dense" if same else None
    if all(type(m) is QuantLinear for m in mods):
        same = len({(m.fmt, m.in_features, m.scale.dtype) for m in mods}) == 1
        return "int" if same else None
    return None


class _Group:
    """One matmul over several modules' rows, or the modules one by one (then concatenated)."""

    def __init__(self, mods):
        self.mods, self.kind = list(mods), _fusable(mods)
        self.weight = None
        self.plans = False  # CUDA int: the fused weight's launch plans (memfit.kernels.replay),
        # made on the first call; what an eager call (the prompt's forward) skips with them is
        # what a QuantLinear's plans skip
        self.fields: list[str] = []
        if self.kind == "dense":
            self.fields = ["weight"]
        elif self.kind == "int":
            self.fields = [f for f in ("qdata", "scale", "zero") if getattr(mods[0], f, None) is not None]

    def pack(self) -> None:
        """Concatenate the rows once; point each module's tensors at its slice."""
        if self.kind is None:
            return
        cat = {f: torch.cat([self._get(m, f) for m in self.mods]) for f in self.fields}
        row = 0
        for m in self.mods:
            n = self._get(m, self.fields[0]).shape[0]
            for f in self.fields:
                self._set(m, f, cat[f][row: row + n])
            row += n
        if self.kind == "dense":
            self.weight = cat["weight"]
        else:
            from memfit.formats.intq import kernel_weight
            m0 = self.mods[0]
            self.weight = kernel_weight(cat["qdata"], cat["scale"], cat.get("zero"),
                                        (row, m0.in_features), m0.fmt)

    def relayout(self, tiling: Tiling) -> None:
        """The fused tensor in the decode loop's layout (`Tiling.convert`: 3-bit codes widened,
        the tiled layout of memfit.kernels.weights.tile where every module's rows stay a whole
        number of blocks, so each module's slice stays valid)."""
        whole = bool(tiling.rows) and all(m.out_features % tiling.rows == 0 for m in self.mods)
        t = tiling.convert(self.weight, whole)
        if t is None:
            return
        row = 0
        for m in self.mods:
            m.hold(row_slice(t, row, row + m.out_features))
            row += m.out_features
        self.weight = t

    def unpack(self) -> None:
        """Give each module a tensor of its own again (the model is left as it was)."""
        if self.kind is None:
            return
        for m in self.mods:
            if getattr(m, "tile_rows", 0) or getattr(m, "held_bits", 0):
                m.hold(stored(m.kernel_weight(), m.fmt.bits))  # fresh tensors of its own
                continue
            for f in self.fields:
                self._set(m, f, self._get(m, f).clone())
        self.weight, self.plans = None, False

    @staticmethod
    def _get(m, f):
        return m.weight.data if f == "weight" else getattr(m, f)

    @staticmethod
    def _set(m, f, t):
        if f == "weight":
            m.weight.data = t
        else:
            setattr(m, f, t)  # a registered buffer: replaced in place in _buffers

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "dense":
            return torch.nn.functional.linear(x, self.weight)
        if self.kind == "int":
            if self.plans is False:
                self.plans = prepare(self.weight) if self.weight.qdata.is_cuda else None
            return kernel_linear(x, self.weight, None, self.plans)
        return torch.cat([m(x) for m in self.mods], dim=-1)


class Tiling:
    """Which 4-bit weights a decode loop holds in the tiled layout of memfit.kernels.weights.tile
    (one warp load = 512 contiguous bytes, scales and zero points adjacent; H200: 374 -> 412
    tok/s, benchmarks/RESULTS.md session 9): at batch 1, on CUDA, those the tensor-core decode
    kernel takes. Not at larger batches: there the stored layout's other kernels win at some
    shapes (M = 16 on 14336x4096: 37 µs against the tiled mma kernel's 43). rows None:
    MEMFIT_TILE_ROWS (default 64; 0 = off) on CUDA, off elsewhere; a number given tiles every
    tileable 4-bit weight on any device (tests: off CUDA the reference kernel reads it through
    `untile`). 3-bit weights are widened to 4-bit codes first on CUDA (or when a number is
    given): only the dequantize kernel reads the stored 3-bit layout there (`convert`)."""

    def __init__(self, model, batch: int, rows: int | None = None):
        dev = next(model.parameters()).device
        self.batch, self.forced, self.dtype = batch, rows is not None, model.dtype
        self.rows = (rows if rows is not None else int(os.environ.get("MEMFIT_TILE_ROWS", "64"))
                     if dev.type == "cuda" else 0)
        self.room = None  # bytes widening may still add (None: not yet asked; see `convert`)

    def wants(self, w) -> bool:
        if not self.rows or not tileable(w, self.rows):
            return False
        if self.forced:
            return True
        from memfit.kernels.triton_mma import mma_ineligibility
        return (w.qdata.is_cuda and self.batch == 1
                and mma_ineligibility(w, 1, self.dtype) is None)

    def convert(self, w, tile_ok: bool = True):
        """`w` in the decode loop's layout, or None where it keeps its stored one: 3-bit codes
        on CUDA (or forced) widened to 4 bits (the 4-bit kernels read them; the stored 3-bit
        layout takes dequantize + cuBLAS there: 33% more weight bytes during the loop, put back
        after), then tiled where `wants` says so. Widening adds a third of the 3-bit codes'
        bytes: on CUDA only while the device keeps WIDEN_RESERVE of its memory free besides (the
        KV cache and activations come later), so a model fitted tightly keeps its 3-bit bytes."""
        v = w
        if w.bits == 3 and (self.forced or w.qdata.is_cuda):
            extra = widen_bytes(w)
            if self.room is None:
                self.room = _room(w.qdata.device) if w.qdata.is_cuda else float("inf")
            if extra <= self.room:
                self.room -= extra
                v = widen(w)
        if tile_ok and self.wants(v):
            v = tile(v, self.rows)
        return None if v is w else v


WIDEN_RESERVE = 0.2  # of the device's memory kept free when the loop widens 3-bit weights


def _room(device) -> int:
    free, total = torch.cuda.mem_get_info(device)
    return max(0, free - int(WIDEN_RESERVE * total))


def stored(w, bits: int):
    """The stored layout of a weight the decode loop converted (`Tiling.convert`)."""
    if w.tile_rows:
        w = untile(w)
    return narrow(w) if w.bits != bits else w


@contextlib.contextmanager
def tiled_linears(model, tiling: Tiling, skip: frozenset = frozenset(),
                  untiled: frozenset = frozenset()):
    """Within: the model's QuantLinears hold `tiling`'s layout (`Tiling.convert`: 3-bit codes
    widened, tiled where it wants; ids in `skip` left alone, in `untiled` widened only: a
    mixture of experts' routed kernels read the stored 4-bit layout), in place (no extra
    memory once each old tensor is dropped); on exit the stored layout again. Inside, their
    state dict is the converted bytes: for the decode loop only."""
    from memfit.formats.quant_linear import QuantLinear
    done = []
    try:
        with torch.inference_mode(False), torch.no_grad():
            for m in model.modules():
                w = m.kernel_weight() if type(m) is QuantLinear and id(m) not in skip else None
                v = None if w is None else tiling.convert(w, id(m) not in untiled)
                if v is not None:
                    m.hold(v)
                    done.append(m)
        yield
    finally:
        with torch.inference_mode(False), torch.no_grad():
            for m in done:
                m.hold(stored(m.kernel_weight(), m.fmt.bits))
            if done:  # memfit.moe.Experts' tables may hold the converted tensors
                for mod in model.modules():
                    if hasattr(mod, "forget_tables"):
                        mod.forget_tables()


class NativeStep:
    """The decode step of one Llama-family model for `batch` rows and `max_len` positions.
    Within `packed_groups`, 4-bit weights are in the tiled layout where `Tiling(model, batch,
    tile_rows)` wants them (fused q/k/v and gate/up too: row blocks stay whole, so each
    module's slice of a fused tiled tensor is a tiled weight of its own)."""

    def __init__(self, model, batch: int, max_len: int, tile_rows: int | None = None,
                 kv=None):
        self.model = model
        self.tiling = Tiling(model, batch, tile_rows)
        cfg = model.config
        inner = model.model
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.layers = inner.layers
        self.qkv = [_Group([ly.self_attn.q_proj, ly.self_attn.k_proj, ly.self_attn.v_proj])
                    for ly in self.layers]
        self.gate_up = [_Group([ly.mlp.gate_proj, ly.mlp.up_proj]) for ly in self.layers]
        dev = inner.embed_tokens.weight.device
        dt = next(p.dtype for p in inner.norm.parameters())
        if getattr(model, "dtype", None) is not None:
            dt = model.dtype
        shape = (batch, self.kv_heads, max_len, self.head_dim)
        self.kv = None  # kv (a memfit.kvcache.KVFormat): a quantized cache per layer instead
        if kv is not None:
            from memfit.kvstatic import StaticKV
            self.kv = [StaticKV(kv, batch, self.kv_heads, self.head_dim, max_len, dt, dev)
                       for _ in self.layers]
        else:
            self.kc = [torch.zeros(shape, dtype=dt, device=dev) for _ in self.layers]
            self.vc = [torch.zeros(shape, dtype=dt, device=dev) for _ in self.layers]
        pos = torch.arange(max_len, device=dev)[None]
        cos, sin = inner.rotary_emb(torch.zeros(1, dtype=dt, device=dev), pos)  # (1, L, D)
        self.cos, self.sin = cos[0].to(dt).contiguous(), sin[0].to(dt).contiguous()
        self.fast = dev.type == "cuda" or INTERPRET

    @contextlib.contextmanager
    def packed_groups(self):
        """Within: q/k/v and gate/up are one tensor each (see the module docstring)."""
        done = []
        try:
            with torch.inference_mode(False), torch.no_grad():  # the model's tensors stay normal
                for g in self.qkv + self.gate_up:
                    g.pack()
                    done.append(g)
                    if g.kind == "int":
                        g.relayout(self.tiling)
            grouped = frozenset(id(m) for g in done if g.kind == "int" for m in g.mods)
            with tiled_linears(self.model, self.tiling, grouped):  # o, down, a packed lm_head
                yield self
        finally:
            with torch.inference_mode(False), torch.no_grad():
                for g in done:
                    g.unpack()

    def _norm(self, h, r, norm):
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        if self.fast:
            return td.add_rmsnorm(h, r, norm.weight, eps)
        return td.add_rmsnorm_ref(h, r, norm.weight, eps)

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """ids (B, T) at positions pos (T,) -> (B,) greedy next ids (last position)."""
        b, t = ids.shape
        inner = self.model.model
        h = inner.embed_tokens(ids).reshape(b * t, -1).contiguous()  # (B*T, d) residual stream
        x = self._norm(h, None, self.layers[0].input_layernorm)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            qkv = self.qkv[i](x)                                       # (B*T, (H + 2 KVH) D)
            scale = getattr(attn, "scaling", self.head_dim ** -0.5)
            if self.kv is not None:
                a = self._attend_kv(self.kv[i], qkv, pos, scale)
            else:
                a = self._attend(i, qkv, pos, scale, b, t)
            o = attn.o_proj(a.reshape(b * t, -1))
            x = self._norm(h, o, layer.post_attention_layernorm)
            gu = self.gate_up[i](x)                                    # (B*T, 2 I)
            m = td.silu_mul(gu) if self.fast else td.silu_mul_ref(gu)
            d = layer.mlp.down_proj(m)
            nxt = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else inner.norm
            x = self._norm(h, d, nxt)
        last = x.view(b, t, -1)[:, -1]                                 # (B, d)
        logits = self.model.lm_head(last)                              # (B, V)
        return td.argmax_rows(logits.contiguous()) if self.fast else logits.argmax(-1)

    def _attend(self, i, qkv, pos, scale, b, t):
        """Rope, the cache write and attention over the 16-bit cache: (B, T, H * D)."""
        kc, vc = self.kc[i], self.vc[i]
        split = td.attn_split(kc.shape[2], b * self.kv_heads)
        if t == 1 and self.fast and self.head_dim >= 32:  # one launch (tl.dot: K >= 16)
            return td.rope_attention(qkv, pos, self.cos, self.sin, kc, vc, self.heads, scale,
                                     split)
        if t == 1 and self.fast:
            q = td.rope_cache(qkv, pos, self.cos, self.sin, kc, vc, self.heads)
            return td.decode_attention(q, kc, vc, pos, scale, split)
        rope = td.rope_cache if self.fast else td.rope_cache_ref
        q = rope(qkv, pos, self.cos, self.sin, kc, vc, self.heads)
        return td.attention_ref(q, kc, vc, pos, scale)

    def _attend_kv(self, cache, qkv, pos, scale):
        """The same over a quantized cache (memfit.kvstatic): a prompt (from position 0)
        attends over its own 16-bit states, which then fill the cache; a decode step writes its
        token into the ring, quantizes the group leaving it (if one does) and attends over the
        packed store and the ring."""
        rope = td.rope_cache if self.fast else td.rope_cache_ref
        b, t = qkv.shape[0] // pos.shape[0], pos.shape[0]
        if t > 1:
            shape = (b, self.kv_heads, t, self.head_dim)
            kc, vc = qkv.new_empty(shape), qkv.new_empty(shape)
            q = rope(qkv, pos, self.cos, self.sin, kc, vc, self.heads)
            g = self.heads // self.kv_heads  # causal: no (T, T) mask at long prompts
            a = torch.nn.functional.scaled_dot_product_attention(
                q, kc.repeat_interleave(g, 1), vc.repeat_interleave(g, 1), is_causal=True,
                scale=scale)
            cache.prefill(kc, vc)
            return a.transpose(1, 2)
        if self.fast:  # token into slot pos % ring, and the flush, in one launch
            q = td.rope_cache(qkv, pos, self.cos, self.sin, cache.kr, cache.vr, self.heads,
                              flush=cache.flush_args())
        else:
            q = td.rope_cache_ref(qkv, pos, self.cos, self.sin, cache.kr, cache.vr, self.heads)
            cache.flush(pos)
        return cache.attend(q[:, :, 0], pos, scale, qkv.dtype)
