"""What an unlearning run reports as it goes: forget and retain losses, and the result.

:func:`measure` is the mean over examples of each answer's mean token NLL,

    L(S) = (1/|S|) Σ_{z∈S} (1/|y_z|) Σₜ −log p(y_z,ₜ | x_z, y_z,<ₜ),

scored through the task (:meth:`attribution.task.Task.token_scores`). A :class:`Monitor`
measures it on fixed samples (the first ``EVAL_SAMPLE`` forget and retain examples) every
few steps; :class:`UnlearnResult` keeps that history and why the run stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from attribution.progress import evaluating
from attribution.task import Task, scored_batches

EVAL_SAMPLE = 64  # examples of each set in the periodic forget/retain measurement


def measure(
    model: nn.Module,
    task: Task,
    examples: Sequence[Any],
    batch_size: int,
    progress: bool | None = False,
) -> float:
    """Mean over examples of the mean token NLL of each answer (eval mode, no gradients)."""
    values = [
        scores.mean_nll
        for _, _, _, scores in scored_batches(
            model, task, examples, batch_size, "measuring", progress
        )
    ]
    return torch.cat(values).mean().item()


@dataclass
class Measurement:
    """Mean token NLL of the forget and retain samples after ``step`` steps (and the stop
    criterion's value, when the run has one)."""

    step: int
    forget_loss: float
    retain_loss: float
    criterion: float | None = None


class Criterion(Protocol):
    """A calibrated stop: ``criterion(model)`` is how far the model is from its target
    (lower is better); the run ends in the measured state where it was lowest. ``name``
    says what it measures (recorded in the result)."""

    name: str

    def __call__(self, model: nn.Module) -> float: ...


@dataclass
class UnlearnResult:
    """The measured history of a run, how many steps ran and why it stopped."""

    history: list[Measurement] = field(default_factory=list)
    steps_run: int = 0
    stopped: str = "steps"  # steps, forget target, retain budget, line search
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def start(self) -> Measurement:
        return self.history[0]

    @property
    def end(self) -> Measurement:
        return self.history[-1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps_run": self.steps_run,
            "stopped": self.stopped,
            "history": [asdict(m) for m in self.history],
            **self.details,
        }


class Monitor:
    """Forget and retain losses on fixed samples (the first ``EVAL_SAMPLE`` of each)."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        forget: Sequence[Any],
        retain: Sequence[Any],
        batch_size: int,
        criterion: Criterion | None = None,
    ):
        self.model, self.task, self.batch_size = model, task, batch_size
        self.forget, self.retain = forget[:EVAL_SAMPLE], retain[:EVAL_SAMPLE]
        self.criterion = criterion

    def measure(self, step: int) -> Measurement:
        with evaluating(self.model):
            value = None if self.criterion is None else float(self.criterion(self.model))
            return Measurement(
                step,
                measure(self.model, self.task, self.forget, self.batch_size),
                measure(self.model, self.task, self.retain, self.batch_size),
                value,
            )
