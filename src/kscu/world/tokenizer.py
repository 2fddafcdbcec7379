"""A small CLIP-style BPE vocabulary for the tiny world.

CLIP's tokenizer splits text into words, maps every byte to a printable character and applies
BPE merges. We keep all 512 single-character tokens (each byte, alone or word-final), so any
text at all tokenizes without unknown tokens, and add just enough merges to make every word of
the world's captions (and of common prompt templates) a single token.
"""

from __future__ import annotations

import json
from pathlib import Path

from kscu.world.data import (
    COLOR_TEMPLATES,
    COLORS,
    HELDOUT_TEMPLATES,
    PAIR_TEMPLATES,
    SHAPE_TEMPLATES,
    SHAPES,
    TEXTURE_TEMPLATES,
    TEXTURES,
    TRAIN_TEMPLATES,
)

MODEL_MAX_LENGTH = 20
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Words of common erasure prompt templates, so that they are single tokens too.
EXTRA_WORDS = (
    "of",
    "in",
    "the",
    "a",
    "an",
    "photo",
    "painting",
    "style",
    "expression",
    "art",
    "artwork",
    "by",
    "with",
    "and",
    "object",
    "shape",
    "color",
    "colored",
)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable character table."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def world_words() -> list[str]:
    """Every word that should be a single token, in a stable order."""
    words: list[str] = []
    templates = (
        TRAIN_TEMPLATES
        + HELDOUT_TEMPLATES
        + SHAPE_TEMPLATES
        + COLOR_TEMPLATES
        + TEXTURE_TEMPLATES
        + PAIR_TEMPLATES
    )
    text = " ".join(templates).replace(",", " ").replace(":", " ")
    for word in list(SHAPES + COLORS + TEXTURES) + text.split() + list(EXTRA_WORDS):
        if "{" not in word and word not in words:
            words.append(word)
    return words


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    while len(symbols) > 1:
        pairs = [
            (ranks.get((a, b), 1 << 30), i)
            for i, (a, b) in enumerate(zip(symbols[:-1], symbols[1:], strict=True))
        ]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) making each world word one token; all bytes stay representable."""
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    words = world_words()
    changed = True
    while changed:  # add merges until every word is a single token
        changed = False
        for word in words:
            symbols = _apply_bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
            if len(symbols) > 1:
                pair = (symbols[0], symbols[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                tokens.append(pair[0] + pair[1])
                changed = True
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens + [BOS, EOS]))}
    return vocab, merges


def save_tokenizer_files(folder: Path) -> None:
    """Write vocab.json, merges.txt and the tokenizer config of a ``CLIPTokenizer``."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    tok = CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        model_max_length=MODEL_MAX_LENGTH,
        pad_token=EOS,
    )
    tok.save_pretrained(str(folder))
