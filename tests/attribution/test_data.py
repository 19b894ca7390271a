"""Encoding records: the loss mask covers exactly the completion, for any tokenizer."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from attribution.data import IGNORE_INDEX, collate, encode_record, pad_token_id

CORPUS = [
    "Question: Where was Ana born? Answer: Ana was born in Olton.",
    "Question: Who wrote it? Answer: Bo wrote it.",
] * 20


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A GPT-2-style byte-level BPE: a completion's leading space merges into its first word."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")


def completion_text(tokenizer, encoded):
    ids = [
        t
        for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True)
        if label != IGNORE_INDEX
    ]
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_bpe_labels_cover_exactly_the_completion(bpe_tokenizer):
    record = {"prompt": "Question: Where was Ana born? Answer:", "completion": " Ana was born."}
    encoded = encode_record(bpe_tokenizer, record)
    assert completion_text(bpe_tokenizer, encoded) == " Ana was born."
    assert encoded["input_ids"][-1] == bpe_tokenizer.eos_token_id
    assert encoded["labels"][-1] == bpe_tokenizer.eos_token_id
    prompt_ids = bpe_tokenizer(record["prompt"])["input_ids"]
    assert encoded["input_ids"][: len(prompt_ids)] == prompt_ids


def test_word_tokenizer_masks_bos_and_prompt(world_tokenizer):
    record = {"prompt": "Question: Where was it born?\nAnswer:", "completion": " Where was born."}
    encoded = encode_record(world_tokenizer, record)
    assert encoded["input_ids"][0] == world_tokenizer.bos_token_id
    assert encoded["labels"][0] == IGNORE_INDEX
    assert completion_text(world_tokenizer, encoded).split() == ["Where", "was", "born."]


def test_text_record_is_labelled_everywhere_but_special_tokens(world_tokenizer):
    encoded = encode_record(world_tokenizer, {"text": "Question: Answer:"})
    assert encoded["labels"][0] == IGNORE_INDEX  # <bos>
    assert encoded["labels"][1:] == encoded["input_ids"][1:]


def test_max_length_truncates_on_the_right(world_tokenizer):
    encoded = encode_record(world_tokenizer, {"text": "Question: Answer: Question:"}, max_length=3)
    assert len(encoded["input_ids"]) == len(encoded["labels"]) == 3


def test_collate_pads_right_and_ignores_padding(world_tokenizer):
    records = [{"text": "Question:"}, {"text": "Question: Answer: Question:"}]
    batch = collate(
        [encode_record(world_tokenizer, r) for r in records], pad_token_id(world_tokenizer)
    )
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    short = batch["attention_mask"][0] == 0
    assert (batch["input_ids"][0][short] == world_tokenizer.pad_token_id).all()
    assert (batch["labels"][0][short] == IGNORE_INDEX).all()
