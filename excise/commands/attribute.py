"""``excise attribute``: factors, influence scores and top-k proponents per query.

Reads the user's files, fits (or reuses) factors, scores every training example against
every query and writes::

    OUT/factors/                      the factor store (reused by a rerun)
    OUT/scores/pairwise.safetensors   "scores" [n_query, n_train] (+ per module/token),
                                      ids in its metadata
    OUT/scores/self.safetensors       with --self: "scores" [n_train]
    OUT/scores/ensemble.safetensors   with --ensemble: the mean over the models
    OUT/ensemble/<k>/                 with --ensemble: each member's factors and scores
    OUT/damping.json                  with --choose-damping: every candidate's agreement
    OUT/topk.jsonl                    per query: its strongest proponents and opponents
    OUT/summary.md                    the same, for people

With ``--index DIR`` (an ``excise index`` output) the scores come from the stored
gradient index instead of a factor fit and a pass over the training data
(:mod:`excise.commands.index`).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from attribution import FactorArguments, LanguageModelingTask, fit_factors
from attribution.artifacts import atomic_directory, check_output_folder, write_bytes
from attribution.curvature import DAMPING_FACTOR, Damping, Factors
from attribution.damping_search import SearchArguments, choose_damping
from attribution.distributed import current_shard, on_main
from attribution.influence import (
    ScoreArguments,
    check_queries_have_targets,
    self_scores,
    stored_pairwise_scores,
    top_k,
)
from attribution.store import ScoreStore
from excise.commands import index as index_command
from excise.commands.ensemble import check_members, ensemble_scores
from excise.commands.inputs import check_length, factor_arguments_of
from excise.errors import BadInputError
from excise.models import choose_device, load_model
from excise.options import DAMPING_OPTIONS, FACTOR_FIELDS, add_options, from_options
from excise.outputs import check_apart
from excise.records import read_records
from excise.streaming import open_records

KIND = "attribution"
PART_SIZE = 1024  # training examples per saved part by default (a killed run resumes there)
TEXT_PREVIEW = 160


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Validate everything, then compute and write; returns a small summary for the CLI."""
    score_arguments = ScoreArguments(  # checked before anything is read, fitted or written
        damping=from_options(Damping, args, "damping"),
        batch_size=args.batch_size,
        per_module=args.per_module,
        per_token=args.per_token,
        query_rank=args.query_rank,
        cg_iterations=args.cg_iterations,
        cg_curvature=args.cg_curvature,
        dtype=getattr(args, "factors.dtype"),
        autocast=getattr(args, "factors.autocast"),
    )
    if args.index:
        index_command.check_index_options(args)
    if args.self_influence and score_arguments.cg_iterations:
        raise BadInputError("--self with --cg-iterations: self-influence uses the factors alone")
    search = _search_arguments(args, score_arguments)
    train, queries = open_records(args.train), read_records(args.query)  # train: lazy if large
    members = args.ensemble or []
    check_apart(args.out, [args.model, args.train, args.query, *members])  # as every command
    members = check_members(args.model, members)
    model, tokenizer = load_model(args.model)
    out = check_output_folder(args.out, KIND)
    check_length(args.max_length, {"train": train, "query": queries}, tokenizer, model)
    model.to(choose_device(args.device))
    factor_arguments = factor_arguments_of(args, model)
    task = LanguageModelingTask(tokenizer, max_length=args.max_length)
    check_queries_have_targets(task, queries, [q["id"] for q in queries])
    k = _top_k_count(args.top_k, len(train))
    partitions = _partition_count(args.partitions, len(train))
    factor_arguments = replace(factor_arguments, partitions=partitions)
    score_arguments = replace(score_arguments, partitions=partitions)
    factors = Factors.load(args.factors, model) if args.factors else None
    index = None
    if args.index:
        index = index_command.open_index(
            args.index, model, train, args.max_length, score_arguments.damping
        )
        factors = index_command.described_factors(index)
    progress = False if args.quiet else None
    shard = current_shard()  # under torchrun: every rank computes its share, rank 0 writes
    on_main(lambda: _create(out), shard)
    if factors is None:
        factors = fit_factors(model, task, train, factor_arguments, out / "factors", progress)
    choice = None
    if search is not None:
        choice = choose_damping(
            model, task, train, queries, factors, search, score_arguments, progress
        )
        score_arguments = replace(score_arguments, damping=choice.damping)
        if shard.is_main:
            text = json.dumps(choice.to_dict(), indent=2) + "\n"
            write_bytes(out / "damping.json", text.encode())
    ids = {"query_ids": [q["id"] for q in queries], "train_ids": [z["id"] for z in train]}
    if index is not None:
        total = index_command.index_pairwise_scores(
            model, task, queries, train, index, out / "scores", args.batch_size, ids, progress
        )
    else:
        total = stored_pairwise_scores(
            model,
            task,
            queries,
            train,
            factors,
            out / "scores",
            score_arguments,
            ids=ids,
            progress=progress,
        ).total
    if members:
        device = next(model.parameters()).device
        total = ensemble_scores(
            total,
            members,
            task,
            queries,
            train,
            factor_arguments,
            score_arguments,
            out,
            device,
            ids,
            progress,
        )
    if args.self_influence:
        values = self_scores(model, task, train, factors, score_arguments, progress)
        if shard.is_main:
            ScoreStore(out / "scores").save(
                "self", {"scores": values}, {"train_ids": json.dumps(ids["train_ids"])}
            )
    rows = topk_rows(total, queries, train, k)
    described = RunDescription(
        args.model,
        args.train,
        score_arguments.damping,
        choice is not None,
        1 + len(members),
        index_command.index_sentence(index) if index is not None else None,
    )
    if shard.is_main:
        write_topk(out, rows, described, factors)
    chosen = choice.describe() if choice else None
    return {
        "out": str(out),
        "queries": len(queries),
        "train": len(train),
        "rows": rows,
        "damping_choice": chosen,
    }


def _create(out: Path) -> None:
    """The output folder, marked as an attribution artifact (kept when it exists)."""
    if not (out / ".excise.json").exists():
        with atomic_directory(out, KIND):
            pass


def _search_arguments(args, score_arguments: ScoreArguments) -> SearchArguments | None:
    """The damping search's arguments with --choose-damping (checked before any work)."""
    if not args.choose_damping:
        return None
    explicit = getattr(args, "damping.value") is not None
    if explicit or getattr(args, "damping.factor") != DAMPING_FACTOR:
        raise BadInputError("--choose-damping with --damping/--damping-factor: give one of them")
    if score_arguments.cg_iterations:
        raise BadInputError(
            "--choose-damping with --cg-iterations: the search measures the factors' damping"
        )
    return from_options(SearchArguments, args, "search", seed=args.seed, batch_size=args.batch_size)


def add_search_options(parser: argparse.ArgumentParser) -> None:
    """--search-perturbations, --search-steps, --search-learning-rate, --search-optimizer,
    --search-margin: the damping search's arguments."""
    fields_ = ("perturbations", "steps", "learning_rate", "optimizer", "margin")
    names = {f: "--search-" + f.replace("_", "-") for f in fields_}
    add_options(parser, SearchArguments, "search", names=names, skip=("seed", "batch_size"))


def topk_rows(scores: torch.Tensor, queries: list[dict], train: list[dict], k: int) -> list[dict]:
    """One row per query: its ``k`` strongest proponents and opponents, with text."""
    proponents, opponents = top_k(scores, k)
    rows = []
    for q, query in enumerate(queries):

        def entries(indices, q=q):
            return [
                {"id": train[i]["id"], "score": scores[q, i].item(), "text": record_text(train[i])}
                for i in indices.tolist()
            ]

        rows.append(
            {
                "query_id": query["id"],
                "query": record_text(query),
                "proponents": entries(proponents[q]),
                "opponents": entries(opponents[q]),
            }
        )
    return rows


@dataclass(frozen=True)
class RunDescription:
    """What the summary says the scores came from."""

    model: str
    train: str
    damping: Damping
    damping_chosen: bool = False
    models: int = 1
    index: str | None = None  # the sentence on the gradient index used, if any


def write_topk(out: Path, rows: list[dict], described: RunDescription, factors) -> None:
    """``out``/topk.jsonl (a row per query) and ``out``/summary.md (for people)."""
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_bytes(out / "topk.jsonl", lines.encode("utf-8"))
    write_bytes(out / "summary.md", summary_markdown(rows, described, factors).encode("utf-8"))


def record_text(record: dict) -> str:
    return record["text"] if "text" in record else record["prompt"] + record["completion"]


def summary_markdown(rows: list[dict], described: RunDescription, factors) -> str:
    fa = factors.arguments
    lines = [
        "# excise attribute",
        "",
        f"Model `{described.model}`; {len(rows)} queries against `{described.train}`; "
        f"strategy {fa.strategy}, {fa.fisher} Fisher, {len(factors.modules)} tracked modules, "
        f"damping {described.damping.describe()}"
        + (" (chosen on data: OUT/damping.json)." if described.damping_chosen else "."),
        "Positive: training on the example raises the probability of the query's completion.",
    ]
    if described.models > 1:
        lines.append(
            f"Scores: the mean over {described.models} models (--model and --ensemble; "
            "OUT/scores/ensemble.safetensors)."
        )
    if described.index:
        lines.append(described.index)
    for row in rows:
        lines += ["", f"## Query `{row['query_id']}`", "", f"> {_cell(row['query'])}", ""]
        for title, key in (("Proponents", "proponents"), ("Opponents", "opponents")):
            lines += [f"**{title}**", "", "| # | id | score | text |", "|---|---|---|---|"]
            for rank, entry in enumerate(row[key], start=1):
                lines.append(
                    f"| {rank} | `{_cell(entry['id'])}` | {entry['score']:.4g} | "
                    f"{_cell(entry['text'])} |"
                )
            lines.append("")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text that stays in one markdown table cell."""
    text = " ".join(str(text).split()).replace("|", "\\|").replace("`", "'")
    return text if len(text) <= TEXT_PREVIEW else text[: TEXT_PREVIEW - 1] + "…"


def add_curvature_options(parser: argparse.ArgumentParser) -> None:
    """--strategy and --fisher (FactorArguments), --damping and --damping-factor (Damping)."""
    skip = tuple(f.name for f in fields(FactorArguments) if f.name not in FACTOR_FIELDS)
    add_options(parser, FactorArguments, "factors", skip=skip)
    add_options(parser, Damping, "damping", names=DAMPING_OPTIONS)


def _partition_count(requested: int | None, n_train: int) -> int:
    """--partitions, or one part per ``PART_SIZE`` training examples."""
    if requested is None:
        return max(1, math.ceil(n_train / PART_SIZE))
    if not 1 <= requested <= n_train:
        raise BadInputError(
            f"--partitions {requested}: must be between 1 and the {n_train} training examples"
        )
    return requested


def _top_k_count(requested: int | None, n_train: int) -> int:
    if requested is None:
        return min(5, n_train)
    if not 1 <= requested <= n_train:
        raise BadInputError(
            f"--top-k {requested}: must be between 1 and the {n_train} training examples"
        )
    return requested
