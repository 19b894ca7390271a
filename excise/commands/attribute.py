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
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from attribution import FactorArguments, LanguageModelingTask, fit_factors, select_modules
from attribution.artifacts import atomic_directory, check_output_folder, write_bytes
from attribution.curvature import DAMPING_FACTOR, Damping, Factors
from attribution.damping_search import SearchArguments, choose_damping
from attribution.influence import (
    ScoreArguments,
    check_queries_have_targets,
    self_scores,
    stored_pairwise_scores,
    top_k,
)
from attribution.modules import default_attribution_modules
from attribution.store import ScoreStore
from excise.commands.ensemble import check_members, ensemble_scores
from excise.context import check_fits_context, model_context
from excise.errors import BadInputError
from excise.models import choose_device, load_model
from excise.options import DAMPING_OPTIONS, FACTOR_FIELDS, add_options, from_options
from excise.outputs import check_apart
from excise.records import read_records

KIND = "attribution"
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
    )
    if args.self_influence and score_arguments.cg_iterations:
        raise BadInputError("--self with --cg-iterations: self-influence uses the factors alone")
    search = _search_arguments(args, score_arguments)
    train, queries = read_records(args.train), read_records(args.query)
    members = args.ensemble or []
    check_apart(args.out, [args.model, args.train, args.query, *members])  # as every command
    members = check_members(args.model, members)
    model, tokenizer = load_model(args.model)
    out = check_output_folder(args.out, KIND)
    check_length(args.max_length, {"train": train, "query": queries}, tokenizer, model)
    model.to(choose_device(args.device))
    factor_arguments = _factor_arguments(args, model)
    task = LanguageModelingTask(tokenizer, max_length=args.max_length)
    check_queries_have_targets(task, queries, [q["id"] for q in queries])
    k = _top_k_count(args.top_k, len(train))
    factors = Factors.load(args.factors, model) if args.factors else None
    progress = False if args.quiet else None
    if not (out / ".excise.json").exists():
        with atomic_directory(out, KIND):
            pass
    if factors is None:
        factors = fit_factors(model, task, train, factor_arguments, out / "factors", progress)
    choice = None
    if search is not None:
        choice = choose_damping(
            model, task, train, queries, factors, search, score_arguments, progress
        )
        score_arguments = replace(score_arguments, damping=choice.damping)
        write_bytes(out / "damping.json", (json.dumps(choice.to_dict(), indent=2) + "\n").encode())
    ids = {"query_ids": [q["id"] for q in queries], "train_ids": [z["id"] for z in train]}
    scores = stored_pairwise_scores(
        model,
        task,
        queries,
        train,
        factors,
        out / "scores",
        score_arguments,
        ids=ids,
        progress=progress,
    )
    total = scores.total
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
        ScoreStore(out / "scores").save(
            "self", {"scores": values}, {"train_ids": json.dumps(ids["train_ids"])}
        )
    rows = topk_rows(total, queries, train, k)
    described = RunDescription(
        args.model, args.train, score_arguments.damping, choice is not None, 1 + len(members)
    )
    write_topk(out, rows, described, factors)
    chosen = choice.describe() if choice else None
    return {
        "out": str(out),
        "queries": len(queries),
        "train": len(train),
        "rows": rows,
        "damping_choice": chosen,
    }


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


def check_length(max_length: int | None, splits, tokenizer, model) -> None:
    """Records must fit the model's context, unless ``--max-length`` (within it) cuts them."""
    context = model_context(model)
    if max_length is None:
        hint = "shorten it, or pass --max-length N to cut every record to N tokens"
        check_fits_context(splits, tokenizer, context, hint)
    elif context is not None and max_length > context:
        raise BadInputError(
            f"--max-length {max_length}: more than the model's context of {context} tokens"
        )


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
    lines += []
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


def _factor_arguments(args: argparse.Namespace, model) -> FactorArguments:
    modules = _module_spec(args.modules, model)
    arguments = from_options(
        FactorArguments,
        args,
        "factors",
        modules=modules,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    select_modules(model, modules)  # unknown names fail here, before anything is written
    return arguments


def add_curvature_options(parser: argparse.ArgumentParser) -> None:
    """--strategy and --fisher (FactorArguments), --damping and --damping-factor (Damping)."""
    skip = tuple(f.name for f in fields(FactorArguments) if f.name not in FACTOR_FIELDS)
    add_options(parser, FactorArguments, "factors", skip=skip)
    add_options(parser, Damping, "damping", names=DAMPING_OPTIONS)


def _module_spec(values: list[str] | None, model) -> str | tuple[str, ...]:
    """Several values are module names; one value is a name if the model has it, else a regex;
    none: the blocks and a small output head (:func:`default_attribution_modules`)."""
    if not values:
        return default_attribution_modules(model)
    if len(values) == 1 and values[0] not in dict(model.named_modules()):
        return values[0]
    return tuple(values)


def _top_k_count(requested: int | None, n_train: int) -> int:
    if requested is None:
        return min(5, n_train)
    if not 1 <= requested <= n_train:
        raise BadInputError(
            f"--top-k {requested}: must be between 1 and the {n_train} training examples"
        )
    return requested
