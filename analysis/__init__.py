"""analysis: what changed — forget and utility metrics, knowledge shift, audit reports.

:func:`audit` compares a model before and after unlearning (and, optionally, a reference
model retrained without the forget set) on the forget, retain, neighbor, world and holdout
splits, and returns one plain dict of schema ``excise-audit/1``: TOFU's probability,
ROUGE-L recall, truth ratio, forget quality and model utility; exact memorization and
extraction strength; membership inference (LOSS, zlib, Min-K%, Min-K%++, privleak);
knowledge shift with bootstrap intervals; per-tensor parameter change; relearning
robustness. :func:`write_report` renders it as ``report.json``, a self-contained
``report.html`` and ``report.md``. :class:`Ledger` is the append-only, hash-chained SQLite
record of the deletion requests processed. Each metric is also a function of its own
module (:mod:`analysis.rouge`, :mod:`analysis.memorization`, :mod:`analysis.relearning` ...).

>>> from analysis import harmonic_mean, privleak
>>> harmonic_mean([0.5, 1.0]), privleak(0.75, 0.5)
(0.6666666666666666, -50.0)
"""

from analysis.audit import AuditInputError, audit
from analysis.ledger import Ledger, LedgerEntry
from analysis.membership import membership_inference, privleak
from analysis.report import write_report
from analysis.scoring import score_completions
from analysis.shift import knowledge_shift
from analysis.truth import forget_quality, truth_ratio
from analysis.utility import harmonic_mean, model_utility

__all__ = [
    # the audit and its report
    "audit",
    "write_report",
    "AuditInputError",
    # the deletion ledger
    "Ledger",
    "LedgerEntry",
    # metrics (every other metric is a function of its module)
    "score_completions",
    "truth_ratio",
    "forget_quality",
    "model_utility",
    "harmonic_mean",
    "membership_inference",
    "privleak",
    "knowledge_shift",
]
