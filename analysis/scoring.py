"""Teacher-forced scoring of completions: the building block of most metrics.

Every metric of :mod:`analysis` scores records the same way: the records go through the
task (``task.collate``, then ``task.token_scores``: one forward pass, no gradients, the
model in eval mode; :func:`attribution.task.scored_batches`), so a custom
:class:`~attribution.task.Task` changes what every metric measures. A Hugging Face causal
LM is described by ``LanguageModelingTask(tokenizer)``: its targets are a record's
completion tokens (every token of a ``text`` record).

For each record, over its target tokens t:

- ``nll``: the summed negative log-likelihood  -Σₜ log p(yₜ | y<ₜ);
- ``n_tokens``: how many tokens are targets;
- ``n_correct``: how many targets are the model's argmax.

A completion is reproduced exactly by greedy decoding if and only if every target token
is the argmax under teacher forcing (``n_correct == n_tokens``): greedy decoding feeds
back exactly those tokens. The mean-NLL probability of TOFU is exp(-nll / n_tokens).

>>> scores = CompletionScores(torch.tensor([0.0, 2.0]), torch.tensor([2, 2]), torch.tensor([2, 1]))
>>> scores.exact.tolist(), [round(p, 4) for p in scores.probability.tolist()]
([True, False], [1.0, 0.3679])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from attribution.task import Task, scored_batches


@dataclass(frozen=True)
class CompletionScores:
    """Per-record teacher-forced statistics (tensors of length ``n_records``)."""

    nll: torch.Tensor  # float32 (or wider)
    n_tokens: torch.Tensor  # int64
    n_correct: torch.Tensor  # int64

    @property
    def exact(self) -> torch.Tensor:
        """True where greedy decoding reproduces the whole completion."""
        return self.n_correct == self.n_tokens

    @property
    def probability(self) -> torch.Tensor:
        """Length-normalised probability exp(-mean token NLL)."""
        return torch.exp(-self.nll / self.n_tokens.clamp(min=1))


def score_completions(
    model: torch.nn.Module,
    task: Task,
    records: Sequence[Mapping[str, Any]],
    batch_size: int = 32,
    progress: bool | None = None,
) -> CompletionScores:
    """Score every record's targets under ``model`` (on the model's own device)."""
    nll, n_tokens, n_correct = [], [], []
    for *_, scores in scored_batches(model, task, records, batch_size, "scoring", progress):
        nll.append(scores.nll.cpu())
        n_tokens.append(scores.length.cpu())
        n_correct.append(scores.correct.sum(1).cpu())
    return CompletionScores(torch.cat(nll), torch.cat(n_tokens), torch.cat(n_correct))


def per_record(values: torch.Tensor, scores_mask: torch.Tensor) -> list[torch.Tensor]:
    """``values`` (one per target token, row-major) cut into one CPU tensor per record.

    >>> mask = torch.tensor([[True, False, True], [False, True, False]])
    >>> [v.tolist() for v in per_record(torch.tensor([1.0, 2.0, 3.0]), mask)]
    [[1.0, 2.0], [3.0]]
    """
    return list(values.cpu().split(scores_mask.sum(1).tolist()))
