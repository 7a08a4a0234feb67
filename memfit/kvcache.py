"""Quantized KV cache (KIVI-style) that plugs into transformers' `generate` and forward passes.

Keys are quantized per channel (one scale/zero per channel for every `group` consecutive tokens:
key outliers live in fixed channels), values per token (one scale/zero per `group` channels of a
token), both asymmetric min-max on an int8/int4/int2 grid (x ~ q * scale + min), codes packed
with memfit.kernels.packing, scales and minima in float16. The most recent tokens stay in full
precision (`residual`, at least `group`): once more than `residual` tokens are unquantized, the
oldest whole groups are quantized and appended to the packed store. Quantized tokens are never
re-quantized (transformers' QuantizedCache re-quantizes the whole history at every flush, which
compounds the error).

The packed store of a layer is six contiguous tensors along the token axis (codes, scales and
minima of keys and values; a flush appends by concatenation, so nothing is over-allocated).
Attention reads dense states by default: `update` returns the dequantized history + the residual,
built for one layer at a time and freed after that layer's attention, so the memory held across
layers is the packed store (`nbytes()`); the transient is one layer's dense K/V. With
`fused=True` (CUDA decode steps, `enable_fused_kv_attention(model)`), `update` returns only the
residual and the attention function "memfit_kv" reads the packed store through the Triton
decode-attention kernel (memfit.kernels.triton_kv), merging it exactly with the residual; other
steps (prefill, masks with padding) dequantize as before.

Sliding-window layers (Gemma 2/3, Mistral) keep transformers' own windowed layer unquantized: they
hold at most `sliding_window` tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from memfit.errors import UserError
from memfit.kernels.packing import pack, unpack


@dataclass(frozen=True)
class KVFormat:
    bits: int = 4
    group: int = 32       # tokens per key group; channels per value group (capped at head_dim)
    residual: int = 128   # most recent tokens kept in full precision (>= group)

    def __post_init__(self):
        if self.bits not in (2, 4, 8):
            raise UserError(f"KV cache bits={self.bits} is not supported; use 8, 4 or 2")
        if self.group < 1 or self.residual < self.group:
            raise UserError(f"KV cache group={self.group}, residual={self.residual}: need "
                            "1 <= group <= residual (e.g. group 32, residual 128)")


# int4 takes groups of 64 (transformers' QuantizedCache's default q_group_size too): 3.5x less
# than a 16-bit cache at head_dim 128 (groups of 32: 3.2x) and the GPU decode-attention kernel's
# mma.sync path (memfit.kernels.triton_kv_mma: 1.5x bf16 SDPA at 32k; groups of 32 0.63x); its
# perplexity on the default model 1.0058x of the model's own cache against 1.0038x for groups of
# 32 (benchmarks/RESULTS.md: "KV int4 perplexity at other groups"). int8/int2 keep groups of 32.
KV_FORMATS = {"int8": KVFormat(8), "int4": KVFormat(4, group=64), "int2": KVFormat(2),
              "int4-g32": KVFormat(4, group=32), "int4-g64": KVFormat(4, group=64),
              "int4-g128": KVFormat(4, group=128)}


def kv_format(name: str | None) -> KVFormat | None:
    """'int8' | 'int4' (= 'int4-g64') | 'int2' | 'int4-g32' | 'int4-g128' -> KVFormat;
    None/'none'/'16' -> None (the model's own cache)."""
    if name in (None, "none", "16", "fp16", "bf16"):
        return None
    if name not in KV_FORMATS:
        raise UserError(f"unknown KV cache format {name!r}; use none, {', '.join(KV_FORMATS)}")
    return KV_FORMATS[name]


def _quantize(x: torch.Tensor, bits: int, dim: int):
    """Min-max over `dim` (size 1 afterwards in scale/min) -> (packed, scale, min, shape), so that
    x ~ q * scale + min. The minimum is stored as is (float16), not as an integer zero point:
    a key channel is often all-positive or all-negative over a token group, and an integer zero
    clamped to the grid would then cut off the range."""
    lo, hi = x.amin(dim, keepdim=True).float(), x.amax(dim, keepdim=True).float()
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp_min(2.0**-14).half()  # smallest normal float16
    low = lo.half()
    codes = ((x.float() - low.float()) / scale.float()).round().clamp(0, qmax).to(torch.uint8)
    shape = codes.shape
    return pack(codes.reshape(-1, shape[-1]), bits).view(*shape[:-1], -1), scale, low, shape


def _dequantize(block, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """-> the (B, H, T, D) states of a block stored by `_flush`."""
    (packed, scale, low, shape), out_shape = block
    codes = unpack(packed.reshape(-1, packed.shape[-1]), bits, shape[-1]).view(shape)
    return (codes.float() * scale.float() + low.float()).to(dtype).reshape(out_shape)


def value_group(fmt: KVFormat, head_dim: int) -> int:
    """Channels per value group: the format's group, capped at head_dim (which it must divide;
    otherwise one group a token)."""
    gv = min(fmt.group, head_dim)
    return gv if head_dim % gv == 0 else head_dim


def quantize_store(keys: torch.Tensor, values: torch.Tensor, fmt: KVFormat) -> list:
    """(B, H, n, D) keys/values, n whole key groups -> the packed store's six tensors (see
    QuantizedKVLayer.store)."""
    b, h, n, d = keys.shape
    g, gv = fmt.group, value_group(fmt, d)
    kg = keys.reshape(b, h, n // g, g, d)  # (B, H, groups, g, D): one scale per channel
    kq, ks, km, _ = _quantize(kg, fmt.bits, dim=3)
    vg = values.reshape(b, h, n, d // gv, gv)  # (B, H, T, D/gv, gv): one scale per group
    vq, vs, vm, _ = _quantize(vg, fmt.bits, dim=4)
    return [kq.reshape(b, h, n, -1), ks.reshape(b, h, n // g, d), km.reshape(b, h, n // g, d),
            vq.reshape(b, h, n, -1), vs.reshape(b, h, n, d // gv), vm.reshape(b, h, n, d // gv)]


def dequantize_store(store, fmt: KVFormat, head_dim: int):
    """The six packed tensors of `n` tokens -> (B, H, n, D) float32 keys and values."""
    kq, ks, km, vq, vs, vm = store
    b, h, t, _ = kq.shape
    d, g = head_dim, fmt.group
    kc = unpack(kq.reshape(-1, kq.shape[-1]), fmt.bits, d).view(b, h, t // g, g, d)
    k = (kc.float() * ks.float()[:, :, :, None] + km.float()[:, :, :, None]).view(b, h, t, d)
    gv = d // vs.shape[-1]
    vc = unpack(vq.reshape(-1, vq.shape[-1] // (d // gv)), fmt.bits, gv)
    vc = vc.view(b, h, t, d // gv, gv)
    v = (vc.float() * vs.float()[..., None] + vm.float()[..., None]).view(b, h, t, d)
    return k, v


def cache_kwarg(model) -> str:
    """The forward keyword for a cache: `cache` in newer transformers, `past_key_values` before."""
    import inspect
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class QuantizedKVLayer(DynamicLayer):
    """One full-attention layer's cache: packed old tokens + a dense residual."""

    def __init__(self, fmt: KVFormat, fused: bool = False):
        super().__init__()
        self.fmt = fmt
        self.fused = fused
        # (B, H, Tq, D*bits/8) codes, (B, H, Tq/g, D) key scale/min, (B, H, Tq, D/gv) value
        # scale/min; None until the first flush
        self.store: list | None = None
        self.quantized_tokens = 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self.fused and key_states.shape[-2] == 1 and (key_states.is_cuda or _INTERPRET):
            self._flush()  # the kernel reads the packed store, the residual comes back dense
            if self.store is not None and _fused_ineligibility(self) is None:
                _PENDING[id(self.keys)] = self
                return self.keys, self.values
            _warn_fused(self)
        keys, values = self.dense(self.keys, self.values)
        self._flush()
        return keys, values

    def dense(self, keys: torch.Tensor, values: torch.Tensor):
        """The dequantized history followed by `keys`/`values` (the residual)."""
        if self.store is None:
            return keys, values
        k, v = dequantize_store(self.store, self.fmt, keys.shape[-1])
        return (torch.cat([k.to(keys.dtype), keys], dim=-2),
                torch.cat([v.to(values.dtype), values], dim=-2))

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               scaling: float) -> torch.Tensor:
        """Decode attention (B, Hq, 1, D) of query over the packed store + the dense residual."""
        from memfit.kernels import on_device, triton_kv
        with on_device(query):
            out = triton_kv.kv_attention(query[:, :, 0], self.store, self.fmt.bits,
                                         self.fmt.group, scaling, keys, values)  # (B, Hq, D)
        return out.unsqueeze(2)

    def _flush(self) -> None:
        """Quantize the oldest whole groups while more than `residual` tokens are dense."""
        g, t = self.fmt.group, self.keys.shape[-2]
        n = (t - self.fmt.residual) // g * g if t > self.fmt.residual else 0
        if n <= 0:
            return
        new = quantize_store(self.keys[..., :n, :], self.values[..., :n, :], self.fmt)
        self.store = new if self.store is None else [torch.cat([a, c], dim=2)
                                                     for a, c in zip(self.store, new)]
        self.keys = self.keys[..., n:, :].clone()
        self.values = self.values[..., n:, :].clone()
        self.quantized_tokens += n

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.quantized_tokens + (self.keys.shape[-2] if self.keys.numel() else 0)

    def nbytes(self) -> int:
        """Bytes held: packed codes, scales and zeros, and the dense residual."""
        total = sum(t.numel() * t.element_size() for t in (self.store or []))
        if self.is_initialized:
            total += self.keys.numel() * self.keys.element_size()
            total += self.values.numel() * self.values.element_size()
        return total

    def reorder_cache(self, beam_idx):
        raise UserError("beam search with a quantized KV cache is not supported; use greedy or "
                        "sampling (num_beams=1)")

    def crop(self, max_length: int):
        raise UserError("cropping a quantized KV cache (assisted decoding) is not supported")


class QuantizedKVCache(Cache):
    """A transformers Cache whose full-attention layers are `QuantizedKVLayer`s; `fused=True`
    needs the model's attention set to "memfit_kv" (`enable_fused_kv_attention`)."""

    def __init__(self, config, fmt: KVFormat, fused: bool = False):
        if fused and getattr(config, "_attn_implementation", None) != FUSED:
            raise UserError("a fused quantized KV cache needs the model's attention set to "
                            f"{FUSED!r}: call memfit.kvcache.enable_fused_kv_attention(model)")
        # transformers' own per-layer choice (sliding, shared, full), full layers swapped
        plain = DynamicCache(config=config).layers
        super().__init__(layers=[QuantizedKVLayer(fmt, fused) if type(layer) is DynamicLayer
                                 else layer for layer in plain])
        self.fmt = fmt

    def nbytes(self) -> int:
        total = 0
        for layer in self.layers:
            if isinstance(layer, QuantizedKVLayer):
                total += layer.nbytes()
            elif layer.is_initialized:
                total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        return total


def quantized_kv_bytes(fmt: KVFormat, *, tokens: int, batch: int, kv_heads: int, head_dim: int,
                       dtype_bytes: int) -> int:
    """Exact bytes of one full-attention layer holding `tokens` tokens (what `nbytes` reports
    after those tokens went through the cache)."""
    g = fmt.group
    quantized = (tokens - fmt.residual) // g * g if tokens > fmt.residual else 0
    dense = tokens - quantized
    rows = batch * kv_heads
    gv = value_group(fmt, head_dim)
    codes = rows * quantized * -(-head_dim * fmt.bits // 8)  # packed rows of head_dim codes
    k_params = rows * (quantized // g) * head_dim * 2 * 2    # float16 scale + min per channel
    v_params = rows * quantized * (head_dim // gv) * 2 * 2   # per token and channel group
    return 2 * codes + k_params + v_params + 2 * rows * dense * head_dim * dtype_bytes


FUSED = "memfit_kv"
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # CPU tests run the kernel interpreted
_PENDING: dict = {}  # id(residual keys returned by update) -> the layer whose store to read
_WARNED: set = set()


def _fused_ineligibility(layer: QuantizedKVLayer) -> str | None:
    from memfit.kernels.triton_kv import kv_ineligibility
    kq, _, _, _, vs, _ = layer.store
    d = layer.keys.shape[-1]
    why = kv_ineligibility(layer.fmt.bits, d, layer.fmt.group, d // vs.shape[-1])
    if why is None and kq.shape[-1] * 8 != d * layer.fmt.bits:
        why = "packed rows are padded"
    return why


def _warn_fused(layer) -> None:
    why = _fused_ineligibility(layer) if layer.store is not None else None
    if why is not None and why not in _WARNED:
        import warnings
        _WARNED.add(why)
        warnings.warn(f"memfit: the KV decode-attention kernel cannot take this cache ({why}); "
                      "dequantizing it instead", stacklevel=3)


def fused_kv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       **kwargs):
    """transformers attention function "memfit_kv": a decode step of a fused quantized layer goes
    through the kernel (no mask: no padding); anything else is SDPA on dense states."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    layer = _PENDING.pop(id(key), None)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if layer is not None and attention_mask is None and query.shape[2] == 1:
        out = layer.attend(query, key, value, scaling)  # (B, Hq, 1, D)
        return out.transpose(1, 2).to(query.dtype), None
    if layer is not None:  # a mask after all: attend over the dense states
        key, value = layer.dense(key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                  dropout=dropout, **kwargs)


def enable_fused_kv_attention(model) -> None:
    """Route the model's attention through "memfit_kv" (SDPA except fused decode steps)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(FUSED, fused_kv_attention)
    AttentionMaskInterface.register(FUSED, sdpa_mask)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(FUSED)
    else:
        model.config._attn_implementation = FUSED
