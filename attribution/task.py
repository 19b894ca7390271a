"""The task: how a model's loss and measurement are computed on a batch.

Every stage (factors, scores, unlearning) consumes the same small contract, so the user
describes the model once (STYLE.md; kronfluence's ``Task``):

- ``collate(examples)``: a batch of tensors from in-memory examples;
- ``loss(model, batch, sample=False, generator=None)``: the training loss of each
  example, summed over its tokens, shape [batch]. With ``sample=True`` the labels are
  drawn from the model's own predictive distribution (for the true Fisher) instead of
  taken from the data (the empirical Fisher); ``generator`` is one generator, or one per
  example (then each example's labels do not depend on how examples are batched);
- ``measurement(model, batch)``: what a query's influence is measured on, shape [batch];
- ``token_mask(batch)``: the tokens whose module inputs count in activation statistics
  (``None``: all).

:class:`LanguageModelingTask` implements it for Hugging Face causal LMs: the summed token
NLL of the completion (or of every token of a ``text`` record), with attention masks,
right padding and prompt masking.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from attribution.data import IGNORE_INDEX, collate, encode_record, pad_token_id

Generators = torch.Generator | Sequence[torch.Generator] | None


class Task(Protocol):
    """What every stage needs to know about a model (see the module docstring)."""

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]: ...

    def loss(
        self,
        model: nn.Module,
        batch: Mapping[str, torch.Tensor],
        sample: bool = False,
        generator: Generators = None,
    ) -> torch.Tensor: ...

    def measurement(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor: ...

    def token_mask(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None: ...


class LanguageModelingTask:
    """Summed token NLL of a causal LM: ℓ(z) = -Σₜ log p(yₜ | y<ₜ) over labelled tokens.

    Examples are records (``{"prompt", "completion"}`` or ``{"text"}``; a ``tokenizer`` is
    then required) or already encoded ``{"input_ids", "labels"}`` dicts (``-100`` marks
    an unlabelled token). Batches are right-padded.

    >>> task = LanguageModelingTask(pad_id=0)
    >>> batch = task.collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}])
    >>> batch["labels"].tolist()
    [[-100, 6, 7]]
    """

    def __init__(
        self, tokenizer: Any = None, max_length: int | None = None, pad_id: int | None = None
    ):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = (
            pad_id
            if pad_id is not None
            else (pad_token_id(tokenizer) if tokenizer is not None else 0)
        )

    def encode(self, example: Mapping[str, Any]) -> dict[str, list[int]]:
        """Token ids and labels of one example."""
        if "input_ids" in example:
            ids = list(example["input_ids"])
            labels = list(example.get("labels", ids))
            return {"input_ids": ids[: self.max_length], "labels": labels[: self.max_length]}
        if self.tokenizer is None:
            raise ValueError("LanguageModelingTask needs a tokenizer to encode text records")
        return encode_record(self.tokenizer, example, self.max_length)

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        return collate([self.encode(e) for e in examples], self.pad_id)

    def loss(
        self,
        model: nn.Module,
        batch: Mapping[str, torch.Tensor],
        sample: bool = False,
        generator: Generators = None,
    ) -> torch.Tensor:
        logits = self._logits(model, batch)
        labels = batch["labels"][:, 1:]
        if sample:
            labels = sample_labels(logits, labels, generator)
        return token_nll(logits, labels).sum(-1)

    def measurement(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return token_nll(self._logits(model, batch), batch["labels"][:, 1:]).sum(-1)

    def token_mask(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        mask = batch.get("attention_mask")
        return None if mask is None else mask.bool()

    @staticmethod
    def _logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits predicting token t+1 at position t, shape [batch, seq - 1, vocab]."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        logits = out.logits if hasattr(out, "logits") else out
        return logits[:, :-1]


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token NLL, zero where the label is ``-100``; shape [batch, seq]."""
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    return nll * (labels != IGNORE_INDEX)


@torch.no_grad()
def sample_labels(
    logits: torch.Tensor, labels: torch.Tensor, generator: Generators = None
) -> torch.Tensor:
    """Labels drawn from softmax(logits) where ``labels`` has one, ``-100`` elsewhere.

    ``generator`` may be a sequence with one generator per example.
    """
    probs = torch.softmax(logits.detach().float(), dim=-1)
    if generator is None or isinstance(generator, torch.Generator):
        drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    else:
        drawn = torch.stack(
            [
                torch.multinomial(p, 1, generator=g).squeeze(-1)
                for p, g in zip(probs, generator, strict=True)
            ]
        )
    drawn = drawn.view(labels.shape)
    return torch.where(labels != IGNORE_INDEX, drawn, labels)


def batches(
    model: nn.Module,
    task: Task,
    examples: Sequence[Any],
    batch_size: int,
    desc: str,
    progress: bool | None = None,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
    """``(first, last, batch)`` over ``examples[start:stop]``, on the model's device.

    The model is in eval mode while the batches are used (restored after); the bar is
    hidden when ``progress`` is False, or when not on a terminal and ``progress`` is None.
    """
    device = next(model.parameters()).device
    stop = len(examples) if stop is None else stop
    was_training = model.training
    model.eval()
    try:
        starts = range(start, stop, batch_size)
        hidden = None if progress is None else not progress
        for first in tqdm(starts, desc=desc, disable=hidden, leave=False):
            last = min(first + batch_size, stop)
            batch = task.collate(examples[first:last])
            yield first, last, {k: v.to(device) for k, v in batch.items()}
    finally:
        model.train(was_training)
