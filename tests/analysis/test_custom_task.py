"""The audit scores records through the task it is given: a custom Task changes every metric."""

from __future__ import annotations

import json
import math

import pytest
import torch

from analysis.audit import audit
from analysis.scoring import score_completions
from attribution.data import IGNORE_INDEX
from attribution.task import LanguageModelingTask
from excise.models import load_model
from excise.world import SPLITS, read_split

LAST = 2


class LastTargetsTask(LanguageModelingTask):
    """A causal LM's completion loss on its last ``n`` target tokens only (the rest is context)."""

    def __init__(self, tokenizer, n: int = LAST):
        super().__init__(tokenizer)
        self.n = n

    def collate(self, examples):
        batch = super().collate(examples)
        targets = batch["labels"] != IGNORE_INDEX  # [batch, seq]
        from_end = targets.flip(-1).cumsum(-1).flip(-1)  # targets at or after each position
        keep = targets & (from_end <= self.n)
        return {**batch, "labels": torch.where(keep, batch["labels"], IGNORE_INDEX)}


class PrefixedTask:
    """A Task written from scratch: each record is read after a fixed prefix token.

    It exposes no ``tokenizer``, so ROUGE-L (which generates text) cannot run.
    """

    def __init__(self, tokenizer, prefix_id: int):
        self._lm = LanguageModelingTask(tokenizer)
        self.prefix_id = prefix_id

    def collate(self, examples):
        batch = self._lm.collate(examples)
        column = torch.ones(batch["input_ids"].shape[0], 1, dtype=torch.long)
        return {
            "input_ids": torch.cat([column * self.prefix_id, batch["input_ids"]], 1),
            "attention_mask": torch.cat([column, batch["attention_mask"]], 1),
            "labels": torch.cat([column * IGNORE_INDEX, batch["labels"]], 1),
        }

    def loss(self, model, batch, sample=False, generator=None):
        return self._lm.loss(model, batch, sample, generator)

    def measurement(self, model, batch):
        return self._lm.measurement(model, batch)

    def token_mask(self, batch):
        return self._lm.token_mask(batch)

    def token_scores(self, model, batch, hidden_states=False):
        return self._lm.token_scores(model, batch, hidden_states)


@pytest.fixture(scope="module")
def models(tiny_world):
    return load_model(tiny_world / "base"), load_model(tiny_world / "reference")


@pytest.fixture(scope="module")
def small(tiny_world):
    return {s: read_split(tiny_world, s)[:6] for s in SPLITS}


def by_hand(model, task, record) -> tuple[float, float]:
    """``(probability, exact memorization)`` of one record, alone, via ``task.token_scores``."""
    with torch.no_grad():
        scores = task.token_scores(model, task.collate([record]))
    log_probs = scores.log_probs[0][scores.mask[0]].double()
    correct = scores.correct[0][scores.mask[0]]
    return math.exp(log_probs.mean().item()), correct.double().mean().item()


def test_the_audit_measures_what_the_task_scores(models, small):
    (base, tokenizer), (reference, _) = models
    task = LastTargetsTask(tokenizer)
    report = audit(base, reference, task, small, reference=reference, relearn_steps=2)
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    record = small["forget"][0]
    for role, model in (("before", base), ("after", reference)):
        metrics = report["metrics"]["forget"][role]
        probability, memorized = by_hand(model, task, record)
        assert metrics["probability"]["per_example"][0] == pytest.approx(probability, rel=1e-5)
        assert metrics["exact_memorization"]["per_example"][0] == pytest.approx(memorized)
    default = score_completions(reference, LanguageModelingTask(tokenizer), small["forget"])
    custom = report["metrics"]["forget"]["after"]["probability"]["per_example"]
    assert custom != pytest.approx(default.probability.tolist(), abs=1e-3)
    with torch.no_grad():
        before, after = (task.token_scores(m, task.collate([record])) for m in (base, reference))
    change = report["shift"]["forget"]["log_prob_change"]["per_example"][0]
    # the shift uses the full log-distribution, the task its loss: float32 rounding apart
    assert change == pytest.approx((before.nll - after.nll).item(), rel=1e-4, abs=1e-6)
    assert int(before.length) == LAST
    assert report["metrics"]["forget"]["before"]["rouge_l_recall"]["value"] is not None
    assert report["relearning"]["available"] and report["membership"]["available"]


def test_a_task_without_a_tokenizer_still_audits(models, small):
    (base, tokenizer), (reference, _) = models
    task = PrefixedTask(tokenizer, tokenizer.eos_token_id)
    report = audit(base, reference, task, small, relearn_steps=2)
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    for per_role in report["metrics"].values():
        for metrics in per_role.values():
            rouge = metrics["rouge_l_recall"]
            assert rouge["value"] is None and "tokenizer" in rouge["reason"]
    assert not any("rouge" in c for c in report["model_utility"]["before"]["components"])
    record = small["retain"][0]
    probability, _ = by_hand(base, task, record)
    custom = report["metrics"]["retain"]["before"]["probability"]["per_example"]
    assert custom[0] == pytest.approx(probability, rel=1e-5)
    default = score_completions(base, LanguageModelingTask(tokenizer), small["retain"])
    assert custom != pytest.approx(default.probability.tolist(), abs=1e-6)
    assert report["relearning"]["available"]


@pytest.mark.parametrize("method", ["gd", "npo"])
def test_unlearning_runs_through_a_custom_task(models, tiny_world, method):
    """scoped_edit with a task of its own: the loop measures and optimises what it scores."""
    import copy

    from unlearn import ScopeArguments, UnlearnArguments, measure, scoped_edit

    (base, tokenizer), _ = models
    forget, retain = read_split(tiny_world, "forget")[:8], read_split(tiny_world, "retain")[:16]
    task = LastTargetsTask(tokenizer)
    edited = copy.deepcopy(base)
    edit = scoped_edit(
        edited,
        task,
        forget,
        retain,
        ScopeArguments(method="random", sparsity=0.05),
        UnlearnArguments(method=method, steps=6, lr=1e-2, eval_every=3, retain_budget=None),
        frozen=base,
        progress=False,
    )
    assert edit.proof["holds"]
    start = edit.result.start
    assert start.forget_loss == pytest.approx(measure(base, task, forget, 8), abs=1e-6)
    default = measure(base, LanguageModelingTask(tokenizer), forget, 8)
    assert start.forget_loss != pytest.approx(default, abs=1e-4)  # the custom task's targets
    assert edit.result.end.forget_loss == pytest.approx(measure(edited, task, forget, 8), abs=1e-6)
    assert edit.result.end.forget_loss > start.forget_loss
