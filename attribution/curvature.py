"""Curvature of the loss for each tracked module, and its damped inverse.

G is the Fisher (Gauss-Newton for the NLL) of the summed-token loss of a sequence,
block-diagonal over modules: G = E_z[vec(G_z) vec(G_z)ᵀ], with G_z = Σₜ gₜ aₜᵀ the
gradient of sequence z in the ``[out, in (+1)]`` layout and labels sampled from the model
(``fisher="true"``) or taken from the data (``"empirical"``). Four approximations:

- ``identity``: G ≈ I, and the product is left as it is (a plain gradient dot product);
- ``diagonal``: G ≈ diag(E[G_z ⊙ G_z]);
- ``kfac``: G ≈ S ⊗ A, with A = (1/N_tokens) Σ a aᵀ over non-padding tokens and
  S = (1/N_sequences) Σ g gᵀ over all tokens; exact for one sequence of one token.
  With A = Q_A diag(α) Q_Aᵀ and S = Q_S diag(σ) Q_Sᵀ (eigendecompositions in float64),
  G ≈ (Q_S ⊗ Q_A) diag(σ ⊗ α) (Q_S ⊗ Q_A)ᵀ;
- ``ekfac`` (George et al. 2018; Grosse et al. 2023): the same eigenbasis, with the
  diagonal refitted on per-example gradients, Λ = E[(Q_Sᵀ G_z Q_A)²] — the best diagonal
  in that basis in Frobenius norm, so never a worse fit of G than K-FAC.

The damped inverse product with V of shape [out, in (+1)] is
(G + λI)⁻¹ V = Q_S [(Q_Sᵀ V Q_A) ⊘ (Λ + λ)] Q_Aᵀ, with λ = ``damping`` or, by default,
0.1 × mean(Λ) per module (Grosse et al. 2023).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attribution.distributed import (
    all_reduce_sums,
    broadcast,
    current_shard,
    gather_counts,
    on_main,
    to_cpu,
    work_record,
)
from attribution.errors import InputError, NonFiniteError, check_choice, check_positive_ints
from attribution.gradients import Visitor, module_io, outer_sum, stream_io
from attribution.modules import layout_shape, select_modules
from attribution.precision import AUTOCAST
from attribution.store import FactorStore
from attribution.task import Task, batches

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
FISHER_TYPES = ("true", "empirical")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DAMPING_FACTOR = 0.1  # λ = 0.1 × mean eigenvalue per module (Grosse et al. 2023)
STAGES = {  # the stages each strategy fits, in order
    "identity": (),
    "diagonal": ("diagonal",),
    "kfac": ("covariance", "eigendecomposition"),
    "ekfac": ("covariance", "eigendecomposition", "lambda"),
}


@dataclass(frozen=True)
class Damping:
    """λ of the damped inverse (G + λI)⁻¹: absolute, or a multiple of each module's mean
    eigenvalue (Grosse et al. 2023: λ = 0.1 × mean(Λ)). One object, shared by influence
    scores, the EK-FAC scope and the Newton step.

    >>> Damping().factor, Damping(value=0.5).value, Damping.of(0.5) == Damping(value=0.5)
    (0.1, 0.5, True)
    """

    value: float | None = field(
        default=None, metadata={"help": "absolute damping λ (default: factor × mean eigenvalue)"}
    )
    factor: float = field(
        default=DAMPING_FACTOR, metadata={"help": "λ = factor × each module's mean eigenvalue"}
    )

    def __post_init__(self) -> None:
        for name in ("value", "factor"):
            value = getattr(self, name)
            if value is None and name == "value":
                continue
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise InputError(f"damping {name} must be a finite number >= 0, got {value!r}")

    @classmethod
    def of(cls, damping: Damping | float | None) -> Damping:
        """A :class:`Damping` from itself, an absolute λ, or None (the heuristic)."""
        if isinstance(damping, Damping):
            return damping
        return cls() if damping is None else cls(value=float(damping))

    def describe(self) -> str:
        return f"{self.value:g}" if self.value is not None else f"{self.factor:g} × mean eigenvalue"


@dataclass(frozen=True)
class FactorArguments:
    """How factors are fitted. Every field is recorded beside the factors on disk."""

    strategy: str = field(
        default="ekfac", metadata={"help": "the curvature approximation", "choices": STRATEGIES}
    )
    fisher: str = field(
        default="true",
        metadata={"help": "true (labels sampled) or empirical (data's)", "choices": FISHER_TYPES},
    )
    modules: str | tuple[str, ...] | None = field(
        default=None, metadata={"help": "regex or module names; None: Linear/Conv1D in blocks"}
    )
    batch_size: int = field(default=16, metadata={"help": "sequences per forward pass"})
    seed: int = field(
        default=0, metadata={"help": "seeds the labels sampled for the true Fisher and Λ's share"}
    )
    partitions: int = field(
        default=1, metadata={"help": "parts the data is fitted in (each saved; same result)"}
    )
    dtype: str = field(
        default="float32",  # bf16 covariances break eigenvectors: never below float32
        metadata={
            "help": "per-example gradients, factors and scores in float32 or float64 (float64: "
            "equal to ~1e-10 whatever the batch size, parts or processes; float32 rounding "
            "can turn the eigenvectors of nearly equal eigenvalues, and EK-FAC with them)",
            "choices": tuple(DTYPES),
        },
    )
    autocast: str = field(
        default="none",
        metadata={
            "help": "run forward passes in bfloat16 or float16 (autocast; float16 with a loss "
            "scale), the factors still summed in --dtype; none: in the model's own dtype",
            "choices": tuple(AUTOCAST),
        },
    )
    lambda_fraction: float = field(
        default=1.0,
        metadata={
            "help": "share of the examples EK-FAC's eigen-correction Λ is fitted on, drawn at "
            "random with --seed (below 1: a cheaper estimator, its pass shortened in "
            "proportion; 1: every example)"
        },
    )

    def __post_init__(self) -> None:
        for name, choices in (
            ("autocast", AUTOCAST),
            ("strategy", STRATEGIES),
            ("fisher", FISHER_TYPES),
            ("dtype", DTYPES),
        ):
            check_choice("FactorArguments", name, getattr(self, name), choices)
        check_positive_ints(
            "FactorArguments", {"batch_size": self.batch_size, "partitions": self.partitions}
        )
        fraction = self.lambda_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise InputError(f"FactorArguments.lambda_fraction must be a number, got {fraction!r}")
        if not 0 < fraction <= 1:
            raise InputError(f"FactorArguments.lambda_fraction must be in (0, 1], got {fraction!r}")
        if fraction < 1 and self.strategy != "ekfac":
            raise InputError(
                f"FactorArguments.lambda_fraction < 1 applies to ekfac only (Λ is EK-FAC's), "
                f"not {self.strategy}"
            )
        object.__setattr__(self, "lambda_fraction", float(fraction))
        if isinstance(self.modules, list):
            object.__setattr__(self, "modules", tuple(self.modules))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["modules"] = list(self.modules) if isinstance(self.modules, tuple) else self.modules
        return data

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class Factors:
    """Fitted curvature per module, and the damped inverse-curvature product.

    ``tensors[module]`` holds, by strategy: ``diagonal``; ``activation_covariance``,
    ``gradient_covariance``, ``activation_eigenvectors``, ``activation_eigenvalues``,
    ``gradient_eigenvectors``, ``gradient_eigenvalues``; and for EK-FAC ``lambda``.
    """

    arguments: FactorArguments
    tensors: dict[str, dict[str, torch.Tensor]]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    work: dict[str, dict[str, str]] = field(default_factory=dict)  # stage → who did what

    @property
    def modules(self) -> list[str]:
        return list(self.tensors)

    def eigenvalues(self, module: str) -> torch.Tensor:
        """The diagonal Λ in the approximation's basis, shape [out, in (+1)]."""
        t = self.tensors[module]
        strategy = self.arguments.strategy
        if strategy == "ekfac":
            return t["lambda"]
        if strategy == "kfac":
            return torch.outer(t["gradient_eigenvalues"], t["activation_eigenvalues"])
        if strategy == "diagonal":
            return t["diagonal"]
        raise InputError("the identity strategy has no eigenvalues")

    def damping(self, module: str, damping: Damping | float | None = None) -> float:
        """λ for ``module`` (see :class:`Damping`; a number is an absolute λ)."""
        damping = Damping.of(damping)
        if damping.value is not None:
            return float(damping.value)
        if self.arguments.strategy == "identity":
            return 0.0
        return damping.factor * self.eigenvalues(module).mean().item()

    def inverse_product(
        self, module: str, vectors: torch.Tensor, damping: Damping | float | None = None
    ) -> torch.Tensor:
        """(G + λI)⁻¹ V for a batch V of shape [..., out, in (+1)] (identity: V itself)."""
        strategy = self.arguments.strategy
        if strategy == "identity":
            return vectors
        lam = self.damping(module, damping)
        eig = self.eigenvalues(module).to(vectors.dtype)
        if strategy == "diagonal":
            return vectors / (eig + lam)
        t = self.tensors[module]
        q_s = t["gradient_eigenvectors"].to(vectors.dtype)
        q_a = t["activation_eigenvectors"].to(vectors.dtype)
        rotated = q_s.T @ vectors @ q_a  # [..., out, in]
        return q_s @ (rotated / (eig + lam)) @ q_a.T

    def quadratic_form(
        self, module: str, vectors: torch.Tensor, damping: Damping | float | None = None
    ) -> torch.Tensor:
        """vᵀ (G + λI)⁻¹ v for each V of a batch [..., out, in (+1)], shape [...].

        In the eigenbasis this is Σ (Q_Sᵀ V Q_A)² ⊘ (Λ + λ): one rotation, not the two of
        :meth:`inverse_product` followed by a dot product.
        """
        strategy = self.arguments.strategy
        if strategy == "identity":
            return (vectors**2).sum(dim=(-2, -1))
        lam = self.damping(module, damping)
        eig = self.eigenvalues(module).to(vectors.dtype)
        if strategy != "diagonal":
            t = self.tensors[module]
            q_s = t["gradient_eigenvectors"].to(vectors.dtype)
            q_a = t["activation_eigenvectors"].to(vectors.dtype)
            vectors = q_s.T @ vectors @ q_a
        return (vectors**2 / (eig + lam)).sum(dim=(-2, -1))

    def precondition(
        self, gradients: Mapping[str, torch.Tensor], damping: Damping | float | None = None
    ) -> dict[str, torch.Tensor]:
        """:meth:`inverse_product` for every module of a gradient dict."""
        return {name: self.inverse_product(name, v, damping) for name, v in gradients.items()}

    @classmethod
    def load(cls, folder: str | Path, model: nn.Module | None = None) -> Factors:
        """The factors saved in ``folder`` (a :class:`~attribution.store.FactorStore`).

        With ``model``, refuse factors fitted for another model, and put them on its device.
        """
        store = FactorStore.existing(folder, model)
        arguments = FactorArguments(**store.description["arguments"])
        tensors: dict[str, dict[str, torch.Tensor]] = {
            name: {} for name in store.description["modules"]
        }
        for stage in STAGES[arguments.strategy]:
            values = store.load_nested(stage)
            if values is None:
                raise InputError(f"{folder}: stage {stage!r} was never finished; fit again")
            for name, quantities in values.items():
                tensors[name].update(quantities)
        return cls(arguments, _to_device(tensors, model) if model is not None else tensors)


def fit_factors(
    model: nn.Module,
    task: Task,
    examples: Sequence[Any],
    arguments: FactorArguments | None = None,
    folder: Any = None,
    progress: bool | None = None,
    *,
    fingerprint: str | None = None,
) -> Factors:
    """Fit the curvature factors of ``arguments.strategy`` on ``examples``.

    The data is split into ``arguments.partitions`` contiguous parts; the sums of each
    part are fitted separately and added, which gives the same factors as one pass. With
    ``folder``, each finished part and stage is saved there (see
    :class:`attribution.store.FactorStore`), so a killed run resumes where it stopped,
    and a folder fitted with other arguments or for another model is refused
    (``fingerprint``: the model's, when the caller has hashed it already).
    """
    arguments = arguments or FactorArguments()
    modules = select_modules(model, arguments.modules)
    if len(examples) == 0:
        raise InputError("no examples to fit factors on")
    shard = current_shard()
    store = None
    if folder is not None:
        store = on_main(
            lambda: FactorStore.open_for(
                folder, arguments, model, list(modules), fingerprint, train=examples
            ),
            shard,
        )
    tensors: dict[str, dict[str, torch.Tensor]] = {name: {} for name in modules}
    seconds: dict[str, float] = {}
    work: dict[str, dict[str, str]] = {}
    for stage in STAGES[arguments.strategy]:
        saved = broadcast(store.load_nested(stage) if store else None, shard)
        if saved is None:
            started = time.perf_counter()
            if stage == "eigendecomposition":  # on rank 0, so that every rank has its bits
                eigen = on_main(lambda: eigendecompose(tensors, arguments.torch_dtype), shard)
                saved = broadcast(eigen, shard)
            else:
                eigen = tensors if stage == "lambda" else None
                data = examples
                if stage == "lambda":
                    data = RandomShare.of(examples, arguments.lambda_fraction, arguments.seed)
                sums, work[stage] = _partitioned_sums(
                    stage, model, task, data, arguments, modules, eigen, store, progress
                )
                saved = _normalize(sums, arguments.torch_dtype)
            seconds[stage] = time.perf_counter() - started
            if store:
                store.save_nested(stage, to_cpu_nested(saved), work.get(stage))
                store.drop_parts(stage)
        saved = _to_device(saved, model)
        for name, values in saved.items():
            tensors[name].update(values)
    return Factors(arguments, tensors, seconds, work)


class RandomShare(Sequence):
    """n = max(1, round(f·N)) of N examples drawn without replacement by a seeded
    generator, kept in their original order (item k is ``examples[indices[k]]``).

    The subset EK-FAC's Λ is fitted on when ``lambda_fraction`` < 1. Random, not evenly
    spaced: a stride aliases with periodic data (records grouped by entity, k phrasings
    each), which on the world LM moved LDS by +0.07 where random halves moved it by at
    most 0.01 (``benchmarks/results/cheaper_estimators``). The seed is
    ``FactorArguments.seed``, mixed with a constant of its own.

    >>> share = RandomShare.of(list(range(10)), 0.3, seed=0)
    >>> len(share), share[:] == sorted(share[:]), len(set(share[:]))
    (3, True, 3)
    >>> RandomShare.of("abc", 1.0, seed=0)
    'abc'
    """

    SALT = 7_919  # keeps the share's draws apart from the sampled labels'

    def __init__(self, examples: Sequence[Any], indices: list[int]):
        self.examples, self.indices = examples, indices

    @classmethod
    def of(cls, examples: Sequence[Any], fraction: float, seed: int) -> Sequence[Any]:
        """``examples`` itself for a fraction of 1, else a random share of it."""
        if fraction >= 1:
            return examples
        n = max(1, round(fraction * len(examples)))
        generator = torch.Generator().manual_seed(seed * 1_000_003 + cls.SALT)
        chosen = torch.randperm(len(examples), generator=generator)[:n]
        return cls(examples, sorted(chosen.tolist()))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return [self.examples[i] for i in self.indices[key]]
        return self.examples[self.indices[key]]


def eigendecompose(
    covariances: Mapping[str, Mapping[str, torch.Tensor]], dtype: torch.dtype
) -> dict[str, dict[str, torch.Tensor]]:
    """Eigenvectors and eigenvalues of A and S, computed in float64 (negatives clamped)."""
    result = {}
    for name, cov in covariances.items():
        result[name] = {}
        for side in ("activation", "gradient"):
            values, vectors = torch.linalg.eigh(cov[f"{side}_covariance"].double())
            result[name][f"{side}_eigenvalues"] = values.clamp(min=0).to(dtype)
            result[name][f"{side}_eigenvectors"] = vectors.to(dtype)
    return result


def _partitioned_sums(stage, model, task, examples, arguments, modules, eigen, store, progress):
    """The stage's sums over all examples, added up part by part (each part saved).

    Under ``torchrun`` each part is shared among the ranks (:mod:`attribution.distributed`)
    and their sums are all-reduced; rank 0 saves. Returns the sums and what each rank did.
    """
    shard = current_shard()
    total: dict[str, dict[str, torch.Tensor]] = {}
    counts, resumed = [0] * shard.world_size, 0
    for part, (start, stop) in enumerate(partition_bounds(len(examples), arguments.partitions)):
        sums = broadcast(store.load_nested(f"{stage}.part-{part}") if store else None, shard)
        if sums is None:
            low, high = shard.bounds(start, stop)
            sums = stage_sums(
                stage, model, task, examples, arguments, modules, eigen, low, high, progress
            )
            done = gather_counts(_sequences(sums), shard)
            all_reduce_sums(sums, shard)
            counts = [a + b for a, b in zip(counts, done, strict=True)]
            if store:
                store.save_nested(f"{stage}.part-{part}", to_cpu_nested(sums))
        else:
            sums = _to_device(sums, model)
            resumed += stop - start
        for name, values in sums.items():
            acc = total.setdefault(name, {})
            for key, value in values.items():
                acc[key] = value if key not in acc else acc[key] + value
    return total, work_record(counts, resumed)


def stage_sums(
    stage: str,
    model: nn.Module,
    task: Task,
    examples: Sequence[Any],
    arguments: FactorArguments,
    modules: Mapping[str, nn.Module],
    eigen: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    start: int = 0,
    stop: int | None = None,
    progress: bool | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Unnormalized sums of one stage over ``examples[start:stop]``, with their counts.

    ``covariance``: Σ a aᵀ over non-padding tokens (``n_tokens`` of them) and Σ g gᵀ over
    all tokens; ``lambda``: Σ_z (Q_Sᵀ G_z Q_A)², the rotation applied to each token's a and
    g before they are multiplied (Q_Sᵀ G_z Q_A = Σₜ (Q_Sᵀ gₜ)(Q_Aᵀ aₜ)ᵀ); ``diagonal``:
    Σ_z G_z ⊙ G_z. Every stage also counts ``n_sequences``. The sums start from zeros of
    the right shapes (an empty range gives zeros) and are accumulated inside the hooks
    (:func:`~attribution.gradients.stream_io`): no module's a or g outlives its use.
    """
    sums = zero_sums(stage, model, modules, arguments.torch_dtype)
    stop = len(examples) if stop is None else stop
    for batch, generators in labelled_batches(
        model, task, examples, arguments, stage, start, stop, progress
    ):
        if stage == "covariance":
            visitor = _CovarianceVisitor(sums, task.token_mask(batch))
        else:
            visitor = _SquaredGradientVisitor(sums, stage, eigen)
        stream_io(
            model,
            task,
            batch,
            modules,
            visitor,
            sample=arguments.fisher == "true",
            generator=generators,
            dtype=arguments.torch_dtype,
            autocast_to=arguments.autocast,
        )
        visitor.flush()
        for values in sums.values():
            values["n_sequences"] += batch["input_ids"].shape[0]
    return sums


def zero_sums(
    stage: str, model: nn.Module, modules: Mapping[str, nn.Module], dtype: torch.dtype
) -> dict[str, dict[str, torch.Tensor]]:
    """Zeros of every sum a stage accumulates, on the model's device."""
    device = next(model.parameters()).device
    sums = {}
    for name, module in modules.items():
        n_out, n_in = layout_shape(module)
        if stage == "covariance":
            values = {
                "activation_covariance": torch.zeros(n_in, n_in, dtype=dtype, device=device),
                "gradient_covariance": torch.zeros(n_out, n_out, dtype=dtype, device=device),
                "n_tokens": torch.zeros((), dtype=torch.float64, device=device),
            }
        else:
            values = {stage: torch.zeros(n_out, n_in, dtype=dtype, device=device)}
        values["n_sequences"] = torch.zeros((), dtype=torch.float64, device=device)
        sums[name] = values
    return sums


class _CovarianceVisitor(Visitor):
    """Σ a aᵀ (non-padding tokens) in the forward hook, Σ g gᵀ in the gradient hook."""

    def __init__(self, sums, mask):
        self.sums, self.mask = sums, mask

    def on_input(self, name, a, bias):
        a = _masked_tokens(a, self.mask)
        covariance = self.sums[name]["activation_covariance"]
        if bias:  # [a, 1]ᵀ[a, 1] = [[aᵀa, Σa], [Σaᵀ, n]], without copying a
            n_in, column = a.shape[-1], a.sum(0)
            covariance[:n_in, :n_in] += a.T @ a
            covariance[:n_in, n_in] += column
            covariance[n_in, :n_in] += column
            covariance[n_in, n_in] += a.shape[0]
        else:
            covariance += a.T @ a
        self.sums[name]["n_tokens"] += a.shape[0]

    def on_grad(self, name, kept, g, last):
        g = g.reshape(-1, g.shape[-1])
        self.sums[name]["gradient_covariance"] += g.T @ g


class _SquaredGradientVisitor(Visitor):
    """Σ_z (Q_Sᵀ G_z Q_A)² (or G_z² without eigenvectors): the input is rotated in the
    forward hook, and each call's rotated per-example gradient added up in the gradient
    hook; squared once the module's last call has arrived."""

    def __init__(self, sums, stage, eigen):
        self.sums, self.stage, self.eigen = sums, stage, eigen
        self.partial: dict[str, torch.Tensor] = {}

    def on_input(self, name, a, bias):
        if not self.eigen:
            return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1) if bias else a
        q_a = self.eigen[name]["activation_eigenvectors"].to(a.dtype)
        return a @ q_a[:-1] + q_a[-1] if bias else a @ q_a  # [a, 1] Q_A

    def on_grad(self, name, kept, g, last):
        if self.eigen:
            g = g @ self.eigen[name]["gradient_eigenvectors"].to(g.dtype)
        term = outer_sum(g, kept)  # per-example gradient of this call, maybe rotated
        self.partial[name] = term if name not in self.partial else self.partial[name] + term
        if last:
            self._square(name)

    def flush(self):
        for name in list(self.partial):  # modules with a call that never got a gradient
            self._square(name)

    def _square(self, name):
        self.sums[name][self.stage] += (self.partial.pop(name) ** 2).sum(0)


def _sequences(sums: Mapping[str, Mapping[str, torch.Tensor]]) -> int:
    """How many sequences the sums were accumulated over."""
    first = next(iter(sums.values()))
    return int(first["n_sequences"].item())


def to_cpu_nested(values: Mapping[str, Mapping[str, torch.Tensor]]):
    return {name: to_cpu(quantities) for name, quantities in values.items()}


def _to_device(values, model: nn.Module):
    device = next(model.parameters()).device
    return {name: {k: t.to(device) for k, t in q.items()} for name, q in values.items()}


def _normalize(
    sums: Mapping[str, Mapping[str, torch.Tensor]], dtype: torch.dtype
) -> dict[str, dict[str, torch.Tensor]]:
    """Sums to means: A by tokens, everything else by sequences."""
    result = {}
    for name, values in sums.items():
        n_sequences = values["n_sequences"].item()
        means = {}
        for key, value in values.items():
            if key in ("n_sequences", "n_tokens"):
                continue
            count = values["n_tokens"].item() if key == "activation_covariance" else n_sequences
            means[key] = (value / max(count, 1.0)).to(dtype)
        _check_finite_factors(name, means)
        result[name] = means
    return result


def partition_bounds(n: int, partitions: int) -> list[tuple[int, int]]:
    """``partitions`` contiguous, nearly equal [start, stop) ranges covering ``range(n)``."""
    edges = [round(i * n / partitions) for i in range(partitions + 1)]
    return [(a, b) for a, b in itertools.pairwise(edges) if b > a]


def labelled_batches(
    model: nn.Module,
    task: Task,
    examples: Sequence[Any],
    arguments: FactorArguments,
    desc: str,
    start: int,
    stop: int,
    progress: bool | None,
) -> Iterator[tuple[dict[str, torch.Tensor], list[torch.Generator] | None]]:
    """Batches of ``examples[start:stop]`` with, for the true Fisher, a generator per example.

    Example i's labels are drawn with its own generator, seeded by (``seed``, stage, i):
    the draws do not depend on batch size, partitioning or the rank that processes it.
    """
    sample = arguments.fisher == "true"
    stage_offset = 0 if desc == "covariance" else 1
    for first, last, batch in batches(
        model, task, examples, arguments.batch_size, desc, progress, start, stop
    ):
        generators = None
        if sample:
            device = batch["input_ids"].device
            generators = [
                _example_generator(arguments.seed, stage_offset, i, device)
                for i in range(first, last)
            ]
        yield batch, generators


def training_passes(
    model: nn.Module,
    task: Task,
    examples: Sequence[Any],
    arguments: FactorArguments,
    modules: Mapping[str, nn.Module],
    desc: str,
    start: int,
    stop: int,
    progress: bool | None,
) -> Iterator[tuple[dict[str, torch.Tensor], dict]]:
    """One forward/backward pass per batch; yields the batch and what the modules saw
    (labels as :func:`labelled_batches` draws them)."""
    sample = arguments.fisher == "true"
    for batch, generators in labelled_batches(
        model, task, examples, arguments, desc, start, stop, progress
    ):
        records = module_io(
            model,
            task,
            batch,
            modules,
            sample=sample,
            generator=generators,
            dtype=arguments.torch_dtype,
            autocast_to=arguments.autocast,
        )
        yield batch, records


def _example_generator(seed: int, stage: int, index: int, device) -> torch.Generator:
    mixed = (seed * 1_000_003 + stage) * 1_000_000_007 + index
    return torch.Generator(device=device).manual_seed(mixed % (2**63 - 1))


def _masked_tokens(a: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``a`` ([batch, seq, d]) at tokens the mask keeps, as [n, d]."""
    if mask is not None and mask.shape == a.shape[:2] and not mask.all():
        return a[mask]
    return a.reshape(-1, a.shape[-1])


def _check_finite_factors(name: str, values: Mapping[str, torch.Tensor]) -> None:
    for key, tensor in values.items():
        if not torch.isfinite(tensor).all():
            raise NonFiniteError(f"the {key} of module {name!r} is NaN or infinite")
