"""analysis: what changed — forget and utility metrics, knowledge shift, audit reports.

This release holds teacher-forced completion scoring (:mod:`analysis.scoring`), the
building block of the metrics; the rest arrives with the audit issue.
"""

from analysis.scoring import CompletionScores, score_completions

__all__ = ["CompletionScores", "score_completions"]
