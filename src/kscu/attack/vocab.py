"""The tokens an attack may use: whole words whose text tokenizes back to the same token.

Both attacks search over token ids, but what they hand back must be a real prompt: a string that
anyone can type and that tokenizes to exactly the ids that were found. A CLIP tokenizer splits
text at whitespace before BPE, so a sequence of word-final tokens, each of which round-trips on
its own, written with spaces in between, round-trips as a whole. Sub-word pieces (``he`` of
``heart``), special tokens and control characters are left out of the search; the reference
codes search the whole vocabulary and do not check the round trip.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kscu.errors import KscuError


class WordVocab:
    """The round-tripping word tokens of a pipeline's (CLIP) tokenizer and their embeddings."""

    def __init__(self, tokenizer: Any, text_encoder: Any | None = None):
        self.tokenizer = tokenizer
        special = set(tokenizer.all_special_ids)
        candidates = sorted(
            i
            for token, i in tokenizer.get_vocab().items()
            if i not in special and token.endswith("</w>")
        )
        decoded = tokenizer.batch_decode([[i] for i in candidates])
        encoded = tokenizer(decoded, add_special_tokens=False).input_ids
        ids, words = [], []
        for i, word, back in zip(candidates, decoded, encoded, strict=True):
            if word and word.isprintable() and word == word.strip() and back == [i]:
                ids.append(i)
                words.append(word)
        if not ids:
            raise KscuError("the tokenizer has no whole-word tokens to attack with")
        self.token_ids = torch.tensor(ids)
        self.words = words
        self.embeddings = None
        if text_encoder is not None:
            table = text_encoder.get_input_embeddings().weight.detach()
            self.embeddings = table[self.token_ids.to(table.device)].float()

    def ids(self, text: str) -> list[int]:
        """The token ids of ``text`` without BOS/EOS or padding."""
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def text(self, positions: list[int]) -> str:
        """The prompt that the words at ``positions`` (indices into this vocabulary) spell."""
        return " ".join(self.words[p] for p in positions)

    def adversarial_prompt(self, positions: list[int], prompt: str = "") -> str:
        """``positions``' words prepended to ``prompt``, checked to tokenize back to them."""
        text = " ".join(filter(None, [self.text(positions), prompt.strip()]))
        want = [int(self.token_ids[p]) for p in positions] + self.ids(prompt)
        if self.ids(text) != want:
            raise KscuError(f"the adversarial prompt {text!r} does not tokenize back to its ids")
        limit = self.tokenizer.model_max_length - 2  # BOS and EOS
        if len(want) > limit:
            raise KscuError(
                f"{prompt!r} with {len(positions)} attack tokens is {len(want)} tokens, more than "
                f"the text encoder's {limit}; shorten the prompt or use fewer attack tokens "
                "(--tokens for unlearndiff, --length for ringabell)"
            )
        return text

    def nearest(self, vectors: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
        """Positions of the vocabulary embeddings nearest to ``vectors`` (..., d)."""
        table = self.embeddings.to(vectors.device)
        if metric == "cosine":
            scores = F.normalize(vectors, dim=-1) @ F.normalize(table, dim=-1).T
        else:
            scores = -torch.cdist(vectors.reshape(-1, vectors.shape[-1]), table).reshape(
                *vectors.shape[:-1], len(table)
            )
        return scores.argmax(-1)
