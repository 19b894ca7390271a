"""What the benchmarks against kronfluence share: the model, the data, both tools' setup,
the child-process runner, the machine's idleness, and the report files.

The model is a randomly initialised GPT-2 (seed 0, float32, eval mode, CPU); the data
are uniformly random token sequences (seed 0); the tracked modules are the four
projections of every block (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``,
``mlp.c_proj``); the loss, for both tools, is the summed token NLL of each sequence,
ℓ(z) = -Σₜ log p(x₍ₜ₊₁₎ | x₍≤ₜ₎), labels = input ids shifted by one.

kronfluence tracks only ``nn.Linear`` and ``nn.Conv2d``, so its model is a copy in which
every Hugging Face ``Conv1D`` (``y = x W + b`` with W of shape [in, out]) is the
equivalent ``nn.Linear`` (W transposed), checked to give the same logits.

Each tool runs in its own child process (the benchmark module with ``--tool``), so its
peak resident memory is its own, and a child whose timed span shared the machine with
more than ``BUSY_CORES`` cores of other work is run again (:func:`quietest_run`).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from attribution.artifacts import utc_timestamp

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CACHE = ROOT / "cache"
QUICK_RESULTS = CACHE / "quick"  # where --quick runs write, so they never replace results/
TOOLS = ("excise", "kronfluence")
BLOCK_PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
BATCH_SIZE = 32
THREADS = 2
BUSY_CORES = 0.25  # other processes' CPU use above which a timed run is repeated
ATTEMPTS = 3  # runs per tool at most, keeping the one on the quietest machine
IDLE_WAIT_SECONDS = 180.0  # how long to wait for an idle machine before each child

T = TypeVar("T")


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


# --- the shared model and data ---------------------------------------------------------


DEVICE = os.environ.get("EXCISE_BENCH_DEVICE", "cpu")  # cuda: benchmarks/gpu_check.sh


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


def make_sequences(setting: Setting, n: int | None = None, seed: int = 0) -> torch.Tensor:
    """Uniformly random token ids, shape [n (default ``setting.n_sequences``), seq_len].

    The draw fills rows in order, so the first k rows do not depend on ``n``.
    """
    generator = torch.Generator().manual_seed(seed)
    shape = (setting.n_sequences if n is None else n, setting.seq_len)
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
    sample = sample.to(next(model.parameters()).device)
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


class Sequences(Dataset):
    """Token sequences as the dict batches kronfluence's data loader stacks."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.ids[index]
        return {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row}


def excise_examples(ids: torch.Tensor) -> list[dict[str, list[int]]]:
    """Token sequences as excise's encoded examples (every token labelled)."""
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]


# --- the two tools' setup --------------------------------------------------------------


def fit_excise_factors(
    model: nn.Module,
    ids: torch.Tensor,
    modules: list[str],
    strategy: str,
    fisher: str,
    folder: Path | None = None,
    **options: Any,
) -> tuple[dict[str, float], Any]:
    """excise's ``fit_factors`` (saved to ``folder`` as it goes, if given); ``options``:
    other ``FactorArguments`` fields (e.g. ``autocast``, ``lambda_fraction``).

    Returns the seconds per stage (and ``"total"``) and the ``Factors``.
    """
    from attribution import FactorArguments, LanguageModelingTask, fit_factors

    arguments = FactorArguments(
        strategy=strategy,
        fisher=fisher,
        modules=tuple(modules),
        batch_size=BATCH_SIZE,
        seed=0,
        **options,
    )
    started = time.perf_counter()
    factors = fit_factors(
        model,
        LanguageModelingTask(pad_id=0),
        excise_examples(ids),
        arguments,
        folder=folder,
        progress=False,
    )
    return {**factors.stage_seconds, "total": time.perf_counter() - started}, factors


def kronfluence_analyzer(model: nn.Module, sample: torch.Tensor, modules: list[str], folder: Path):
    """A kronfluence ``Analyzer`` on a Linear copy of ``model`` (checked on ``sample``)."""
    from kronfluence.analyzer import Analyzer, prepare_model

    task = kronfluence_task(modules)
    prepared = prepare_model(conv1d_to_linear(model, sample), task)
    return Analyzer(
        "bench",
        prepared,
        task,
        cpu=DEVICE == "cpu",
        output_dir=str(folder),
        disable_tqdm=True,
        log_level=logging.WARNING,
    )


def kronfluence_task(modules: list[str]) -> Any:
    """A kronfluence ``Task``: summed token NLL as loss and measurement, given modules."""
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


def kronfluence_data(ids: torch.Tensor) -> dict[str, Any]:
    """The dataset, batch size and loader keywords of kronfluence's factor stages."""
    from kronfluence.utils.dataset import DataLoaderKwargs

    return {
        "dataset": Sequences(ids),
        "per_device_batch_size": BATCH_SIZE,
        "dataloader_kwargs": DataLoaderKwargs(num_workers=0),
    }


KRONFLUENCE_STAGES = {  # stage name: Analyzer method, and whether it reads the data
    "covariance": ("fit_covariance_matrices", True),
    "eigendecomposition": ("perform_eigendecomposition", False),
    "lambda": ("fit_lambda_matrices", True),
}


def fit_kronfluence_factors(
    analyzer: Any,
    ids: torch.Tensor,
    strategy: str,
    fisher: str,
    name: str,
    amp: torch.dtype | None = None,
    **options: Any,
) -> dict[str, float]:
    """kronfluence's factor stages in float32 (eigendecomposition in float64), timed;
    ``amp``: its autocast dtype for the forward and backward passes (None: off);
    ``options``: other fields of its ``FactorArguments`` (e.g. ``lambda_max_examples``).

    A stage the strategy does not need returns at once (``identity``: all three), after
    saving the factor arguments the score stages look for.
    """
    from kronfluence.arguments import FactorArguments

    arguments = FactorArguments(
        strategy=strategy,
        use_empirical_fisher=fisher == "empirical",
        amp_dtype=amp,
        activation_covariance_dtype=torch.float32,
        gradient_covariance_dtype=torch.float32,
        eigendecomposition_dtype=torch.float64,
        per_sample_gradient_dtype=torch.float32,
        lambda_dtype=torch.float32,
        **options,
    )
    common = {"factors_name": name, "factor_args": arguments, "overwrite_output_dir": True}
    seconds = {}
    for stage, (method, reads_data) in KRONFLUENCE_STAGES.items():
        extra = kronfluence_data(ids) if reads_data else {}
        seconds[stage] = timed(getattr(analyzer, method), **common, **extra)
    seconds["total"] = sum(seconds.values())
    return seconds


def timed(function: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    """Seconds ``function(*args, **kwargs)`` took (its result is dropped)."""
    started = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - started


def quiet_kronfluence() -> None:
    """Silence kronfluence's FutureWarnings (``torch.cuda.amp``) in a child process."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")


# --- one tool in its own process -------------------------------------------------------


def run_child(module: str, out: Path, arguments: list[str]) -> dict[str, Any]:
    """``python -m <module> --out <out> <arguments>`` in a fresh interpreter; its
    ``result.json``."""
    command = [sys.executable, "-m", module, "--out", str(out), *arguments]
    subprocess.run(command, check=True, cwd=ROOT.parent)
    return json.loads((out / "result.json").read_text())


def quietest_run(
    launch: Callable[[], tuple[dict[str, Any], T]], attempts: int = ATTEMPTS
) -> tuple[dict[str, Any], T]:
    """``launch()`` (a child run: its result and payload) after waiting for an idle
    machine, and again while other processes used over ``BUSY_CORES`` cores meanwhile
    (``result["cpu"]["other_cores"]``); the quietest of the tries is kept."""
    best = None
    for attempt in range(1, attempts + 1):
        wait_for_idle()
        result, payload = launch()
        other = result["cpu"]["other_cores"] or 0.0
        result["attempt"] = attempt
        if best is None or other < (best[0]["cpu"]["other_cores"] or 0.0):
            best = result, payload
        if other <= BUSY_CORES:
            break
        print(f"  other processes used {other:.2f} cores; running again", file=sys.stderr)
    return best


def fresh(folder: Path) -> Path:
    """``folder``, emptied (created if missing)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


# --- the machine's load and memory -----------------------------------------------------


def cpu_snapshot() -> tuple[float, float, float | None]:
    """Wall clock, this process's CPU seconds, and the whole machine's busy CPU seconds."""
    times = os.times()
    return time.perf_counter(), times.user + times.system, _machine_busy_seconds()


def _machine_busy_seconds() -> float | None:
    try:  # Linux: the first line of /proc/stat, in clock ticks
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def cpu_use(before: tuple, after: tuple) -> dict[str, float | None]:
    """CPU seconds of this process over an interval, and the cores other processes used.

    Timings on a shared machine are only comparable when ``other_cores`` is near zero: with
    torch's OpenMP threads, a busy neighbour can slow small parallel kernels many times.
    """
    wall, own = after[0] - before[0], after[1] - before[1]
    other = None
    if before[2] is not None and after[2] is not None:
        other = max(after[2] - before[2] - own, 0.0) / wall
    return {"wall_seconds": wall, "process_cpu_seconds": own, "other_cores": other}


def wait_for_idle(
    threshold: float = BUSY_CORES, window: float = 2.0, timeout: float = IDLE_WAIT_SECONDS
) -> float | None:
    """Sleep until other processes use at most ``threshold`` cores over a ``window``.

    Gives up after ``timeout`` seconds (the run then goes ahead, and :func:`quietest_run`
    repeats it if the machine stayed busy). Returns the last load seen (None off Linux).
    """
    deadline = time.monotonic() + timeout
    told = False
    while True:
        before = cpu_snapshot()
        time.sleep(window)
        other = cpu_use(before, cpu_snapshot())["other_cores"]
        if other is None or other <= threshold or time.monotonic() >= deadline:
            return other
        if not told:
            print(f"  waiting for an idle machine ({other:.2f} cores busy)", file=sys.stderr)
            told = True


def current_rss_mb() -> float | None:
    """This process's resident memory now, in MB (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the report ------------------------------------------------------------------------


def machine_info(threads: int, peers: Sequence[str] = ("kronfluence",)) -> dict[str, Any]:
    """Where and with what the numbers were taken (``peers``: their package versions too)."""
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
        **{peer: metadata.version(peer) for peer in peers},
        "excise": metadata.version("excise"),
        "date": utc_timestamp(),
    }


def versions_note(machine: dict[str, Any]) -> str:
    """The threads, CPUs, versions and date, for a table's footnote."""
    m = machine
    return (
        f"{m['threads']} threads on {m['cpu_count']} CPUs; torch {m['torch']}, "
        f"kronfluence {m['kronfluence']}, excise {m['excise']}; {m['date']}"
    )


def write_report(name: str, title: str, report: dict[str, Any], table: str, folder: Path) -> None:
    """Write ``<name>.json`` (the raw numbers) and ``<name>.md`` (the table) to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / f"{name}.md").write_text(f"# {title}\n\n{table}")


def results_folder(requested: Path | None, quick: bool) -> Path:
    """Where a run writes its report: as asked, else ``results/`` (``cache/quick`` for
    ``--quick``, so a quick run never replaces the full results)."""
    if requested is not None:
        return requested
    return QUICK_RESULTS if quick else RESULTS
