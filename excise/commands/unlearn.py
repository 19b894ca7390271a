"""``excise unlearn``: choose a scope, unlearn inside it, write a new model and the proof.

Writes (atomically; the input model folder is never touched)::

    OUT/model/            a Hugging Face folder (config, safetensors, tokenizer)
    OUT/scope.safetensors the mask per parameter (uint8)
    OUT/manifest.json     method, arguments, seed, input hashes, edited parameters per
                          tensor and layer, the loss history, and a hash per tensor
                          before/after proving every out-of-scope tensor unchanged
    OUT/factors/          the EK-FAC factors, when they were fitted here
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from torch import nn

from analysis.audit import overlap_warnings
from analysis.calibration import TruthRatioMatch
from attribution import FactorArguments, Factors, LanguageModelingTask, fit_factors
from attribution.artifacts import (
    package_version,
    sha256_file,
    utc_timestamp,
    write_json,
)
from attribution.curvature import Damping
from attribution.data import subject_pool
from attribution.distributed import current_shard
from attribution.precision import as_stored
from excise.context import check_fits_context, model_context
from excise.errors import BadInputError, warn
from excise.models import (
    check_model_folder,
    choose_device,
    load_model,
    no_transformers_progress_bars,
)
from excise.options import DAMPING_OPTIONS, FACTOR_FIELDS, add_options, from_options
from excise.outputs import check_new_output, output_folder
from excise.recipes import BY_METHOD, RECIPE_FIELDS, default_help, settings
from excise.records import read_records
from excise.streaming import joined, open_records
from unlearn import (
    METHODS,
    ScopeArguments,
    ScopedEdit,
    UnlearnArguments,
    check_sets,
    measure,
    scoped_edit,
)
from unlearn.stranger import infer_subjects

KIND = "unlearning"
MANIFEST_SCHEMA = "excise-unlearn/1"


@dataclass(frozen=True)
class EditOptions:
    """The library argument objects of one edit, built once from the command line."""

    scope: ScopeArguments
    unlearn: UnlearnArguments
    factors: FactorArguments


def add_edit_options(parser: argparse.ArgumentParser) -> None:
    """Options from ScopeArguments, UnlearnArguments, Damping and FactorArguments' fields;
    the method and its recipe's settings default to :mod:`excise.recipes`."""
    add_options(
        parser,
        UnlearnArguments,
        "unlearn",
        skip=("seed",),
        defaults=dict.fromkeys(RECIPE_FIELDS, BY_METHOD),
        helps={"method": f"the unlearning objective ({default_help()})"},  # data-dependent
    )
    add_options(parser, ScopeArguments, "scope", names={"method": "--scope"}, skip=("seed",))
    add_options(parser, Damping, "damping", names=DAMPING_OPTIONS)
    skip = tuple(f.name for f in fields(FactorArguments) if f.name not in FACTOR_FIELDS)
    add_options(parser, FactorArguments, "factors", skip=skip)


def arguments_from(
    args: argparse.Namespace, has_holdout: bool, note: Callable[[str], None] = lambda _: None
) -> EditOptions:
    """The library argument objects (validated: bad values fail before any work); unset
    unlearning options come from the method's recipe (:mod:`excise.recipes`)."""
    damping = from_options(Damping, args, "damping")
    given = {
        f.name: getattr(args, f"unlearn.{f.name}")
        for f in fields(UnlearnArguments)
        if hasattr(args, f"unlearn.{f.name}")
    }
    chosen, message = settings(given, has_holdout)
    if message:
        note(message)
    return EditOptions(
        scope=from_options(ScopeArguments, args, "scope", seed=args.seed, damping=damping),
        unlearn=UnlearnArguments(**chosen, seed=args.seed, damping=damping),
        factors=from_options(FactorArguments, args, "factors", seed=args.seed),
    )


def with_strangers(
    options: EditOptions,
    holdout: list[dict] | None,
    forget: list[dict],
    note: Callable[[str], None] = lambda _: None,
) -> tuple[EditOptions, list[dict]]:
    """For ``distill``: the options with the stranger pool (the holdout's subjects), and the
    forget records, with subjects inferred from the holdout prompts when none names one."""
    if options.unlearn.method != "distill":
        return options, forget
    if holdout is None:
        raise BadInputError(
            "--method distill needs --holdout FILE: records whose subjects the model never "
            "saw, to ask the original model about a stranger"
        )
    pool = subject_pool(holdout)
    if not subject_pool(forget):
        inferred = infer_subjects(forget, holdout)
        if not inferred.found:
            raise BadInputError(
                "--method distill: no forget record names a 'subject', and none differs from "
                "a --holdout prompt by a name alone; add 'subject' fields (the name as written)"
            )
        note(inferred.describe())
        forget, pool = inferred.records, inferred.strangers
    if not pool:
        raise BadInputError("--holdout: no record names a 'subject'; the name pool is empty")
    unlearn = dataclasses.replace(options.unlearn, strangers=pool)
    return dataclasses.replace(options, unlearn=unlearn), forget


def run(args: argparse.Namespace, note: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Validate everything, then unlearn and write OUT; returns the manifest."""
    options = arguments_from(args, has_holdout=args.holdout is not None, note=note)
    model_dir = check_model_folder(args.model)
    forget, retain = read_records(args.forget), open_records(args.retain)  # retain: lazy if large
    check_sets(forget, retain)
    warnings = overlap_warnings({"forget": forget, "retain": retain})
    holdout = read_records(args.holdout) if args.holdout else None
    options, forget = with_strangers(options, holdout, forget, note)
    inputs = [model_dir, Path(args.forget), Path(args.retain)]
    out = check_new_output(args.out, inputs + ([Path(args.holdout)] if holdout else []))
    device = choose_device(args.device)
    model, tokenizer = load_model(model_dir)
    sets = {"forget": forget, "retain": retain, **({"holdout": holdout} if holdout else {})}
    check_fits_context(sets, tokenizer, model_context(model))
    model.to(device)
    factors = Factors.load(args.factors, model) if args.factors else None
    reference = check_model_folder(args.reference) if args.reference else None
    reference_model = load_model(reference)[0].to(device) if reference else None
    progress = False if args.quiet else None
    warn(note, warnings)  # once every input is checked
    started = time.perf_counter()
    with output_folder(out, KIND) as folder:  # under torchrun: rank 0 writes
        edit = edit_model(
            model,
            LanguageModelingTask(tokenizer),
            forget,
            retain,
            options,
            factors=factors,
            factor_folder=folder / "factors",
            reference=reference_model,
            holdout=holdout,
            progress=progress,
        )
        inputs = {
            "model": {"path": str(model_dir), "fingerprint": edit.fingerprint_before},
            "forget": _file_entry(args.forget, len(forget)),
            "retain": _file_entry(args.retain, len(retain)),
            "factors": str(args.factors) if args.factors else None,
            "reference": str(reference) if reference else None,
        }
        manifest = manifest_of(edit, inputs, args.seed, started, warnings)
        if current_shard().is_main:
            write_outputs(folder, model, tokenizer, edit, manifest)
    manifest["out"] = str(out)
    return manifest


def edit_model(
    model: nn.Module,
    task: LanguageModelingTask,
    forget: list,
    retain: list,
    options: EditOptions,
    factors: Factors | None = None,
    factor_folder: Path | None = None,
    reference: nn.Module | None = None,
    frozen: nn.Module | None = None,
    before: dict[str, str] | None = None,
    holdout: list | None = None,
    progress: bool | None = None,
) -> ScopedEdit:
    """Fit factors if the scope or method needs them, then :func:`unlearn.scoped_edit`.

    ``reference``: a model retrained without the forget set, on the model's device; unless
    a forget target is set, the run stops at its forget loss. ``frozen``/``before``: an
    unmodified original and its hashes, when the caller has them (nothing is copied or
    hashed twice). ``holdout``: records of entities the model never saw (the calibrated
    stop's target when there is no reference).
    """
    arguments = options.unlearn
    criterion = calibrated_stop(arguments, model, task, forget, reference, holdout)
    needs_factors = options.scope.method == "ekfac" or METHODS[arguments.method].needs_factors
    if needs_factors and factors is None:
        factors = fit_factors(
            model, task, joined(forget, retain), options.factors, factor_folder, progress
        )
    if reference is not None and arguments.forget_target is None and criterion is None:
        target = measure(reference, task, forget, arguments.batch_size)
        arguments = dataclasses.replace(arguments, forget_target=target)
    return scoped_edit(
        model,
        task,
        forget,
        retain,
        options.scope,
        arguments,
        factors,
        before=before,
        frozen=frozen,
        criterion=criterion,
        progress=progress,
    )


def calibrated_stop(arguments, model, task, forget, reference, holdout) -> TruthRatioMatch | None:
    """The criterion of ``--stop calibrated``: truth ratios matched to the reference's on the
    forget split, or (no reference) to the original model's on the holdout split."""
    if arguments.stop != "calibrated":
        return None
    if reference is not None:
        return TruthRatioMatch.to_reference(reference, task, forget)
    if holdout:
        return TruthRatioMatch.to_holdout(model, task, forget, holdout)
    raise BadInputError(
        "--stop calibrated needs --holdout FILE (entities the model never saw) or --reference"
    )


def write_outputs(folder: Path, model, tokenizer, edit: ScopedEdit, manifest) -> None:
    """The model folder, the scope file and the manifest (:func:`manifest_of`), inside
    ``folder``."""
    with no_transformers_progress_bars(), as_stored(model):  # in the input's dtype
        model.save_pretrained(folder / "model", safe_serialization=True)
        tokenizer.save_pretrained(folder / "model")
    edit.scope.save(folder / "scope.safetensors")
    write_json(folder / "manifest.json", manifest)


def manifest_of(edit: ScopedEdit, inputs, seed, started, warnings=()) -> dict[str, Any]:
    """The edit's manifest: method, arguments, scope, inputs, result and proof;
    ``warnings``: sentences about the inputs."""
    scope = edit.scope
    return {
        "schema": MANIFEST_SCHEMA,
        "excise_version": package_version(),
        "created_utc": utc_timestamp(),
        "seed": seed,
        "method": edit.arguments.method,
        "arguments": edit.arguments.to_dict(),
        "scope": {
            **(edit.scope_arguments.to_dict() if edit.scope_arguments else {"method": "given"}),
            "edited": scope.edited,
            "total": scope.total,
            "fraction": scope.fraction,
            "edited_per_layer": scope.by_layer(),
        },
        "edited_per_tensor": scope.by_tensor(),
        "inputs": inputs,
        "output": {"fingerprint": edit.fingerprint_after},
        "result": edit.result.to_dict(),
        "proof": edit.proof,
        "warnings": list(warnings),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _file_entry(path: str | Path, n: int) -> dict[str, Any]:
    path = Path(path)
    digest = sha256_file(path) if path.is_file() else None
    return {"path": str(path), "sha256": digest, "n": n}
