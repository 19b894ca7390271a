"""The unlearning methods, one record each: its loss on a step's batches, what it needs.

A method is a loss, not a module (STYLE.md): :data:`METHODS` maps each name to a
:class:`Method` that says how to compute its objective from one forget batch and one
retain batch (:mod:`unlearn.objectives` holds the formulas), whether it needs the frozen
original model, what it prepares before the first step and its default β. Adding a
method is one entry here. Every loss scores batches through the task
(:meth:`attribution.task.Task.token_scores`).

>>> sorted(METHODS)
['distill', 'ga', 'gd', 'idk', 'kl', 'newton', 'npo', 'rmu', 'simnpo']
>>> METHODS["simnpo"].default_beta, METHODS["npo"].uses_frozen, METHODS["newton"].loss is None
(4.5, True, True)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from attribution.errors import InputError
from attribution.task import Task, TokenScores, scored_batches
from unlearn import objectives, stranger
from unlearn.importance import mean_gradient


@dataclass
class Step:
    """What a method's loss sees at one step (``frozen``: the original model, no grad)."""

    model: nn.Module
    task: Task
    forget: Mapping[str, torch.Tensor]
    retain: Mapping[str, torch.Tensor]
    arguments: Any  # unlearn.arguments.UnlearnArguments
    frozen: nn.Module | None = None
    state: dict[str, Any] = field(default_factory=dict)
    forget_records: Sequence[Any] = ()  # the examples the forget batch was collated from

    def scores(self, which: str, hidden_states: bool = False) -> TokenScores:
        """The model's token scores of the ``forget`` or ``retain`` batch (with the graph)."""
        return self.task.token_scores(self.model, getattr(self, which), hidden_states)

    def frozen_scores(self, batch: Mapping[str, torch.Tensor], hidden_states: bool = False):
        """The frozen original model's token scores of ``batch`` (no graph)."""
        with torch.no_grad():
            return self.task.token_scores(self.frozen, batch, hidden_states)

    @property
    def alpha(self) -> float:
        return self.arguments.retain_weight

    @property
    def beta(self) -> float:
        return self.arguments.effective_beta


Prepare = Callable[[nn.Module, Task, Sequence[Any], Any, "nn.Module | None"], dict[str, Any]]


@dataclass(frozen=True)
class Method:
    """One unlearning method (see the module docstring)."""

    name: str
    help: str
    loss: Callable[[Step], torch.Tensor] | None  # None: not a loss (the Newton step)
    uses_frozen: bool = False  # the loss needs the frozen original model
    default_beta: float | None = None  # β when the user gives none (None: β unused)
    prepare: Prepare | None = None  # state computed once before the first step
    needs_factors: bool = False
    # ḡ_f of the scope: the gradient of this method's own forget term (None: the NLL's)
    scope_gradient: Callable[..., dict[str, torch.Tensor]] | None = None


def _ga(step: Step) -> torch.Tensor:
    return objectives.gradient_ascent_loss(step.scores("forget").mean_nll)


def _gd(step: Step) -> torch.Tensor:
    forget, retain = step.scores("forget"), step.scores("retain")
    return objectives.gradient_difference_loss(forget.mean_nll, retain.mean_nll, step.alpha)


def _kl(step: Step) -> torch.Tensor:
    forget, retain = step.scores("forget"), step.scores("retain")
    reference = step.frozen_scores(step.retain)
    divergence = objectives.token_kl(reference.logits, retain.logits, retain.mask)
    return objectives.kl_loss(forget.mean_nll, divergence, step.alpha)


def _retain_term(step: Step) -> torch.Tensor:
    """α × mean retain NLL per token, the retain term of NPO, SimNPO and IDK."""
    return step.alpha * step.scores("retain").mean_nll.mean()


def _npo(step: Step) -> torch.Tensor:
    forget = step.scores("forget")
    retain_term = _retain_term(step)
    reference = -step.frozen_scores(step.forget).nll
    return objectives.npo_loss(-forget.nll, reference, step.beta) + retain_term


def _simnpo(step: Step) -> torch.Tensor:
    forget = step.scores("forget")
    retain_term = _retain_term(step)
    delta = step.arguments.delta
    return objectives.simnpo_loss(-forget.nll, forget.length, step.beta, delta) + retain_term


def _idk(step: Step) -> torch.Tensor:
    forget = step.scores("forget")
    retain_term = _retain_term(step)
    forget_reference = -step.frozen_scores(step.forget).nll
    idk_batch = _idk_batch(step.forget, step.state["idk_ids"])
    idk = -step.task.token_scores(step.model, idk_batch).nll
    idk_reference = -step.frozen_scores(idk_batch).nll
    loss = objectives.idk_loss(idk, idk_reference, -forget.nll, forget_reference, step.beta)
    return loss + retain_term


def _rmu(step: Step) -> torch.Tensor:
    layer = step.state["rmu_layer"] + 1  # hidden_states[0] is the embedding output
    forget = step.scores("forget", hidden_states=True)
    retain = step.scores("retain", hidden_states=True)
    reference = step.frozen_scores(step.retain, hidden_states=True)
    return objectives.rmu_loss(
        forget.hidden_states[layer].float(),
        step.state["rmu_target"],
        retain.hidden_states[layer].float(),
        reference.hidden_states[layer].float(),
        step.forget["attention_mask"].bool(),
        step.retain["attention_mask"].bool(),
        step.alpha,
    )


def _distill(step: Step) -> torch.Tensor:
    student = step.scores("forget")
    device = step.forget["input_ids"].device
    teacher = stranger.teacher_scores(step.task, step.frozen, step.forget_records, device)
    forget_term = stranger.distillation_kl(student, teacher).mean()
    retain = step.scores("retain")
    reference = step.frozen_scores(step.retain)
    retain_term = objectives.token_kl(reference.logits, retain.logits, retain.mask).mean()
    return forget_term + step.alpha * retain_term


def _distill_state(model, task, forget, arguments, frozen) -> dict[str, Any]:
    """The student/teacher record pairs (forget records and paraphrases, names swapped)."""
    aligned = stranger.token_aligned(task)
    pairs = stranger.stranger_pairs(forget, arguments.strangers, aligned, arguments.seed)
    return {"forget_examples": pairs}


def _distill_gradient(model, task, forget, arguments, frozen, progress=None):
    """ḡ_f = mean over student/teacher pairs of ∇θ KL(p_teacher ‖ p_θ) (the scope's forget
    term for ``distill``: the direction the distillation itself will move)."""
    pairs = _distill_state(model, task, forget, arguments, frozen)["forget_examples"]
    device = next(model.parameters()).device

    def loss(batch, first, last):
        teacher = stranger.teacher_scores(task, frozen, pairs[first:last], device)
        return stranger.distillation_kl(task.token_scores(model, batch), teacher).sum()

    return mean_gradient(
        model, task, pairs, arguments.batch_size, progress, "distillation gradient", loss
    )


def _rmu_state(model, task, forget, arguments, frozen) -> dict[str, Any]:
    """The steered block and its target c·u (c = rmu_scale × mean ‖h_l‖ on forget tokens)."""
    n_layers = getattr(model.config, "num_hidden_layers", None) or model.config.n_layer
    layer = arguments.rmu_layer if arguments.rmu_layer is not None else n_layers // 2
    if not 0 <= layer < n_layers:
        raise InputError(f"rmu_layer {layer} is outside the model's blocks 0..{n_layers - 1}")
    norms = []
    for _, _, batch, scores in scored_batches(
        frozen, task, forget, arguments.batch_size, "rmu target", False, hidden_states=True
    ):
        hidden = scores.hidden_states[layer + 1].float()
        norms.append(hidden.norm(dim=-1)[batch["attention_mask"].bool()])
    generator = torch.Generator().manual_seed(arguments.seed)
    direction = torch.rand(model.config.hidden_size, generator=generator)
    direction = direction / direction.norm()
    scale = arguments.rmu_scale * torch.cat(norms).mean().item()
    device = next(model.parameters()).device
    return {"rmu_layer": layer, "rmu_target": (scale * direction).to(device)}


def _idk_state(model, task, forget, arguments, frozen) -> dict[str, Any]:
    return {"idk_ids": _idk_ids(task, arguments.idk_text)}


def _idk_ids(task: Task, text: str) -> list[int]:
    tokenizer = getattr(task, "tokenizer", None)
    if tokenizer is None:
        raise InputError("the idk method needs a task with a tokenizer")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    unknown = getattr(tokenizer, "unk_token_id", None)
    if not ids or (unknown is not None and unknown in ids):
        raise InputError(
            f"the tokenizer cannot spell the IDK answer {text!r} (unknown tokens); "
            "give an answer in the model's vocabulary with --idk-text"
        )
    eos = getattr(tokenizer, "eos_token_id", None)
    return ids + ([eos] if eos is not None else [])


def _idk_batch(batch: Mapping[str, torch.Tensor], idk_ids: list[int]) -> dict[str, torch.Tensor]:
    """The forget prompts with the IDK answer in place of each completion."""
    rows, labels = [], []
    for ids, lab, mask in zip(
        batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True
    ):
        prompt = ids[(lab == -100) & mask.bool()].tolist()
        rows.append(prompt + idk_ids)
        labels.append([-100] * len(prompt) + idk_ids)
    width = max(len(r) for r in rows)
    pad = 0  # any id: padded positions are masked out and unlabelled
    device = batch["input_ids"].device
    out = {
        "input_ids": torch.full((len(rows), width), pad, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        "labels": torch.full((len(rows), width), -100, dtype=torch.long),
    }
    for i, (row, lab) in enumerate(zip(rows, labels, strict=True)):
        out["input_ids"][i, : len(row)] = torch.tensor(row)
        out["attention_mask"][i, : len(row)] = 1
        out["labels"][i, : len(row)] = torch.tensor(lab)
    return {k: v.to(device) for k, v in out.items()}


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("ga", "gradient ascent on the forget answers", _ga),
        Method("gd", "gradient difference: ascent on forget, descent on retain", _gd),
        Method("kl", "ascent on forget + KL to the original model on retain", _kl, True),
        Method("npo", "negative preference optimisation (+ retain NLL)", _npo, True, 0.1),
        Method("simnpo", "SimNPO: length-normalised NPO without reference", _simnpo, False, 4.5),
        Method("idk", "DPO toward an 'I don't know' answer", _idk, True, 0.1, _idk_state),
        Method("rmu", "representation misdirection at one block", _rmu, True, None, _rmu_state),
        Method("newton", "one scoped EK-FAC Newton step, line-searched", None, needs_factors=True),
        Method(
            "distill",
            "stranger distillation: answer as the original model does about a stranger",
            _distill,
            True,
            None,
            _distill_state,
            scope_gradient=_distill_gradient,
        ),
    )
}
