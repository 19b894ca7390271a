"""Teacher-forced scoring of completions: the building block of most metrics.

For each record, one forward pass gives, over its labelled tokens t (the completion):

- ``nll``: the summed negative log-likelihood  -Σₜ log p(yₜ | y<ₜ);
- ``n_tokens``: how many tokens are labelled;
- ``n_correct``: how many tokens are the model's argmax.

A completion is reproduced exactly by greedy decoding if and only if every labelled token
is the argmax under teacher forcing (``n_correct == n_tokens``): greedy decoding feeds
back exactly those tokens. The mean-NLL probability of TOFU is exp(-nll / n_tokens).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from attribution.data import IGNORE_INDEX, collate, encode_record, pad_token_id


@dataclass(frozen=True)
class CompletionScores:
    """Per-record teacher-forced statistics (tensors of length ``n_records``)."""

    nll: torch.Tensor
    n_tokens: torch.Tensor
    n_correct: torch.Tensor

    @property
    def exact(self) -> torch.Tensor:
        """True where greedy decoding reproduces the whole completion."""
        return self.n_correct == self.n_tokens

    @property
    def probability(self) -> torch.Tensor:
        """Length-normalised probability exp(-mean token NLL)."""
        return torch.exp(-self.nll / self.n_tokens.clamp(min=1))


@torch.no_grad()
def score_completions(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    batch_size: int = 32,
    progress: bool | None = None,
) -> CompletionScores:
    """Score every record's completion under ``model`` (on the model's own device)."""
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    encoded = [encode_record(tokenizer, r) for r in records]
    nll, n_tokens, n_correct = [], [], []
    was_training = model.training
    model.eval()
    starts = range(0, len(encoded), batch_size)
    for start in tqdm(starts, desc="scoring", disable=_disabled(progress), leave=False):
        chunk = collate(encoded[start : start + batch_size], pad)
        batch = {k: v.to(device) for k, v in chunk.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]  # predict token t+1
        mask = labels != IGNORE_INDEX
        safe = labels.clamp(min=0)
        token_nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), safe, reduction="none"
        )  # [batch, seq]
        nll.append((token_nll * mask).sum(1).cpu())
        n_tokens.append(mask.sum(1).cpu())
        n_correct.append(((logits.argmax(-1) == safe) & mask).sum(1).cpu())
    model.train(was_training)
    return CompletionScores(torch.cat(nll), torch.cat(n_tokens), torch.cat(n_correct))


def _disabled(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None hides the bar when not on a terminal."""
    return None if progress is None else not progress
