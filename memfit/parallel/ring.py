"""Ring attention (context parallel) and a single-device tiled attention to compare it with.

`ring_attention(q, k, v, causal)`: each rank holds a slice of the sequence (`shard_sequence`);
the K/V blocks travel around the ring (rank r sends to r+1 and receives from r-1 with
`batch_isend_irecv`) while the block already held is being computed, so after N steps every
query has seen every key. Each block's partial result is merged in float32 (float64 for float64
inputs) by the log-sum-exp rule, kept in its max-shifted form (lse = m + log l):
    m = max(m_a, m_b),  l = l_a e^(m_a - m) + l_b e^(m_b - m),  acc = acc_a e^(m_a - m) + ...
and normalised once at the end (o = acc / l). Merging normalised outputs with a rounded lse
instead (o_a e^(lse_a - lse) + ...) measured twice the forward error of the tiled baseline: the
rounding of lse (|lse| of a few units) enters every probability.

Causal load balance: with a plain split, rank N-1 would compute N blocks and rank 0 one. Zigzag
slicing cuts the sequence into 2N chunks and gives rank i chunks i and 2N-1-i, so every rank
computes the same number of (chunk, chunk) products on every step but the first; a chunk pair
is computed in full (key chunk before query chunk), with a causal mask (same chunk), or skipped.

Backward (a torch.autograd.Function): flash-attention's recomputation of the probabilities
from the saved row max and denominator. K/V travel the ring again and each block's dK/dV accumulator travels with it, one
step behind the K/V exchange, and is sent home on the last step; dQ stays local.

Sizes: the local sequence length must be the same on every rank (checked, one small
all-gather per call); causal on N > 1 ranks needs it even (2 chunks), i.e. a global length
divisible by 2N (`shard_sequence` refuses other lengths; non-causal needs a multiple of N).
GQA: q has H heads, k/v Hkv with H % Hkv == 0; query head i reads KV head i // (H / Hkv), as in
transformers. Scores are materialised per block in tiles of query rows (1M scores on the CPU,
64M on GPUs), in plain torch float32 einsums: the readable reference, not a fused kernel (on a
GPU a flash kernel returning the log-sum-exp would replace `_block_forward`/`_block_backward`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from memfit.errors import UserError

# Scores materialised at once: on the CPU small tiles stay in cache (2048 tokens, 8 heads, one
# thread: 1.9 s fwd+bwd at 16M elements, 0.75 s at 1M); on a GPU large ones keep kernels busy.
_TILE_ELEMENTS = {"cpu": 1 << 20}
_TILE_ELEMENTS_GPU = 1 << 26


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_shapes(q, k, v) -> tuple[int, int, int, int, int]:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise UserError(f"attention expects q (B, H, L, D) and k, v (B, Hkv, L, D); got "
                        f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    if H % Hkv or k.shape[0] != B or k.shape[3] != D:
        raise UserError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} do not match: batch and "
                        "head dim must agree and the query heads must be a multiple of the KV heads")
    return B, H, Hkv, L, D


def full_attention(q, k, v, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Plain softmax attention in the inputs' dtype (the float64 reference of the tests)."""
    _, H, Hkv, L, D = _check_shapes(q, k, v)
    scale = D ** -0.5 if scale is None else scale
    k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)  # (B, H, Lk, D)
    s = q @ k.transpose(-1, -2) * scale  # (B, H, L, Lk)
    if causal:
        s = s.masked_fill(~torch.ones(L, k.shape[2], dtype=torch.bool, device=q.device).tril(),
                          float("-inf"))
    return torch.softmax(s, -1) @ v


def tiled_attention(q, k, v, causal: bool = False, scale: float | None = None,
                    block: int = 64) -> torch.Tensor:
    """Single-device flash-style attention: keys in blocks of `block`, online softmax (running
    max and denominator) in float32; differentiable by autograd. q (B, H, L, D)."""
    B, H, Hkv, L, D = _check_shapes(q, k, v)
    cdt, Lk = _compute_dtype(q), k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    q5 = q.to(cdt).reshape(B, Hkv, H // Hkv, L, D)  # (B, Hkv, G, L, D)
    m = torch.full((B, Hkv, H // Hkv, L), float("-inf"), dtype=cdt, device=q.device)
    denom = torch.zeros_like(m)
    acc = torch.zeros_like(q5)
    rows = torch.arange(L, device=q.device)[:, None]
    for j in range(0, Lk, block):
        kb, vb = k[:, :, j:j + block].to(cdt), v[:, :, j:j + block].to(cdt)  # (B, Hkv, b, D)
        s = torch.einsum("bhgqd,bhkd->bhgqk", q5, kb) * scale  # (B, Hkv, G, L, b)
        if causal:
            cols = torch.arange(j, j + kb.shape[2], device=q.device)[None, :]
            s = s.masked_fill(cols > rows, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        alpha = torch.exp(m - m_new)
        p = torch.exp(s - m_new[..., None])
        denom = denom * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + torch.einsum("bhgqk,bhkd->bhgqd", p, vb)
        m = m_new
    return (acc / denom[..., None]).reshape(B, H, L, D).to(q.dtype)


# --- sequence slicing ------------------------------------------------------------------------

def shard_sequence(x: torch.Tensor, rank: int, world: int, causal: bool, dim: int = 2):
    """Rank's slice of the sequence: zigzag chunks (rank, 2N-1-rank) when causal, else a
    contiguous 1/N."""
    n = 2 * world if causal else world
    if x.shape[dim] % n:
        raise UserError(
            f"sequence length {x.shape[dim]} does not divide by {n}: ring attention over {world} "
            f"ranks needs a multiple of {n}" + (" (2 zigzag chunks per rank when causal)"
                                                if causal else "") + "; pad the sequence")
    chunks = x.chunk(n, dim)
    if not causal:
        return chunks[rank].contiguous()
    return torch.cat([chunks[rank], chunks[n - 1 - rank]], dim)


def unshard_sequence(parts: list[torch.Tensor], causal: bool, dim: int = 2) -> torch.Tensor:
    """Inverse of `shard_sequence` given every rank's slice, in rank order."""
    if not causal:
        return torch.cat(parts, dim)
    n = 2 * len(parts)
    chunks = [None] * n
    for r, p in enumerate(parts):
        chunks[r], chunks[n - 1 - r] = p.chunk(2, dim)
    return torch.cat(chunks, dim)


# --- block math (B, Hkv, G, Lq, D) queries against (B, Hkv, Lk, D) keys ----------------------

def _row_tiles(lq: int, per_row: int, device: torch.device):
    budget = _TILE_ELEMENTS.get(device.type, _TILE_ELEMENTS_GPU)
    step = max(1, budget // max(1, per_row))
    return [slice(i, min(lq, i + step)) for i in range(0, lq, step)]


def _scores(q, k, scale, diag: bool, rows: slice):
    s = torch.einsum("bhgqd,bhkd->bhgqk", q[:, :, :, rows], k) * scale  # (B, Hkv, G, t, Lk)
    if diag:
        r = torch.arange(rows.start, rows.stop, device=q.device)[:, None]
        s = s.masked_fill(torch.arange(k.shape[2], device=q.device)[None, :] > r, float("-inf"))
    return s


def _block_forward(q, k, v, scale: float, diag: bool):
    """Unnormalised partial result of q against one key block: (acc, m, l) with m the row max of
    the scores, l = sum exp(s - m) and acc = exp(s - m) @ v; acc (B, Hkv, G, Lq, D), m and l
    (B, Hkv, G, Lq)."""
    acc = torch.empty_like(q)
    m = torch.empty(q.shape[:-1], dtype=q.dtype, device=q.device)
    denom = torch.empty_like(m)
    for rows in _row_tiles(q.shape[3], q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2], q.device):
        s = _scores(q, k, scale, diag, rows)
        m[:, :, :, rows] = s.amax(-1)
        p = torch.exp(s - m[:, :, :, rows, None])
        denom[:, :, :, rows] = p.sum(-1)
        acc[:, :, :, rows] = torch.einsum("bhgqk,bhkd->bhgqd", p, v)
    return acc, m, denom


def _block_backward(q, k, v, do, m, denom, delta, scale: float, diag: bool):
    """(dq, dk, dv) of one block, given the final row max m and denominator (softmax =
    exp(s - m) / denom, i.e. exp(s - lse)) and delta = rowsum(dO * O)."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for rows in _row_tiles(q.shape[3], q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2], q.device):
        s = _scores(q, k, scale, diag, rows)  # (B, Hkv, G, t, Lk)
        p = torch.exp(s - m[:, :, :, rows, None]) / denom[:, :, :, rows, None]
        do_t = do[:, :, :, rows]
        dv += torch.einsum("bhgqk,bhgqd->bhkd", p, do_t)
        ds = p * (torch.einsum("bhgqd,bhkd->bhgqk", do_t, v) - delta[:, :, :, rows, None])
        dq[:, :, :, rows] = torch.einsum("bhgqk,bhkd->bhgqd", ds, k) * scale
        dk += torch.einsum("bhgqk,bhgqd->bhkd", ds, q[:, :, :, rows]) * scale
    return dq, dk, dv


def _merge(acc, part):
    """Log-sum-exp merge of two unnormalised partials (acc, m, l), shifted by the larger max."""
    if acc is None:
        return part
    (a_a, m_a, l_a), (a_b, m_b, l_b) = acc, part
    m = torch.maximum(m_a, m_b)
    w_a, w_b = torch.exp(m_a - m), torch.exp(m_b - m)
    return a_a * w_a[..., None] + a_b * w_b[..., None], m, l_a * w_a + l_b * w_b


def _n_chunks(causal: bool, world: int, length: int) -> int:
    """Chunks per local slice: the 2 zigzag chunks when causal (also on one rank, where the
    split skips the upper-right quarter), else 1; an odd length on one rank stays whole."""
    return 2 if causal and (world > 1 or length % 2 == 0) else 1


def _pairs(rank: int, src: int, world: int, causal: bool, n: int):
    """(query chunk, key chunk, causal-diagonal) products rank computes against src's block."""
    if n == 1:
        return [(0, 0, causal)]
    q_idx, k_idx = (rank, 2 * world - 1 - rank), (src, 2 * world - 1 - src)
    return [(qi, ki, a == b) for qi, a in enumerate(q_idx) for ki, b in enumerate(k_idx) if b <= a]


def _chunk(x: torch.Tensor, i: int, n: int, dim: int) -> torch.Tensor:
    size = x.shape[dim] // n
    return x.narrow(dim, i * size, size)


# --- the ring ----------------------------------------------------------------------------------

def _rank_world(group) -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _exchange(send: torch.Tensor, group, tag: int):
    """Start sending `send` to the next rank and receiving the previous rank's into a new
    buffer; returns (buffer, requests)."""
    rank, world = _rank_world(group)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    if group is not None:
        nxt, prv = dist.get_global_rank(group, nxt), dist.get_global_rank(group, prv)
    recv = torch.empty_like(send)
    ops = [dist.P2POp(dist.isend, send, nxt, group, tag), dist.P2POp(dist.irecv, recv, prv, group, tag)]
    return recv, dist.batch_isend_irecv(ops)


def _wait(reqs) -> None:
    for r in reqs:
        r.wait()


def _check_same_length(x: torch.Tensor, group, world: int) -> None:
    if world == 1:
        return
    mine = torch.tensor(list(x.shape), device=x.device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    if any(not torch.equal(e, mine) for e in every):
        raise UserError(f"ring attention needs the same local k/v shape on every rank; got "
                        f"{[tuple(e.tolist()) for e in every]}: slice with shard_sequence")


def _ring_forward(q5, kv, causal: bool, scale: float, group):
    """q5 (B, Hkv, G, L, D) in the compute dtype, kv (2, B, Hkv, L, D) -> (o like q5, m, l)."""
    rank, world = _rank_world(group)
    n = _n_chunks(causal, world, q5.shape[3])
    acc = [None] * n
    for step in range(world):
        src = (rank - step) % world
        nxt, reqs = _exchange(kv, group, 0) if step < world - 1 else (None, [])
        k, v = kv[0].to(q5.dtype), kv[1].to(q5.dtype)  # overlapped with the exchange in flight
        for qi, ki, diag in _pairs(rank, src, world, causal, n):
            part = _block_forward(_chunk(q5, qi, n, 3), _chunk(k, ki, n, 2), _chunk(v, ki, n, 2),
                                  scale, diag)
            acc[qi] = _merge(acc[qi], part)
        _wait(reqs)
        kv = nxt if nxt is not None else kv
    m, denom = torch.cat([a[1] for a in acc], 3), torch.cat([a[2] for a in acc], 3)
    return torch.cat([a[0] for a in acc], 3) / denom[..., None], m, denom


def _ring_backward(do5, q5, kv, o, m, denom, causal: bool, scale: float, group):
    """(dq like q5, dkv (2, B, Hkv, L, D)) in the compute dtype."""
    rank, world = _rank_world(group)
    n = _n_chunks(causal, world, q5.shape[3])
    delta = (do5 * o).sum(-1)  # (B, Hkv, G, L)
    dq = torch.zeros_like(q5)
    dkv_in, dkv_reqs = None, []
    for step in range(world):
        src = (rank - step) % world
        nxt, reqs = _exchange(kv, group, 0) if step < world - 1 else (None, [])
        k, v = kv[0].to(q5.dtype), kv[1].to(q5.dtype)
        dkv = torch.zeros((2, *k.shape), dtype=q5.dtype, device=q5.device)
        for qi, ki, diag in _pairs(rank, src, world, causal, n):
            rows = slice(qi * (q5.shape[3] // n), (qi + 1) * (q5.shape[3] // n))
            dq_b, dk_b, dv_b = _block_backward(
                _chunk(q5, qi, n, 3), _chunk(k, ki, n, 2), _chunk(v, ki, n, 2),
                _chunk(do5, qi, n, 3), m[:, :, :, rows], denom[:, :, :, rows], delta[:, :, :, rows],
                scale, diag)
            dq[:, :, :, rows] += dq_b
            _chunk(dkv[0], ki, n, 2).add_(dk_b)
            _chunk(dkv[1], ki, n, 2).add_(dv_b)
        _wait(dkv_reqs)  # the accumulator of src's block from the ranks before this one
        if dkv_in is not None:
            dkv += dkv_in
        if world > 1:  # pass it on; on the last step the next rank is the block's owner
            dkv_in, dkv_reqs = _exchange(dkv, group, 1)
        _wait(reqs)
        kv = nxt if nxt is not None else kv
    _wait(dkv_reqs)
    return dq, (dkv_in if world > 1 else dkv)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, group):
        B, H, Hkv, L, D = _check_shapes(q, k, v)
        q5 = q.to(_compute_dtype(q)).reshape(B, Hkv, H // Hkv, L, D)  # (B, Hkv, G, L, D)
        kv = torch.stack([k, v])  # (2, B, Hkv, L, D): one message per step, input dtype
        o, m, denom = _ring_forward(q5, kv, causal, scale, group)
        ctx.save_for_backward(q5, kv, o, m, denom)
        ctx.causal, ctx.scale, ctx.group, ctx.dtypes = causal, scale, group, (q.dtype, k.dtype)
        return o.reshape(B, H, L, D).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q5, kv, o, m, denom = ctx.saved_tensors
        do5 = dout.to(q5.dtype).reshape(q5.shape)  # (B, Hkv, G, L, D)
        dq, dkv = _ring_backward(do5, q5, kv, o, m, denom, ctx.causal, ctx.scale, ctx.group)
        B, Hkv, G, L, D = q5.shape
        dq = dq.reshape(B, Hkv * G, L, D).to(ctx.dtypes[0])
        return dq, dkv[0].to(ctx.dtypes[1]), dkv[1].to(ctx.dtypes[1]), None, None, None


def ring_attention(q, k, v, causal: bool = False, scale: float | None = None, group=None):
    """Attention over the whole sequence when every rank of `group` holds a slice of it
    (`shard_sequence`: zigzag when causal). q (B, H, L, D), k/v (B, Hkv, L, D), local slices;
    returns this rank's (B, H, L, D) output, in q's dtype. Outside torch.distributed it is
    ordinary single-device attention (one rank)."""
    _, _, _, L, D = _check_shapes(q, k, v)
    _, world = _rank_world(group)
    if causal and world > 1 and L % 2:
        raise UserError(f"causal ring attention holds 2 zigzag chunks per rank, but the local "
                        f"length is {L} (odd): use a global length divisible by {2 * world}")
    _check_same_length(k, group, world)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    return _RingAttention.apply(q, k, v, causal, scale, group)
