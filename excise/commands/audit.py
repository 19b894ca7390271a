"""``excise audit``: compare a model before and after unlearning; write the audit report.

Reads two (or three, with ``--reference``) local model folders and the split files, checks
everything, runs :func:`analysis.audit.audit` and writes (atomically; no input is touched)::

    OUT/report.json   every number (schema excise-audit/1)
    OUT/report.html   one self-contained page with the plots
    OUT/report.md     the headline table, for the terminal

Without a reference model (retrained without the forget set) forget quality and privleak
are marked unavailable in the report; without a holdout split, membership inference is.
An ``OUT`` that holds an earlier audit is replaced; any other non-empty folder is refused.

:func:`load_splits`, :func:`load_audit_models` and :func:`audit_models` are the steps of
:func:`run`, reused by ``excise forget`` to audit the models it holds in memory.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from analysis.audit import SPLITS, audit, check_same_architecture, check_same_tokenizer
from analysis.relearning import LEARNING_RATE, STEPS
from analysis.report import ReportPaths, write_report
from analysis.truth import DEFAULT_QUESTION
from attribution.artifacts import (
    atomic_directory,
    check_output_folder,
    sha256_file,
)
from attribution.task import LanguageModelingTask
from excise.context import check_fits_context, model_context
from excise.errors import BadInputError
from excise.models import check_model_folder, choose_device, load_model
from excise.outputs import check_apart
from excise.records import read_records

KIND = "audit"
ROLES = ("before", "after", "reference")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Validate everything, then audit and write OUT; returns the report, paths and OUT."""
    check_numbers(args.batch_size, args.relearn_steps, args.relearn_lr)
    folders = {"before": args.before, "after": args.after, "reference": args.reference}
    folders = {role: check_model_folder(path) for role, path in folders.items() if path}
    files = {split: getattr(args, split) for split in SPLITS if getattr(args, split, None)}
    splits, hashes = load_splits(files)
    out = check_new_output(args.out, [*folders.values(), *map(Path, files.values())])
    device = choose_device(args.device)
    models, tokenizer = load_audit_models(folders, device)
    check_fits_context(splits, tokenizer, model_context(models["before"]))
    started = time.perf_counter()
    with atomic_directory(out, KIND) as folder:
        report, _ = audit_models(
            models["before"],
            models["after"],
            tokenizer,
            splits,
            models.get("reference"),
            out=folder,
            paths={role: str(path) for role, path in folders.items()},
            split_hashes=hashes,
            relearn_steps=args.relearn_steps,
            relearn_lr=args.relearn_lr,
            seed=args.seed,
            batch_size=args.batch_size,
            progress=False if args.quiet else None,
            truth_question=args.truth_question,
        )
    paths = ReportPaths(out / "report.json", out / "report.html", out / "report.md")
    return {
        "report": report,
        "paths": paths,
        "out": str(out),
        "seconds": round(time.perf_counter() - started, 3),
    }


def audit_models(
    before: Any,
    after: Any,
    tokenizer: Any,
    splits: Mapping[str, list[dict[str, Any]]],
    reference: Any = None,
    *,
    out: str | Path | None = None,
    paths: Mapping[str, str | None] | None = None,
    split_hashes: Mapping[str, str | None] | None = None,
    relearn_steps: int = STEPS,
    relearn_lr: float = LEARNING_RATE,
    seed: int = 0,
    batch_size: int = 32,
    fingerprints: Mapping[str, str] | None = None,
    progress: bool | None = None,
    truth_question: str = DEFAULT_QUESTION,
) -> tuple[dict[str, Any], ReportPaths | None]:
    """Audit in-memory models; with ``out``, write report.json/html/md into that folder.

    Records are scored as a causal LM's completions (``LanguageModelingTask(tokenizer)``).

    ``out`` is written in place (each file atomically): a caller that wants the whole
    folder to appear at once builds it inside :func:`attribution.artifacts.atomic_directory`,
    as :func:`run` does. The models are not modified (relearning works on a copy).
    """
    check_numbers(batch_size, relearn_steps, relearn_lr)
    report = audit(
        before,
        after,
        LanguageModelingTask(tokenizer),
        splits,
        reference,
        paths=paths,
        split_hashes=split_hashes,
        relearn_steps=relearn_steps,
        relearn_lr=relearn_lr,
        seed=seed,
        batch_size=batch_size,
        fingerprints=fingerprints,
        progress=progress,
        truth_question=truth_question,
    )
    written = write_report(report, out) if out is not None else None
    return report, written


def load_splits(
    files: Mapping[str, str | Path],
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str | None]]:
    """``(records by split, sha256 by split)`` from split name → file or datasets folder.

    Forget and retain are required; every file must hold at least one record. A
    ``save_to_disk`` folder has no single file to hash: its sha256 is ``None``.
    """
    unknown = sorted(set(files) - set(SPLITS))
    if unknown:
        raise BadInputError(f"unknown split(s) {unknown}; the audit knows {list(SPLITS)}")
    missing = [s for s in ("forget", "retain") if s not in files]
    if missing:
        raise BadInputError(f"the audit needs --{' and --'.join(missing)}")
    records, hashes = {}, {}
    for split in SPLITS:
        if split in files:
            path = Path(files[split])
            records[split] = read_records(path)
            hashes[split] = sha256_file(path) if path.is_file() else None
    return records, hashes


def load_audit_models(
    folders: Mapping[str, str | Path], device: Any = "cpu"
) -> tuple[dict[str, Any], Any]:
    """``({role: model}, tokenizer)`` from role → folder ("before" required), on ``device``.

    Every model must share the before model's architecture and tokenizer; a mismatch
    raises an :class:`~attribution.errors.InputError` naming the two roles.
    """
    if "before" not in folders:
        raise BadInputError("the audit needs the model before unlearning (--before)")
    models, tokenizers = {}, {}
    for role in ROLES:
        if folders.get(role) is not None:
            models[role], tokenizers[role] = load_model(folders[role])
    for role in models:
        if role != "before":
            check_same_tokenizer(tokenizers["before"], tokenizers[role], ("before", role))
            check_same_architecture(models["before"], models[role], ("before", role))
    for model in models.values():
        model.to(device)
    return models, tokenizers["before"]


def check_numbers(batch_size: int, relearn_steps: int, relearn_lr: float) -> None:
    """Refuse a batch size below 1, negative relearning steps or a non-positive rate."""
    if batch_size < 1:
        raise BadInputError(f"--batch-size must be at least 1, got {batch_size}")
    if relearn_steps < 0:
        raise BadInputError(
            f"--relearn-steps must be 0 (no relearning) or more, got {relearn_steps}"
        )
    if not relearn_lr > 0:
        raise BadInputError(f"--relearn-lr must be positive, got {relearn_lr}")


def check_new_output(path: str | Path, inputs: Iterable[Path]) -> Path:
    """An --out apart from every input, empty or holding an earlier audit (then replaced)."""
    out = check_apart(path, inputs)
    check_output_folder(out, KIND)
    return out
