"""The audit: every metric of a before/after (and optional reference) comparison, as one dict.

:func:`audit` runs the metrics on each model and split and returns the report of schema
``excise-audit/1`` — a plain JSON-serialisable dict (Python floats, lists, None) that
:mod:`analysis.report` renders. Its sections:

- ``metrics[split][role]``: probability, ROUGE-L recall, truth ratio, exact memorization
  and extraction strength (each ``{"value", "per_example"}``) on forget, retain, neighbor
  and world, for the models before and after unlearning and the reference model;
- ``forget_quality[role]``: KS test of forget truth ratios against the reference model;
- ``model_utility[role]``: harmonic mean of the utility components (retain and world);
- ``membership``: LOSS, zlib, Min-K%, Min-K%++ on forget (members) vs holdout, ROC AUC and
  curve per model, and MUSE's privleak against the reference model;
- ``shift[split]``: per-record change in answer log-probability and token KL from before to
  after, with bootstrap intervals and the most shifted records;
- ``parameters``: per-tensor change (count, fraction, L2, bit-identical);
- ``relearning``: how much of the forget set a few fine-tuning steps bring back;
- ``headline``: the numbers a reader looks at first;
- ``warnings``: what about the inputs a reader should know (forget records that another
  split also holds), one sentence each;
- ``definitions``: how the numbers are defined where the field's tools differ (which
  question the truth ratio uses, ROUGE, end of sequence, k, zlib, privleak, utility);
- ``seconds``: wall-clock seconds of the audit's stages.

Every record is batched and scored through one :class:`~attribution.task.Task`
(``task.collate`` and ``task.token_scores``; :mod:`analysis.scoring`), so a custom task
changes every metric alike; ROUGE-L generates with the task's ``tokenizer`` and is marked
unavailable when it has none. The models are used on their own devices, in eval mode (their
train/eval flags are restored afterwards), and never modified; relearning fine-tunes a deep
copy. Inputs are checked
first: :class:`AuditInputError` (an :class:`attribution.errors.InputError`) says what is
wrong — a missing or empty split, a record with neither prompt/completion nor text, or
models of different architectures.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from analysis.calibration import split_truth_ratios, stranger_null
from analysis.membership import (
    MIN_K,
    PRIVLEAK_ATTACK,
    answer_texts,
    attack_results,
    attack_scores,
    privleak_by_attack,
)
from analysis.memorization import TokenStatistics, token_statistics
from analysis.metrics import check_metric_names, split_metrics
from analysis.relearning import LEARNING_RATE, STEPS, relearning_robustness
from analysis.shift import N_RESAMPLES, knowledge_shift, parameter_change
from analysis.truth import (
    DEFAULT_QUESTION,
    QUESTIONS,
    forget_quality,
    forget_quality_unavailable,
    truth_ratio_fields_missing,
)
from analysis.utility import model_utility
from attribution.artifacts import package_version, utc_timestamp
from attribution.data import shared_records
from attribution.errors import InputError
from attribution.fingerprint import model_fingerprint
from attribution.progress import evaluating
from attribution.task import Task

SCHEMA = "excise-audit/1"
REQUIRED_SPLITS = ("forget", "retain")
SPLITS = ("forget", "retain", "neighbor", "real_authors", "world", "holdout")
METRIC_SPLITS = ("forget", "retain", "neighbor", "real_authors", "world")
SHIFT_SPLITS = ("neighbor", "retain", "world", "forget")


class AuditInputError(InputError):
    """The inputs of an audit are wrong (the message says what and how to fix it)."""


class MissingSplitError(AuditInputError):
    """A required split (forget, retain) was not given."""


class UnknownSplitError(AuditInputError):
    """A split name the audit does not know."""


class EmptySplitError(AuditInputError):
    """A split holds no records."""


class BadRecordError(AuditInputError):
    """A record has neither ``prompt``/``completion`` strings nor a ``text`` string."""


class ArchitectureMismatchError(AuditInputError):
    """Two models do not share an architecture (config class, parameter names or shapes)."""


class TokenizerMismatchError(AuditInputError):
    """Two tokenizers do not map text to the same ids."""


def audit(
    before: nn.Module,
    after: nn.Module,
    task: Task,
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    reference: nn.Module | None = None,
    *,
    paths: Mapping[str, str | None] | None = None,
    split_hashes: Mapping[str, str | None] | None = None,
    relearn_steps: int = STEPS,
    relearn_lr: float = LEARNING_RATE,
    seed: int = 0,
    batch_size: int = 32,
    min_k: float = MIN_K,
    n_resamples: int = N_RESAMPLES,
    fingerprints: Mapping[str, str] | None = None,
    progress: bool | None = None,
    truth_question: str = DEFAULT_QUESTION,
    metrics: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The ``excise-audit/1`` report of ``after`` (unlearned) against ``before`` (original).

    ``task`` says how records are batched and scored (``LanguageModelingTask(tokenizer)``
    for a Hugging Face causal LM; ROUGE-L needs its ``tokenizer``). ``splits`` maps names
    (forget and retain required; neighbor, world, holdout optional) to records;
    ``reference`` is the model retrained without the forget set (forget quality and
    privleak need it); ``paths`` (role → folder) and ``split_hashes`` (split → sha256) are
    recorded as given; ``fingerprints`` (role → fingerprint) spares hashing a model whose
    fingerprint the caller has. ``seed`` drives the bootstrap and relearning.
    ``truth_question``: the question the truth ratio's answers are scored after
    (``original``, TOFU's, or ``paraphrased``; :mod:`analysis.truth`). ``metrics``: the
    per-split metrics to compute (names of :data:`analysis.metrics.METRICS`; default all;
    the others are reported unavailable, "not selected").
    """
    splits = check_splits(splits)
    models = _check_models(before, after, reference)
    if truth_question not in QUESTIONS:
        raise AuditInputError(f"truth_question must be one of {QUESTIONS}, got {truth_question!r}")
    try:
        metrics = check_metric_names(metrics)
    except InputError as error:
        raise AuditInputError(str(error)) from None
    options = {"batch_size": batch_size, "progress": progress}
    seconds: dict[str, float] = {}
    timed = _Stopwatch(seconds)
    with evaluating(*models.values()):
        with timed("metrics per model and split"):
            roles = {
                r: _role_metrics(
                    m, task, splits, question=truth_question, metrics=metrics, **options
                )
                for r, m in models.items()
            }
        report = {
            "schema": SCHEMA,
            "excise_version": package_version(),
            "created_utc": utc_timestamp(),
            "models": _models_section(models, paths or {}, fingerprints or {}),
            "splits": {
                s: {"n": len(r), "sha256": (split_hashes or {}).get(s)} for s, r in splits.items()
            },
            "warnings": overlap_warnings(splits),
            "metrics": {
                s: {r: roles[r].metrics[s] for r in roles} for s in METRIC_SPLITS if s in splits
            },
            "forget_quality": _forget_quality_section(roles),
            "model_utility": {r: model_utility(roles[r].metrics) for r in roles},
            "membership": _membership_section(roles, splits, task, min_k),
        }
        with timed("perfect-stranger null"):
            report["forget_quality_null"] = _null_section(
                before, task, splits, roles, seed, batch_size, truth_question
            )
        with timed("knowledge shift"):
            report["shift"] = {
                s: knowledge_shift(
                    before, after, task, splits[s], seed=seed, n_resamples=n_resamples, **options
                )
                for s in SHIFT_SPLITS
                if s in splits
            }
        with timed("parameter change"):
            report["parameters"] = parameter_change(
                dict(before.named_parameters()), dict(after.named_parameters())
            )
        with timed("relearning"):
            report["relearning"] = relearning_robustness(
                before,
                after,
                task,
                splits["forget"],
                steps=relearn_steps,
                lr=relearn_lr,
                seed=seed,
                **options,
            )
    report["definitions"] = definitions(truth_question, min_k, report["model_utility"])
    report["seconds"] = seconds
    report["headline"] = headline(report)
    return report


class _Stopwatch:
    """``with timed("stage"):`` adds the stage's wall-clock seconds to a dict."""

    def __init__(self, seconds: dict[str, float]):
        self.seconds = seconds

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = round(time.perf_counter() - start, 3)


def definitions(
    truth_question: str, min_k: float, utility: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """How the report's numbers are defined where the field's tools differ (the report
    states them, so a figure can be put beside TOFU's, MUSE's or open-unlearning's)."""
    return {
        "truth_ratio_question": truth_question,
        "rouge": "rouge_score's ROUGE-L recall with its Porter stemmer (TOFU, open-unlearning)",
        "end_of_sequence": "left out of exact memorization, extraction strength, Min-K% and "
        "Min-K%++ (open-unlearning); kept in the probability",
        "min_k": min_k,
        "zlib": "compressed length of the decoded answer tokens (open-unlearning)",
        "privleak": "MUSE's: ((1 - AUC) - (1 - AUC_ref)) / (1 - AUC_ref) x 100; headline: Min-K%",
        "model_utility": (utility.get("after") or {}).get("definition"),
    }


def _check_models(
    before: nn.Module, after: nn.Module, reference: nn.Module | None
) -> dict[str, nn.Module]:
    """The models by role, after checking that they share the before model's architecture."""
    models = {"before": before, "after": after}
    if reference is not None:
        models["reference"] = reference
    for role, model in models.items():
        if role != "before":
            check_same_architecture(before, model, ("before", role))
    return models


@dataclass
class _RoleResult:
    """One model's metrics per split, and the token statistics the attacks reuse."""

    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    stats: dict[str, TokenStatistics] = field(default_factory=dict)


def _role_metrics(
    model: nn.Module,
    task: Task,
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    batch_size: int,
    progress: bool | None,
    question: str = DEFAULT_QUESTION,
    metrics: Sequence[str] | None = None,
) -> _RoleResult:
    result = _RoleResult()
    for name, records in splits.items():
        stats = token_statistics(model, task, records, batch_size=batch_size, progress=progress)
        result.stats[name] = stats
        if name in METRIC_SPLITS:
            result.metrics[name] = split_metrics(
                model,
                task,
                name,
                records,
                stats=stats,
                batch_size=batch_size,
                progress=progress,
                question=question,
                metrics=metrics,
            )
    return result


def _models_section(
    models: Mapping[str, nn.Module],
    paths: Mapping[str, str | None],
    fingerprints: Mapping[str, str],
) -> dict[str, Any]:
    section: dict[str, Any] = {"reference": None}
    for role, model in models.items():
        path = paths.get(role)
        section[role] = {
            "path": None if path is None else str(path),
            "fingerprint": fingerprints.get(role) or model_fingerprint(model),
        }
    return section


def _null_section(before, task, splits, roles, seed, batch_size, question) -> dict[str, Any]:
    """The perfect-stranger null of D (:func:`analysis.calibration.stranger_null`): against
    the reference's forget truth ratios, or, with no reference, the original's on holdout."""
    if "holdout" not in splits:
        return {"available": False, "reason": "no holdout split (the strangers' names)"}
    after = roles["after"].metrics["forget"]["truth_ratio"]
    if not after.get("per_example"):
        return {"available": False, "reason": "no forget truth ratios"}
    if "reference" in roles:
        target, against = (
            roles["reference"].metrics["forget"]["truth_ratio"]["per_example"],
            "reference",
        )
    else:
        reason = truth_ratio_fields_missing(splits["holdout"])
        if reason is not None:
            return {"available": False, "reason": f"holdout: {reason}"}
        target = split_truth_ratios(before, task, splits["holdout"], batch_size, question)
        against = "holdout"
    null = stranger_null(
        before,
        task,
        splits["forget"],
        splits["holdout"],
        np.asarray(target, dtype=np.float64),
        np.asarray(after["per_example"], dtype=np.float64),
        seed=seed,
        batch_size=batch_size,
        question=question,
    )
    return {**null, "target": against}


def _forget_quality_section(roles: Mapping[str, _RoleResult]) -> dict[str, Any]:
    section = {}
    reference = roles.get("reference")
    for role in ("before", "after"):
        truth = roles[role].metrics["forget"]["truth_ratio"]
        n = len(truth["per_example"])
        if reference is None:
            section[role] = forget_quality_unavailable("no reference model", n)
        elif truth["value"] is None:
            section[role] = forget_quality_unavailable(f"no truth ratios: {truth['reason']}", n)
        else:
            ref = reference.metrics["forget"]["truth_ratio"]["per_example"]
            section[role] = forget_quality(truth["per_example"], ref)
    return section


def _membership_section(
    roles: Mapping[str, _RoleResult],
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    task: Task,
    k: float = MIN_K,
) -> dict[str, Any]:
    if "holdout" not in splits:
        return {"available": False, "reason": "no holdout split (non-members)", "privleak": None}
    section: dict[str, Any] = {"k": k}
    for role, result in roles.items():
        scores = [
            attack_scores(result.stats[s], answer_texts(task, splits[s], result.stats[s]), k)
            for s in ("forget", "holdout")
        ]
        section[role] = attack_results(*scores)
    section["privleak"] = (
        {r: privleak_by_attack(section[r], section["reference"]) for r in ("before", "after")}
        if "reference" in roles
        else None
    )
    section.update(available=True, reason=None)
    return section


def headline(report: Mapping[str, Any]) -> dict[str, Any]:
    """The first numbers a reader looks at, taken from the other sections."""
    forget = report["metrics"]["forget"]
    quality = report["forget_quality"]["after"]
    shift, parameters = report["shift"], report["parameters"]
    total = parameters["total_parameters"]
    null = report.get("forget_quality_null") or {}
    return {
        "forget_quality": quality["p_value"] if quality["available"] else None,
        "forget_probability_before": forget["before"]["probability"]["value"],
        "forget_probability_after": forget["after"]["probability"]["value"],
        "forget_probability_reference": (
            forget["reference"]["probability"]["value"] if "reference" in forget else None
        ),
        "model_utility_before": report["model_utility"]["before"]["value"],
        "model_utility_after": report["model_utility"]["after"]["value"],
        "neighbor_log_prob_change": (
            shift["neighbor"]["log_prob_change"]["mean"] if "neighbor" in shift else None
        ),
        "retain_log_prob_change": shift["retain"]["log_prob_change"]["mean"],
        "changed_parameters_fraction": parameters["changed_parameters"] / total if total else 0.0,
        "identical_tensors": parameters["identical_tensors"],
        "total_tensors": parameters["total_tensors"],
        "forget_quality_d": null.get("after_d"),
        "forget_quality_null_p90": null.get("p90"),
        "privleak": _privleak_headline(report["membership"]),
    }


def _privleak_headline(membership: Mapping[str, Any]) -> float | None:
    """MUSE's number: privleak of the unlearned model, Min-K% attack."""
    privleak = membership.get("privleak") or {}
    return (privleak.get("after") or {}).get(PRIVLEAK_ATTACK)


def check_splits(
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
) -> dict[str, list[Mapping[str, Any]]]:
    """The splits as lists, in the audit's order, after checking names, sizes and records."""
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise UnknownSplitError(f"unknown split(s) {unknown}; the audit knows {list(SPLITS)}")
    missing = [s for s in REQUIRED_SPLITS if s not in splits]
    if missing:
        raise MissingSplitError(f"the audit needs the {' and '.join(missing)} split(s); none given")
    checked = {}
    for name in SPLITS:
        if name not in splits:
            continue
        records = list(splits[name])
        if not records:
            raise EmptySplitError(f"the {name} split has no records; give at least one")
        for index, record in enumerate(records):
            _check_record(record, f"{name} split, record {index}")
        checked[name] = records
    return checked


def _check_record(record: Any, where: str) -> None:
    if not isinstance(record, Mapping):
        raise BadRecordError(f"{where}: expected a mapping, got {type(record).__name__}")
    has_pair = isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str)
    if not (has_pair or isinstance(record.get("text"), str)):
        raise BadRecordError(f"{where}: needs prompt and completion strings, or a text string")


def check_same_architecture(
    first: nn.Module, second: nn.Module, names: tuple[str, str] = ("first", "second")
) -> None:
    """Raise :class:`ArchitectureMismatchError` unless config class, names and shapes agree.

    >>> check_same_architecture(nn.Linear(2, 3), nn.Linear(2, 3))
    >>> try:
    ...     check_same_architecture(nn.Linear(2, 3), nn.Linear(3, 3))
    ... except ArchitectureMismatchError as err:
    ...     print(err)  # doctest: +ELLIPSIS
    the first and second models differ: parameter weight has shape (3, 2) vs (3, 3); ...
    """
    a, b = names
    hint = "compare two versions of the same model"
    config_a, config_b = getattr(first, "config", None), getattr(second, "config", None)
    if type(config_a) is not type(config_b):
        kinds = f"{type(config_a).__name__} vs {type(config_b).__name__}"
        raise ArchitectureMismatchError(f"the {a} and {b} models differ: config {kinds}; {hint}")
    shapes_a = {n: tuple(p.shape) for n, p in first.named_parameters()}
    shapes_b = {n: tuple(p.shape) for n, p in second.named_parameters()}
    only = sorted(set(shapes_a) ^ set(shapes_b))
    if only:
        raise ArchitectureMismatchError(
            f"the {a} and {b} models differ: parameter {only[0]} is in one only "
            f"({len(only)} such); {hint}"
        )
    for name, shape in shapes_a.items():
        if shape != shapes_b[name]:
            raise ArchitectureMismatchError(
                f"the {a} and {b} models differ: parameter {name} has shape {shape} vs "
                f"{shapes_b[name]}; {hint}"
            )


def overlap_warnings(splits: Mapping[str, Sequence[Any]]) -> list[str]:
    """One sentence per split that holds some of the forget records (the same text).

    >>> splits = {"forget": [{"id": "a", "text": "x"}], "retain": [{"id": "b", "text": "x"}]}
    >>> overlap_warnings(splits)[0][:65]
    "1 of the 1 forget records are also in the retain split (e.g. 'a')"
    """
    forget, sentences = splits["forget"], []
    for name, records in splits.items():
        shared = shared_records(forget, records) if name != "forget" else []
        if shared:
            why = OVERLAP_MEANS.get(name, "its figures mix the two")
            sentences.append(
                f"{len(shared)} of the {len(forget)} forget records are also in the {name} "
                f"split (e.g. {shared[0]!r}): {why}"
            )
    return sentences


OVERLAP_MEANS = {
    "retain": "they are asked to be forgotten and kept at once",
    "holdout": "membership inference counts them as never trained on",
}


def check_same_tokenizer(
    first: Any, second: Any, names: tuple[str, str] = ("first", "second")
) -> None:
    """Raise :class:`TokenizerMismatchError` unless vocabularies and special ids agree."""
    a, b = names
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        if getattr(first, attr, None) != getattr(second, attr, None):
            raise TokenizerMismatchError(
                f"the {a} and {b} tokenizers differ ({attr} {getattr(first, attr, None)} vs "
                f"{getattr(second, attr, None)}); both models must use the same tokenizer"
            )
    if first.get_vocab() != second.get_vocab():
        raise TokenizerMismatchError(
            f"the {a} and {b} tokenizers have different vocabularies "
            f"({len(first.get_vocab())} vs {len(second.get_vocab())} tokens); both models "
            "must use the same tokenizer"
        )
