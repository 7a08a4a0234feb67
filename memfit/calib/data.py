"""Text sources and token windows.

Sources: `builtin` (CPython's pydoc_data.topics, always installed, ~460k characters of English
prose about Python), a local `.txt` or `.jsonl` file, and `wikitext2` / `c4` through the
`datasets` library when online. A .jsonl line holds {"text": ...} or a conversation
{"messages": [{"role": ..., "content": ...}, ...]}, rendered with the tokenizer's chat template
where it has one (what a chat model sees), else as its contents, a message a line.

Splits are disjoint by construction, so calibration never sees evaluation text:
- builtin: each topic (a document) goes to "eval" when the first byte of sha1(topic key) is below
  77 (30% of the 79 topics, 26% of the characters), otherwise to "calib"; topics quote each
  other, so paragraphs of calibration documents that also occur in evaluation ones are dropped;
- a file: the first 90% of its characters (cut at a line break) is "calib", the rest "eval";
  "all" is the whole file (the default when a user evaluates on their own file);
- wikitext2: the dataset's train split for "calib" and test split for "eval" (GPTQ protocol);
- c4: the en train shard 0 for "calib", validation shard 0 for "eval".

Windows are non-overlapping slices of the concatenated tokens. Evaluation takes them in order;
calibration draws a fixed-seed random subset of them.

BOS: some models are trained with a beginning-of-sequence token at the start of every sequence
and score far worse without one (Gemma: perplexity 154.9 without, 59.1 with). `bos` is "auto"
(what the tokenizer itself adds for plain text), "always" or "never". With a BOS, each window is
[BOS] + seq_len - 1 text tokens, so every text token of the window is scored; without, a window
is seq_len text tokens and its first token is context only.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from memfit.errors import UserError

SPLITS = ("calib", "eval", "all")
BOS_MODES = ("auto", "always", "never")
_HUB_SETS = ("wikitext2", "c4")


def _builtin(split: str) -> str:
    from pydoc_data.topics import topics

    def in_eval(key: str) -> bool:
        return hashlib.sha1(key.encode()).digest()[0] < 77

    keys = sorted(topics)
    if split == "all":
        return "\n\n".join(topics[k].strip() for k in keys)
    eval_text = "\n\n".join(topics[k].strip() for k in keys if in_eval(k))
    if split == "eval":
        return eval_text
    # Several topics quote the same paragraphs; drop from calibration every paragraph that also
    # appears in the evaluation documents, so the two splits share no paragraph.
    eval_paras = {p.strip() for p in eval_text.split("\n\n")}
    calib = [p for k in keys if not in_eval(k) for p in topics[k].strip().split("\n\n")
             if p.strip() not in eval_paras]
    return "\n\n".join(calib)


def _conversation(messages, chat, where: str) -> str:
    """A chat line's text: `chat(messages)` (the tokenizer's chat template) when given, else its
    messages' contents one per line. Content may be a string or a list of parts with "text"."""
    turns = []
    for m in messages if isinstance(messages, list) else [None]:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "\n".join(part["text"] for part in content
                                 if isinstance(part, dict) and isinstance(part.get("text"), str))
        if not isinstance(content, str):
            raise UserError(f"{where}: 'messages' is not a list of {{'role', 'content'}} "
                            "objects with text content; fix the line or pass a .txt file")
        turns.append({"role": m.get("role", "user"), "content": content})
    return chat(turns) if chat is not None else "\n".join(t["content"] for t in turns)


def chat_renderer(tokenizer):
    """`tokenizer`'s chat template as a function of a message list -> text; None without one
    (conversations are then their contents, one message a line)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    return lambda turns: tokenizer.apply_chat_template(turns, tokenize=False)


def _file(path: Path, split: str, chat=None) -> str:
    if path.suffix == ".jsonl":
        texts = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:  # e.g. a binary file named .jsonl
            raise UserError(f"{path} is not UTF-8 text; pass a .jsonl of UTF-8 JSON lines") from None
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and "text" not in row and "messages" in row:
                texts.append(_conversation(row["messages"], chat, f"{path}:{i}"))
                continue
            if not isinstance(row, dict) or "text" not in row:
                raise UserError(f"{path}:{i} is not a JSON object with a 'text' field (or a "
                                "'messages' list); fix the line or pass a .txt file")
            if not isinstance(row["text"], str):
                raise UserError(f"{path}:{i}: its 'text' is not a string; fix the line or "
                                "pass a .txt file")
            texts.append(row["text"])
        text = "\n\n".join(texts)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text; convert it or pass another file") from None
    if not text.strip():
        raise UserError(f"{path} holds no text; pass a file with some text in it")
    if split == "all":
        return text
    cut = text.rfind("\n", 0, int(len(text) * 0.9))
    cut = cut if cut > 0 else int(len(text) * 0.9)
    return text[:cut] if split == "calib" else text[cut:]


def _hub(name: str, split: str) -> str:
    try:
        import datasets
    except ImportError:
        raise UserError(f"'{name}' needs the datasets library: pip install 'memfit[data]'") from None
    try:
        if name == "wikitext2":
            part = {"calib": "train", "eval": "test", "all": "test"}[split]
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=part)
            return "\n\n".join(ds["text"])
        shard = ("en/c4-train.00000-of-01024.json.gz" if split == "calib"
                 else "en/c4-validation.00000-of-00008.json.gz")
        ds = datasets.load_dataset("allenai/c4", data_files={"x": shard}, split="x")
        return "\n\n".join(ds["text"][:3000])
    except (ConnectionError, OSError, ValueError) as e:
        raise UserError(f"could not load '{name}' ({str(e).splitlines()[0][:120]}); it needs "
                        "network access: use 'builtin' or a local .txt/.jsonl file") from None


def load_text(source: str = "builtin", split: str = "eval", chat=None) -> str:
    """The text of a source's split (see module docstring for the split rules). `chat` renders
    the conversations of a .jsonl's "messages" lines (`chat_renderer`)."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {SPLITS}")
    if source == "builtin":
        return _builtin(split)
    if source in _HUB_SETS:
        return _hub(source, split)
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"data {source!r} does not exist; pass 'builtin', 'wikitext2', 'c4', "
                        "or a .txt/.jsonl file")
    if path.is_dir():
        raise UserError(f"data {source!r} is a folder; pass a .txt or .jsonl file")
    return _file(path, split, chat)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids (no special tokens)."""
    enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False,
                    verbose=False)["input_ids"]
    return torch.tensor(enc, dtype=torch.long)


def bos_id(tokenizer, bos: str = "auto") -> int | None:
    """The token id each window starts with, or None (see the module docstring)."""
    if bos not in BOS_MODES:
        raise UserError(f"unknown bos {bos!r}; use one of {', '.join(BOS_MODES)}")
    bid = getattr(tokenizer, "bos_token_id", None)
    if bos == "never":
        return None
    if bos == "always":
        if bid is None:
            raise UserError("the tokenizer has no beginning-of-sequence token; use --bos never "
                            "(or auto)")
        return bid
    if bid is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bid if ids and ids[0] == bid else None


def windows(ids: torch.Tensor, seq_len: int, *, max_windows: int | None = None,
            seed: int | None = None, what: str = "text", bos: int | None = None) -> torch.Tensor:
    """Non-overlapping (n, seq_len) windows of a 1-D token tensor, each starting with the token
    `bos` when given (then followed by seq_len - 1 text tokens).

    `seed=None` keeps document order (evaluation); a seed draws a fixed random subset
    (calibration). Raises if the text is shorter than one window.
    """
    if seq_len < 2:
        raise UserError(f"seq_len={seq_len} is too short; a window needs at least 2 tokens "
                        "(typical: 512 or 2048)")
    text_len = seq_len - (bos is not None)
    n = ids.numel() // text_len
    if n == 0:
        raise UserError(f"the {what} has {ids.numel()} tokens, fewer than one window of "
                        f"{text_len}; use more text or a smaller --seq-len")
    w = ids[: n * text_len].view(n, text_len)  # (n, text_len)
    if bos is not None:
        w = torch.cat([torch.full((n, 1), bos, dtype=w.dtype), w], dim=1)  # (n, seq_len)
    if seed is not None:
        w = w[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    return w[:max_windows] if max_windows else w


def token_windows(tokenizer, source: str = "builtin", split: str = "eval", *, seq_len: int = 512,
                  max_windows: int | None = None, seed: int | None = None,
                  bos: str = "auto") -> torch.Tensor:
    """load_text + tokenize + windows in one call; `bos` as in the module docstring."""
    start = bos_id(tokenizer, bos)
    text = load_text(source, split, chat_renderer(tokenizer))
    return windows(tokenize(tokenizer, text), seq_len, max_windows=max_windows, seed=seed,
                   what=f"{source} {split} text" if source == "builtin" or source in _HUB_SETS
                   else f"text of {source}", bos=start)


def sentences(source: str = "builtin", split: str = "eval", *, limit: int | None = 256,
              min_chars: int = 20) -> list[str]:
    """Sentence-like lines (of `min_chars`+ characters) for encoders, in document order; the
    first `limit` of them (None: all)."""
    text = load_text(source, split)
    out = [s.strip() for s in text.replace("\n\n", "\n").split("\n") if len(s.strip()) >= min_chars]
    if not out:
        raise UserError(f"{source} {split} text has no line of {min_chars}+ characters to embed")
    return out[:limit]


def calibration_windows(tokenizer, calib) -> torch.Tensor:
    """The calibration windows a recipe's `calib` asks for (memfit.recipe.Calib); a text too
    short for `calib.samples` windows gives fewer, with one warning line on stderr."""
    w = token_windows(tokenizer, calib.data, "calib", seq_len=calib.seq_len,
                      max_windows=calib.samples, seed=calib.seed, bos=calib.bos)
    if len(w) < calib.samples:
        print(f"memfit: warning: the {calib.data} calibration text holds {len(w)} windows of "
              f"{calib.seq_len} tokens, fewer than the {calib.samples} asked; using {len(w)}",
              file=sys.stderr, flush=True)
    return w


def sentence_windows(tokenizer, source: str = "builtin", split: str = "calib", *,
                     seq_len: int = 256, max_windows: int | None = None,
                     seed: int | None = None) -> torch.Tensor:
    """(n, seq_len) encoder windows of whole sentence-like lines, no padding: the lines of the
    split (memfit.calib.data.sentences, in document order) each followed by the separator token,
    concatenated, cut into pieces of seq_len - 1 tokens, each piece led by the classifier token:
    [CLS] s1 [SEP] s2 [SEP] ... Every window is full, so every position is real text and the
    attention mask is all ones (calibration statistics never see padding). `seed` draws a fixed
    random subset, as `windows` does."""
    cls_id = getattr(tokenizer, "cls_token_id", None)
    sep_id = getattr(tokenizer, "sep_token_id", None)
    if cls_id is None or sep_id is None:
        raise UserError("the encoder's tokenizer has no classifier/separator token (cls_token, "
                        "sep_token); memfit builds encoder windows as [CLS] text [SEP] ...")
    lines = sentences(source, split, limit=None)
    ids = tokenizer(lines, add_special_tokens=False, return_attention_mask=False,
                    verbose=False)["input_ids"]
    stream = torch.tensor([t for line in ids for t in (*line, sep_id)], dtype=torch.long)
    return windows(stream, seq_len, max_windows=max_windows, seed=seed,
                   what=f"{source} {split} sentences", bos=cls_id)
