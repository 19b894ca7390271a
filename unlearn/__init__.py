"""unlearn: remove a forget set by editing only the parameters tied to it.

A scope (:class:`Scope`, boolean masks per parameter) is chosen by attribution
(:func:`choose_scope`: EK-FAC Newton-direction influence, WAGLE, saliency, magnitude,
random, all); an objective (gradient ascent, gradient difference, KL, NPO, SimNPO, IDK,
RMU) is minimised by one masked loop, or a scoped EK-FAC Newton step is taken
(:func:`unlearn`); :func:`scope_proof` lists a hash per tensor before and after.

>>> from unlearn import ScopeArguments, UnlearnArguments
>>> ScopeArguments(method="wagle", sparsity=0.05).method, UnlearnArguments().method
('wagle', 'npo')
"""

from unlearn.importance import choose_scope, mean_gradient, newton_direction
from unlearn.loop import METHODS, UnlearnArguments, UnlearnResult, check_sets, measure, unlearn
from unlearn.objectives import (
    gradient_ascent_loss,
    gradient_difference_loss,
    idk_loss,
    kl_loss,
    npo_loss,
    rmu_loss,
    simnpo_loss,
    token_kl,
)
from unlearn.optimizer import MaskedAdamW
from unlearn.proof import ScopeViolation, check_proof, scope_proof, state_hashes
from unlearn.scope import SCOPES, Scope, ScopeArguments, full_scope, mask_from_scores

__all__ = [
    # scope
    "SCOPES",
    "Scope",
    "ScopeArguments",
    "choose_scope",
    "full_scope",
    "mask_from_scores",
    # unlearning
    "METHODS",
    "MaskedAdamW",
    "UnlearnArguments",
    "UnlearnResult",
    "check_sets",
    "measure",
    "mean_gradient",
    "newton_direction",
    "unlearn",
    # objectives
    "gradient_ascent_loss",
    "gradient_difference_loss",
    "idk_loss",
    "kl_loss",
    "npo_loss",
    "rmu_loss",
    "simnpo_loss",
    "token_kl",
    # proof
    "ScopeViolation",
    "check_proof",
    "scope_proof",
    "state_hashes",
]
