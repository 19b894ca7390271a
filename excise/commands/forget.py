"""``excise forget``: the main job — attribute, scope, unlearn, audit, record.

With no model or data named, it runs on the embedded default world (built into the cache
on first use): the base model, its forget/retain/neighbor/world/holdout splits and the
reference model retrained without the forget set. With ``--model --forget --retain`` it
runs on the user's files. The stages:

1. attribute — EK-FAC factors on the training set, influence of every training example
   on every forget record, top-k proponents (how many of them are forget records);
2. scope — the ``ekfac`` scope (or another) from those factors;
3. unlearn — the masked loop inside the scope, proof that nothing else moved;
4. audit — every metric of :func:`analysis.audit` against the model before (and the
   reference, when there is one), written as report.json/report.html/report.md;
5. record — one row in the deletion ledger (SQLite).

Writes (atomically; inputs never touched)::

    OUT/attribution/   factors/, scores/, topk.jsonl, summary.md
    OUT/unlearn/       model/, scope.safetensors, manifest.json
    OUT/report.json  OUT/report.html  OUT/report.md
    OUT/forget.json    inputs, stage timings, attribution and unlearning summaries, and the
                       ledger row to record (written before the folder is put in place)
    OUT/ledger.json    the row's id and hash, once recorded (a run killed before it:
                       ``excise ledger record OUT`` adds the row)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.audit import check_splits, overlap_warnings
from analysis.ledger import Ledger, LedgerEntry
from analysis.report import write_report
from analysis.shift import foresight
from attribution import Factors, LanguageModelingTask, fit_factors
from attribution.artifacts import (
    package_version,
    sha256_file,
    utc_timestamp,
    write_json,
)
from attribution.distributed import alone, broadcast, current_shard, on_main
from attribution.fingerprint import fingerprint_of
from attribution.influence import ScoreArguments, stored_pairwise_scores
from excise.commands.attribute import RunDescription, topk_rows, write_topk
from excise.commands.audit import audit_models, load_audit_models, load_splits
from excise.commands.ledger import (
    RUN_ANCHOR,
    entry_fields,
    entry_from_report,
    run_entry,
    write_run_anchor,
)
from excise.commands.unlearn import (
    EditOptions,
    arguments_from,
    edit_model,
    manifest_of,
    with_strangers,
    write_outputs,
)
from excise.context import check_fits_context, model_context
from excise.errors import BadInputError, warn
from excise.home import default_ledger_path, excise_home
from excise.models import check_model_folder, choose_device
from excise.outputs import check_new_output, output_folder
from excise.streaming import open_records
from unlearn import check_sets
from unlearn.guard import (
    closure_indices,
    guard_indices,
    predicted_damage,
    random_guard_indices,
    with_guard,
)
from unlearn.proof import state_hashes

KIND = "forget"
SCHEMA = "excise-forget/1"
EVALUATION_SPLITS = ("neighbor", "world", "holdout")
TOP_K = 5


@dataclass
class ForgetInputs:
    """What one ``excise forget`` run works on: folders, files and their records."""

    model: Path
    reference: Path | None
    files: dict[str, Path | None]  # split → file (None: built from other splits)
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    hashes: dict[str, str | None] = field(default_factory=dict)  # split → file SHA-256
    world: Path | None = None  # the embedded world's folder, when it is used
    trained_on: tuple[str, ...] = ("forget", "retain")  # the training set, without --train

    @property
    def splits(self) -> dict[str, list[dict[str, Any]]]:
        """The audit's splits (every split but the training set)."""
        return {name: r for name, r in self.records.items() if name != "train"}

    def entry(self, split: str) -> dict[str, Any]:
        """Where a split came from, its hash and size (for the manifests)."""
        path = self.files.get(split)
        n = len(self.records[split])
        return {"path": str(path) if path else None, "sha256": self.hashes.get(split), "n": n}


def run(
    args: argparse.Namespace, note: Callable[[str], None] = lambda _: None
) -> dict[str, Any] | None:
    """Validate everything, run the five stages, record the request; returns the summary.

    Under ``torchrun`` every rank takes its share of the attribution and of the unlearning
    loop; then the ranks other than 0 return None and rank 0 alone writes the folder,
    audits (:func:`attribution.distributed.alone`) and records the ledger row.
    """
    options = arguments_from(args, has_holdout=uses_world(args) or bool(args.holdout), note=note)
    if args.guard < 0:
        raise BadInputError(f"--guard {args.guard}: must be >= 0 (training examples to guard)")
    inputs = resolve_inputs(args, note)
    train_ids = {z["id"] for z in inputs.records["train"]}
    missing = [r["id"] for r in inputs.records["forget"] if r["id"] not in train_ids]
    if args.expand and missing:
        raise BadInputError(
            f"--expand needs every forget record in the training set (--train); {len(missing)} "
            f"are not, e.g. {missing[0]!r}"
        )
    warnings = overlap_warnings(inputs.splits) + _untrained(missing, inputs)
    options, distilled = with_strangers(
        options, inputs.records.get("holdout"), inputs.records["forget"], note
    )
    shard = current_shard()  # under torchrun: ranks share attribution and unlearning
    ledger = on_main(lambda: _open_ledger(args), shard)  # rank 0's: it alone records
    out = check_new_output(args.out or broadcast(_default_out(), shard), _input_paths(inputs))
    folders = {"before": inputs.model, "reference": inputs.reference}
    models, tokenizer = load_audit_models(folders, choose_device(args.device))
    check_fits_context(inputs.records, tokenizer, model_context(models["before"]))
    model, reference = models["before"], models.get("reference")
    factors = Factors.load(args.factors, model) if args.factors else None
    progress = False if args.quiet else None
    warn(note, warnings)  # once every input is checked
    timings: dict[str, float] = {}
    with output_folder(out, KIND) as folder:  # under torchrun: rank 0 writes
        task = LanguageModelingTask(tokenizer)
        before = state_hashes(model)  # the original is hashed once, here
        with _timed(timings, "attribute", note):
            factors, attribution, chosen = attribute(
                model,
                task,
                inputs,
                folder / "attribution",
                options,
                factors,
                before,
                (args.guard, args.guard_by),
                progress,
            )
        forget, retain = edit_sets(inputs, chosen, expand=args.expand, forget=distilled)
        factor_path = args.factors or str(out / "attribution" / "factors")
        with _timed(timings, "scope + unlearn", note):
            edited = copy.deepcopy(model)  # the original stays as the frozen reference
            started = time.perf_counter()
            edit = edit_model(
                edited,
                task,
                forget,
                retain,
                options,
                factors=factors,
                reference=reference,
                frozen=model,
                before=before,
                holdout=inputs.records.get("holdout"),
                progress=progress,
            )
            unlearn_inputs = {
                **_unlearn_inputs(inputs, edit.fingerprint_before, factor_path),
                "expanded_with": attribution["closure"].get("ids") if args.expand else None,
                "guard": attribution["guard"]["ids"],
            }
            manifest = manifest_of(edit, unlearn_inputs, args.seed, started)
            if not shard.is_main:
                return None  # rank 0 alone writes, audits and records
            (folder / "unlearn").mkdir()
            write_outputs(folder / "unlearn", edited, tokenizer, edit, manifest)
        with _timed(timings, "audit", note), alone():  # the other ranks have stopped
            report, _ = audit_models(
                model,
                edited,
                tokenizer,
                inputs.splits,
                reference,
                paths=_audit_paths(inputs, out),
                split_hashes={s: inputs.hashes[s] for s in inputs.splits},
                relearn_steps=args.relearn_steps,
                relearn_lr=args.relearn_lr,
                seed=args.seed,
                fingerprints={"before": edit.fingerprint_before, "after": edit.fingerprint_after},
                progress=progress,
                truth_question=args.truth_question,
            )
            report["foresight"] = influence_foresight(chosen["damage"], inputs, report)
            report["warnings"] = warnings  # the audit's, and what only this run knows
            write_report(report, folder)
        summary = _summary(inputs, attribution, manifest, report, timings, args.seed, out)
        summary["expanded"] = bool(args.expand)
        summary["world_size"] = shard.world_size  # the processes that shared the work
        summary["warnings"] = warnings
        entry = _ledger_entry(manifest, report, inputs, out)
        summary["ledger"] = {"path": str(ledger.path.resolve()), "entry": entry_fields(entry)}
        write_json(folder / "forget.json", summary)  # the row, before the folder is in place
    with _timed(timings, "record", note):  # a kill here: excise ledger record OUT adds it
        recorded = ledger.get(ledger.record(entry))
        write_run_anchor(out, ledger, recorded)
    summary.update(ledger_id=recorded.id, ledger=str(ledger.path), report=report, timings=timings)
    return summary


def _open_ledger(args: argparse.Namespace) -> Ledger:
    """The ledger, checked before any work (a finished deletion must get its row)."""
    ledger = Ledger(args.ledger or default_ledger_path())
    ledger.check_writable()
    if args.out:
        check_not_unrecorded(Path(args.out), ledger)
    return ledger


def check_not_unrecorded(out: Path, ledger: Ledger) -> None:
    """Say how to register a finished run at ``out`` that the ledger lacks (a run killed
    before its row), instead of only "already exists"."""
    if not (out / "forget.json").is_file() or (out / RUN_ANCHOR).exists():
        return
    try:
        entry, _ = run_entry(out)
    except BadInputError:
        return  # not a run folder: "already exists" says enough
    if ledger.find(entry.report_path, entry.after_fingerprint) is None:
        raise BadInputError(
            f"--out {out}: holds a finished run with no row in ledger {ledger.path} (it "
            f"stopped before recording); register it with: excise ledger record {out}"
        )


def uses_world(args: argparse.Namespace) -> bool:
    """Whether the run works on the embedded world (no model or data named)."""
    names = (
        "model",
        *("forget", "retain", "train", "neighbor", "real_authors", "world", "holdout"),
        "reference",
    )
    return not any(getattr(args, k) for k in names)


def resolve_inputs(args: argparse.Namespace, note: Callable[[str], None]) -> ForgetInputs:
    """The default world when nothing is named, else the user's files; records read."""
    named = {k: getattr(args, k) for k in ("model", "forget", "retain")}
    if uses_world(args):
        device = str(choose_device(args.device))  # the world is trained there if not built
        inputs = _world_inputs(args.size, note, False if args.quiet else None, device)
    elif all(named.values()):
        inputs = ForgetInputs(
            model=check_model_folder(args.model),
            reference=check_model_folder(args.reference) if args.reference else None,
            files={k: Path(getattr(args, k)) if getattr(args, k) else None for k in _FILES},
        )
    else:
        missing = [f"--{k}" for k, v in named.items() if not v]
        raise BadInputError(
            f"{', '.join(missing)} missing: give --model, --forget and --retain together "
            "(or none of them, for the embedded world)"
        )
    named_splits = {k: p for k, p in inputs.files.items() if p is not None and k != "train"}
    inputs.records, inputs.hashes = load_splits(named_splits)
    check_splits(inputs.records)
    check_sets(inputs.records["forget"], inputs.records["retain"])
    train = inputs.files.get("train")
    if train is not None:
        inputs.records["train"], inputs.hashes["train"] = open_records(train), _sha256(train)
    else:
        inputs.records["train"] = [r for s in inputs.trained_on for r in inputs.records[s]]
    _check_unique_train_ids(inputs.records["train"])
    return inputs


_FILES = ("train", "forget", "retain", "neighbor", "real_authors", "world", "holdout")


def _world_inputs(
    size: str, note: Callable[[str], None], progress: bool | None, device: str = "cpu"
) -> ForgetInputs:
    from excise.world import PRESETS, build_world, world_is_built
    from excise.world.build import TRAINED_ON

    settings = PRESETS[size]()
    if current_shard().parallel and not world_is_built(settings):  # no rank waits for a build
        raise BadInputError(
            f"the embedded {size} world is not built yet; build it once in one process "
            f"(excise world --size {size}, on every machine), then run excise forget under "
            "torchrun"
        )
    folder, built = build_world(settings, progress=progress, note=note, device=device)
    note(f"{'built' if built else 'using'} the embedded {size} world: {folder}")
    inputs = ForgetInputs(
        model=folder / "base",
        reference=folder / "reference",
        files={s: folder / f"{s}.jsonl" for s in ("forget", "retain", *EVALUATION_SPLITS)},
        world=folder,
        trained_on=TRAINED_ON["base"],
    )
    return inputs


def attribute(
    model,
    task,
    inputs: ForgetInputs,
    folder: Path,
    options: EditOptions,
    factors: Factors | None = None,
    hashes: dict[str, str] | None = None,
    guard: tuple[int, str] = (0, "random"),
    progress: bool | None = None,
) -> tuple[Factors, dict, list[dict]]:
    """Factors on the training set (unless given); forget records' top-k proponents.

    The factor fit and the scores use the run's factor arguments (strategy, Fisher, seed)
    and damping, the same that the scope and a Newton step use. Returns the factors, the
    summary and the guard set: ``guard`` = (n, by) training examples outside the forget set,
    drawn at random (seeded) or with the largest predicted damage (:mod:`unlearn.guard`).
    Writes ``folder``/factors (when fitted here), scores/, topk.jsonl and summary.md.
    """
    train, forget = inputs.records["train"], inputs.records["forget"]
    fingerprint = fingerprint_of(hashes) if hashes is not None else None
    if factors is None:
        factors = fit_factors(
            model,
            task,
            train,
            options.factors,
            folder / "factors",
            progress,
            fingerprint=fingerprint,
        )
    shard = current_shard()
    if shard.is_main:
        folder.mkdir(exist_ok=True)
    ids = {"query_ids": [q["id"] for q in forget], "train_ids": [z["id"] for z in train]}
    damping = options.scope.damping
    scores = stored_pairwise_scores(
        model,
        task,
        forget,
        train,
        factors,
        folder / "scores",
        ScoreArguments(damping=damping),
        ids,
        progress,
        fingerprint=fingerprint,
    )
    k = min(TOP_K, len(train))
    rows = topk_rows(scores.total, forget, train, k)
    if shard.is_main:
        described = RunDescription(str(inputs.model), _train_name(inputs), damping)
        write_topk(folder, rows, described, factors)
    summary = attribution_summary(rows, forget, train, k)
    position = {z["id"]: i for i, z in enumerate(train)}
    own = [position.get(r["id"]) for r in forget]
    exclude = {i for i in own if i is not None}
    n, by = guard
    if by == "influence":
        chosen = guard_indices(scores.total, n, exclude)
    else:
        chosen = random_guard_indices(len(train), n, exclude, options.unlearn.seed)
    guarded = [train[i] for i in chosen]
    closure = None if None in own else [train[i] for i in closure_indices(scores.total, own)]
    summary["guard"] = {**records_summary(guarded, inputs), "by": by}
    summary["closure"] = (
        records_summary(closure, inputs)
        if closure is not None
        else {"n": None, "reason": "the forget records are not all in the training set"}
    )
    damage = dict(
        zip((z["id"] for z in train), predicted_damage(scores.total).tolist(), strict=True)
    )
    return factors, summary, {"guard": guarded, "closure": closure, "damage": damage}


def influence_foresight(
    damage: dict[str, float], inputs: ForgetInputs, report: dict[str, Any]
) -> dict[str, Any]:
    """Per split out of the forget set, how well the predicted damage ranked the records'
    observed loss rise (:func:`analysis.shift.foresight`)."""
    return {
        split: foresight(damage, inputs.splits[split], entry)
        for split, entry in report["shift"].items()
        if split != "forget"
    }


def edit_sets(
    inputs: ForgetInputs,
    chosen: dict[str, list[dict] | None],
    expand: bool,
    forget: list[dict] | None = None,
) -> tuple[list[dict], list[dict]]:
    """The forget and retain sets of the edit: the retain set and the guard after it; with
    ``expand``, the forget set and its closure (taken out of the retain set and guard).
    ``forget``: the forget records as the method sees them (default: as read)."""
    forget = inputs.records["forget"] if forget is None else forget
    retain = with_guard(inputs.records["retain"], chosen["guard"])
    if not expand:
        return forget, retain
    closure = chosen["closure"] or []  # run() refused --expand without them
    moved = {r["id"] for r in closure}
    return forget + closure, [r for r in retain if r["id"] not in moved]


def records_summary(records: list[dict], inputs: ForgetInputs) -> dict[str, Any]:
    """How many records a choice holds, their ids, and how many come from each split."""
    split_of = {r["id"]: name for name, split in inputs.splits.items() for r in split}
    by_split: dict[str, int] = {}
    for record in records:
        name = split_of.get(record["id"], "train")
        by_split[name] = by_split.get(name, 0) + 1
    return {"n": len(records), "by_split": by_split, "ids": [r["id"] for r in records]}


def attribution_summary(rows: list[dict], forget: list[dict], train: list[dict], k: int) -> dict:
    """How many of each forget record's top-k proponents are forget records themselves.

    The chance level is the forget share of the training set; attribution that finds the
    data responsible for a behaviour lands well above it.

    >>> rows = [{"proponents": [{"id": "f1"}, {"id": "r1"}]}]
    >>> attribution_summary(rows, [{"id": "f1"}], [{"id": "f1"}, {"id": "r1"}], 2)["precision"]
    0.5
    """
    forget_ids = {r["id"] for r in forget}
    in_train = sum(z["id"] in forget_ids for z in train)
    hits = [sum(p["id"] in forget_ids for p in row["proponents"]) for row in rows]
    return {
        "queries": len(rows),
        "train": len(train),
        "top_k": k,
        "precision": sum(hits) / (k * len(rows)) if rows else None,
        "chance": in_train / len(train) if train else None,
        "forget_records_in_train": in_train,
    }


def _untrained(missing: list[str], inputs: ForgetInputs) -> list[str]:
    """The warning for forget records that the training set (--train) does not hold."""
    if not missing:
        return []
    n = len(inputs.records["forget"])
    return [
        f"{len(missing)} of the {n} forget records are not in the training set (--train), "
        f"e.g. {missing[0]!r}: attribution cannot rank them among the training examples, "
        "and their closure is not computed"
    ]


def _check_unique_train_ids(train: list[dict]) -> None:
    seen: set[str] = set()
    for record in train:
        if record["id"] in seen:
            raise BadInputError(
                f"training record id {record['id']!r} appears twice; ids must be unique"
            )
        seen.add(record["id"])


def _input_paths(inputs: ForgetInputs) -> list[Path]:
    paths = [inputs.model, *(p for p in inputs.files.values() if p is not None)]
    return paths + ([inputs.reference] if inputs.reference else [])


def _default_out() -> Path:
    stamp = utc_timestamp(compact=True)
    base = excise_home() / "runs" / f"forget-{stamp}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str, note: Callable[[str], None]) -> Iterator[None]:
    """Announce a stage and time it into ``timings``."""
    note(f"{name} ...")
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 2)


def _unlearn_inputs(inputs: ForgetInputs, fingerprint: str, factors: str) -> dict[str, Any]:
    return {
        "model": {"path": str(inputs.model), "fingerprint": fingerprint},
        **{split: inputs.entry(split) for split in ("forget", "retain")},
        "factors": factors,
        "reference": str(inputs.reference) if inputs.reference else None,
    }


def _audit_paths(inputs: ForgetInputs, out: Path) -> dict[str, str | None]:
    return {
        "before": str(inputs.model),
        "after": str(out / "unlearn" / "model"),
        "reference": str(inputs.reference) if inputs.reference else None,
    }


def _sha256(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def _train_name(inputs: ForgetInputs) -> str:
    if inputs.files.get("train") is not None:
        return str(inputs.files["train"])
    if inputs.world is not None:
        return "the base model's training set (forget + retain + neighbor + world)"
    return "forget + retain"


def _summary(inputs, attribution, manifest, report, timings, seed, out) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "excise_version": package_version(),
        "created_utc": utc_timestamp(),
        "seed": seed,
        "out": str(out),
        "inputs": {
            "model": str(inputs.model),
            "reference": str(inputs.reference) if inputs.reference else None,
            "world": str(inputs.world) if inputs.world else None,
            "splits": {split: inputs.entry(split) for split in inputs.records},
        },
        "attribution": attribution,
        "unlearning": {
            "method": manifest["method"],
            "scope": {k: manifest["scope"][k] for k in ("method", "sparsity", "edited", "total")},
            "steps_run": manifest["result"]["steps_run"],
            "stopped": manifest["result"]["stopped"],
            "out_of_scope_identical": manifest["proof"]["out_of_scope_identical"],
            "out_of_scope_tensors": manifest["proof"]["out_of_scope_tensors"],
        },
        "headline": report["headline"],
        "seconds": dict(timings),
    }


def _ledger_entry(manifest, report, inputs: ForgetInputs, out: Path) -> LedgerEntry:
    forget = inputs.hashes["forget"] or records_sha256(inputs.records["forget"])
    return entry_from_report(
        report,
        method=manifest["method"],
        scope=manifest["scope"],
        report_path=out / "report.html",
        forget_sha256=forget,
    )


def records_sha256(records: list[dict[str, Any]]) -> str:
    """SHA-256 of the records' canonical JSON (for sets that are not one file)."""
    canonical = json.dumps(records, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
