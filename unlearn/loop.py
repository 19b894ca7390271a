"""One masked update loop for every unlearning objective.

Each step draws a forget batch and a retain batch (seeded, without replacement within an
epoch), evaluates the method's loss (:data:`unlearn.methods.METHODS`), takes gradients
of the in-scope tensors only (every other tensor has ``requires_grad`` switched off for
the run) and updates the in-scope elements with :class:`~unlearn.optimizer.MaskedAdamW`.
Nothing outside the scope is ever written: not by the update, not by weight decay, not
by optimizer state.

Every ``eval_every`` steps the mean token NLL of a fixed forget and retain sample is
measured (:class:`~unlearn.monitor.Monitor`). The run stops early when the forget loss
reaches ``forget_target`` (e.g. the reference model's level) or, if the retain loss rose
more than ``retain_budget`` above its start, steps back to the last measured state within
the budget (so the defaults do not collapse the model). The model stays in eval mode (no
dropout): the same seed gives the same edit.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from attribution.distributed import broadcast, current_shard, gather_counts
from attribution.errors import InputError, NonFiniteError
from attribution.progress import evaluating, progress_bar
from attribution.task import Task, on_device
from unlearn.arguments import UnlearnArguments
from unlearn.importance import trainable
from unlearn.methods import METHODS, Step
from unlearn.monitor import Criterion, Monitor, UnlearnResult
from unlearn.optimizer import MaskedAdamW
from unlearn.scope import Scope


def optimize(
    model: nn.Module,
    task: Task,
    forget: Sequence[Any],
    retain: Sequence[Any],
    scope: Scope,
    arguments: UnlearnArguments,
    frozen: nn.Module | None = None,
    progress: bool | None = None,
    criterion: Criterion | None = None,
) -> UnlearnResult:
    """Minimise the method's loss in place, editing only ``scope`` (module docstring).

    ``frozen``: the original model for methods that compare with it (a deep copy of
    ``model`` is made when they need one and none is given); it is never modified.
    ``criterion``: a calibrated stop (:class:`~unlearn.monitor.Criterion`), measured at
    every measurement; the run ends restored to the measured state where it was lowest.
    """
    method = METHODS[arguments.method]
    params = trainable(model)
    optimizer = MaskedAdamW(
        params, scope.masks, lr=arguments.lr, weight_decay=arguments.weight_decay
    )
    names = optimizer.names
    if method.uses_frozen or method.prepare is not None:
        frozen = frozen if frozen is not None else _frozen_copy(model)
    state = method.prepare(model, task, forget, arguments, frozen) if method.prepare else {}
    generator = torch.Generator().manual_seed(arguments.seed)
    forget_examples = state.get("forget_examples", forget)  # a method may rewrite them
    forget_batches = _endless_batches(forget_examples, arguments.batch_size, generator)
    retain_batches = _endless_batches(retain, arguments.batch_size, generator)
    monitor = Monitor(model, task, forget, retain, arguments.batch_size, criterion)
    shard = current_shard()  # under torchrun: each rank takes a share of every batch
    _check_shareable(arguments.batch_size, shard)
    result = UnlearnResult(history=[broadcast(monitor.measure(0), shard)])
    processed = 0
    saved = optimizer.snapshot()
    best = (result.start.criterion, 0, saved) if criterion is not None else None
    device = next(model.parameters()).device
    frozen_models = (frozen,) if frozen is not None else ()
    with _only_grad_for(params, names), evaluating(model, *frozen_models):
        bar = progress_bar(range(arguments.steps), f"unlearn ({arguments.method})", progress)
        for step_index in bar:
            forget_records, weight = _share(next(forget_batches), shard)
            retain_records, _ = _share(next(retain_batches), shard)
            processed += len(forget_records) + len(retain_records)
            if forget_records and retain_records:
                batches_on_device = (
                    on_device(task.collate(forget_records), device),
                    on_device(task.collate(retain_records), device),
                )
                step = Step(
                    model, task, *batches_on_device, arguments, frozen, state, forget_records
                )
                loss = method.loss(step)
                grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            else:  # a short last batch with fewer examples than ranks: this one sits it out
                loss = torch.zeros((), device=device, dtype=params[names[0]].dtype)
                grads, weight = [None] * len(names), 0.0
            loss, grads = _joined(loss, grads, [params[n] for n in names], weight, shard)
            if not torch.isfinite(loss):
                raise NonFiniteError(
                    f"the {arguments.method} loss became {loss.item()} at step "
                    f"{step_index + 1}; lower --lr or raise --beta"
                )
            optimizer.step(dict(zip(names, grads, strict=True)), arguments.max_grad_norm)
            result.steps_run = step_index + 1
            if (step_index + 1) % arguments.eval_every and step_index + 1 < arguments.steps:
                continue
            point = broadcast(monitor.measure(step_index + 1), shard)  # one decision for all
            bar.set_postfix(forget=f"{point.forget_loss:.3f}", retain=f"{point.retain_loss:.3f}")
            budget = arguments.retain_budget
            if budget is not None and point.retain_loss > result.start.retain_loss + budget:
                optimizer.restore(saved)
                result.stopped = "retain budget"
                result.details["over_budget"] = asdict(point)
                break
            result.history.append(point)
            saved = optimizer.snapshot()
            if best is not None and point.criterion < best[0]:
                best = (point.criterion, point.step, saved)
            target = arguments.forget_target
            if target is not None and point.forget_loss >= target:
                result.stopped = "forget target"
                break
    if best is not None:
        _restore_best(optimizer, best, result, criterion)
        result.history.append(broadcast(monitor.measure(best[1]), shard))
    elif result.stopped == "retain budget":
        result.history.append(broadcast(monitor.measure(result.history[-1].step), shard))
    counts = gather_counts(processed, shard)
    result.details["data_parallel"] = {"world_size": len(counts), "examples_per_rank": counts}
    return result


def _check_shareable(batch_size: int, shard) -> None:
    if batch_size < shard.world_size:
        raise InputError(
            f"batch size {batch_size} is smaller than the {shard.world_size} processes "
            "sharing each batch; raise --batch-size or start fewer processes"
        )


def _share(records: list, shard) -> tuple[list, float]:
    """This rank's contiguous share of a batch, and its weight (share / batch size)."""
    low, high = shard.bounds(0, len(records))
    return records[low:high], (high - low) / len(records)


def _joined(loss, grads, params, weight: float, shard):
    """The whole batch's loss and gradients from each rank's share (the data-parallel
    all-reduce): Σ_r weight_r · (loss_r, ∇loss_r), weight_r = share_r / batch size.

    Every objective is a mean over the batch's examples, so this is the one-process loss and
    gradient whenever the forget and retain batches are shared in the same proportions
    (equal batch sizes: every step but an epoch's short last batch, where a rank whose share
    is empty contributes nothing); an objective averaged over tokens (RMU) is weighted by
    examples instead. One process: unchanged.
    """
    if not shard.parallel:
        return loss, grads
    joined = [
        torch.zeros_like(p) if g is None else g * weight for g, p in zip(grads, params, strict=True)
    ]
    value = loss.detach() * weight
    for tensor in [value, *joined]:
        dist.all_reduce(tensor)
    return value, joined


def _restore_best(optimizer, best, result: UnlearnResult, criterion: Criterion) -> None:
    """End in the measured state where the criterion was lowest (see :func:`optimize`)."""
    value, step, values = best
    optimizer.restore(values)
    result.details["calibrated_stop"] = {
        "criterion": criterion.name,
        "best_step": step,
        "best_value": value,
        "per_step": [[m.step, m.criterion] for m in result.history],
    }
    result.stopped = "calibrated"


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
