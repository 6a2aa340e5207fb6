"""Fixtures for the data tests (helpers and constants live in ``data_helpers``)."""

from __future__ import annotations

import pytest

from data_helpers import SPECIAL_TOKENS, training_text


@pytest.fixture(scope="session")
def trained_tokenizer_json() -> str:
    """A byte-level BPE trained on a few KB of French (0.1 s), serialised once per session."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(training_text().splitlines(), trainer=trainer)
    return tok.to_str()


@pytest.fixture
def trained_tokenizer(trained_tokenizer_json):
    """A fresh ``PreTrainedTokenizerFast`` around that BPE, with no chat template (a test may set one)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(trained_tokenizer_json),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
