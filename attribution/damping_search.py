"""Damping chosen on data, without retraining: a proxy of the linear datamodeling score.

The damping λ of (G + λI)⁻¹ trades the curvature's fit against how far the model really
moves when its training data changes; the best λ differs by setting (on the fidelity
benchmark, 0.3 × the mean eigenvalue on an MLP, ≤ 0.001 × on the tiny-world LM) and no
fixed rule gets both. This module picks λ among candidates by how well each predicts
cheap, real perturbations of the model:

- K random halves S_k of the training set (seeded); for each, the tracked parameters are
  fine-tuned from the trained model θ on S_k alone for T steps of Adam (or SGD) on
  mini-batches of S_k,
  giving θ_k; the probes' measured loss change is Δ_k(q) = ℓ_q(θ_k) − ℓ_q(θ); then every
  parameter is restored bit for bit;
- each candidate λ predicts, up to a constant per probe, Δ_k(q) ≈ −Σ_{z∈S_k} s_λ(q, z),
  s_λ the influence score (positive: z lowers q's loss);
- agreement(λ) = mean over probes of Spearman(−Σ_{z∈S_k} s_λ(q, z), Δ_k(q)) over k;
  the candidate with the highest agreement replaces the default rule (0.1 × the mean
  eigenvalue, always among the candidates) only if it beats it by more than ``margin``
  (2) standard errors of the per-probe paired difference: on a few probes every
  candidate's agreement is noise, and then the default is kept and the report says so.

This is the LDS with "retrain on the half from scratch" replaced by "fine-tune on the
half from θ" (K · T optimizer steps on the tracked modules, no retraining). The fine-tune
response is itself damped (T steps of size ~lr move little along flat directions), so the
choice depends on lr · T; the defaults were measured on both fidelity settings
(``benchmarks/results/damping_search.md``). Scores for every candidate cost one training
pass together (the preconditioned probes of all candidates are stacked).

>>> [d.describe() for d in SearchArguments().damping_candidates()][:2]
['0.0001 × mean eigenvalue', '0.001 × mean eigenvalue']
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from scipy.stats import rankdata
from torch import nn

from attribution.curvature import DAMPING_FACTOR, Damping, Factors
from attribution.distributed import current_shard, gather
from attribution.errors import InputError, NonFiniteError, check_positive_ints
from attribution.influence import QueryGradients, ScoreArguments, pairwise_scores, query_gradients
from attribution.modules import select_modules
from attribution.progress import evaluating, progress_bar
from attribution.task import Task, batches, on_device

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class SearchArguments:
    """How damping is chosen on data (see the module docstring)."""

    factors: tuple[float, ...] = field(
        default=(1e-4, 1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0),
        metadata={"help": "candidate λ as multiples of each module's mean eigenvalue"},
    )
    perturbations: int = field(default=16, metadata={"help": "random halves fine-tuned on"})
    steps: int = field(default=200, metadata={"help": "optimizer steps per half"})
    learning_rate: float = field(default=3e-3, metadata={"help": "the optimizer's learning rate"})
    optimizer: str = field(default="adam", metadata={"help": "adam or sgd", "choices": OPTIMIZERS})
    batch_size: int = field(default=16, metadata={"help": "examples per fine-tuning step"})
    seed: int = field(default=0, metadata={"help": "seeds the halves and the mini-batches"})
    margin: float = field(
        default=2.0,
        metadata={
            "help": "standard errors (paired over probes) by which the best candidate must beat "
            "the default 0.1 × mean eigenvalue to replace it"
        },
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "factors", tuple(float(f) for f in self.factors))
        if not self.factors or any(not math.isfinite(f) or f < 0 for f in self.factors):
            raise InputError(f"damping candidates must be finite and >= 0, got {self.factors}")
        fields_ = ("perturbations", "steps", "batch_size")
        check_positive_ints("SearchArguments", {n: getattr(self, n) for n in fields_})
        if self.perturbations < 3:
            raise InputError("SearchArguments.perturbations must be >= 3 (a rank correlation)")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise InputError(f"margin must be a finite number >= 0, got {self.margin!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise InputError(f"learning_rate must be > 0, got {self.learning_rate!r}")

    def damping_candidates(self) -> list[Damping]:
        """The candidates, and the default rule (0.1 ×) among them, last if not given."""
        factors = self.factors + ((DAMPING_FACTOR,) if DAMPING_FACTOR not in self.factors else ())
        return [Damping(factor=f) for f in factors]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DampingChoice:
    """The chosen damping, every candidate's agreement (mean ± s.e. over probes), and the
    best candidate's paired margin over the default rule (``versus_default``)."""

    damping: Damping
    candidates: list[dict[str, Any]]
    arguments: SearchArguments
    versus_default: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.damping.describe(),
            "versus_default": self.versus_default,
            "candidates": self.candidates,
            "arguments": self.arguments.to_dict(),
        }

    def describe(self) -> str:
        """One line for people: what was chosen and why."""
        v = self.versus_default
        gain = f"{v['mean']:+.3f} ± {v['stderr']:.3f}" if v else ""
        if v.get("kept_default"):
            return (
                f"kept {self.damping.describe()}: the best candidate ({v['best']}) did not beat "
                f"it by {self.arguments.margin:g} s.e. (agreement {gain})"
            )
        return f"{self.damping.describe()} (agreement {gain} over the default)"


def choose_damping(
    model: nn.Module,
    task: Task,
    train: Sequence[Any],
    probes: Sequence[Any],
    factors: Factors,
    search: SearchArguments | None = None,
    scoring: ScoreArguments | None = None,
    progress: bool | None = None,
) -> DampingChoice:
    """The candidate damping whose influence scores best predict how the probes' losses
    move when the model is fine-tuned on random halves of ``train`` (module docstring).
    ``scoring``: the other score arguments (batch size, dtype); its damping is ignored."""
    search = search or SearchArguments()
    scoring = scoring or ScoreArguments()
    if len(train) < 4:
        raise InputError(f"choosing damping needs at least 4 training examples, got {len(train)}")
    masks = random_halves(len(train), search.perturbations, search.seed)
    measured = perturbation_responses(model, task, train, probes, factors, masks, search, progress)
    predicted = candidate_predictions(model, task, train, probes, factors, masks, search, scoring)
    candidates = search.damping_candidates()
    per_probe = [rank_correlations(guess, measured) for guess in predicted]
    rows = [
        {"damping": d.describe(), **mean_and_stderr(values)}
        for d, values in zip(candidates, per_probe, strict=True)
    ]
    for row in rows:
        row["agreement"] = row.pop("mean")
    chosen, versus = pick(per_probe, candidates.index(Damping()), search.margin)
    versus["best"] = candidates[versus.pop("best_index")].describe()
    return DampingChoice(candidates[chosen], rows, search, versus)


def pick(per_probe: list[torch.Tensor], default: int, margin: float) -> tuple[int, dict]:
    """The index of the candidate with the highest mean agreement if it beats ``default``'s
    by more than ``margin`` standard errors of the paired per-probe difference, else
    ``default``; and that comparison.

    >>> strong = [torch.tensor([0.1, 0.2, 0.1, 0.2]), torch.tensor([0.5, 0.6, 0.5, 0.6])]
    >>> noise = torch.tensor([0.01, -0.01, 0.02, -0.01])
    >>> pick(strong, 0, 2.0)[0], pick([strong[0], strong[0] + noise], 0, 2.0)[0]
    (1, 0)
    """
    means = [mean_and_stderr(v)["mean"] for v in per_probe]
    best = max(range(len(means)), key=lambda i: means[i])
    difference = mean_and_stderr(per_probe[best] - per_probe[default])
    clear = best == default or difference["mean"] > margin * difference["stderr"]
    if difference["stderr"] == 0 and best != default:  # identical per-probe gains: no noise
        clear = difference["mean"] > 0
    return (best if clear else default), {
        **difference,
        "best_index": best,
        "kept_default": not clear,
    }


def mean_and_stderr(values: torch.Tensor) -> dict[str, float]:
    """Mean and standard error of the finite values (−inf and 0 when there are none)."""
    finite = values[torch.isfinite(values)].double()
    if not finite.numel():
        return {"mean": -math.inf, "stderr": 0.0}
    stderr = finite.std().item() / math.sqrt(finite.numel()) if finite.numel() > 1 else 0.0
    return {"mean": finite.mean().item(), "stderr": stderr}


def random_halves(n: int, count: int, seed: int) -> torch.Tensor:
    """[count, n] booleans, each row a random half of ``n`` examples."""
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(count, n, dtype=torch.bool)
    for row in masks:
        row[torch.randperm(n, generator=generator)[: n // 2]] = True
    return masks


def perturbation_responses(
    model: nn.Module,
    task: Task,
    train: Sequence[Any],
    probes: Sequence[Any],
    factors: Factors,
    masks: torch.Tensor,
    search: SearchArguments,
    progress: bool | None = None,
) -> torch.Tensor:
    """Δ_k(q) [K, n_probes]: the probes' loss change after fine-tuning the tracked
    modules on each half; the model is restored exactly after each. Under ``torchrun``
    each rank fine-tunes a contiguous share of the halves (each seeded by its k, so the
    rank does not matter) and the rows are gathered in order."""
    params = [p for m in select_modules(model, factors.modules).values() for p in m.parameters()]
    before = probe_losses(model, task, probes, search.batch_size)
    shard = current_shard()
    low, high = shard.bounds(0, len(masks))
    responses = [before.new_zeros(0, len(before))]  # this rank's rows, none if its share is empty
    with only_trainable(model, params):
        saved = [p.detach().clone() for p in params]
        for k in progress_bar(range(low, high), "damping search", progress):
            try:
                fine_tune(model, task, train, masks[k], params, search, search.seed + k + 1)
                change = probe_losses(model, task, probes, search.batch_size) - before
                responses.append(change[None])
            finally:
                with torch.no_grad():
                    for p, value in zip(params, saved, strict=True):
                        p.copy_(value)
    result = torch.cat(gather(torch.cat(responses), shard))  # probe losses are on the CPU
    if not torch.isfinite(result).all():
        raise NonFiniteError(
            "the damping search's fine-tuning made a probe loss non-finite; lower its learning rate"
        )
    return result


def fine_tune(model, task, train, mask, params, search: SearchArguments, seed: int) -> None:
    """``search.steps`` optimizer steps on mini-batches of the examples in ``mask`` (eval
    mode: the same network the scores describe, no dropout)."""
    chosen = mask.nonzero().flatten()
    generator = torch.Generator().manual_seed(seed)
    kind = torch.optim.Adam if search.optimizer == "adam" else torch.optim.SGD
    optimizer = kind(params, lr=search.learning_rate)
    device = params[0].device
    order: list[int] = []
    with evaluating(model), torch.enable_grad():
        for _ in range(search.steps):
            if len(order) < search.batch_size:
                order += chosen[torch.randperm(len(chosen), generator=generator)].tolist()
            picked, order = order[: search.batch_size], order[search.batch_size :]
            batch = on_device(task.collate([train[i] for i in picked]), device)
            optimizer.zero_grad(set_to_none=True)
            task.loss(model, batch).mean().backward()
            optimizer.step()


@torch.no_grad()
def probe_losses(model, task, probes, batch_size: int) -> torch.Tensor:
    """The task's measurement of every probe, float64 [n_probes]."""
    values = [
        task.measurement(model, batch).double()
        for _, _, batch in batches(model, task, probes, batch_size, "probes", False)
    ]
    return torch.cat(values).cpu()


def candidate_predictions(
    model, task, train, probes, factors, masks, search: SearchArguments, scoring: ScoreArguments
) -> list[torch.Tensor]:
    """Per candidate, the predicted loss change [K, n_probes] = −masks · scoresᵀ; the
    candidates' preconditioned probes are stacked so that one training pass scores all."""
    raw = query_gradients(model, task, probes, factors, scoring)
    candidates = search.damping_candidates()
    stacked = QueryGradients(
        dense={
            name: torch.cat([factors.inverse_product(name, g, d) for d in candidates])
            for name, g in raw.items()
        }
    )
    scores = pairwise_scores(model, task, stacked, train, factors, scoring, progress=False)
    per_candidate = scores.total.double().cpu().chunk(len(candidates))
    return [-(masks.double() @ s.T) for s in per_candidate]


def rank_correlations(predicted: torch.Tensor, measured: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of each column of ``predicted`` and ``measured`` ([K, q]);
    NaN for a constant column.

    >>> x, y = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[3.0], [5.0], [9.0]])
    >>> round(rank_correlations(x, y).item(), 6), round(rank_correlations(x, -y).item(), 6)
    (1.0, -1.0)
    """
    rx = torch.as_tensor(rankdata(predicted.double().numpy(), axis=0))
    ry = torch.as_tensor(rankdata(measured.double().numpy(), axis=0))
    rx, ry = rx - rx.mean(0), ry - ry.mean(0)
    denominator = rx.norm(dim=0) * ry.norm(dim=0)
    corr = (rx * ry).sum(0) / denominator.clamp(min=1e-300)
    return torch.where(denominator > 0, corr, torch.full_like(corr, math.nan))


@contextlib.contextmanager
def only_trainable(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Gradients for ``params`` only (the rest frozen) inside the block; flags restored."""
    flags = {p: p.requires_grad for p in model.parameters()}
    chosen = {id(p) for p in params}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
