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
  (``None``: all);
- ``token_scores(model, batch, hidden_states=False)``: teacher-forced statistics of the
  target tokens (:class:`TokenScores`: their log-probabilities, mask, logits and, on
  request, hidden states) — the one scoring path of unlearning and the audit.

:class:`LanguageModelingTask` implements it for Hugging Face causal LMs: the summed token
NLL of the completion (or of every token of a ``text`` record), with attention masks,
right padding and prompt masking.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import torch
from torch import nn

from attribution.data import IGNORE_INDEX, collate, encode_record, pad_token_id
from attribution.errors import InputError
from attribution.progress import evaluating, progress_bar

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

    def token_scores(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor], hidden_states: bool = False
    ) -> TokenScores: ...


@dataclass(frozen=True)
class TokenScores:
    """Teacher-forced statistics of a batch's target tokens, from one forward pass.

        ``logits[b, t]`` predicts ``labels[b, t]`` (already shifted: position t of the input
        predicts token t + 1); ``labels`` is ``-100`` where a token is not a target. Every
        derived value keeps the graph (take ``torch.no_grad()`` outside when scoring only);
        log-probabilities are computed in float32 or wider.

        - ``log_probs[b, t] = log p(yₜ | y<ₜ)`` on targets, 0 elsewhere;  ``nll = −Σₜ log_probs``
    - ``target_log_softmax``: the full next-token log-distribution at each target, [n, vocab]
        - ``length`` the number of targets;  ``mean_nll = nll / length``
        - ``correct[b, t]``: the target is the argmax (greedy decoding reproduces an answer iff
          every target is correct).

        >>> logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])
        >>> scores = TokenScores(logits, torch.tensor([[1, -100]]))
        >>> round(scores.nll.item(), 4), scores.length.tolist(), scores.correct.tolist()
        (0.6931, [1], [[False, False]])
    """

    logits: torch.Tensor  # [batch, seq - 1, vocab]
    labels: torch.Tensor  # [batch, seq - 1]
    hidden_states: tuple[torch.Tensor, ...] | None = None  # [0] embeddings, [l] after block l
    attention_mask: torch.Tensor | None = None  # [batch, seq] of the inputs

    @cached_property
    def mask(self) -> torch.Tensor:
        """True on target tokens, [batch, seq - 1]."""
        return self.labels != IGNORE_INDEX

    @cached_property
    def target_log_softmax(self) -> torch.Tensor:
        """log p(· | y<ₜ) at the target positions only, [n_targets, vocab] (row-major order
        of ``mask``), float32 or wider: a full-vocabulary row is never built for padding or
        prompt tokens."""
        selected = self.logits[self.mask]
        return torch.log_softmax(selected.float() if selected.dtype.itemsize < 4 else selected, -1)

    @cached_property
    def log_probs(self) -> torch.Tensor:
        """log p(yₜ | y<ₜ) of each target token (0 elsewhere), [batch, seq - 1].

        Computed as the task's loss is (:func:`token_nll`, float32 or wider), so a metric
        and the training loss of the same tokens agree to the bit.
        """
        logits = self.logits.float() if self.logits.dtype.itemsize < 4 else self.logits
        return -token_nll(logits, self.labels)

    @property
    def nll(self) -> torch.Tensor:
        """Summed NLL of each example's targets, [batch]."""
        return -self.log_probs.sum(-1)

    @property
    def length(self) -> torch.Tensor:
        """Number of target tokens of each example, [batch]."""
        return self.mask.sum(-1)

    @property
    def mean_nll(self) -> torch.Tensor:
        """Mean token NLL of each example's targets (0 for an example with none), [batch]."""
        return self.nll / self.length.clamp(min=1)

    @property
    def correct(self) -> torch.Tensor:
        """True where a target token is the model's argmax, [batch, seq - 1]."""
        return (self.logits.argmax(-1) == self.labels) & self.mask


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
        if max_length is not None and (
            not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1
        ):
            raise InputError(f"max_length must be an integer >= 1 (tokens), got {max_length!r}")
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

    def token_scores(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor], hidden_states: bool = False
    ) -> TokenScores:
        mask = batch.get("attention_mask")
        out = model(
            input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=hidden_states
        )
        logits = out.logits if hasattr(out, "logits") else out
        hidden = tuple(out.hidden_states) if hidden_states else None
        return TokenScores(logits[:, :-1], batch["labels"][:, 1:], hidden, mask)

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
    with evaluating(model):
        for first in progress_bar(range(start, stop, batch_size), desc, progress):
            last = min(first + batch_size, stop)
            yield first, last, on_device(task.collate(examples[first:last]), device)


def scored_batches(
    model: nn.Module,
    task: Task,
    examples: Sequence[Any],
    batch_size: int,
    desc: str,
    progress: bool | None = None,
    hidden_states: bool = False,
) -> Iterator[tuple[int, int, dict[str, torch.Tensor], TokenScores]]:
    """``(first, last, batch, task.token_scores(...))`` over ``examples``, without gradients.

    The model is in eval mode throughout (see :func:`batches`).
    """
    for first, last, batch in batches(model, task, examples, batch_size, desc, progress):
        with torch.no_grad():
            scores = task.token_scores(model, batch, hidden_states)
        yield first, last, batch, scores


def on_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of ``batch`` on ``device``."""
    return {k: v.to(device) for k, v in batch.items()}
