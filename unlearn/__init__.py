"""unlearn: remove a forget set by editing only the parameters tied to it.

A scope (:class:`Scope`, boolean masks per parameter) is chosen by attribution
(:func:`choose_scope`: EK-FAC Newton-direction influence, WAGLE, saliency, magnitude,
random, all); a method of :data:`METHODS` (gradient ascent, gradient difference, KL, NPO,
SimNPO, IDK, RMU, a scoped EK-FAC Newton step) is run inside it (:func:`unlearn`), and
:func:`scoped_edit` does all of it — hash, scope, unlearn, proof — as one call.

>>> from unlearn import ScopeArguments, UnlearnArguments
>>> ScopeArguments(method="wagle", sparsity=0.05).method, UnlearnArguments().method
('wagle', 'npo')

Everything else stays importable from its module (:mod:`unlearn.objectives`,
:mod:`unlearn.importance`, :mod:`unlearn.proof`, :mod:`unlearn.optimizer` ...).
"""

from unlearn.arguments import UnlearnArguments
from unlearn.edit import ScopedEdit, check_sets, scoped_edit, unlearn
from unlearn.importance import choose_scope
from unlearn.methods import METHODS, Method
from unlearn.monitor import UnlearnResult, measure
from unlearn.proof import ScopeViolation
from unlearn.scope import SCOPES, Scope, ScopeArguments

__all__ = [
    # the edit
    "ScopedEdit",
    "scoped_edit",
    "unlearn",
    "UnlearnArguments",
    "UnlearnResult",
    "check_sets",
    "measure",
    # scope
    "SCOPES",
    "Scope",
    "ScopeArguments",
    "choose_scope",
    # methods
    "METHODS",
    "Method",
    # proof
    "ScopeViolation",
]
