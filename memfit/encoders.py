"""What `memfit compress` does differently for an encoder (BERT, RoBERTa, XLM-R, ELECTRA,
CamemBERT): the calibration window length, the recipe options that only mean something for a
decoder, the smoke check (embedding cosine instead of KL divergence) and the sentence-transformers
files carried into the output folder so it loads as the same sentence-transformers model.

Calibration text for an encoder is built of whole sentence-like lines ([CLS] s1 [SEP] s2 [SEP]
..., memfit.calib.data.sentence_windows), with no padding. The window length is the recipe's
`calib.seq_len` capped at the length the model is used at: sentence-transformers'
`max_seq_length` where the folder has one (256 for all-MiniLM-L6-v2), else the tokenizer's
`model_max_length` and the position table; an explicit `--seq-len` is taken as given.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from memfit.archs import arch_for
from memfit.errors import UserError

# sentence-transformers' description of the model (pooling, normalisation, max length)
_ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def _st_config(source: str | Path) -> dict:
    path = Path(source) / "sentence_bert_config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def used_length(loaded) -> int:
    """The longest input the encoder is used at (see the module docstring)."""
    config = loaded.model.config
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and arch_for(config).positions_after_pad:
        # the embeddings' own padding index (MPNet fixes it at 1 whatever the config says)
        pad = getattr(getattr(loaded.model, "embeddings", None), "padding_idx", None)
        positions -= (pad if pad is not None else getattr(config, "pad_token_id", 0) or 0) + 1
    limits = [positions,
              _st_config(loaded.source).get("max_seq_length"),
              getattr(loaded.tokenizer, "model_max_length", None)]
    limits = [n for n in limits if isinstance(n, int) and 1 < n < 1_000_000]
    return min(limits) if limits else 512


def check_recipe(recipe, spec: str, arch) -> None:
    """Refuse the recipe options that only a decoder has, naming the option."""
    if recipe.head is not None:
        raise UserError(f"the recipe option 'head' quantizes a decoder's output head; {spec} is "
                        "an encoder and has none: remove 'head' from the recipe (encoders take "
                        "'embeddings')")
    if recipe.calib.bos != "auto":
        raise UserError(f"--bos / calib.bos {recipe.calib.bos!r} is a decoder-only option; "
                        f"{spec} is an encoder, whose windows always start with its classifier "
                        "token: leave bos at auto")
    s = recipe.structured
    if s is not None and (s.mlp_keep is not None or s.heads_keep is not None) \
            and arch.layout is None:
        raise UserError("the recipe options structured.mlp_keep / structured.heads_keep are "
                        f"not supported on encoders ({spec}); structured.drop_blocks is")


def side_files(source: str | Path) -> dict[str, Path]:
    """The sentence-transformers files of the source folder (none for a plain transformers
    folder): the description files and the module folders modules.json names (1_Pooling ...)."""
    folder = Path(source)
    out = {name: folder / name for name in _ST_FILES if (folder / name).is_file()}
    try:
        modules = json.loads((folder / "modules.json").read_text()) if "modules.json" in out else []
    except (OSError, ValueError):
        modules = []
    for m in modules if isinstance(modules, list) else []:
        path = m.get("path") if isinstance(m, dict) else None
        if path and "/" not in path and (folder / path).is_dir():
            out[path] = folder / path
    return out


@dataclass
class EmbeddingReference:
    """Mean-pooled embeddings of a few held-apart sentences before compressing, to compare with
    after (the encoder's smoke check)."""

    sentences: list[str]
    tokenizer: object
    embeddings: torch.Tensor
    max_length: int

    @classmethod
    def capture(cls, model, tokenizer, sentences: list[str], max_length: int):
        from memfit.eval.encoder import embed
        return cls(sentences, tokenizer, embed(model, tokenizer, sentences,
                                               max_length=max_length), max_length)

    def check(self, model) -> dict:
        from memfit.eval.encoder import embed
        emb = embed(model, self.tokenizer, self.sentences, max_length=self.max_length)
        cos = F.cosine_similarity(emb, self.embeddings, dim=1)
        finite = bool(torch.isfinite(emb).all())
        return {"cosine_mean": cos.mean().item() if finite else math.nan,
                "cosine_min": cos.min().item() if finite else math.nan,
                "sentences": len(self.sentences)}
