"""Unlearning: every method × scope on the default embedded world, against retraining.

The default world (``excise world --size default``): a 4-layer Llama of width 128 (1.1 M
parameters) trained on forget (10 people, 60 facts), retain (80 people, 480 facts) and
world facts; the reference model is the same recipe retrained without the forget set.
EK-FAC factors are fitted once on the base model (forget + retain) and shared by every run;
each scope (method, sparsity) is chosen once on the base model and shared by every
unlearning method. Each configuration edits a fresh copy of the base model.

Two passes per unlearning method:

- ``default``: :class:`unlearn.UnlearnArguments` as they are (60 steps, lr 1e-3, retain
  budget 0.5 nats/token with step-back), on the unscoped scope ``all`` and on every
  scoped method at every sparsity;
- ``matched``: the scoped runs again with ``forget_target`` = the unscoped run's final
  forget loss, up to ``--matched-steps`` steps, measured every ``--matched-eval-every``
  steps: they stop as soon as they forget as much as the unscoped run did, so their
  neighbour shift is compared at matched forgetting.

Per configuration (every loss is the mean over records of the answer's mean token NLL,
:func:`unlearn.measure`):

- forget efficacy: forget loss (base 0.006, reference ≈ 2.1: what retraining reaches),
  forget probability (mean exp(−NLL/token)), forget truth ratio and forget quality (KS
  p-value of the forget truth ratios against the reference model's, with D and n);
- utility: retain and world loss;
- shift on the neighbour set (retain people who share attributes with forget people):
  mean over records of |Δ log p(answer)| (summed over answer tokens, after − before, with
  a bootstrap 95 % interval), the mean signed Δ and the mean token KL(before ‖ after);
- parameters: the scope's size (count, fraction) and how many actually changed, and the
  number of elements outside the scope that changed (must be 0);
- steps run, why the run stopped, and seconds (the scope's selection, shared and timed
  once, plus the unlearning).

Target (issue 5): a scoped configuration with ≤ 5 % of parameters whose forget loss is at
least the unscoped run's (same method) and whose neighbour |Δ log p| is at most half of it.

    python -m benchmarks.unlearning --quick     # npo and newton, 4 scopes at 5 %: ~2.5 min
    python -m benchmarks.unlearning             # the full grid: ~26 min on 2 shared cores
    python -m benchmarks.unlearning --methods npo --scopes all,ekfac --sparsities 0.05
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis.scoring import score_completions
from analysis.shift import bootstrap_mean_ci, token_shift
from analysis.truth import answer_log_probs, forget_quality, truth_ratio_value, truth_ratios
from attribution import FactorArguments, LanguageModelingTask, fit_factors
from benchmarks.common import machine_info, results_folder, write_report
from unlearn import (
    METHODS,
    Scope,
    ScopeArguments,
    UnlearnArguments,
    choose_scope,
    measure,
    scoped_edit,
)
from unlearn.proof import state_hashes

SCOPED = ("ekfac", "wagle", "saliency", "random")
ALL_SCOPES = ("all", *SCOPED)
SPARSITIES = (0.01, 0.05, 0.2)
MATCHED_SPARSITIES = (0.05,)
MATCHED_STEPS = 120  # twice the default: a small scope moves fewer weights per step
MATCHED_EVAL_EVERY = 2
MATCHED_NEWTON_ITERATIONS = 4  # newton's counterpart of more steps: repeated Newton steps
FORGOTTEN = 0.05  # nats/token above the base forget loss below which nothing was forgotten
QUICK = {"methods": ("npo", "newton"), "scopes": ("all", "ekfac", "wagle", "random")}
QUICK_SPARSITIES = (0.05,)
TARGET_FRACTION = 0.05  # the target: ≤ 5 % of parameters edited ...
TARGET_SHIFT_RATIO = 0.5  # ... with at most half the unscoped neighbour shift
BATCH_SIZE = 8  # the unlearning loop's default, so losses equal its monitor's
SPLITS = ("forget", "retain", "neighbor", "world")
TITLE = "Unlearning: methods × scopes on the default world"


@dataclass(frozen=True)
class Config:
    """One unlearning run: method, scope, sparsity (1 for ``all``) and pass."""

    method: str
    scope: str
    sparsity: float
    matched: bool = False

    @property
    def label(self) -> str:
        where = "all" if self.scope == "all" else f"{self.scope} {self.sparsity:g}"
        return f"{self.method} / {where}" + (" / matched" if self.matched else "")


@dataclass
class Bench:
    """The world loaded once: models, records, task, factors and what the runs share."""

    folder: Path
    base: nn.Module
    reference: nn.Module
    tokenizer: Any
    task: LanguageModelingTask
    sets: dict[str, list[dict[str, Any]]]
    factors: Any
    seed: int = 0
    base_forget_loss: float = 0.0
    reference_ratios: np.ndarray | None = None
    base_hashes: dict[str, str] = field(default_factory=dict)
    scopes: dict[tuple[str, float], tuple[Scope, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


# --- the world and its baselines -------------------------------------------------------


def default_world() -> Path:
    """The default embedded world's folder (built into the cache if it is missing)."""
    from excise.world import PRESETS, build_world

    return build_world(PRESETS["default"](), progress=False)[0]


def load_bench(folder: Path, seed: int = 0) -> Bench:
    """Load a world's models and splits, fit the shared EK-FAC factors (timed)."""
    from excise.models import load_model
    from excise.records import read_records

    base, tokenizer = load_model(folder / "base")
    reference, _ = load_model(folder / "reference")
    sets = {s: read_records(folder / f"{s}.jsonl") for s in SPLITS}
    task = LanguageModelingTask(tokenizer)
    started = time.perf_counter()
    factors = fit_factors(
        base,
        task,
        sets["forget"] + sets["retain"],
        FactorArguments(strategy="ekfac", seed=seed),
        None,
        False,
    )
    bench = Bench(Path(folder), base.eval(), reference.eval(), tokenizer, task, sets, factors)
    bench.seed = seed
    bench.seconds["factors"] = time.perf_counter() - started
    bench.base_forget_loss = measure(base, task, sets["forget"], BATCH_SIZE)
    bench.reference_ratios = forget_ratios(bench, reference)
    bench.base_hashes = state_hashes(base)
    return bench


def forget_ratios(bench: Bench, model: nn.Module) -> np.ndarray:
    """Truth ratio R per forget question (paraphrased vs perturbed answers)."""
    paraphrased, perturbed = answer_log_probs(model, bench.task, bench.sets["forget"])
    return truth_ratios(paraphrased, perturbed)


def shared_scope(bench: Bench, scope: str, sparsity: float) -> tuple[Scope, float]:
    """The scope of ``scope`` at ``sparsity`` on the base model, chosen once (and timed)."""
    key = (scope, sparsity)
    if key not in bench.scopes:
        started = time.perf_counter()
        chosen = choose_scope(
            bench.base,
            bench.task,
            bench.sets["forget"],
            bench.sets["retain"],
            ScopeArguments(method=scope, sparsity=sparsity, seed=bench.seed),
            bench.factors,
            BATCH_SIZE,
            False,
        )
        bench.scopes[key] = (chosen, time.perf_counter() - started)
    return bench.scopes[key]


# --- metrics ---------------------------------------------------------------------------


def evaluate(bench: Bench, model: nn.Module) -> dict[str, Any]:
    """Forget efficacy, utility and neighbour shift of ``model`` (see the module docstring)."""
    losses = {f"{s}_loss": measure(model, bench.task, bench.sets[s], BATCH_SIZE) for s in SPLITS}
    scores = score_completions(model, bench.task, bench.sets["forget"], progress=False)
    ratios = forget_ratios(bench, model)
    quality = forget_quality(ratios, bench.reference_ratios)
    return {
        **losses,
        "forget_probability": float(scores.probability.double().mean()),
        "forget_truth_ratio": truth_ratio_value(ratios, forget=True),
        "forget_quality": {k: quality[k] for k in ("p_value", "ks_statistic", "n", "n_reference")},
        "neighbor_shift": neighbor_shift(bench, model),
    }


def neighbor_shift(bench: Bench, model: nn.Module) -> dict[str, float]:
    """Mean |Δ log p| (with a bootstrap interval), mean Δ and mean KL on the neighbour set."""
    change, kl = token_shift(bench.base, model, bench.task, bench.sets["neighbor"])
    size = np.abs(change)
    low, high = bootstrap_mean_ci(size, seed=bench.seed)
    return {
        "abs_log_prob_change": float(size.mean()),
        "abs_log_prob_change_ci": [low, high],
        "log_prob_change": float(change.mean()),
        "kl": float(kl.mean()),
    }


def changed_elements(before: nn.Module, after: nn.Module, scope: Scope) -> tuple[int, int]:
    """Elements that differ from ``before``: ``(inside the scope, outside it)``."""
    inside = outside = 0
    old = dict(before.named_parameters())
    for name, param in after.named_parameters():
        differs = param.detach() != old[name].detach()
        mask = scope.masks.get(name, torch.zeros_like(differs))
        inside += int((differs & mask).sum())
        outside += int((differs & ~mask).sum())
    return inside, outside


def baseline_rows(bench: Bench) -> list[dict[str, Any]]:
    """The base model (before unlearning) and the reference model (retrained without forget)."""
    return [
        {"model": name, "metrics": evaluate(bench, model)}
        for name, model in (("base", bench.base), ("reference", bench.reference))
    ]


# --- one configuration -----------------------------------------------------------------


def run_configuration(
    bench: Bench, config: Config, arguments: UnlearnArguments
) -> tuple[dict[str, Any], nn.Module]:
    """Unlearn a copy of the base model as ``config`` says; returns its row and the model."""
    scope, scope_seconds = shared_scope(bench, config.scope, config.sparsity)
    model = copy.deepcopy(bench.base)
    started = time.perf_counter()
    edit = scoped_edit(
        model,
        bench.task,
        bench.sets["forget"],
        bench.sets["retain"],
        scope,
        arguments,
        bench.factors,
        before=bench.base_hashes,
        frozen=bench.base,
        progress=False,
    )
    unlearn_seconds = time.perf_counter() - started
    result, proof = edit.result, edit.proof
    inside, outside = changed_elements(bench.base, model, scope)
    row = {
        **dataclasses.asdict(config),
        "pass": "matched" if config.matched else "default",
        "label": config.label,
        "arguments": arguments.to_dict(),
        "edited": scope.edited,
        "total": scope.total,
        "fraction": scope.fraction,
        "changed": inside,
        "changed_outside_scope": outside,
        "proof_holds": proof["holds"],
        "steps_run": result.steps_run,
        "stopped": result.stopped,
        "history": result.to_dict()["history"],
        "scope_seconds": scope_seconds,
        "unlearn_seconds": unlearn_seconds,
        "metrics": evaluate(bench, model),
    }
    return row, model


def arguments_for(
    config: Config,
    defaults: UnlearnArguments,
    unscoped: dict[str, Any] | None,
    base_forget_loss: float,
    plan: dict[str, Any],
) -> UnlearnArguments | None:
    """The run's arguments: the defaults, or for a matched run the unscoped forget loss as
    target with the matched budget of steps (newton: of Newton iterations). None: there
    is no unscoped run to match, or it forgot nothing."""
    if not config.matched:
        return defaults
    if unscoped is None or _forget(unscoped) < base_forget_loss + FORGOTTEN:
        return None
    return dataclasses.replace(
        defaults,
        forget_target=_forget(unscoped),
        steps=plan["matched_steps"],
        eval_every=plan["matched_eval_every"],
        newton_iterations=plan["matched_newton_iterations"],
    )


def configurations(
    method: str, scopes: Sequence[str], sparsities: Sequence[float], matched: Sequence[float]
) -> list[Config]:
    """One method's runs: unscoped first, then each scope × sparsity, then the matched."""
    runs = [Config(method, "all", 1.0)] if "all" in scopes else []
    scoped = [s for s in scopes if s != "all"]
    runs += [Config(method, s, p) for s in scoped for p in sparsities]
    runs += [Config(method, s, p, matched=True) for s in scoped for p in matched]
    return runs


# --- the target ------------------------------------------------------------------------


def target_check(
    rows: Sequence[dict[str, Any]], base_forget_loss: float
) -> dict[str, dict[str, Any]]:
    """Per method: the unscoped run; the scoped runs with ≤ 5 % of parameters that forget
    at least as much (``matching_runs``), the one of them with the least neighbour shift
    (``best``) and those within half the unscoped shift (``meeting``). An unscoped run
    that forgot nothing has nothing to match: no best, target not met."""
    verdicts = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        unscoped = next((r for r in mine if r["scope"] == "all"), None)
        if unscoped is None:
            continue
        forget, shift = _forget(unscoped), _shift(unscoped)
        forgot = forget >= base_forget_loss + FORGOTTEN
        eligible = [r for r in mine if forgot and _matches(r, forget)]
        meeting = [r["label"] for r in eligible if _shift(r) <= TARGET_SHIFT_RATIO * shift]
        best = min(eligible, key=_shift, default=None)
        verdicts[method] = {
            "unscoped_forget_loss": forget,
            "unscoped_neighbor_shift": shift,
            "unscoped_forgot": forgot,
            "matching_runs": len(eligible),
            "best": best["label"] if best else None,
            "best_forget_loss": _forget(best) if best else None,
            "best_neighbor_shift": _shift(best) if best else None,
            "shift_ratio": _shift(best) / shift if best and shift > 0 else None,
            "meeting": meeting,
            "met": bool(meeting),
        }
    return verdicts


def _matches(row: dict[str, Any], unscoped_forget_loss: float) -> bool:
    """A scoped run with ≤ 5 % of parameters that forgot as much as the unscoped run."""
    return (
        row["scope"] != "all"
        and row["fraction"] <= TARGET_FRACTION
        and _forget(row) >= unscoped_forget_loss
    )


def _forget(row: dict[str, Any]) -> float:
    return row["metrics"]["forget_loss"]


def _shift(row: dict[str, Any]) -> float:
    return row["metrics"]["neighbor_shift"]["abs_log_prob_change"]


# --- the report ------------------------------------------------------------------------

COLUMNS = (
    "method",
    "scope",
    "sparsity",
    "run",
    "edited %",
    "steps (stop)",
    "forget loss",
    "forget P",
    "forget TR",
    "FQ p",
    "retain loss",
    "world loss",
    "nbr \\|Δ log p\\|",
    "nbr KL",
    "s",
)
VERDICT_COLUMNS = (
    "method",
    "unscoped forget",
    "unscoped nbr",
    "least-shift scoped run that forgets as much",
    "forget",
    "nbr",
    "ratio",
    "runs meeting the target",
)
STOPS = {"steps": "steps", "retain budget": "budget", "forget target": "target"}


def markdown(report: dict[str, Any]) -> str:
    """The results table (baselines first, then by method, pass, scope, sparsity) and the
    target verdicts."""
    lines = [_header(COLUMNS)]
    lines += [_baseline_line(b) for b in report["baselines"]]
    lines += [_row_line(r) for r in sorted(report["results"], key=_order)]
    table = "\n".join(lines) + "\n"
    verdicts = report.get("target", {})
    if verdicts:
        table += "\n" + _verdict_table(verdicts)
    note = (
        f"\nWorld {Path(report['world']['folder']).name}; forget loss = mean answer NLL "
        "per token; nbr = neighbour set, |Δ log p| = mean |change of the answer's summed "
        "log-probability| from the base model; KL = mean token KL(base ‖ edited); FQ p = "
        "forget quality (KS p-value against the reference model's forget truth ratios); "
        "s = seconds of scope selection + unlearning. "
        f"{report['machine']['threads']} thread(s) on {report['machine']['cpu_count']} "
        f"CPUs; torch {report['machine']['torch']}; {report['machine']['date']}; "
        f"{report.get('wall_seconds', 0):.0f} s in all.\n"
    )
    return table + note


def _header(columns: Sequence[str], text: Sequence[int] = (0, 1, 2, 3)) -> str:
    """A table header; the columns at indices ``text`` are left-aligned, numbers right."""
    aligned = ["---" if i in text else "---:" for i in range(len(columns))]
    return "| " + " | ".join(columns) + " |\n|" + "|".join(aligned) + "|"


def _order(row: dict[str, Any]) -> tuple:
    names = list(METHODS)
    method = names.index(row["method"]) if row["method"] in names else len(names)
    scope = ALL_SCOPES.index(row["scope"]) if row["scope"] in ALL_SCOPES else len(ALL_SCOPES)
    return (method, row["matched"], scope, row["sparsity"])


def _metric_cells(m: dict[str, Any]) -> list[str]:
    p = m["forget_quality"]["p_value"]
    shift = m.get("neighbor_shift")
    return [
        f"{m['forget_loss']:.3f}",
        f"{m['forget_probability']:.3f}",
        f"{m['forget_truth_ratio']:.3f}",
        f"{p:.1e}" if p is not None else "—",
        f"{m['retain_loss']:.3f}",
        f"{m['world_loss']:.3f}",
        f"{shift['abs_log_prob_change']:.2f}" if shift else "—",
        f"{shift['kl']:.3f}" if shift else "—",
    ]


def _baseline_line(baseline: dict[str, Any]) -> str:
    cells = [f"*{baseline['model']}*", "", "", "", "", "", *_metric_cells(baseline["metrics"]), ""]
    return "| " + " | ".join(cells) + " |"


def _row_line(r: dict[str, Any]) -> str:
    cells = [
        r["method"],
        r["scope"],
        "" if r["scope"] == "all" else f"{r['sparsity']:g}",
        r["pass"],
        f"{100 * r['fraction']:.1f}",
        f"{r['steps_run']} ({STOPS.get(r['stopped'], r['stopped'])})",
        *_metric_cells(r["metrics"]),
        f"{r['scope_seconds'] + r['unlearn_seconds']:.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


def _verdict_table(verdicts: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"Target: ≤ {100 * TARGET_FRACTION:g} % of parameters, forget loss ≥ the unscoped "
        f"run's, neighbour |Δ log p| ≤ {TARGET_SHIFT_RATIO:g} × the unscoped run's.\n",
        _header(VERDICT_COLUMNS, text=(0, 3, 7)),
    ]
    lines += ["| " + " | ".join(_verdict_cells(m, v)) + " |" for m, v in verdicts.items()]
    return "\n".join(lines) + "\n"


def _verdict_cells(method: str, v: dict[str, Any]) -> list[str]:
    best = v["best"] is not None
    if not v["unscoped_forgot"]:
        name = "— (the unscoped run forgot nothing)"
    else:
        name = v["best"] or "none forgets as much"
    return [
        method,
        f"{v['unscoped_forget_loss']:.3f}",
        f"{v['unscoped_neighbor_shift']:.2f}",
        name,
        f"{v['best_forget_loss']:.3f}" if best else "—",
        f"{v['best_neighbor_shift']:.2f}" if best else "—",
        f"{v['shift_ratio']:.2f}" if v["shift_ratio"] is not None else "—",
        "; ".join(v["meeting"]) or "none",
    ]


def finish(report: dict[str, Any], folder: Path) -> str:
    """Add the target verdicts, write the JSON and the table; return the table."""
    report["target"] = target_check(report["results"], report["world"]["base_forget_loss"])
    table = markdown(report)
    write_report("unlearning", TITLE, report, table, folder)
    return table


# --- the command -----------------------------------------------------------------------


def run_benchmark(
    bench: Bench,
    methods: Sequence[str],
    plan: dict[str, Any],
    report: dict[str, Any],
    folder: Path | None,
    started: float,
) -> dict[str, Any]:
    """Run every configuration of ``plan`` for each method, appending rows to ``report``
    (written to ``folder`` after each method, so a crash keeps what is done)."""
    defaults = plan["arguments"]
    for method in methods:
        unscoped = None
        for config in configurations(method, plan["scopes"], plan["sparsities"], plan["matched"]):
            own = dataclasses.replace(defaults, method=method)
            arguments = arguments_for(config, own, unscoped, bench.base_forget_loss, plan)
            if arguments is None:
                continue
            row = run_configuration(bench, config, arguments)[0]
            unscoped = row if config.scope == "all" else unscoped
            report["results"].append(row)
            print(_progress(row), file=sys.stderr, flush=True)
        report["wall_seconds"] = time.perf_counter() - started
        if folder is not None:
            finish(report, folder)
    return report


def _progress(row: dict[str, Any]) -> str:
    m = row["metrics"]
    return (
        f"{row['label']:32s} {row['steps_run']:4d} steps ({row['stopped']}), forget "
        f"{m['forget_loss']:.3f}, retain {m['retain_loss']:.3f}, neighbour |Δ| "
        f"{m['neighbor_shift']['abs_log_prob_change']:.2f}, "
        f"{row['scope_seconds'] + row['unlearn_seconds']:.1f} s"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="npo and newton, 4 scopes at 5 %%")
    parser.add_argument("--world", type=Path, help="a world folder (default: the default world)")
    parser.add_argument("--methods", help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--scopes", help=f"comma-separated, of {', '.join(ALL_SCOPES)}")
    parser.add_argument("--sparsities", help="comma-separated fractions for the scoped runs")
    parser.add_argument("--matched-sparsities", help="comma-separated; empty: no matched pass")
    parser.add_argument("--matched-steps", type=int, default=MATCHED_STEPS)
    parser.add_argument("--matched-eval-every", type=int, default=MATCHED_EVAL_EVERY)
    parser.add_argument("--matched-newton-iterations", type=int, default=MATCHED_NEWTON_ITERATIONS)
    parser.add_argument("--steps", type=int, help="override the default pass's steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, help="folder for the report files")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """The methods and the plan (scopes, sparsities, matched pass, default arguments)."""

    def listed(text: str | None, default: Sequence, kind=str) -> list:
        if text is None:
            return list(default)
        return [kind(x) for x in text.split(",") if x.strip()]

    methods = listed(args.methods, QUICK["methods"] if args.quick else METHODS)
    arguments = UnlearnArguments(seed=args.seed)
    if args.steps is not None:
        arguments = dataclasses.replace(arguments, steps=args.steps)
    return methods, {
        "scopes": listed(args.scopes, QUICK["scopes"] if args.quick else ALL_SCOPES),
        "sparsities": listed(
            args.sparsities, QUICK_SPARSITIES if args.quick else SPARSITIES, float
        ),
        "matched": listed(args.matched_sparsities, MATCHED_SPARSITIES, float),
        "matched_steps": args.matched_steps,
        "matched_eval_every": args.matched_eval_every,
        "matched_newton_iterations": args.matched_newton_iterations,
        "arguments": arguments,
    }


def new_report(bench: Bench, plan: dict[str, Any], argv: list[str], threads: int) -> dict:
    """The report's header: command, machine, world, shared timings, baselines."""
    return {
        "benchmark": "unlearning",
        "command": ("python -m benchmarks.unlearning " + " ".join(argv)).strip(),
        "machine": machine_info(threads, peers=()),
        "world": {
            "folder": str(bench.folder),
            "sizes": {s: len(r) for s, r in bench.sets.items()},
            "parameters": sum(p.numel() for p in bench.base.parameters()),
            "base_forget_loss": bench.base_forget_loss,
        },
        "plan": {**plan, "arguments": plan["arguments"].to_dict()},
        "factor_seconds": bench.seconds["factors"],
        "baselines": baseline_rows(bench),
        "results": [],
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    methods, plan = make_plan(args)
    bench = load_bench(args.world or default_world(), args.seed)
    report = new_report(bench, plan, argv, args.threads)
    folder = results_folder(args.results, args.quick)
    run_benchmark(bench, methods, plan, report, folder, started)
    report["wall_seconds"] = time.perf_counter() - started
    table = finish(report, folder)
    print(table)
    print(f"written to {folder} in {report['wall_seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
