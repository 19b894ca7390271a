"""Turn records into token tensors with a loss mask, for any Hugging Face tokenizer.

A ``{"prompt", "completion"}`` record is tokenized as one string, ``prompt + completion``;
its label is the token id on completion tokens and ``-100`` (ignored) on prompt tokens, so
the loss is ℓ = -Σₜ log p(yₜ | y<ₜ) over the completion only. A ``{"text"}`` record has
labels on every token. The end-of-sequence token is appended (and labelled) so a model
learns where an answer stops. Tokens are split between prompt and completion by their
character offsets, which is correct for tokenizers whose tokens straddle the boundary
(a completion's leading space merged into a word piece).

>>> from tokenizers import Tokenizer, models, pre_tokenizers
>>> from transformers import PreTrainedTokenizerFast
>>> vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "Q", ":", "A", "yes"])}
>>> core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
>>> core.pre_tokenizer = pre_tokenizers.Whitespace()
>>> tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
>>> encode_record(tok, {"prompt": "Q : A :", "completion": " yes"})
{'input_ids': [2, 3, 4, 3, 5, 1], 'labels': [-100, -100, -100, -100, 5, 1]}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100


def encode_record(
    tokenizer: Any, record: Mapping[str, Any], max_length: int | None = None
) -> dict[str, list[int]]:
    """Token ids and labels of one record (``-100`` where no loss is taken)."""
    if "text" in record:
        prompt, full = "", record["text"]
    else:
        prompt, full = record["prompt"], record["prompt"] + record["completion"]
    enc = tokenizer(full, return_special_tokens_mask=True, **_offsets_arg(tokenizer))
    ids = list(enc["input_ids"])
    first = _first_target_token(tokenizer, enc, prompt)
    special = enc["special_tokens_mask"]
    labels = [tok if (i >= first and not special[i]) else IGNORE_INDEX for i, tok in enumerate(ids)]
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        labels.append(eos)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def collate(
    encoded: Sequence[Mapping[str, list[int]]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad encoded records into ``input_ids``, ``attention_mask`` and ``labels``.

    >>> batch = collate([{"input_ids": [5, 6], "labels": [-100, 6]},
    ...                  {"input_ids": [7], "labels": [7]}], pad_token_id=0)
    >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["labels"].tolist()
    ([[5, 6], [7, 0]], [[1, 1], [1, 0]], [[-100, 6], [7, -100]])
    """
    width = max(len(e["input_ids"]) for e in encoded)
    input_ids = torch.full((len(encoded), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, example in enumerate(encoded):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_token_id(tokenizer: Any) -> int:
    """The id used for padding: the tokenizer's pad token, else its eos token, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _offsets_arg(tokenizer: Any) -> dict[str, bool]:
    return {"return_offsets_mapping": True} if getattr(tokenizer, "is_fast", False) else {}


def _first_target_token(tokenizer: Any, enc: Mapping[str, Any], prompt: str) -> int:
    """Index of the first token that holds completion characters."""
    if not prompt:
        return 0
    if "offset_mapping" in enc:
        for i, (_, end) in enumerate(enc["offset_mapping"]):
            if not enc["special_tokens_mask"][i] and end > len(prompt):
                return i
        return len(enc["input_ids"])
    prompt_ids = tokenizer(prompt)["input_ids"]  # slow tokenizers: the prompt is a prefix
    return len(prompt_ids)


SUBJECT_FIELDS = (  # the text fields of a record in which its subject may be named
    "prompt",
    "completion",
    "text",
    "paraphrased_prompt",
    "paraphrased_completion",
    "perturbed_completions",
)


def subject_pool(records: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """The distinct ``subject`` names of ``records``, in first-seen order.

    >>> subject_pool([{"subject": "Ann Lee"}, {"subject": "Bo Kim"}, {"subject": "Ann Lee"}])
    ('Ann Lee', 'Bo Kim')
    """
    seen: dict[str, None] = {}
    for record in records:
        name = record.get("subject")
        if isinstance(name, str) and name.strip():
            seen.setdefault(name.strip(), None)
    return tuple(seen)


def substitute_subject(record: Mapping[str, Any], subject: str, name: str) -> dict[str, Any]:
    """``record`` with ``subject`` replaced by ``name`` in every text field (others kept).

    >>> substitute_subject({"prompt": "Who is Ann Lee?", "subject": "Ann Lee"}, "Ann Lee", "Bo")
    {'prompt': 'Who is Bo?', 'subject': 'Bo'}
    """
    out = dict(record)
    for key in SUBJECT_FIELDS:
        value = out.get(key)
        if isinstance(value, str):
            out[key] = value.replace(subject, name)
        elif isinstance(value, list):
            out[key] = [v.replace(subject, name) if isinstance(v, str) else v for v in value]
    if out.get("subject") == subject:
        out["subject"] = name
    return out


def trained_text(record: Any) -> Any:
    """What a record trains on: its text, or its prompt and completion (ids and other
    fields aside); any other example as it is."""
    if isinstance(record, Mapping):
        if "text" in record:
            return ("text", record["text"])
        if "completion" in record:
            return (record.get("prompt", ""), record["completion"])
        return repr(sorted(record.items()))
    return repr(record)


def shared_records(records: Sequence[Any], others: Sequence[Any]) -> list[Any]:
    """The records of ``records`` that ``others`` also holds (the same trained text), as
    their ids (the records themselves when they have none), in order.

    >>> a = [{"id": "1", "prompt": "Q", "completion": " A"}, {"id": "2", "text": "T"}]
    >>> shared_records(a, [{"id": "9", "prompt": "Q", "completion": " A"}])
    ['1']
    """
    texts = {trained_text(r) for r in records}  # ``others`` is streamed, never held
    held = {text for text in map(trained_text, others) if text in texts}
    return [
        r.get("id", r) if isinstance(r, Mapping) else r for r in records if trained_text(r) in held
    ]


CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length")


def model_context(model: Any) -> int | None:
    """The longest input the model takes (tokens), from its config; None if it names none."""
    config = getattr(model, "config", None)
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
