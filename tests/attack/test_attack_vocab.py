"""The attack vocabulary: whole words that tokenize back to themselves."""

from __future__ import annotations

import pytest
import torch

from kscu.attack.vocab import WordVocab
from kscu.errors import KscuError
from kscu.models import load_pipeline


@pytest.fixture(scope="module")
def vocab():
    pipe = load_pipeline(None)
    return WordVocab(pipe.tokenizer, pipe.text_encoder)


def test_every_word_round_trips_and_sub_word_pieces_are_left_out(vocab):
    tok = vocab.tokenizer
    assert {"heart", "red", "striped", "a"} <= set(vocab.words)
    for i, word in zip(vocab.token_ids.tolist(), vocab.words, strict=True):
        assert word.isprintable() and tok(word, add_special_tokens=False).input_ids == [i]
    pieces = [i for t, i in tok.get_vocab().items() if not t.endswith("</w>")]
    assert pieces and not set(pieces) & set(vocab.token_ids.tolist())
    assert not set(tok.all_special_ids) & set(vocab.token_ids.tolist())


def test_a_whole_sequence_round_trips(vocab):
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        positions = torch.randint(len(vocab.words), (5,), generator=g).tolist()
        text = vocab.adversarial_prompt(positions, "a red heart")
        ids = [int(vocab.token_ids[p]) for p in positions]
        assert vocab.ids(text) == ids + vocab.ids("a red heart")


def test_nearest_word_of_a_words_own_embedding_is_itself(vocab):
    for metric in ("cosine", "l2"):
        assert torch.equal(vocab.nearest(vocab.embeddings, metric), torch.arange(len(vocab.words)))


def test_too_long_a_prompt_is_refused(vocab):
    with pytest.raises(KscuError, match="more than the text encoder's 18"):
        vocab.adversarial_prompt([0] * 12, "a red heart on a striped background")
