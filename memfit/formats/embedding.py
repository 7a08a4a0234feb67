"""`QuantEmbedding`: an embedding table stored on the integer grid, read one row per token.

The table (num_embeddings, dim) is stored exactly like a `QuantLinear` weight of shape
(out=num_embeddings, in=dim): `qdata`, `scale`, `zero` buffers, groups along `dim`. A forward
gathers the packed rows of the requested tokens and dequantizes only those, so the dense table
never exists. Because the layout equals the output head's (vocab, hidden) weight, a tied head
can be a `QuantLinear` sharing these very buffers: one copy in memory and on disk.

Models that scale their embeddings (Gemma: × sqrt(hidden)) keep that factor in `embed_scale`,
applied as the original module does (the scalar cast to the output dtype, then multiplied).
The output dtype follows `model.to(dtype)`; the format's own fields never change dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from memfit.formats.grid import IntFormat
from memfit.formats.intq import PackedIntWeight, apply_keeping_dtypes, field_specs, kernel_weight
from memfit.kernels.packing import unpack
from memfit.kernels.weights import dequantize_rows_

_FIXED_DTYPE = ("qdata", "scale", "zero")


class QuantEmbedding(nn.Module):
    """Rows of a packed (num_embeddings, dim) table; a drop-in for nn.Embedding's forward."""

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: IntFormat, *,
                 padding_idx: int | None = None, embed_scale: float | None = None,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.fmt = num_embeddings, embedding_dim, fmt
        self.padding_idx, self.embed_scale, self.dtype = padding_idx, embed_scale, dtype
        for name, (shape, dt) in field_specs(fmt, num_embeddings, embedding_dim).items():
            self.register_buffer(name, torch.empty(shape, dtype=dt, device=device))

    # weight_table and the protocol read a packed module's (out, in) like a linear's
    @property
    def out_features(self) -> int:
        return self.num_embeddings

    @property
    def in_features(self) -> int:
        return self.embedding_dim

    @classmethod
    def from_packed(cls, packed: PackedIntWeight, like: nn.Embedding) -> "QuantEmbedding":
        scale = getattr(like, "scalar_embed_scale", None)
        m = cls(*packed.shape, packed.fmt, padding_idx=like.padding_idx,
                embed_scale=None if scale is None else float(scale), dtype=like.weight.dtype,
                device=packed.qdata.device)
        with torch.no_grad():
            for name, t in packed.tensors().items():
                getattr(m, name).copy_(t)
        return m

    def packed(self) -> PackedIntWeight:
        """The buffers as a checked `PackedIntWeight`."""
        return PackedIntWeight(self.qdata, self.scale, getattr(self, "zero", None),
                               (self.num_embeddings, self.embedding_dim), self.fmt)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = kernel_weight(self.qdata, self.scale, getattr(self, "zero", None),
                          (self.num_embeddings, self.embedding_dim), self.fmt)
        flat = ids.reshape(-1)
        rows = unpack(w.qdata[flat], w.bits, self.embedding_dim).float()  # (N, dim)
        dequantize_rows_(rows, w.scale[flat].float(), w.zeros()[flat], w.group_size)
        out = rows.to(self.dtype).view(*ids.shape, self.embedding_dim)
        if self.embed_scale is not None:
            out = out * torch.tensor(self.embed_scale, dtype=self.dtype)
        return out

    # --- the packed-module protocol -------------------------------------------------------------

    def nbytes(self) -> int:
        return sum(getattr(self, n).numel() * getattr(self, n).element_size()
                   for n in field_specs(self.fmt, self.num_embeddings, self.embedding_dim))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.packed().dequantize(dtype)

    def describe(self) -> dict:
        return {"fmt": self.fmt.to_dict(), "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim, "padding_idx": self.padding_idx,
                "embed_scale": self.embed_scale}

    def _apply(self, fn, recurse=True):
        apply_keeping_dtypes(self, fn, _FIXED_DTYPE,
                             lambda f: super(QuantEmbedding, self)._apply(f, recurse))
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype  # follows model.to(dtype)
        return self

    def extra_repr(self) -> str:
        g = "channel" if self.fmt.group_size is None else self.fmt.group_size
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.fmt.bits}, group={g}, "
                f"bpw={8 * self.nbytes() / (self.num_embeddings * self.embedding_dim):.3f}")
