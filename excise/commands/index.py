"""``excise index``: a compressed gradient index of a training set, for repeated queries;
and what ``excise attribute --index`` needs to score with one.

Fits (or reuses) factors, then stores every training example's gradient rotated into the
curvature's eigenbasis, scaled by (Λ + λ)^(-1/2) and compressed to ``--dimension``
coordinates per module (:mod:`attribution.index`)::

    OUT/factors/   the factor store (unless --factors)
    OUT/index/     the index store (resumed by a rerun with the same arguments)

A later ``excise attribute --index OUT`` scores queries against the whole training set
with one matrix product, instead of a pass of per-example gradients over it; at full
dimension (the default) the scores equal the plain command's with the same factors.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from attribution import Damping, FactorArguments, Factors, LanguageModelingTask, fit_factors
from attribution.artifacts import artifact_kind, atomic_directory, check_output_folder
from attribution.damping_search import SearchArguments
from attribution.distributed import broadcast, current_shard, on_main
from attribution.index import INDEXABLE, Index, IndexArguments, build_index, index_scores
from attribution.influence import ScoreArguments
from attribution.store import ScoreStore, examples_sha256
from excise.commands.inputs import check_length, factor_arguments_of
from excise.errors import BadInputError
from excise.models import choose_device, load_model
from excise.options import add_options, from_options
from excise.outputs import check_apart
from excise.streaming import open_records

KIND = "gradient-index"
INDEX_FIELDS = ("dimension", "method", "storage")  # IndexArguments' fields on the command line
# Why excise attribute's options cannot be honoured with --index, per option (below)
ONE_MODEL = "an index gives only total pairwise scores of one model, from exact query gradients"
FIXED_FACTORS = "the index fixes the factors (strategy, Fisher, modules) it was built with"
FIXED_PRECISION = "the index's vectors were computed in the precision it was built with"
BAKED_DAMPING = "the index's damping is baked into its vectors"
NO_CG = "the index scores with its factors' solution, not by conjugate gradient"
NO_PASS = "the index is built: nothing is fitted or passed over in parts"
SEARCH_FIELDS = ("perturbations", "steps", "learning_rate", "optimizer", "margin")  # --search-*


def _changed(cls: type, name: str):
    """Whether an option of ``cls``'s field ``name`` was given: it differs from the default
    (the value the parser fills in when the option is absent)."""
    default = next(f.default for f in fields(cls) if f.name == name)
    return lambda value: value != default


def _is_set(value: Any) -> bool:
    return value is not None


# excise attribute's options an index cannot honour: (attribute name, flag, is it given?, why)
INCOMPATIBLE = (
    ("per_token", "--per-token", bool, ONE_MODEL),
    ("per_module", "--per-module", bool, ONE_MODEL),
    ("self_influence", "--self", bool, ONE_MODEL),
    ("query_rank", "--query-rank", _is_set, ONE_MODEL),
    ("ensemble", "--ensemble", bool, ONE_MODEL),
    ("factors", "--factors", _is_set, FIXED_FACTORS),
    ("modules", "--modules", _is_set, FIXED_FACTORS),
    ("factors.strategy", "--strategy", _changed(FactorArguments, "strategy"), FIXED_FACTORS),
    ("factors.fisher", "--fisher", _changed(FactorArguments, "fisher"), FIXED_FACTORS),
    ("factors.dtype", "--dtype", _changed(FactorArguments, "dtype"), FIXED_PRECISION),
    ("factors.autocast", "--autocast", _changed(FactorArguments, "autocast"), FIXED_PRECISION),
    (
        "factors.lambda_fraction",
        "--lambda-fraction",
        _changed(FactorArguments, "lambda_fraction"),
        FIXED_FACTORS,
    ),
    ("choose_damping", "--choose-damping", bool, BAKED_DAMPING),
    *(
        (
            f"search.{f}",
            f"--search-{f.replace('_', '-')}",
            _changed(SearchArguments, f),
            BAKED_DAMPING,
        )
        for f in SEARCH_FIELDS
    ),
    ("cg_iterations", "--cg-iterations", bool, NO_CG),
    ("cg_curvature", "--cg-curvature", _changed(ScoreArguments, "cg_curvature"), NO_CG),
    ("partitions", "--partitions", _is_set, NO_PASS),
)


def add_index_options(parser: argparse.ArgumentParser) -> None:
    """--dimension, --method and --storage (IndexArguments)."""
    skip = tuple(f.name for f in fields(IndexArguments) if f.name not in INDEX_FIELDS)
    add_options(parser, IndexArguments, "index", skip=skip)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Validate everything, then fit factors (unless given) and build the index."""
    started = time.perf_counter()
    arguments = from_options(  # checked before anything is read, fitted or written
        IndexArguments,
        args,
        "index",
        seed=args.seed,
        batch_size=args.batch_size,
        dtype=getattr(args, "factors.dtype"),  # the gradients and vectors, as the factors'
        damping=from_options(Damping, args, "damping"),
    )
    train = open_records(args.train)  # lazy when large
    check_apart(args.out, [args.model, args.train, *([args.factors] if args.factors else [])])
    model, tokenizer = load_model(args.model)
    out = check_output_folder(args.out, KIND)
    check_length(args.max_length, {"train": train}, tokenizer, model)
    model.to(choose_device(args.device))
    factor_arguments = factor_arguments_of(args, model)
    factors = Factors.load(args.factors, model) if args.factors else None
    strategy = factors.arguments.strategy if factors else factor_arguments.strategy
    if strategy not in INDEXABLE:
        raise BadInputError(
            f"an index needs curvature eigenvalues: {strategy} factors have none; use "
            f"--strategy {'|'.join(INDEXABLE)}"
        )
    task = LanguageModelingTask(tokenizer, max_length=args.max_length)
    progress = False if args.quiet else None
    on_main(lambda: _create(out), current_shard())  # under torchrun: rank 0 writes
    if factors is None:
        factors = fit_factors(model, task, train, factor_arguments, out / "factors", progress)
    index = build_index(
        model,
        task,
        train,
        factors,
        arguments,
        out / "index",
        progress,
        extra={"max_length": args.max_length},
    )
    return {
        "out": str(out),
        "examples": index.n_train,
        "modules": len(index.modules),
        "floats": index.floats_per_example,
        "seconds": time.perf_counter() - started,
    }


def _create(out: Path) -> None:
    """The output folder, marked as an index artifact (kept when it exists)."""
    if not (out / ".excise.json").exists():
        with atomic_directory(out, KIND):
            pass


# --- excise attribute --index ----------------------------------------------------------


def check_index_options(args: argparse.Namespace) -> None:
    """Refuse, before any work, each option of ``excise attribute`` that was given and that
    an index cannot honour (:data:`INCOMPATIBLE`; an option left at its default is not
    given: ``--cg-iterations 0`` or ``--strategy ekfac`` pass, as when left out)."""
    for name, flag, given, why in INCOMPATIBLE:
        if given(getattr(args, name, None)):
            raise BadInputError(f"--index with {flag}: {why}; drop {flag} or --index")


def open_index(
    folder: str | Path,
    model: torch.nn.Module,
    train: list[dict],
    max_length: int | None,
    damping: Damping,
) -> Index:
    """The index in ``folder`` (an ``excise index`` output or its ``index/``), refused
    unless built, completely, for this model, this training data, this ``--max-length``
    and this damping."""
    folder = Path(folder)
    if artifact_kind(folder) == KIND:
        folder = folder / "index"
    index = Index.load(folder, model)
    if index.description.get("train_sha256") != examples_sha256(train):
        raise BadInputError(
            f"--index {folder}: built on other training data than --train (the records "
            "differ); build an index of this training set"
        )
    built = index.description.get("max_length")
    if built != max_length:
        raise BadInputError(
            f"--index {folder}: built with --max-length {built}, this run asks {max_length}; "
            "give the same --max-length"
        )
    if damping != index.arguments.damping:
        raise BadInputError(
            f"--index {folder}: built with damping {index.arguments.damping.describe()}, this "
            f"run asks {damping.describe()}; give the same --damping/--damping-factor"
        )
    index.complete_parts()  # refused when parts are missing
    return index


def index_pairwise_scores(
    model: torch.nn.Module,
    task: Any,
    queries: list[dict],
    train: list[dict],
    index: Index,
    folder: Path,
    batch_size: int,
    ids: dict[str, list[str]],
    progress: bool | None = None,
) -> torch.Tensor:
    """The index's scores [n_query, n_train], saved as ``folder``/pairwise.safetensors
    (reused by a rerun with the same index and queries)."""
    import json

    description = {
        "arguments": {"source": "index", **index.arguments.to_dict(), "batch_size": batch_size},
        "index": {k: v for k, v in index.description.items() if k != "excise_version"},
        "model_fingerprint": index.description["model_fingerprint"],
        "queries_sha256": examples_sha256(queries),
        "train_sha256": examples_sha256(train),
        "excise_version": index.description.get("excise_version"),
    }
    shard = current_shard()  # under torchrun every rank scores (one product), rank 0 saves
    store = on_main(lambda: ScoreStore.open(folder, description), shard)
    done = broadcast(store.load("pairwise") if store else None, shard)
    if done is not None:
        return done["scores"]
    scores = index_scores(model, task, queries, index, batch_size=batch_size, progress=progress)
    metadata = {key: json.dumps(list(value)) for key, value in ids.items()}
    if store:
        store.save("pairwise", {"scores": scores}, metadata)
    return scores


def described_factors(index: Index) -> SimpleNamespace:
    """What the attribution summary reads from factors (their arguments and modules)."""
    return SimpleNamespace(arguments=index.factor_arguments, modules=index.modules)


def index_sentence(index: Index) -> str:
    """The summary's line on the index used."""
    arguments = index.arguments
    exact = arguments.dimension is None or all(
        d == basis["scale"].numel()
        for d, basis in zip(index.dimensions.values(), index.bases.values(), strict=True)
    )
    dimension = "full (exact)" if exact else f"{arguments.dimension} per module"
    stored = str(arguments.storage_dtype).removeprefix("torch.")
    return (
        f"Scores from a gradient index (method {arguments.method}, dimension {dimension}, "
        f"{index.floats_per_example} stored floats per training example, in {stored})."
    )
