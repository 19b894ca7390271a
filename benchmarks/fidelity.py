"""Attribution fidelity: LDS against retraining, and agreement with exact influence.

Linear datamodeling score (LDS; TRAK, Park et al. 2023; dattri). M random halves
S₁ … S_M of the training set are drawn; on each, models are retrained from scratch with
``--seeds`` seeds, and each query's measured loss L_m(q) is the mean over the seeds.
A method's scores τ(q, z) (excise's sign: positive when training on z lowers q's loss)
predict the loss on subset m as −Σ_{z ∈ S_m} τ(q, z) (up to a constant), and

    LDS(q) = Spearman_m( −Σ_{z ∈ S_m} τ(q, z),  L_m(q) ),

reported as the mean ± standard error over queries (a query whose measured loss is the
same on every subset has no LDS and is left out; the count is recorded). dattri computes
the same number with the signs flipped on both sides (Σ τ against −loss).

The scores come from models trained on the full training set: ``models[0]`` for
single-model methods, ``--ensemble`` models (seeds 0, 1, …) for the ensembles. The
noise ceiling ``seed_agreement`` is the mean over queries of the Spearman correlation
between the losses of two retraining seeds across subsets: no method's LDS against a
one-seed ground truth can be expected above it.

Retrained models and their query losses are cached under ``benchmarks/cache/fidelity/
<setting key>/`` (the key hashes the data, the model and the training settings), one file
per subset and seed, so a rerun, or a run with more subsets, only trains what is new.

    python -m benchmarks.fidelity --quick                     # a few minutes
    python -m benchmarks.fidelity                             # both settings, exact agreement
    python -m benchmarks.fidelity --settings digits --subsets 200 --seeds 3 --methods excise-ekfac
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # dattri's progress bars (read when tqdm loads)

import argparse
import gc
import math
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attribution.artifacts import utc_timestamp
from benchmarks.common import CACHE, results_folder, write_report
from benchmarks.fidelity_methods import ENSEMBLES, METHODS, PEERS

FIDELITY_CACHE = CACHE / "fidelity"
SUBSET_SEED = 10_000  # subset i is drawn with seed SUBSET_SEED + i
FULL = {"digits": {"subsets": 100, "seeds": 3}, "world": {"subsets": 48, "seeds": 2}}
QUICK = {"digits": {"subsets": 20, "seeds": 1}, "world": {"subsets": 10, "seeds": 1}}
ENSEMBLE, QUICK_ENSEMBLE = 5, 3
# --quick leaves these out unless --methods names them (the slowest: DataInf ~10 min on
# digits, CG ~90 min on the world, Arnoldi ~8 min on the world)
QUICK_SKIPS = ("dattri-datainf", "dattri-cg", "dattri-arnoldi")
ALL_SETTINGS = ("digits", "world", "exact")
EXACT_HIDDEN = 32  # the exact-influence MLP: 64-32-10
METHOD_TIMEOUT = [900]  # seconds one method may take (--method-timeout)
NOT_RUN = {  # (setting, method): why a full run leaves it out (recorded in the report)
    ("world", "dattri-cg"): "not run: ~90 min measured (one iteration for 32 queries took "
    "41 s and 4 GB; 10 iterations × 24 query/train batch pairs), past the method timeout",
}


# --- the LDS ---------------------------------------------------------------------------


def subset_masks(n_train: int, n_subsets: int) -> torch.Tensor:
    """[n_subsets, n_train] booleans, each row a random half (subset i: seed 10000 + i)."""
    masks = torch.zeros(n_subsets, n_train, dtype=torch.bool)
    for i in range(n_subsets):
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(SUBSET_SEED + i))
        masks[i, order[: n_train // 2]] = True
    return masks


def spearman_columns(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of each column of x [m, q] with the same column of y (average
    ranks for ties); NaN for a constant column. The library's, which the damping search
    uses too."""
    from attribution.damping_search import rank_correlations

    return rank_correlations(x, y)


def lds(scores: torch.Tensor, masks: torch.Tensor, measured: torch.Tensor) -> torch.Tensor:
    """LDS of each query (module docstring): scores [q, n], masks [m, n], measured [m, q].

    >>> scores = torch.tensor([[1.0, 0.0, -1.0]])  # z0 helps the query, z2 hurts it
    >>> masks = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.bool)
    >>> round(lds(scores, masks, torch.tensor([[0.1], [0.9], [0.5]])).item(), 6)
    1.0
    """
    predicted_loss = -(masks.double() @ scores.double().T)  # [m, q]
    return spearman_columns(predicted_loss, measured)


def summary(values: torch.Tensor) -> dict[str, Any]:
    """Mean, standard error and count of the finite values."""
    finite = values[torch.isfinite(values)].double()
    n = finite.numel()
    mean = finite.mean().item() if n else math.nan
    stderr = (finite.std().item() / math.sqrt(n)) if n > 1 else math.nan
    return {"mean": mean, "stderr": stderr, "n": n}


# --- retraining, cached ----------------------------------------------------------------


def cached_model(setting, folder: Path, label: str, indices, seed: int, keep: bool):
    """The query losses of a model trained on ``indices`` with ``seed`` (and the model if
    ``keep``), trained now or read from ``folder/<label>-seed<seed>.pt``."""
    path = folder / f"{label}-seed{seed}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        model = None
        if keep:
            model = setting.new_model(seed)
            model.load_state_dict(saved["state_dict"])
            model.eval()
        return saved["query_losses"], model
    model = setting.fit(indices, seed)
    losses = setting.query_losses(model)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "query_losses": losses, "indices": list(indices)}, tmp)
    os.replace(tmp, path)
    return losses, model if keep else None


def ground_truth(setting, masks: torch.Tensor, seeds: int, folder: Path) -> torch.Tensor:
    """Query losses [subsets, seeds, queries], retraining what the cache lacks."""
    rows = []
    for i, mask in enumerate(masks):
        indices = mask.nonzero().flatten().tolist()
        losses = [
            cached_model(setting, folder, f"subset{i}", indices, s, False)[0] for s in range(seeds)
        ]
        rows.append(torch.stack(losses))
        if (i + 1) % 10 == 0:
            print(f"  [{setting.name}] {i + 1}/{len(masks)} subsets retrained", file=sys.stderr)
    return torch.stack(rows)


def seed_agreement(losses: torch.Tensor) -> dict[str, Any] | None:
    """Mean per-query Spearman between seed 0 and seed 1 losses across subsets."""
    if losses.shape[1] < 2:
        return None
    return summary(spearman_columns(losses[:, 0], losses[:, 1]))


# --- one setting -----------------------------------------------------------------------


def run_method(name: str, setting, models: Sequence[nn.Module]) -> tuple[dict, torch.Tensor | None]:
    """One method's scores and seconds, or its error (the message and where it was raised)."""
    started = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(METHOD_TIMEOUT[0])
    try:
        scores = METHODS[name](setting, models).detach()
        if scores.shape != (len(setting.queries), len(setting.train)):
            raise RuntimeError(f"scores of shape {list(scores.shape)}")
        if not torch.isfinite(scores).all():
            raise FloatingPointError("scores contain NaN or infinity")
    except Exception as error:
        lines = traceback.format_exception(error)
        where = [line.strip() for line in lines if line.strip().startswith("File")][-3:]
        message = f"{type(error).__name__}: {error}".strip()
        print(f"  {name} failed: {message[:300]}", file=sys.stderr)
        return {"error": message[:2000], "where": where}, None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        gc.collect()
    return {"seconds": time.perf_counter() - started}, scores


def _out_of_time(signum, frame):
    raise TimeoutError(f"stopped after {METHOD_TIMEOUT[0]} s (--method-timeout)")


def limit_memory(gigabytes: float) -> None:
    """Cap this process's address space, so a method that asks for too much memory fails
    (and is recorded) instead of taking the shared machine down."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = int(gigabytes * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard < 0 else min(limit, hard), hard))


def benchmark_setting(setting, methods, n_subsets: int, seeds: int, ensemble: int, cache: Path):
    """LDS of every method on one setting."""
    folder = cache / setting.key()
    started = time.perf_counter()
    needs_ensemble = any(m in ENSEMBLES for m in methods)
    models = [
        cached_model(setting, folder, "full", range(len(setting.train)), s, True)[1]
        for s in range(ensemble if needs_ensemble else 1)
    ]
    masks = subset_masks(len(setting.train), n_subsets)
    losses = ground_truth(setting, masks, seeds, folder)  # [m, seeds, q]
    retrain_seconds = time.perf_counter() - started
    measured = losses.mean(1)
    results, scores = {}, {}
    for name in methods:
        if (setting.name, name) in NOT_RUN:
            results[name], scores[name] = {"not_run": NOT_RUN[setting.name, name]}, None
            continue
        print(f"[{setting.name}] {name} ...", file=sys.stderr, flush=True)
        results[name], scores[name] = run_method(name, setting, models)
        if scores[name] is not None:
            per_query = lds(scores[name], masks, measured)
            results[name].update(lds=summary(per_query), per_query=per_query.tolist())
    _add_cross_correlations(results, scores)
    return {
        "setting": setting.name,
        "key": setting.key(),
        "describe": setting.describe(),
        "subsets": n_subsets,
        "seeds": seeds,
        "ensemble": len(models),
        "retrain_seconds": retrain_seconds,
        "full_model_query_loss": setting.query_losses(models[0]).mean().item(),
        "half_model_query_loss": measured.mean().item(),
        "seed_agreement": seed_agreement(losses),
        "methods": results,
    }


def _add_cross_correlations(results: dict, scores: dict) -> None:
    """Each method's Pearson correlation with excise-ekfac's and excise-identity's scores
    (a sign check: a peer with the opposite convention would come out negative)."""
    for reference in ("excise-ekfac", "excise-identity"):
        ref = scores.get(reference)
        if ref is None:
            continue
        for name, value in scores.items():
            if value is not None:
                pair = torch.stack([value.flatten(), ref.flatten()]).double()
                results[name][f"pearson_with_{reference}"] = torch.corrcoef(pair)[0, 1].item()


def paired_difference(a: dict, b: dict) -> dict[str, Any] | None:
    """Mean ± stderr over queries of LDS(a) − LDS(b) (paired: the same queries)."""
    if "per_query" not in a or "per_query" not in b:
        return None
    diff = torch.tensor(a["per_query"]) - torch.tensor(b["per_query"])
    return summary(diff)


# --- exact influence -------------------------------------------------------------------


def benchmark_exact(methods, cache: Path) -> dict[str, Any]:
    """Every method's agreement with exact damped Gauss-Newton and Hessian influence on
    a 64-32-10 MLP trained on the digits training set."""
    from benchmarks.fidelity_exact import agreement, exact_scores
    from benchmarks.fidelity_settings import DigitsConfig, DigitsSetting

    setting = DigitsSetting(DigitsConfig(hidden=EXACT_HIDDEN), name="digits-small")
    folder = cache / setting.key()
    needs_ensemble = any(m in ENSEMBLES for m in methods)
    models = [
        cached_model(setting, folder, "full", range(len(setting.train)), s, True)[1]
        for s in range(QUICK_ENSEMBLE if needs_ensemble else 1)
    ]
    started = time.perf_counter()
    exact = exact_scores(
        models[0], setting.x_train, setting.y_train, setting.x_query, setting.y_query
    )
    exact_seconds = time.perf_counter() - started
    results, scores = {}, {}
    for name in methods:
        print(f"[exact] {name} ...", file=sys.stderr, flush=True)
        results[name], scores[name] = run_method(name, setting, models)
    table = agreement({k: v for k, v in scores.items() if v is not None}, exact["scores"])
    for name, value in table.items():
        results.setdefault(name, {})["agreement"] = value
    return {
        "setting": "exact",
        "describe": setting.describe(),
        "n_parameters": exact["n_parameters"],
        "matrices": exact["matrices"],
        "exact_seconds": exact_seconds,
        "methods": results,
    }


# --- the report ------------------------------------------------------------------------


def _fmt(entry: dict) -> str:
    if "error" in entry:
        return "failed"
    if "not_run" in entry:
        return "not run"
    if "lds" not in entry:
        return "–"
    s = entry["lds"]
    return f"{s['mean']:.3f} ± {s['stderr']:.3f}"


def markdown(report: dict[str, Any]) -> str:
    """LDS table (setting × method), exact-agreement table, failures, notes."""
    lds_runs = [r for r in report["results"] if r["setting"] != "exact"]
    names = list(dict.fromkeys(m for r in lds_runs for m in r["methods"]))
    text = ""
    if lds_runs:
        head = "| method | " + " | ".join(f"{r['setting']} LDS | s" for r in lds_runs) + " |\n"
        head += "|---|" + "---:|---:|" * len(lds_runs) + "\n"
        rows = []
        for name in names:
            cells = []
            for r in lds_runs:
                entry = r["methods"].get(name, {})
                seconds = f"{entry['seconds']:.1f}" if "seconds" in entry else ""
                cells += [_fmt(entry), seconds]
            if any(cells):
                rows.append(f"| {name} | " + " | ".join(cells) + " |")
        ceiling = ["seed agreement (noise ceiling)"]
        for r in lds_runs:
            agree = r["seed_agreement"]
            ceiling += [f"{agree['mean']:.3f} ± {agree['stderr']:.3f}" if agree else "–", ""]
        rows.append("| " + " | ".join(ceiling) + " |")
        text += head + "\n".join(rows) + "\n\n"
        for r in lds_runs:
            d = r["describe"]
            text += (
                f"- {r['setting']}: {d['model']}, {d['n_train']} training examples, "
                f"{d['n_queries']} queries; {r['subsets']} random halves × {r['seeds']} "
                f"retraining seeds ({r['retrain_seconds']:.0f} s to retrain, or read from the "
                f"cache); ensembles over {r['ensemble']} full-data models.\n"
            )
    exact = next((r for r in report["results"] if r["setting"] == "exact"), None)
    if exact:
        m = exact["matrices"]
        kinds = list(m)
        damping = "; ".join(
            f"{k}: λ = {v['damping']:.3g}, smallest eigenvalue {v['min_eigenvalue']:.3g}"
            + (" (indefinite after damping)" if v["indefinite_after_damping"] else "")
            for k, v in m.items()
        )
        text += (
            f"\nAgreement with exact influence on an MLP 64-{EXACT_HIDDEN}-10 "
            f"({exact['n_parameters']} parameters, every one tracked), damping 0.1 × mean "
            f"eigenvalue ({damping}). Each cell: Pearson / Spearman over all [query, train] "
            "entries / per-query Spearman averaged over queries.\n\n"
            "| method | " + " | ".join(f"vs {k}" for k in kinds) + " |\n"
            "|---|" + "---:|" * len(kinds) + "\n"
        )
        for name, entry in exact["methods"].items():
            agree = entry.get("agreement")
            if agree is None:
                text += f"| {name} | failed" + " |" * len(kinds) + "\n"
                continue
            cells = [
                " / ".join(
                    f"{agree[k][c]:.3f}" for c in ("pearson", "spearman", "per_query_spearman")
                )
                for k in kinds
            ]
            text += f"| {name} | " + " | ".join(cells) + " |\n"
    failures = [
        (r["setting"], name, entry["error"])
        for r in report["results"]
        for name, entry in r["methods"].items()
        if "error" in entry
    ]
    if failures:
        text += "\nFailures (the error each raised):\n\n"
        for setting, name, error in failures:
            first = error.splitlines()[0][:240] if error else ""
            text += f"- {setting} / {name}: `{first}`\n"
    m = report["machine"]
    text += (
        f"\n{m['threads']} threads on {m['cpu_count']} shared CPUs (timings are noisy; "
        f"correlations are not); torch {m['torch']}, "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f"; {m['date']}. Command: `{report['command']}`\n"
    )
    return text


def machine(threads: int) -> dict[str, Any]:
    import platform

    versions = {}
    for package in ("excise", "kronfluence", "dattri", "scikit-learn", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "load_average_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "versions": versions,
        "date": utc_timestamp(),
    }


# --- the command -----------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few subsets, one seed")
    parser.add_argument("--subsets", type=int, help="random halves per setting")
    parser.add_argument("--seeds", type=int, help="retraining seeds per subset")
    parser.add_argument("--ensemble", type=int, help="full-data models the ensembles use")
    parser.add_argument("--settings", default=",".join(ALL_SETTINGS), help="digits,world,exact")
    skipped = ", ".join(QUICK_SKIPS)
    parser.add_argument(
        "--methods", help=f"comma-separated (default: all; --quick leaves out {skipped})"
    )
    parser.add_argument("--no-peers", action="store_true", help="excise's methods only")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)"
    )
    parser.add_argument("--method-timeout", type=int, default=900, help="seconds per method")
    parser.add_argument("--memory-gb", type=float, default=6.0, help="address-space cap")
    parser.add_argument("--cache", type=Path, default=FIDELITY_CACHE, help="retrained models")
    parser.add_argument(
        "--results", type=Path, help="default: benchmarks/results (cache/quick with --quick)"
    )
    parser.add_argument("--digits-data", help=argparse.SUPPRESS)  # tests: a .pt of (x, y)
    args = parser.parse_args(argv)
    args.setting_list = [s.strip() for s in args.settings.split(",") if s.strip()]
    if not args.setting_list or any(s not in ALL_SETTINGS for s in args.setting_list):
        parser.error(f"--settings: choose from {', '.join(ALL_SETTINGS)}")
    if args.methods is None:  # the slowest peers, see QUICK_SKIPS
        args.methods = ",".join(m for m in METHODS if not (args.quick and m in QUICK_SKIPS))
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.method_list if m not in METHODS]
    if unknown or not args.method_list:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if args.no_peers:
        args.method_list = [m for m in args.method_list if m not in PEERS]
    for name in ("subsets", "seeds", "ensemble"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name}: at least 1")
    if args.subsets is not None and args.subsets < 3:
        parser.error("--subsets: at least 3 (a rank correlation needs them)")
    return args


def make_setting(name: str, args: argparse.Namespace):
    from benchmarks.fidelity_settings import DigitsConfig, DigitsSetting, WorldSetting

    if name == "digits":
        if args.digits_data:  # tests: a tiny synthetic data set and model
            x, y, config = torch.load(args.digits_data, weights_only=False)
            return DigitsSetting(DigitsConfig(**config), data=(x, y))
        return DigitsSetting()
    return WorldSetting()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    METHOD_TIMEOUT[0] = args.method_timeout
    if args.memory_gb > 0:
        limit_memory(args.memory_gb)
    started = time.perf_counter()
    plan = QUICK if args.quick else FULL
    ensemble = args.ensemble or (QUICK_ENSEMBLE if args.quick else ENSEMBLE)
    command = "python -m benchmarks.fidelity " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    report = {
        "benchmark": "fidelity",
        "quick": args.quick,
        "command": command.strip(),
        "method_timeout_seconds": args.method_timeout,
        "memory_limit_gb": args.memory_gb,
        "machine": machine(args.threads),
        "results": [],
    }
    folder = results_folder(args.results, args.quick)
    for name in args.setting_list:
        if name == "exact":
            report["results"].append(benchmark_exact(args.method_list, args.cache))
        else:
            subsets = args.subsets or plan[name]["subsets"]
            seeds = args.seeds or plan[name]["seeds"]
            setting = make_setting(name, args)
            report["results"].append(
                benchmark_setting(setting, args.method_list, subsets, seeds, ensemble, args.cache)
            )
        report["wall_seconds"] = time.perf_counter() - started
        table = finish(report, folder)  # after each setting, so a crash keeps what is done
    print(table)
    print(f"written to {folder} in {report['wall_seconds']:.0f} s", file=sys.stderr)
    return 0


def finish(report: dict[str, Any], folder: Path) -> str:
    """Add the paired differences, write the JSON and the table; return the table."""
    report["paired_differences"] = comparisons = {}
    pairs = [
        ("excise-ekfac", "kronfluence-ekfac"),
        ("excise-ekfac-ensemble", "dattri-trak"),
        ("excise-ekfac-ensemble", "dattri-trak-ensemble"),
    ]
    peers = ("dattri-tracin", "dattri-datainf", "dattri-trak", "dattri-cg", "dattri-arnoldi")
    pairs += [("excise-ekfac", p) for p in peers]
    # excise attribute's defaults (true Fisher) against the empirical Fisher, the
    # curvature-free baseline and the strongest peers
    others = ("excise-ekfac", "excise-identity", "dattri-cg", "dattri-arnoldi")
    pairs += [("excise-ekfac-true", p) for p in others]
    pairs += [("excise-ekfac-chosen", "excise-ekfac")]
    pairs += [  # the cheaper estimators against the estimator they cut
        (f"excise-ekfac{fisher}-lambda{percent}", f"excise-ekfac{fisher}")
        for fisher in ("", "-true")
        for percent in (10, 25, 50)
    ]
    pairs += [
        (f"excise-ekfac{fisher}-lambda50-seed{seed}", f"excise-ekfac{fisher}")
        for fisher in ("", "-true")
        for seed in (1, 2)
    ]
    pairs += [("excise-ekfac-bf16", "excise-ekfac")]
    for r in report["results"]:
        for a, b in pairs:
            if a in r["methods"] and b in r["methods"]:
                diff = paired_difference(r["methods"][a], r["methods"][b])
                if diff:
                    comparisons[f"{r['setting']}: {a} − {b}"] = diff
    table = markdown(report)
    if comparisons:
        table += "\nPaired LDS differences (mean ± stderr over the same queries):\n\n"
        table += "".join(
            f"- {k}: {v['mean']:+.3f} ± {v['stderr']:.3f}\n" for k, v in comparisons.items()
        )
    title = "Attribution fidelity: LDS and exact-influence agreement"
    write_report("fidelity", title, report, table, folder)
    return table


if __name__ == "__main__":
    sys.exit(main())
