"""Factor fitting: excise against kronfluence 1.0.1, EK-FAC on GPT-2, on the CPU.

Both tools fit the same EK-FAC factors (activation covariance A, gradient covariance S,
their eigendecompositions and the corrected eigenvalues Λ) for the same randomly
initialised GPT-2, the same random token sequences, the same tracked modules (the four
projections of every block: ``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``,
``mlp.c_proj``), the same Fisher (empirical unless ``--fisher true``), batch size 32,
float32 and two threads, and the same loss: the summed token NLL of each sequence,
ℓ(z) = -Σₜ log p(x₍ₜ₊₁₎ | x₍≤ₜ₎), labels = input ids shifted by one.

Each tool runs in its own child process (this module with ``--tool``), so its peak
resident memory is its own. An untimed warm-up fit on a few sequences comes first. Both
tools write their factors to disk as they go (kronfluence always does; excise is given a
factor folder), so the timings include that. Then the parent compares the factors module
by module.

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

    python -m benchmarks.factors --quick          # setting a only
    python -m benchmarks.factors                  # settings a and b
    python -m benchmarks.factors --settings b --fisher true
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from copy import deepcopy
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CACHE = ROOT / "cache" / "factors"
TOOLS = ("excise", "kronfluence")
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
BLOCK_PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
BATCH_SIZE = 32
THREADS = 2
WARMUP_SEQUENCES = 64  # two batches: imports, allocator and kernel warm-up, untimed
PRODUCT_VECTORS = 4  # random vectors for the EK-FAC product comparison
BUSY_CORES = 0.25  # other processes' CPU use above which a fit is run again
ATTEMPTS = 3  # fits per tool at most, keeping the one on the quietest machine

FactorDict = dict[str, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Setting:
    """A GPT-2 size and a data set of random token sequences."""

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int
    n_sequences: int
    seq_len: int
    vocab_size: int = 512


SETTINGS = {
    "a": Setting("a", n_layer=2, n_embd=64, n_head=4, n_positions=64, n_sequences=512, seq_len=32),
    "b": Setting(
        "b", n_layer=4, n_embd=128, n_head=4, n_positions=128, n_sequences=2048, seq_len=128
    ),
}


# --- the shared model and data ---------------------------------------------------------


def build_model(setting: Setting) -> nn.Module:
    """A randomly initialised GPT-2 (seed 0), float32, eval mode, on the CPU."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=setting.n_layer,
        n_embd=setting.n_embd,
        n_head=setting.n_head,
        vocab_size=setting.vocab_size,
        n_positions=setting.n_positions,
        bos_token_id=setting.vocab_size - 1,  # GPT-2's 50256 is outside the small vocabulary
        eos_token_id=setting.vocab_size - 1,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).float().eval()


def make_sequences(setting: Setting, seed: int = 0) -> torch.Tensor:
    """Uniformly random token ids, shape [n_sequences, seq_len]."""
    generator = torch.Generator().manual_seed(seed)
    shape = (setting.n_sequences, setting.seq_len)
    return torch.randint(0, setting.vocab_size, shape, generator=generator)


def tracked_modules(setting: Setting) -> list[str]:
    """The four projections of every transformer block, in model order."""
    return [
        f"transformer.h.{i}.{name}" for i in range(setting.n_layer) for name in BLOCK_PROJECTIONS
    ]


def conv1d_to_linear(model: nn.Module, sample: torch.Tensor) -> nn.Module:
    """A deep copy of ``model`` with every HF ``Conv1D`` as the equivalent ``nn.Linear``.

    ``Conv1D`` computes x W + b with W of shape [in, out]; ``nn.Linear`` stores Wᵀ. The
    copy's logits on ``sample`` (token ids) are checked against the original's.
    """
    from transformers.pytorch_utils import Conv1D

    converted = deepcopy(model)
    for name, module in list(converted.named_modules()):
        if isinstance(module, Conv1D):
            parent, _, child = name.rpartition(".")
            setattr(converted.get_submodule(parent), child, _as_linear(module))
    with torch.no_grad():
        expected = model(input_ids=sample).logits
        got = converted(input_ids=sample).logits
    if not torch.allclose(expected, got, rtol=1e-5, atol=1e-5):
        gap = (expected - got).abs().max().item()
        raise RuntimeError(f"Conv1D -> Linear changed the logits (max difference {gap:.3g})")
    return converted


def _as_linear(conv: nn.Module) -> nn.Linear:
    n_in, n_out = conv.weight.shape
    linear = nn.Linear(n_in, n_out, bias=conv.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def summed_nll(logits: torch.Tensor, labels: torch.Tensor, sample: bool) -> torch.Tensor:
    """Σ over the batch and tokens of -log p(label), logits at t predicting token t + 1.

    With ``sample`` the labels are drawn from the model's own predictions (true Fisher).
    """
    logits, labels = logits[:, :-1], labels[:, 1:]
    vocab = logits.shape[-1]
    if sample:
        with torch.no_grad():
            probs = torch.softmax(logits.detach().reshape(-1, vocab), dim=-1)
            drawn = torch.multinomial(probs, 1).view(labels.shape)
            labels = torch.where(labels != -100, drawn, labels)
    return F.cross_entropy(
        logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )


class _Sequences(Dataset):
    """Token sequences as the dict batches kronfluence's data loader stacks."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.ids[index]
        return {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row}


# --- the two tools ---------------------------------------------------------------------

Fit = tuple[dict[str, float], FactorDict]  # seconds per stage (and "total"), factors


def fit_excise(
    model: nn.Module, ids: torch.Tensor, modules: list[str], fisher: str, folder: Path
) -> Fit:
    """EK-FAC factors from excise's ``fit_factors``, saved to ``folder`` as it goes."""
    from attribution import FactorArguments, LanguageModelingTask, fit_factors

    examples = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]
    arguments = FactorArguments(
        strategy="ekfac", fisher=fisher, modules=tuple(modules), batch_size=BATCH_SIZE, seed=0
    )
    started = time.perf_counter()
    factors = fit_factors(
        model, LanguageModelingTask(), examples, arguments, folder=folder, progress=False
    )
    seconds = {**factors.stage_seconds, "total": time.perf_counter() - started}
    return seconds, {name: dict(factors.tensors[name]) for name in factors.modules}


def fit_kronfluence(
    model: nn.Module, ids: torch.Tensor, modules: list[str], fisher: str, folder: Path
) -> Fit:
    """EK-FAC factors from kronfluence's three stages, on a Linear copy of ``model``."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    task = _kronfluence_task(modules)
    prepared = prepare_model(conv1d_to_linear(model, ids[:2]), task)
    analyzer = Analyzer(
        "bench",
        prepared,
        task,
        cpu=True,
        output_dir=str(folder),
        disable_tqdm=True,
        log_level=logging.WARNING,
    )
    arguments = FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=fisher == "empirical",
        amp_dtype=None,
        activation_covariance_dtype=torch.float32,
        gradient_covariance_dtype=torch.float32,
        eigendecomposition_dtype=torch.float64,
        per_sample_gradient_dtype=torch.float32,
        lambda_dtype=torch.float32,
    )
    common = {"factors_name": "ekfac", "factor_args": arguments, "overwrite_output_dir": True}
    data = {
        "dataset": _Sequences(ids),
        "per_device_batch_size": BATCH_SIZE,
        "dataloader_kwargs": DataLoaderKwargs(num_workers=0),
    }
    seconds = {
        "covariance": _timed(analyzer.fit_covariance_matrices, **common, **data),
        "eigendecomposition": _timed(analyzer.perform_eigendecomposition, **common),
        "lambda": _timed(analyzer.fit_lambda_matrices, **common, **data),
    }
    seconds["total"] = sum(seconds.values())
    return seconds, _kronfluence_factors(analyzer, "ekfac", modules)


def _kronfluence_task(modules: list[str]) -> Any:
    """A kronfluence ``Task`` with the summed token NLL and the given tracked modules."""
    from kronfluence.task import Task

    class SummedNLLTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            return summed_nll(logits.logits, batch["labels"], sample)

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return list(modules)

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return SummedNLLTask()


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


FITTERS: dict[str, Callable[..., Fit]] = {"excise": fit_excise, "kronfluence": fit_kronfluence}


def _timed(function: Callable[..., Any], **kwargs: Any) -> float:
    started = time.perf_counter()
    function(**kwargs)
    return time.perf_counter() - started


# --- one tool in its own process -------------------------------------------------------


def run_tool(tool: str, setting: Setting, fisher: str, out: Path, threads: int) -> None:
    """Warm up, fit, and write ``result.json`` and ``factors.safetensors`` to ``out``."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")
    model, ids, modules = build_model(setting), make_sequences(setting), tracked_modules(setting)
    baseline_mb = _current_rss_mb()
    fit = FITTERS[tool]
    fit(model, ids[:WARMUP_SEQUENCES], modules, fisher, _fresh(out / "warmup"))
    before = _cpu_snapshot()
    seconds, factors = fit(model, ids, modules, fisher, _fresh(out / "fit"))
    cpu = _cpu_use(before, _cpu_snapshot())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    flat = {
        f"{module}/{key}": value.contiguous()
        for module, tensors in factors.items()
        for key, value in tensors.items()
        if key in FACTOR_KEYS
    }
    save_file(flat, out / "factors.safetensors")
    result = {
        "tool": tool,
        "version": metadata.version("kronfluence" if tool == "kronfluence" else "excise"),
        "seconds": seconds,
        "peak_rss_mb": peak_mb,
        "baseline_rss_mb": baseline_mb,
        "cpu": cpu,
        "load_average": os.getloadavg(),
        "modules": modules,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))


def run_child(
    tool: str, setting: Setting, fisher: str, threads: int
) -> tuple[dict[str, Any], FactorDict]:
    """Run one tool in a fresh interpreter; its result and its factors."""
    out = _fresh(CACHE / f"{setting.name}-{fisher}" / tool)
    command = [sys.executable, "-m", "benchmarks.factors", "--tool", tool, "--out", str(out)]
    command += ["--settings", setting.name, "--fisher", fisher, "--threads", str(threads)]
    subprocess.run(command, check=True, cwd=ROOT.parent)
    result = json.loads((out / "result.json").read_text())
    return result, _unflatten(load_file(out / "factors.safetensors"))


def quietest_run(
    tool: str, setting: Setting, fisher: str, threads: int, attempts: int = ATTEMPTS
) -> tuple[dict[str, Any], FactorDict]:
    """:func:`run_child`, again while other processes used over ``BUSY_CORES`` cores."""
    best = None
    for attempt in range(1, attempts + 1):
        result, factors = run_child(tool, setting, fisher, threads)
        other = result["cpu"]["other_cores"] or 0.0
        result["attempt"] = attempt
        if best is None or other < (best[0]["cpu"]["other_cores"] or 0.0):
            best = result, factors
        if other <= BUSY_CORES:
            break
        print(f"  other processes used {other:.2f} cores; fitting again", file=sys.stderr)
    return best


def _unflatten(flat: dict[str, torch.Tensor]) -> FactorDict:
    factors: FactorDict = {}
    for key, value in flat.items():
        module, _, name = key.rpartition("/")
        factors.setdefault(module, {})[name] = value
    return factors


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _cpu_snapshot() -> tuple[float, float, float | None]:
    """Wall clock, this process's CPU seconds, and the whole machine's busy CPU seconds."""
    times = os.times()
    busy = None
    try:  # Linux: the first line of /proc/stat, in clock ticks
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    return time.perf_counter(), times.user + times.system, busy


def _cpu_use(before: tuple, after: tuple) -> dict[str, float | None]:
    """CPU seconds of this process over an interval, and the cores other processes used.

    Timings on a shared machine are only comparable when ``other_cores`` is near zero: with
    torch's OpenMP threads, a busy neighbour can slow small parallel kernels many times.
    """
    wall, own = after[0] - before[0], after[1] - before[1]
    other = None
    if before[2] is not None and after[2] is not None:
        other = max(after[2] - before[2] - own, 0.0) / wall
    return {"wall_seconds": wall, "process_cpu_seconds": own, "other_cores": other}


def _current_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


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
        runs[tool], factors[tool] = quietest_run(tool, setting, fisher, threads)
    ours, theirs = factors["excise"], factors["kronfluence"]
    per_module = {m: compare_module(ours[m], theirs[m]) for m in tracked_modules(setting)}
    return {
        "setting": asdict(setting),
        "tokens": setting.n_sequences * setting.seq_len,
        "runs": runs,
        "agreement": {"summary": summarize(per_module), "modules": per_module},
    }


def machine_info(threads: int) -> dict[str, Any]:
    """Where and with what the numbers were taken."""
    return {
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "load_average_at_start": os.getloadavg(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": metadata.version("transformers"),
        "kronfluence": metadata.version("kronfluence"),
        "excise": metadata.version("excise"),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
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
    m = report["machine"]
    note = (
        f"\nFisher: {report['fisher']}; batch {BATCH_SIZE}; float32; {m['threads']} threads "
        f"on {m['cpu_count']} CPUs; torch {m['torch']}, kronfluence {m['kronfluence']}, "
        f"excise {m['excise']}; {m['date']}. Scale ×s: excise ≈ s·kronfluence "
        "(S: excise divides by sequences, kronfluence by tokens); err: relative error "
        "after that scale.\n"
    )
    return head + "\n".join(rows) + "\n" + note


def write_report(report: dict[str, Any], folder: Path = RESULTS) -> str:
    """Write ``factors.json`` and ``factors.md``; return the markdown."""
    folder.mkdir(parents=True, exist_ok=True)
    table = markdown(report)
    (folder / "factors.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "factors.md").write_text("# Factor fitting: excise vs kronfluence\n\n" + table)
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="setting a only")
    parser.add_argument("--settings", default="a,b", help="comma-separated: a (tiny), b")
    parser.add_argument("--fisher", choices=("empirical", "true"), default="empirical")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads per tool")
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
    print(write_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
