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

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from attribution.errors import InputError, NonFiniteError
from attribution.gradients import backward_to_outputs, capture
from attribution.modules import ModuleSpec, select_modules
from attribution.task import Task

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
FISHER_TYPES = ("true", "empirical")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
STAGES = {  # the stages each strategy fits, in order
    "identity": (),
    "diagonal": ("diagonal",),
    "kfac": ("covariance", "eigendecomposition"),
    "ekfac": ("covariance", "eigendecomposition", "lambda"),
}


@dataclass(frozen=True)
class FactorArguments:
    """How factors are fitted. Every field is recorded beside the factors on disk."""

    strategy: str = field(default="ekfac", metadata={"help": "identity, diagonal, kfac or ekfac"})
    fisher: str = field(default="true", metadata={"help": "true (sampled labels) or empirical"})
    modules: str | tuple[str, ...] | None = field(
        default=None, metadata={"help": "regex or module names; None: Linear/Conv1D in blocks"}
    )
    batch_size: int = field(default=16, metadata={"help": "sequences per forward pass"})
    seed: int = field(default=0, metadata={"help": "seeds the labels sampled for the true Fisher"})
    dtype: str = field(
        default="float32",  # bf16 covariances break eigenvectors: never below float32
        metadata={"help": "float32 or float64: per-example gradients and accumulation"},
    )

    def __post_init__(self) -> None:
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("fisher", self.fisher, FISHER_TYPES)
        _check_choice("dtype", self.dtype, tuple(DTYPES))
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InputError(f"FactorArguments.batch_size must be >= 1, got {self.batch_size!r}")
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

    def damping(self, module: str, damping: float | None = None, factor: float = 0.1) -> float:
        """λ for ``module``: ``damping`` when given, else ``factor`` × mean(Λ)."""
        if damping is not None:
            return float(damping)
        if self.arguments.strategy == "identity":
            return 0.0
        return factor * self.eigenvalues(module).mean().item()

    def inverse_product(
        self, module: str, vectors: torch.Tensor, damping: float | None = None, factor: float = 0.1
    ) -> torch.Tensor:
        """(G + λI)⁻¹ V for a batch V of shape [..., out, in (+1)] (identity: V itself)."""
        strategy = self.arguments.strategy
        if strategy == "identity":
            return vectors
        lam = self.damping(module, damping, factor)
        eig = self.eigenvalues(module).to(vectors.dtype)
        if strategy == "diagonal":
            return vectors / (eig + lam)
        t = self.tensors[module]
        q_s = t["gradient_eigenvectors"].to(vectors.dtype)
        q_a = t["activation_eigenvectors"].to(vectors.dtype)
        rotated = q_s.T @ vectors @ q_a  # [..., out, in]
        return q_s @ (rotated / (eig + lam)) @ q_a.T

    def precondition(
        self,
        gradients: Mapping[str, torch.Tensor],
        damping: float | None = None,
        factor: float = 0.1,
    ) -> dict[str, torch.Tensor]:
        """:meth:`inverse_product` for every module of a gradient dict."""
        return {
            name: self.inverse_product(name, v, damping, factor) for name, v in gradients.items()
        }


def fit_factors(
    model: nn.Module,
    task: Task,
    examples: Sequence[Any],
    arguments: FactorArguments | None = None,
    folder: Any = None,
    progress: bool | None = None,
) -> Factors:
    """Fit the curvature factors of ``arguments.strategy`` on ``examples``.

    With ``folder``, every finished stage is saved there (see
    :class:`attribution.store.FactorStore`) and stages already saved are loaded instead of
    refitted; a folder fitted with other arguments or for another model is refused.
    """
    arguments = arguments or FactorArguments()
    modules = select_modules(model, _module_spec(arguments.modules))
    if not examples:
        raise InputError("no examples to fit factors on")
    store = None
    if folder is not None:
        from attribution.store import FactorStore

        store = FactorStore.open(folder, arguments, model, list(modules))
    tensors: dict[str, dict[str, torch.Tensor]] = {name: {} for name in modules}
    seconds: dict[str, float] = {}
    for stage in STAGES[arguments.strategy]:
        saved = store.load_stage(stage) if store else None
        if saved is None:
            started = time.perf_counter()
            saved = _run_stage(stage, model, task, examples, arguments, modules, tensors, progress)
            seconds[stage] = time.perf_counter() - started
            if store:
                store.save_stage(stage, saved)
        for name, values in saved.items():
            tensors[name].update(values)
    return Factors(arguments, tensors, seconds)


def _run_stage(stage, model, task, examples, arguments, modules, tensors, progress):
    if stage == "covariance":
        return fit_covariances(model, task, examples, arguments, modules, progress)
    if stage == "eigendecomposition":
        return eigendecompose(tensors, arguments.torch_dtype)
    rotations = tensors if stage == "lambda" else None
    return fit_second_moments(model, task, examples, arguments, modules, rotations, progress)


def fit_covariances(
    model: nn.Module,
    task: Task,
    examples: Sequence[Any],
    arguments: FactorArguments,
    modules: Mapping[str, nn.Module],
    progress: bool | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """A = (1/N_tokens) Σ a aᵀ (non-padding tokens) and S = (1/N_sequences) Σ g gᵀ."""
    dtype = arguments.torch_dtype
    sums: dict[str, dict[str, torch.Tensor]] = {}
    n_tokens = dict.fromkeys(modules, 0)
    n_sequences = 0
    for batch, records in _passes(
        model, task, examples, arguments, modules, "covariance", arguments.seed, progress
    ):
        mask = task.token_mask(batch)
        for name, record in records.items():
            for a, g in zip(record.inputs, record.output_grads, strict=True):
                a = _masked_tokens(a, mask)
                g = g.reshape(-1, g.shape[-1])
                acc = sums.setdefault(
                    name,
                    {
                        "activation_covariance": a.new_zeros(a.shape[1], a.shape[1]),
                        "gradient_covariance": g.new_zeros(g.shape[1], g.shape[1]),
                    },
                )
                acc["activation_covariance"] += a.T @ a
                acc["gradient_covariance"] += g.T @ g
                n_tokens[name] += a.shape[0]
        n_sequences += batch["input_ids"].shape[0]
    for name, acc in sums.items():
        acc["activation_covariance"] /= max(n_tokens[name], 1)
        acc["gradient_covariance"] /= n_sequences
        _check_finite_factors(name, acc)
    return {name: {k: v.to(dtype) for k, v in acc.items()} for name, acc in sums.items()}


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


def fit_second_moments(
    model: nn.Module,
    task: Task,
    examples: Sequence[Any],
    arguments: FactorArguments,
    modules: Mapping[str, nn.Module],
    eigen: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    progress: bool | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """E_z[(Q_Sᵀ G_z Q_A)²] (EK-FAC's ``lambda``) or, without ``eigen``, E_z[G_z²] (diagonal).

    The rotation is applied to each token's a and g before they are multiplied, so the
    per-example gradient is formed directly in the eigenbasis: Q_Sᵀ G_z Q_A =
    Σₜ (Q_Sᵀ gₜ)(Q_Aᵀ aₜ)ᵀ.
    """
    dtype = arguments.torch_dtype
    key = "lambda" if eigen is not None else "diagonal"
    sums: dict[str, torch.Tensor] = {}
    n_sequences = 0
    for _, records in _passes(
        model, task, examples, arguments, modules, key, arguments.seed + 1, progress
    ):
        for name, record in records.items():
            total = None
            for a, g in zip(record.inputs, record.output_grads, strict=True):
                if eigen is not None:
                    a = a @ eigen[name]["activation_eigenvectors"].to(dtype)
                    g = g @ eigen[name]["gradient_eigenvectors"].to(dtype)
                term = torch.einsum("bto,bti->boi", g, a)
                total = term if total is None else total + term
            squared = (total**2).sum(0)
            sums[name] = squared if name not in sums else sums[name] + squared
        n_sequences += next(iter(records.values())).inputs[0].shape[0]
    result = {name: {key: (value / n_sequences).to(dtype)} for name, value in sums.items()}
    for name, values in result.items():
        _check_finite_factors(name, values)
    return result


def _passes(
    model: nn.Module,
    task: Task,
    examples: Sequence[Any],
    arguments: FactorArguments,
    modules: Mapping[str, nn.Module],
    desc: str,
    seed: int,
    progress: bool | None,
) -> Iterator[tuple[dict[str, torch.Tensor], dict]]:
    """One forward/backward pass per batch; yields the batch and what the modules saw."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    sample = arguments.fisher == "true"
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(examples), arguments.batch_size)
        bar = tqdm(
            starts, desc=desc, disable=None if progress is None else not progress, leave=False
        )
        for start in bar:
            batch = task.collate(examples[start : start + arguments.batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}
            with capture(modules, arguments.torch_dtype) as records, torch.enable_grad():
                loss = task.loss(model, batch, sample=sample, generator=generator)
                backward_to_outputs(loss, records, arguments.torch_dtype)
            yield batch, records
    finally:
        model.train(was_training)


def _masked_tokens(a: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``a`` ([batch, seq, d]) at tokens the mask keeps, as [n, d]."""
    if mask is not None and mask.shape == a.shape[:2]:
        return a[mask]
    return a.reshape(-1, a.shape[-1])


def _check_finite_factors(name: str, values: Mapping[str, torch.Tensor]) -> None:
    for key, tensor in values.items():
        if not torch.isfinite(tensor).all():
            raise NonFiniteError(f"the {key} of module {name!r} is NaN or infinite")


def _module_spec(modules: str | tuple[str, ...] | None) -> ModuleSpec:
    return list(modules) if isinstance(modules, tuple) else modules


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(
            f"FactorArguments.{name} must be one of {', '.join(choices)}; got {value!r}"
        )
