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
from pathlib import Path
from typing import Any

from torch import nn

from attribution import FactorArguments, LanguageModelingTask, fit_factors, model_fingerprint
from attribution.artifacts import (
    atomic_directory,
    check_apart,
    package_version,
    sha256_file,
    utc_timestamp,
    write_json,
)
from attribution.store import FactorStore
from excise.errors import BadInputError
from excise.models import (
    check_model_folder,
    choose_device,
    load_model,
    no_transformers_progress_bars,
)
from excise.records import read_records
from unlearn import (
    Scope,
    ScopeArguments,
    UnlearnArguments,
    check_proof,
    check_sets,
    choose_scope,
    measure,
    scope_proof,
    state_hashes,
    unlearn,
)

KIND = "unlearning"
MANIFEST_SCHEMA = "excise-unlearn/1"


def arguments_from(args: argparse.Namespace) -> tuple[ScopeArguments, UnlearnArguments]:
    """The library argument objects (validated: bad values fail before any work)."""
    scope_arguments = ScopeArguments(
        method=args.scope,
        sparsity=args.sparsity,
        ranking=args.ranking,
        granularity=args.granularity,
        seed=args.seed,
    )
    unlearn_arguments = UnlearnArguments(
        method=args.method,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        retain_weight=args.retain_weight,
        beta=args.beta,
        weight_decay=args.weight_decay,
        rmu_layer=args.rmu_layer,
        newton_iterations=args.newton_iterations,
        idk_text=args.idk_text,
        forget_target=args.forget_target,
        retain_budget=args.retain_budget,
        seed=args.seed,
    )
    return scope_arguments, unlearn_arguments


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Validate everything, then unlearn and write OUT; returns the manifest."""
    scope_arguments, unlearn_arguments = arguments_from(args)
    model_dir = check_model_folder(args.model)
    forget, retain = read_records(args.forget), read_records(args.retain)
    check_sets(forget, retain)
    out = check_new_output(args.out, [model_dir, Path(args.forget), Path(args.retain)])
    device = choose_device(args.device)
    model, tokenizer = load_model(model_dir)
    model.to(device)
    factors = FactorStore.load_factors(args.factors, model) if args.factors else None
    reference = check_model_folder(args.reference) if args.reference else None
    reference_model = load_model(reference)[0].to(device) if reference else None
    progress = False if args.quiet else None
    started = time.perf_counter()
    with atomic_directory(out, KIND) as folder:
        result = edit_model(
            model,
            tokenizer,
            forget,
            retain,
            scope_arguments,
            unlearn_arguments,
            factors=factors,
            factor_folder=folder / "factors",
            reference=reference_model,
            progress=progress,
        )
        inputs = {
            "model": {"path": str(model_dir), "fingerprint": result["fingerprint_before"]},
            "forget": _file_entry(args.forget, len(forget)),
            "retain": _file_entry(args.retain, len(retain)),
            "factors": str(args.factors) if args.factors else None,
            "reference": str(reference) if reference else None,
        }
        manifest = write_outputs(folder, model, tokenizer, result, inputs, args.seed, started)
    manifest["out"] = str(out)
    return manifest


def edit_model(
    model,
    tokenizer,
    forget,
    retain,
    scope_arguments: ScopeArguments,
    unlearn_arguments: UnlearnArguments,
    factors=None,
    factor_folder: Path | None = None,
    reference: nn.Module | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Scope + unlearn ``model`` in place; returns the scope, result, hashes and proof.

    ``reference``: a model retrained without the forget set, on the model's device; unless
    a forget target is set, the run stops at its forget loss.
    """
    task = LanguageModelingTask(tokenizer)
    needs_factors = scope_arguments.method == "ekfac" or unlearn_arguments.method == "newton"
    if needs_factors and factors is None:
        factors = fit_factors(
            model,
            task,
            list(forget) + list(retain),
            FactorArguments(strategy="ekfac", seed=scope_arguments.seed),
            factor_folder,
            progress,
        )
    if reference is not None and unlearn_arguments.forget_target is None:
        unlearn_arguments = _with_reference_target(unlearn_arguments, reference, task, forget)
    fingerprint = model_fingerprint(model)
    before = state_hashes(model)
    scope = choose_scope(
        model,
        task,
        forget,
        retain,
        scope_arguments,
        factors,
        unlearn_arguments.batch_size,
        progress,
    )
    result = unlearn(model, task, forget, retain, scope, unlearn_arguments, factors, progress)
    proof = scope_proof(before, state_hashes(model), scope, model)
    check_proof(proof)
    return {
        "scope": scope,
        "scope_arguments": scope_arguments,
        "unlearn_arguments": unlearn_arguments,
        "result": result,
        "proof": proof,
        "fingerprint_before": fingerprint,
        "fingerprint_after": model_fingerprint(model),
    }


def write_outputs(folder: Path, model, tokenizer, result, inputs, seed, started) -> dict[str, Any]:
    """The model folder, the scope file and the manifest, inside ``folder``."""
    with no_transformers_progress_bars():
        model.save_pretrained(folder / "model", safe_serialization=True)
        tokenizer.save_pretrained(folder / "model")
    scope: Scope = result["scope"]
    scope.save(folder / "scope.safetensors")
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "excise_version": package_version(),
        "created_utc": utc_timestamp(),
        "seed": seed,
        "method": result["unlearn_arguments"].method,
        "arguments": result["unlearn_arguments"].to_dict(),
        "scope": {
            **vars(result["scope_arguments"]),
            "edited": scope.edited,
            "total": scope.total,
            "fraction": scope.fraction,
            "edited_per_layer": scope.by_layer(),
        },
        "edited_per_tensor": scope.by_tensor(),
        "inputs": inputs,
        "output": {"fingerprint": result["fingerprint_after"]},
        "result": result["result"].to_dict(),
        "proof": result["proof"],
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_json(folder / "manifest.json", manifest)
    return manifest


def check_new_output(path: str | Path, inputs: list[Path]) -> Path:
    """An output folder that is none of the inputs and holds none of them."""
    out = check_apart(path, inputs, "a new folder")
    if out.exists():
        raise BadInputError(f"--out {path}: already exists; choose a new folder")
    return out


def _with_reference_target(arguments, reference: nn.Module, task, forget) -> UnlearnArguments:
    """Stop when the forget loss reaches the reference model's (retrained without it)."""
    target = measure(reference, task, forget, arguments.batch_size)
    return dataclasses.replace(arguments, forget_target=target)


def _file_entry(path: str | Path, n: int) -> dict[str, Any]:
    path = Path(path)
    digest = sha256_file(path) if path.is_file() else None
    return {"path": str(path), "sha256": digest, "n": n}
