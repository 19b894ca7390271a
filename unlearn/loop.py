"""One masked update loop for every unlearning objective.

Each step draws a forget batch and a retain batch (seeded, without replacement within an
epoch), evaluates the method's loss (:mod:`unlearn.objectives`), takes gradients of the
in-scope tensors only (every other tensor has ``requires_grad`` switched off for the run)
and updates the in-scope elements with :class:`~unlearn.optimizer.MaskedAdamW`. Nothing
outside the scope is ever written: not by the update, not by weight decay, not by
optimizer state.

Every ``eval_every`` steps the mean token NLL of a fixed forget and retain sample is
measured. The run stops early when the forget loss reaches ``forget_target`` (e.g. the
reference model's level) or, if the retain loss rose more than ``retain_budget`` above
its start, steps back to the last measured state within the budget (so the defaults do
not collapse the model). The model stays in eval mode (no dropout): the same seed gives
the same edit.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from attribution.curvature import Factors
from attribution.errors import InputError, NonFiniteError
from attribution.task import Task, token_nll
from unlearn import objectives
from unlearn.importance import trainable
from unlearn.optimizer import MaskedAdamW
from unlearn.scope import Scope, check_choice

METHODS = ("ga", "gd", "kl", "npo", "simnpo", "idk", "rmu", "newton")
NEEDS_FROZEN_COPY = ("kl", "npo", "idk", "rmu")
DEFAULT_BETA = {"npo": 0.1, "idk": 0.1, "simnpo": 4.5}
EVAL_SAMPLE = 64  # examples of each set in the periodic forget/retain measurement


@dataclass(frozen=True)
class UnlearnArguments:
    """How to unlearn; every field is recorded in the manifest."""

    method: str = "npo"  # one of METHODS
    steps: int = 60  # optimizer steps (newton: line-search iterations use newton_iterations)
    lr: float = 1e-3  # the tiny models need more than open-unlearning's 1e-5
    batch_size: int = 8
    retain_weight: float = 1.0  # α
    beta: float | None = None  # None: NPO/IDK 0.1, SimNPO 4.5
    delta: float = 0.0  # SimNPO's margin δ
    weight_decay: float = 0.01  # decoupled, in scope only
    max_grad_norm: float = 1.0
    rmu_layer: int | None = None  # None: the middle block
    rmu_scale: float = 2.0  # c = rmu_scale × mean ‖h_l‖ of the original model on forget tokens
    idk_text: str = " I don't know."
    forget_target: float | None = None  # stop when the forget mean token NLL reaches this
    retain_budget: float | None = 0.5  # nats/token the retain loss may rise (None: no guard)
    eval_every: int = 5
    newton_iterations: int = 1
    newton_max_scale: float = 4096.0  # the line search tries η₀ × 2ᵏ up to this multiple
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        for name in ("steps", "batch_size", "eval_every", "newton_iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("lr", "retain_weight", "weight_decay", "max_grad_norm", "rmu_scale"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise InputError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.beta is not None and not self.beta > 0:
            raise InputError(f"beta must be > 0, got {self.beta!r}")

    @property
    def effective_beta(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA.get(self.method, 0.1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Measurement:
    """Mean token NLL of the forget and retain samples after ``step`` steps."""

    step: int
    forget_loss: float
    retain_loss: float


@dataclass
class UnlearnResult:
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


def unlearn(
    model: nn.Module,
    task: Task,
    forget: Sequence[Any],
    retain: Sequence[Any],
    scope: Scope,
    arguments: UnlearnArguments | None = None,
    factors: Factors | None = None,
    progress: bool | None = None,
) -> UnlearnResult:
    """Unlearn ``forget`` in place, editing only ``scope``; returns the loss history."""
    arguments = arguments or UnlearnArguments()
    check_sets(forget, retain)
    scope.check_fits(model)
    if scope.edited == 0:
        raise InputError("the scope is empty: no parameter may change")
    if arguments.method == "newton":
        from unlearn.newton import newton_unlearn

        return newton_unlearn(model, task, forget, retain, scope, arguments, factors, progress)
    return _optimize(model, task, forget, retain, scope, arguments, progress)


def check_sets(forget: Sequence[Any], retain: Sequence[Any]) -> None:
    """Refuse an empty forget or retain set, or a forget set equal to the retain set."""
    if len(forget) == 0:
        raise InputError("the forget set is empty")
    if len(retain) == 0:
        raise InputError("the retain set is empty")
    if _content(forget) == _content(retain):
        raise InputError("the forget and retain sets are identical; nothing can be kept")


def measure(model: nn.Module, task: Task, examples: Sequence[Any], batch_size: int) -> float:
    """Mean over examples of the mean token NLL of each answer."""
    values = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = _on_device(task.collate(examples[start : start + batch_size]), model)
            nll, length = answer_nll(model, batch)[:2]
            values.append(nll / length.clamp(min=1))
    return torch.cat(values).mean().item()


def answer_nll(model: nn.Module, batch: Mapping[str, torch.Tensor], hidden: bool = False):
    """``(summed NLL [B], answer length [B], logits [B, T-1, V], hidden states or None)``."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        output_hidden_states=hidden,
    )
    logits = out.logits[:, :-1]
    labels = batch["labels"][:, 1:]
    nll = token_nll(logits.float(), labels)
    length = (labels != -100).sum(-1)
    return nll.sum(-1), length, logits, (out.hidden_states if hidden else None)


def _optimize(model, task, forget, retain, scope, arguments, progress) -> UnlearnResult:
    params = trainable(model)
    optimizer = MaskedAdamW(
        params, scope.masks, lr=arguments.lr, weight_decay=arguments.weight_decay
    )
    names = optimizer.names
    frozen = _frozen_copy(model) if arguments.method in NEEDS_FROZEN_COPY else None
    state = _method_state(model, task, forget, arguments, frozen)
    generator = torch.Generator().manual_seed(arguments.seed)
    forget_batches = _endless_batches(forget, arguments.batch_size, generator)
    retain_batches = _endless_batches(retain, arguments.batch_size, generator)
    monitor = _Monitor(model, task, forget, retain, arguments.batch_size)
    result = UnlearnResult(history=[monitor.measure(0)])
    saved = optimizer.snapshot()
    with _only_grad_for(params, names), _eval_mode(model):
        bar = tqdm(
            range(arguments.steps),
            desc=f"unlearn ({arguments.method})",
            disable=_hidden(progress),
            leave=False,
        )
        for step in bar:
            forget_batch = _on_device(task.collate(next(forget_batches)), model)
            retain_batch = _on_device(task.collate(next(retain_batches)), model)
            loss = _method_loss(model, frozen, forget_batch, retain_batch, arguments, state)
            if not torch.isfinite(loss):
                raise NonFiniteError(
                    f"the {arguments.method} loss became {loss.item()} at step {step + 1}; "
                    "lower --lr or raise --beta"
                )
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            optimizer.step(dict(zip(names, grads, strict=True)), arguments.max_grad_norm)
            result.steps_run = step + 1
            if (step + 1) % arguments.eval_every and step + 1 < arguments.steps:
                continue
            point = monitor.measure(step + 1)
            bar.set_postfix(forget=f"{point.forget_loss:.3f}", retain=f"{point.retain_loss:.3f}")
            budget = arguments.retain_budget
            if budget is not None and point.retain_loss > result.start.retain_loss + budget:
                optimizer.restore(saved)
                result.stopped = "retain budget"
                result.details["over_budget"] = asdict(point)
                break
            result.history.append(point)
            saved = optimizer.snapshot()
            target = arguments.forget_target
            if target is not None and point.forget_loss >= target:
                result.stopped = "forget target"
                break
    if result.stopped == "retain budget":
        result.history.append(monitor.measure(result.history[-1].step))
    return result


def _method_loss(model, frozen, forget_batch, retain_batch, arguments, state) -> torch.Tensor:
    """The objective of ``arguments.method`` on one forget and one retain batch."""
    method, alpha, beta = arguments.method, arguments.retain_weight, arguments.effective_beta
    if method == "rmu":
        return _rmu_step(model, frozen, forget_batch, retain_batch, arguments, state)
    f_nll, f_len, _, _ = answer_nll(model, forget_batch)
    f_mean = f_nll / f_len.clamp(min=1)
    if method == "ga":
        return objectives.gradient_ascent_loss(f_mean)
    if method == "kl":
        r_nll, r_len, r_logits, _ = answer_nll(model, retain_batch)
        with torch.no_grad():
            ref_logits = answer_nll(frozen, retain_batch)[2]
        mask = retain_batch["labels"][:, 1:] != -100
        return objectives.kl_loss(f_mean, objectives.token_kl(ref_logits, r_logits, mask), alpha)
    r_nll, r_len, _, _ = answer_nll(model, retain_batch)
    r_mean = r_nll / r_len.clamp(min=1)
    if method == "gd":
        return objectives.gradient_difference_loss(f_mean, r_mean, alpha)
    retain_term = alpha * r_mean.mean()
    if method == "simnpo":
        return objectives.simnpo_loss(-f_nll, f_len, beta, arguments.delta) + retain_term
    with torch.no_grad():
        f_ref = -answer_nll(frozen, forget_batch)[0]
    if method == "npo":
        return objectives.npo_loss(-f_nll, f_ref, beta) + retain_term
    idk_batch = _idk_batch(forget_batch, state["idk_ids"])
    idk_log_prob = -answer_nll(model, idk_batch)[0]
    with torch.no_grad():
        idk_ref = -answer_nll(frozen, idk_batch)[0]
    return objectives.idk_loss(idk_log_prob, idk_ref, -f_nll, f_ref, beta) + retain_term


def _rmu_step(model, frozen, forget_batch, retain_batch, arguments, state) -> torch.Tensor:
    layer = state["rmu_layer"] + 1  # hidden_states[0] is the embedding output
    forget_hidden = answer_nll(model, forget_batch, hidden=True)[3][layer]
    retain_hidden = answer_nll(model, retain_batch, hidden=True)[3][layer]
    with torch.no_grad():
        retain_ref = answer_nll(frozen, retain_batch, hidden=True)[3][layer]
    return objectives.rmu_loss(
        forget_hidden.float(),
        state["rmu_target"],
        retain_hidden.float(),
        retain_ref.float(),
        forget_batch["attention_mask"].bool(),
        retain_batch["attention_mask"].bool(),
        arguments.retain_weight,
    )


def _method_state(model, task, forget, arguments, frozen) -> dict[str, Any]:
    """What a method needs before its first step (RMU's target, IDK's answer tokens)."""
    if arguments.method == "rmu":
        return _rmu_state(model, task, forget, arguments, frozen)
    if arguments.method == "idk":
        return {"idk_ids": _idk_ids(task, arguments.idk_text)}
    return {}


def _rmu_state(model, task, forget, arguments, frozen) -> dict[str, Any]:
    n_layers = getattr(model.config, "num_hidden_layers", None) or model.config.n_layer
    layer = arguments.rmu_layer if arguments.rmu_layer is not None else n_layers // 2
    if not 0 <= layer < n_layers:
        raise InputError(f"rmu_layer {layer} is outside the model's blocks 0..{n_layers - 1}")
    norms = []
    with torch.no_grad():
        for start in range(0, len(forget), arguments.batch_size):
            batch = _on_device(task.collate(forget[start : start + arguments.batch_size]), model)
            hidden = answer_nll(frozen, batch, hidden=True)[3][layer + 1].float()
            norms.append(hidden.norm(dim=-1)[batch["attention_mask"].bool()])
    generator = torch.Generator().manual_seed(arguments.seed)
    direction = torch.rand(model.config.hidden_size, generator=generator)
    direction = direction / direction.norm()
    scale = arguments.rmu_scale * torch.cat(norms).mean().item()
    device = next(model.parameters()).device
    return {"rmu_layer": layer, "rmu_target": (scale * direction).to(device)}


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


class _Monitor:
    """Forget and retain losses on fixed samples (the first ``EVAL_SAMPLE`` of each)."""

    def __init__(self, model, task, forget, retain, batch_size):
        self.model, self.task, self.batch_size = model, task, batch_size
        self.forget, self.retain = forget[:EVAL_SAMPLE], retain[:EVAL_SAMPLE]

    def measure(self, step: int) -> Measurement:
        with _eval_mode(self.model):
            return Measurement(
                step,
                measure(self.model, self.task, self.forget, self.batch_size),
                measure(self.model, self.task, self.retain, self.batch_size),
            )


def _endless_batches(
    examples: Sequence[Any], size: int, generator: torch.Generator
) -> Iterator[list]:
    """Batches drawn without replacement, reshuffled every epoch."""
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), size):
            yield [examples[i] for i in order[start : start + size]]


def _frozen_copy(model: nn.Module) -> nn.Module:
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


@contextlib.contextmanager
def _only_grad_for(params: Mapping[str, nn.Parameter], names: Sequence[str]):
    """``requires_grad`` on the in-scope tensors only, restored afterwards."""
    before = {n: p.requires_grad for n, p in params.items()}
    chosen = set(names)
    try:
        for n, p in params.items():
            p.requires_grad_(n in chosen)
        yield
    finally:
        for n, p in params.items():
            p.requires_grad_(before[n])


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _on_device(batch: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def _content(records: Sequence[Any]) -> list[str]:
    return sorted(repr(sorted(r.items())) if isinstance(r, Mapping) else repr(r) for r in records)


def _hidden(progress: bool | None) -> bool | None:
    return None if progress is None else not progress
