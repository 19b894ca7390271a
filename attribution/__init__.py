"""attribution: which training data and which parameters are responsible for a behaviour.

The task contract (:class:`Task`, :class:`LanguageModelingTask`: loss, measurement and
per-token scores of a batch), curvature factors (identity, diagonal, K-FAC, EK-FAC) with
their damped inverse (:class:`Damping`), and influence scores (pairwise, self, per module,
per token, top-k), and a gradient index of a training set for repeated queries
(:mod:`attribution.index`). Everything else stays importable from its module: per-example
gradients (:mod:`attribution.gradients`), the stores on disk (:mod:`attribution.store`),
fingerprints (:mod:`attribution.fingerprint`), errors (:mod:`attribution.errors`) ...

>>> from attribution import FactorArguments
>>> FactorArguments(strategy="kfac", fisher="empirical").strategy
'kfac'
"""

from attribution.curvature import Damping, FactorArguments, Factors, fit_factors
from attribution.errors import InputError
from attribution.gradients import per_example_gradients
from attribution.index import Index, IndexArguments, build_index, index_scores
from attribution.influence import (
    ScoreArguments,
    Scores,
    pairwise_scores,
    self_scores,
    stored_pairwise_scores,
    top_k,
)
from attribution.modules import select_modules
from attribution.task import LanguageModelingTask, Task, TokenScores

__all__ = [
    # the task
    "LanguageModelingTask",
    "Task",
    "TokenScores",
    # curvature
    "Damping",
    "FactorArguments",
    "Factors",
    "fit_factors",
    "per_example_gradients",
    "select_modules",
    # influence
    "ScoreArguments",
    "Scores",
    "pairwise_scores",
    "self_scores",
    "stored_pairwise_scores",
    "top_k",
    # a gradient index for repeated queries
    "Index",
    "IndexArguments",
    "build_index",
    "index_scores",
    # errors
    "InputError",
]
