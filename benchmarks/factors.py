"""Factor fitting: excise against kronfluence 1.0.1, EK-FAC on GPT-2, on the CPU.

Both tools fit the same EK-FAC factors (activation covariance A, gradient covariance S,
their eigendecompositions and the corrected eigenvalues Λ) for the same randomly
initialised GPT-2, the same random token sequences, the same tracked modules (the four
projections of every block: ``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``,
``mlp.c_proj``), the same Fisher (empirical unless ``--fisher true``), batch size 32,
float32 and two threads, and the same loss: the summed token NLL of each sequence,
ℓ(z) = -Σₜ log p(x₍ₜ₊₁₎ | x₍≤ₜ₎), labels = input ids shifted by one.

Each tool runs in its own child process (this module with ``--tool``), so its peak
resident memory is its own; the model, data, kronfluence setup and child runner are
shared with ``benchmarks.scores`` (``benchmarks/common.py``). An untimed warm-up fit on a
few sequences comes first. Both tools write their factors to disk as they go
(kronfluence always does; excise is given a factor folder), so the timings include that.
Then the parent compares the factors module by module.

Layout. kronfluence tracks only ``nn.Linear`` and ``nn.Conv2d``, so its model is a copy in
which every Hugging Face ``Conv1D`` (``y = x W + b`` with W of shape [in, out]) is the
equivalent ``nn.Linear`` (W transposed), checked to give the same logits. The factors do
not depend on how the weight is stored: both tools see the same inputs a and output
gradients g, both append the bias as a trailing 1 to a, and both hold Λ as [out, in + 1].

Normalization (read from each tool, not assumed): A is a mean over tokens in both. S is
Σ g gᵀ over tokens divided by the number of sequences in excise and by the number of
tokens in kronfluence, so the two differ by the sequence length. Λ is a mean over
sequences in both. The agreement therefore reports the least-squares scale
excise/kronfluence, the Pearson correlation of the entries, and the relative error left
after removing that scale; and, for Λ, which depends on the eigenvectors chosen inside
(near-)degenerate eigenspaces, the relative difference of the two EK-FAC curvature
products (Q_S ⊗ Q_A) diag(Λ) (Q_S ⊗ Q_A)ᵀ v on random vectors v.

    python -m benchmarks.factors --quick          # setting a only, to benchmarks/cache/quick
    python -m benchmarks.factors                  # settings a and b, to benchmarks/results
    python -m benchmarks.factors --settings b --fisher true
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from benchmarks.common import (
    BATCH_SIZE,
    CACHE,
    DEVICE,
    THREADS,
    TOOLS,
    Setting,
    build_model,
    cpu_snapshot,
    cpu_use,
    current_rss_mb,
    fit_excise_factors,
    fit_kronfluence_factors,
    fresh,
    kronfluence_analyzer,
    machine_info,
    make_sequences,
    peak_rss_mb,
    quiet_kronfluence,
    quietest_run,
    results_folder,
    run_child,
    tracked_modules,
    versions_note,
    write_report,
)

FACTOR_CACHE = CACHE / "factors"
STAGES = ("covariance", "eigendecomposition", "lambda")
FACTOR_KEYS = (
    "activation_covariance",
    "gradient_covariance",
    "activation_eigenvalues",
    "gradient_eigenvalues",
    "activation_eigenvectors",
    "gradient_eigenvectors",
    "lambda",
)
WARMUP_SEQUENCES = 64  # two batches: imports, allocator and kernel warm-up, untimed
PRODUCT_VECTORS = 4  # random vectors for the EK-FAC product comparison

FactorDict = dict[str, dict[str, torch.Tensor]]

SETTINGS = {
    "a": Setting("a", n_layer=2, n_embd=64, n_head=4, n_positions=64, n_sequences=512, seq_len=32),
    "b": Setting(
        "b", n_layer=4, n_embd=128, n_head=4, n_positions=128, n_sequences=2048, seq_len=128
    ),
}


# --- the two tools ---------------------------------------------------------------------

Fit = tuple[dict[str, float], FactorDict]  # seconds per stage (and "total"), factors


def fit_excise(
    model: nn.Module, ids: torch.Tensor, modules: list[str], fisher: str, folder: Path
) -> Fit:
    """EK-FAC factors from excise's ``fit_factors``, saved to ``folder`` as it goes."""
    seconds, factors = fit_excise_factors(model, ids, modules, "ekfac", fisher, folder)
    return seconds, {name: dict(factors.tensors[name]) for name in factors.modules}


def fit_kronfluence(
    model: nn.Module, ids: torch.Tensor, modules: list[str], fisher: str, folder: Path
) -> Fit:
    """EK-FAC factors from kronfluence's three stages, on a Linear copy of ``model``."""
    analyzer = kronfluence_analyzer(model, ids[:2], modules, folder)
    seconds = fit_kronfluence_factors(analyzer, ids, "ekfac", fisher, "ekfac")
    return seconds, _kronfluence_factors(analyzer, "ekfac", modules)


def _kronfluence_factors(analyzer: Any, name: str, modules: list[str]) -> FactorDict:
    """kronfluence's factors as it uses them: sums divided by its own counts."""
    cov = analyzer.load_covariance_matrices(name)
    eig = analyzer.load_eigendecomposition(name)
    lam = analyzer.load_lambda_matrices(name)
    factors = {}
    for module in modules:
        factors[module] = {
            "activation_covariance": cov["activation_covariance"][module]
            / cov["num_activation_covariance_processed"][module],
            "gradient_covariance": cov["gradient_covariance"][module]
            / cov["num_gradient_covariance_processed"][module],
            "lambda": lam["lambda_matrix"][module] / lam["num_lambda_processed"][module],
            **{key: eig[key][module] for key in FACTOR_KEYS if key in eig},
        }
    return factors


FITTERS = {"excise": fit_excise, "kronfluence": fit_kronfluence}


# --- one tool in its own process -------------------------------------------------------


def run_tool(tool: str, setting: Setting, fisher: str, out: Path, threads: int) -> None:
    """Warm up, fit, and write ``result.json`` and ``factors.safetensors`` to ``out``."""
    torch.set_num_threads(threads)
    quiet_kronfluence()
    model, ids, modules = build_model(setting), make_sequences(setting), tracked_modules(setting)
    model = model.to(DEVICE)  # the CPU unless EXCISE_BENCH_DEVICE says otherwise
    baseline_mb = current_rss_mb()
    fit = FITTERS[tool]
    fit(model, ids[:WARMUP_SEQUENCES], modules, fisher, fresh(out / "warmup"))
    before = cpu_snapshot()
    seconds, factors = fit(model, ids, modules, fisher, fresh(out / "fit"))
    cpu = cpu_use(before, cpu_snapshot())
    flat = {
        f"{module}/{key}": value.cpu().contiguous()
        for module, tensors in factors.items()
        for key, value in tensors.items()
        if key in FACTOR_KEYS
    }
    save_file(flat, out / "factors.safetensors")
    result = {
        "tool": tool,
        "version": metadata.version("kronfluence" if tool == "kronfluence" else "excise"),
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "device": DEVICE,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if DEVICE != "cpu" else None,
        "baseline_rss_mb": baseline_mb,
        "cpu": cpu,
        "load_average": os.getloadavg(),
        "modules": modules,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))


def tool_run(
    tool: str, setting: Setting, fisher: str, threads: int
) -> tuple[dict[str, Any], FactorDict]:
    """One tool in a fresh interpreter: its result and its factors."""
    out = fresh(FACTOR_CACHE / f"{setting.name}-{fisher}" / tool)
    arguments = ["--tool", tool, "--settings", setting.name, "--fisher", fisher]
    result = run_child("benchmarks.factors", out, [*arguments, "--threads", str(threads)])
    return result, _unflatten(load_file(out / "factors.safetensors"))


def _unflatten(flat: dict[str, torch.Tensor]) -> FactorDict:
    factors: FactorDict = {}
    for key, value in flat.items():
        module, _, name = key.rpartition("/")
        factors.setdefault(module, {})[name] = value
    return factors


# --- agreement -------------------------------------------------------------------------


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, float]:
    """Least-squares scale ours ≈ s·theirs, Pearson correlation, relative error after s."""
    x, y = ours.double().flatten(), theirs.double().flatten()
    scale = (x @ y) / (y @ y)
    correlation = torch.corrcoef(torch.stack([x, y]))[0, 1]
    relative_error = (x - scale * y).norm() / x.norm()
    return {
        "scale": scale.item(),
        "correlation": correlation.item(),
        "relative_error": relative_error.item(),
    }


def ekfac_product(factors: dict[str, torch.Tensor], vectors: torch.Tensor) -> torch.Tensor:
    """(Q_S ⊗ Q_A) diag(Λ) (Q_S ⊗ Q_A)ᵀ v for v of shape [n, out, in + 1], in float64."""
    q_s = factors["gradient_eigenvectors"].double()  # [out, out]
    q_a = factors["activation_eigenvectors"].double()  # [in + 1, in + 1]
    return q_s @ ((q_s.T @ vectors @ q_a) * factors["lambda"].double()) @ q_a.T


def compare_module(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict:
    """Agreement of every factor of one module (eigenvalues compared sorted)."""
    result = {
        key: agreement(ours[key], theirs[key])
        for key in ("activation_covariance", "gradient_covariance", "lambda")
    }
    for side in ("activation", "gradient"):
        key = f"{side}_eigenvalues"
        result[key] = agreement(ours[key].sort().values, theirs[key].sort().values)
    generator = torch.Generator().manual_seed(0)
    shape = (PRODUCT_VECTORS, *ours["lambda"].shape)
    vectors = torch.randn(shape, generator=generator, dtype=torch.float64)
    mine, peer = ekfac_product(ours, vectors), ekfac_product(theirs, vectors)
    result["ekfac_product"] = {"relative_error": ((mine - peer).norm() / mine.norm()).item()}
    return result


def summarize(per_module: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Per factor: the scale range, the lowest correlation and the largest error."""
    summary = {}
    for key in next(iter(per_module.values())):
        rows = [module[key] for module in per_module.values()]
        entry = {"max_relative_error": max(r["relative_error"] for r in rows)}
        if "scale" in rows[0]:
            entry["min_scale"] = min(r["scale"] for r in rows)
            entry["max_scale"] = max(r["scale"] for r in rows)
            entry["min_correlation"] = min(r["correlation"] for r in rows)
        summary[key] = entry
    return summary


# --- the benchmark and its report ------------------------------------------------------


def benchmark(setting: Setting, fisher: str, threads: int) -> dict[str, Any]:
    """Both tools on one setting, then the agreement of their factors."""
    runs, factors = {}, {}
    for tool in TOOLS:
        print(f"[{setting.name}] fitting with {tool} ...", file=sys.stderr, flush=True)
        runs[tool], factors[tool] = quietest_run(
            lambda tool=tool: tool_run(tool, setting, fisher, threads)
        )
    ours, theirs = factors["excise"], factors["kronfluence"]
    per_module = {m: compare_module(ours[m], theirs[m]) for m in tracked_modules(setting)}
    return {
        "setting": asdict(setting),
        "tokens": setting.n_sequences * setting.seq_len,
        "runs": runs,
        "agreement": {"summary": summarize(per_module), "modules": per_module},
    }


def _fmt(entry: dict[str, float], label: str) -> str:
    low, high = entry["min_scale"], entry["max_scale"]
    scale = f"×{low:.4g}" if abs(high - low) <= 1e-3 * abs(high) else f"×{low:.4g}–{high:.4g}"
    return (
        f"{label} {scale}, r ≥ {entry['min_correlation']:.6f}, "
        f"err ≤ {entry['max_relative_error']:.1e}"
    )


def _notes(summary: dict[str, dict[str, float]], runs: dict[str, Any]) -> dict[str, str]:
    """The last column: agreement per stage; on the total row, the machine's other load."""
    others = [runs[tool]["cpu"]["other_cores"] for tool in TOOLS]
    load = " / ".join("?" if x is None else f"{x:.2f}" for x in others)
    return {
        "covariance": _fmt(summary["activation_covariance"], "A")
        + "; "
        + _fmt(summary["gradient_covariance"], "S"),
        "eigendecomposition": _fmt(summary["activation_eigenvalues"], "eig A")
        + "; "
        + _fmt(summary["gradient_eigenvalues"], "eig S"),
        "lambda": _fmt(summary["lambda"], "Λ")
        + f"; EK-FAC product err ≤ {summary['ekfac_product']['max_relative_error']:.1e}",
        "total": f"other processes during the fits: {load} cores",
    }


def markdown(report: dict[str, Any]) -> str:
    """The timing, memory and agreement table."""
    head = (
        "| setting | stage | excise s | kronfluence s | kronfluence/excise "
        "| excise peak MB | kronfluence peak MB | agreement (excise vs kronfluence); notes |\n"
        "|---|---|---:|---:|---:|---:|---:|---|\n"
    )
    rows = []
    for entry in report["results"]:
        s, runs = entry["setting"], entry["runs"]
        label = f"{s['name']}: {s['n_layer']}L×{s['n_embd']}, {s['n_sequences']}×{s['seq_len']} tok"
        cells = _notes(entry["agreement"]["summary"], runs)
        for stage in (*STAGES, "total"):
            ours, theirs = runs["excise"]["seconds"][stage], runs["kronfluence"]["seconds"][stage]
            peaks = ("", "")
            if stage == "total":
                peaks = tuple(f"{runs[t]['peak_rss_mb']:.0f}" for t in TOOLS)
            rows.append(
                f"| {label} | {stage} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.2f} "
                f"| {peaks[0]} | {peaks[1]} | {cells[stage]} |"
            )
    note = (
        f"\nFisher: {report['fisher']}; batch {BATCH_SIZE}; float32; "
        f"{versions_note(report['machine'])}. Scale ×s: excise ≈ s·kronfluence "
        "(S: excise divides by sequences, kronfluence by tokens); err: relative error "
        "after that scale.\n"
    )
    return head + "\n".join(rows) + "\n" + note


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="setting a only")
    parser.add_argument("--settings", default="a,b", help="comma-separated: a (tiny), b")
    parser.add_argument("--fisher", choices=("empirical", "true"), default="empirical")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads per tool")
    parser.add_argument(
        "--results",
        type=Path,
        help="folder for factors.json/.md (default: benchmarks/results; "
        "benchmarks/cache/quick with --quick)",
    )
    parser.add_argument("--tool", choices=TOOLS, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    names = ["a"] if args.quick else [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown or not names:
        parser.error(f"--settings: unknown {unknown}; choose from {', '.join(SETTINGS)}")
    args.names = names
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tool:
        run_tool(args.tool, SETTINGS[args.names[0]], args.fisher, args.out, args.threads)
        return 0
    report = {
        "benchmark": "factors",
        "quick": args.quick,
        "fisher": args.fisher,
        "batch_size": BATCH_SIZE,
        "machine": machine_info(args.threads),
        "results": [benchmark(SETTINGS[n], args.fisher, args.threads) for n in args.names],
    }
    table = markdown(report)
    folder = results_folder(args.results, args.quick)
    write_report("factors", "Factor fitting: excise vs kronfluence", report, table, folder)
    print(table)
    print(f"written to {folder}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
