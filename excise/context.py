"""Records must fit the model's context window, checked before any work starts.

A record longer than the model's context is an error, not something to cut silently: a
model with learned positions (GPT-2) fails deep inside a forward pass, and one with
rotary positions (Llama) scores tokens at positions it never saw. Every text a command
scores is measured — the prompt with the completion, and with each paraphrased or
perturbed completion, and the reworded prompt — plus the end-of-sequence token that
:func:`attribution.data.encode_record` appends.

>>> records = {"forget": [{"id": "a", "prompt": "Q", "completion": " A"}]}
>>> try:
...     check_fits_context(records, lambda texts: {"input_ids": [[1] * 90] * len(texts)}, 64)
... except BadInputError as err:
...     print(err)
forget record 'a': 91 tokens, more than the model's context of 64; shorten it
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from attribution.data import model_context
from excise.errors import BadInputError

__all__ = ["check_fits_context", "model_context", "record_texts"]

CHUNK = 1024  # records tokenized at a time


def record_texts(record: Mapping[str, Any]) -> list[str]:
    """Every prompt-and-answer text of a record that a command may score or generate."""
    if "text" in record:
        return [record["text"]]
    prompts = [record["prompt"]]
    if "paraphrased_prompt" in record:
        prompts.append(record["paraphrased_prompt"])
    answers = [record["completion"], *record.get("perturbed_completions", ())]
    if "paraphrased_completion" in record:
        answers.append(record["paraphrased_completion"])
    return [prompt + answer for prompt in prompts for answer in answers]


def check_fits_context(
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    tokenizer: Any,
    context: int | None,
    hint: str = "shorten it",
) -> None:
    """Refuse, naming the first record, any record with a text longer than ``context``.

    ``tokenizer`` is called on a list of strings (a Hugging Face tokenizer); ``hint`` ends
    the message (what the user can do). ``context`` None: nothing to check.
    """
    if context is None:
        return
    for split, records in splits.items():
        for chunk in _chunks(records, CHUNK):  # a lazy training set is never held whole
            texts, owners = [], []
            for record in chunk:
                variants = record_texts(record)
                texts += variants
                owners += [record] * len(variants)
            if not texts:
                continue
            lengths = [len(ids) + 1 for ids in tokenizer(texts)["input_ids"]]  # + end token
            for length, record in zip(lengths, owners, strict=True):
                if length > context:
                    raise BadInputError(
                        f"{split} record {record.get('id')!r}: {length} tokens, more than the "
                        f"model's context of {context}; {hint}"
                    )


def _chunks(records: Iterable[Mapping[str, Any]], size: int) -> Iterator[list]:
    """``records`` in lists of at most ``size``, read as they are iterated."""
    chunk: list = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
