"""The scoped edit: hash → scope → unlearn → proof, as one library call.

:func:`scoped_edit` is what ``excise unlearn``, ``excise forget`` and the benchmark all
run: it hashes the model's state once before, chooses the scope (or takes one given),
unlearns inside it (:func:`unlearn`: the masked loop of :mod:`unlearn.loop` or the Newton
step of :mod:`unlearn.newton`, by the method's record in :data:`unlearn.methods.METHODS`),
hashes the state once after and checks the proof that every out-of-scope tensor is
bit-identical (:mod:`unlearn.proof`). The model is edited in place.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from attribution.curvature import Factors
from attribution.distributed import broadcast, current_shard
from attribution.errors import InputError
from attribution.fingerprint import fingerprint_of
from attribution.precision import round_to_stored
from attribution.task import Task
from unlearn.arguments import UnlearnArguments
from unlearn.importance import choose_scope
from unlearn.loop import optimize
from unlearn.methods import METHODS
from unlearn.monitor import Criterion, UnlearnResult
from unlearn.newton import newton_unlearn
from unlearn.proof import check_proof, scope_proof, state_hashes
from unlearn.scope import Scope, ScopeArguments


@dataclass
class ScopedEdit:
    """What a scoped edit did: the scope, the run, the proof and the model's fingerprints."""

    scope: Scope
    scope_arguments: ScopeArguments | None  # None: the scope was given
    arguments: UnlearnArguments
    result: UnlearnResult
    proof: dict[str, Any]
    fingerprint_before: str
    fingerprint_after: str


def scoped_edit(
    model: nn.Module,
    task: Task,
    forget: Sequence[Any],
    retain: Sequence[Any],
    scope: Scope | ScopeArguments,
    arguments: UnlearnArguments | None = None,
    factors: Factors | None = None,
    *,
    before: Mapping[str, str] | None = None,
    frozen: nn.Module | None = None,
    criterion: Criterion | None = None,
    progress: bool | None = None,
) -> ScopedEdit:
    """Choose the scope (unless ``scope`` is one), unlearn in place, prove it stayed inside.

    ``before``: the per-tensor hashes of ``model`` when the caller has them already (each
    state is hashed once); ``frozen``: an unmodified copy of the original model for methods
    that compare with it (otherwise one is copied); ``criterion``: a calibrated stop (see
    :func:`unlearn.loop.optimize`). A model stored in 16-bit floats (see
    :mod:`attribution.precision`) is rounded to them after the edit. Raises
    :class:`~unlearn.proof.ScopeViolation` if a tensor outside the scope changed.

    >>> import torch
    >>> from attribution import LanguageModelingTask
    >>> from unlearn.scope import full_scope
    >>> model = torch.nn.Linear(1, 1)  # a model the task cannot run: the sets are checked first
    >>> scoped_edit(model, LanguageModelingTask(), [], [1], full_scope(model))
    Traceback (most recent call last):
    attribution.errors.InputError: the forget set is empty
    """
    arguments = arguments or UnlearnArguments()
    check_sets(forget, retain)
    before = dict(before) if before is not None else state_hashes(model)
    scope_arguments = scope if isinstance(scope, ScopeArguments) else None
    if scope_arguments is not None:
        scope = choose_scope(
            model,
            task,
            forget,
            retain,
            scope_arguments,
            factors,
            arguments.batch_size,
            progress,
            forget_gradient=_scope_gradient(model, task, forget, arguments, frozen),
        )
        scope = broadcast(scope, current_shard())  # under torchrun: rank 0's masks on all
    result = unlearn(
        model,
        task,
        forget,
        retain,
        scope,
        arguments,
        factors,
        progress,
        frozen=frozen,
        criterion=criterion,
    )
    round_to_stored(model)  # the model in memory is the model that will be saved
    after = state_hashes(model)
    proof = scope_proof(before, after, scope, model)
    check_proof(proof)
    return ScopedEdit(
        scope,
        scope_arguments,
        arguments,
        result,
        proof,
        fingerprint_of(before),
        fingerprint_of(after),
    )


def _scope_gradient(model, task, forget, arguments, frozen):
    """How to compute ḡ_f of the method's own forget term (None: the NLL's), for the scopes
    that rank by a gradient (they call it; the others never do)."""
    gradient = METHODS[arguments.method].scope_gradient
    if gradient is None:
        return None

    def compute():
        reference = frozen if frozen is not None else copy.deepcopy(model).eval()
        return gradient(model, task, forget, arguments, reference)

    return compute


def unlearn(
    model: nn.Module,
    task: Task,
    forget: Sequence[Any],
    retain: Sequence[Any],
    scope: Scope,
    arguments: UnlearnArguments | None = None,
    factors: Factors | None = None,
    progress: bool | None = None,
    *,
    frozen: nn.Module | None = None,
    criterion: Criterion | None = None,
) -> UnlearnResult:
    """Unlearn ``forget`` in place, editing only ``scope``; returns the loss history.

    ``frozen``: an unmodified copy of the original model, for methods that compare with it;
    ``criterion``: a calibrated stop for the masked loop (not for the Newton step).
    """
    arguments = arguments or UnlearnArguments()
    check_sets(forget, retain)
    scope.check_fits(model)
    if scope.edited == 0:
        raise InputError("the scope is empty: no parameter may change")
    if METHODS[arguments.method].loss is None:
        if criterion is not None:
            raise InputError("the calibrated stop is for the masked loop, not the newton step")
        return newton_unlearn(model, task, forget, retain, scope, arguments, factors, progress)
    return optimize(model, task, forget, retain, scope, arguments, frozen, progress, criterion)


def check_sets(forget: Sequence[Any], retain: Sequence[Any]) -> None:
    """Refuse an empty forget or retain set, or a forget set equal to the retain set."""
    if len(forget) == 0:
        raise InputError("the forget set is empty")
    if len(retain) == 0:
        raise InputError("the retain set is empty")
    if len(forget) == len(retain) and _content(forget) == _content(retain):
        raise InputError("the forget and retain sets are identical; nothing can be kept")


def _content(records: Sequence[Any]) -> list[str]:
    return sorted(repr(sorted(r.items())) if isinstance(r, Mapping) else repr(r) for r in records)
