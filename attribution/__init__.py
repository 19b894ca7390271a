"""attribution: which training data and which parameters are responsible for a behaviour.

The task contract (:class:`LanguageModelingTask`), per-example gradients of tracked
modules (vectorized hooks for ``nn.Linear`` and ``Conv1D``, a ``torch.func`` reference),
curvature factors (identity, diagonal, K-FAC, EK-FAC) with their damped inverse, the
factor and score stores on disk, and influence scores (pairwise, self, per module, per
token, top-k).

>>> from attribution import FactorArguments
>>> FactorArguments(strategy="kfac", fisher="empirical").strategy
'kfac'
"""

from attribution.curvature import FactorArguments, Factors, fit_factors
from attribution.data import IGNORE_INDEX, collate, encode_record, pad_token_id
from attribution.errors import FactorMismatchError, InputError, ModuleSelectionError, NonFiniteError
from attribution.fingerprint import model_fingerprint, tensor_hashes
from attribution.gradients import per_example_gradients, per_example_gradients_func
from attribution.influence import (
    ScoreArguments,
    Scores,
    pairwise_scores,
    precondition_queries,
    self_scores,
    stored_pairwise_scores,
    top_k,
)
from attribution.modules import select_modules
from attribution.store import FactorStore
from attribution.task import LanguageModelingTask, Task

__all__ = [
    # the task
    "LanguageModelingTask",
    "Task",
    # gradients and curvature
    "FactorArguments",
    "FactorStore",
    "Factors",
    "fit_factors",
    "per_example_gradients",
    "per_example_gradients_func",
    "select_modules",
    # influence
    "ScoreArguments",
    "Scores",
    "pairwise_scores",
    "precondition_queries",
    "self_scores",
    "stored_pairwise_scores",
    "top_k",
    # data and identity
    "IGNORE_INDEX",
    "collate",
    "encode_record",
    "model_fingerprint",
    "pad_token_id",
    "tensor_hashes",
    # errors
    "FactorMismatchError",
    "InputError",
    "ModuleSelectionError",
    "NonFiniteError",
]
