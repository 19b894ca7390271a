"""Scope masks: which parameters an unlearning run may edit.

A scope is a boolean mask per parameter tensor (``True``: may change). It is chosen by
ranking an importance score ``s`` over parameters and keeping the top ``sparsity``
fraction, either in one global ranking (WAGLE's choice) or within each tensor
(``per_tensor``), or by keeping whole tensors (``granularity="tensor"``, ranked by their
mean score). The importance scores (:mod:`unlearn.importance`) are:

- ``ekfac``: the share of parameter i in the Newton step that removes the forget set,
  d = (G + λI)⁻¹ ḡ_f, balanced against the retain set:
  s_i = |d_i ḡ_f,i| − β |d_i ḡ_r,i|, β = ``retain_penalty`` (first-order change of the
  forget loss minus that of the retain loss, if parameter i alone took its Newton step);
- ``wagle``: s = |(θ − ḡ_r / μ) ⊙ ḡ_f|, μ = 1e-6 (WAGLE's weight attribution);
- ``saliency``: s = |ḡ_f| (SalUn);
- ``magnitude``: s = |θ|; ``random``: uniform noise from the seed; ``all``: everything.

ḡ_f and ḡ_r are mean per-example gradients of the summed completion NLL.

>>> import torch
>>> scores = {"a": torch.tensor([0.1, 0.9, 0.5, 0.2]), "b": torch.tensor([0.8, 0.0])}
>>> scope = mask_from_scores(scores, sparsity=0.5)
>>> {k: v.tolist() for k, v in scope.masks.items()}
{'a': [False, True, True, False], 'b': [True, False]}
>>> scope.edited, scope.total
(3, 6)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from attribution.curvature import Damping
from attribution.errors import InputError
from attribution.modules import layer_index

SCOPES = ("ekfac", "wagle", "saliency", "magnitude", "random", "all")
RANKINGS = ("global", "per_tensor")
GRANULARITIES = ("parameter", "tensor")


@dataclass(frozen=True)
class ScopeArguments:
    """How the scope is chosen; recorded in the manifest."""

    method: str = field(
        default="ekfac",
        metadata={"help": "how the editable parameters are chosen", "choices": SCOPES},
    )
    sparsity: float = field(
        default=0.05, metadata={"help": "fraction of parameters that may change, in (0, 1]"}
    )
    ranking: str = field(
        default="global",
        metadata={"help": "one ranking over all parameters, or within each", "choices": RANKINGS},
    )
    granularity: str = field(
        default="parameter",
        metadata={"help": "single weights, or whole tensors", "choices": GRANULARITIES},
    )
    retain_penalty: float = field(
        default=1.0, metadata={"help": "β of the ekfac score |d ḡ_f| − β |d ḡ_r|"}
    )
    wagle_mu: float = field(default=1e-6, metadata={"help": "μ of WAGLE's attribution"})
    damping: Damping = field(
        default_factory=Damping, metadata={"help": "λ of the Newton direction d"}
    )
    seed: int = field(default=0, metadata={"help": "seeds the random scope"})

    def __post_init__(self) -> None:
        check_choice("scope", self.method, SCOPES)
        check_choice("ranking", self.ranking, RANKINGS)
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_sparsity(self.sparsity)
        if not _finite(self.retain_penalty) or self.retain_penalty < 0:
            raise InputError(f"retain_penalty must be >= 0, got {self.retain_penalty!r}")
        if not _finite(self.wagle_mu) or not self.wagle_mu > 0:
            raise InputError(f"wagle_mu must be > 0, got {self.wagle_mu!r}")
        object.__setattr__(self, "damping", Damping.of(self.damping))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Scope:
    """A boolean mask per parameter name; parameters without a mask are out of scope."""

    masks: dict[str, torch.Tensor]

    @property
    def edited(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    @property
    def total(self) -> int:
        return int(sum(m.numel() for m in self.masks.values()))

    @property
    def fraction(self) -> float:
        return self.edited / max(self.total, 1)

    def in_scope(self, name: str) -> int:
        """How many elements of parameter ``name`` may change."""
        mask = self.masks.get(name)
        return 0 if mask is None else int(mask.sum())

    def by_tensor(self) -> list[dict]:
        """Per parameter tensor: name, layer index (or None), size and edited count."""
        rows = []
        for name, mask in self.masks.items():
            edited = int(mask.sum())
            rows.append(
                {
                    "name": name,
                    "layer": layer_index(name),
                    "numel": mask.numel(),
                    "edited": edited,
                    "fraction": edited / mask.numel(),
                }
            )
        return rows

    def by_layer(self) -> dict[str, int]:
        """Edited parameters per transformer layer ("other" for tensors outside blocks)."""
        counts: dict[str, int] = {}
        for row in self.by_tensor():
            key = "other" if row["layer"] is None else str(row["layer"])
            counts[key] = counts.get(key, 0) + row["edited"]
        return counts

    def save(self, path) -> None:
        """Write the masks as a safetensors file (uint8 tensors, names as keys)."""
        save_file({n: m.to(torch.uint8).contiguous() for n, m in self.masks.items()}, str(path))

    @classmethod
    def load(cls, path) -> Scope:
        return cls({n: t.bool() for n, t in load_file(str(path)).items()})

    def check_fits(self, model: nn.Module) -> None:
        """Refuse masks whose names or shapes are not the model's parameters."""
        params = dict(model.named_parameters())
        for name, mask in self.masks.items():
            if name not in params:
                raise InputError(f"scope names {name!r}, which is not a parameter of the model")
            if tuple(mask.shape) != tuple(params[name].shape):
                raise InputError(
                    f"scope mask of {name!r} has shape {tuple(mask.shape)}, the parameter "
                    f"{tuple(params[name].shape)}"
                )


def mask_from_scores(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    ranking: str = "global",
    granularity: str = "parameter",
) -> Scope:
    """Keep the top ``sparsity`` fraction of the scored parameters.

    Ties at the threshold are broken by position, so the count is exact:
    ``round(sparsity × n)`` (at least 1) parameters in a global ranking, and as many per
    tensor in a per-tensor ranking. Scores of ``-inf`` are never kept unless needed to
    reach the count. With ``granularity="tensor"``, whole tensors are kept in the order
    of their mean score until the fraction is reached (at least one tensor).
    """
    check_sparsity(sparsity)
    check_choice("ranking", ranking, RANKINGS)
    check_choice("granularity", granularity, GRANULARITIES)
    if not scores:
        raise InputError("no parameters to choose a scope from")
    if granularity == "tensor":
        return _tensor_scope(scores, sparsity)
    if ranking == "per_tensor":
        return Scope({n: _tensor_top_fraction(s, sparsity) for n, s in scores.items()})
    flat = torch.cat([s.detach().flatten().double() for s in scores.values()])
    keep = _top_fraction(flat, sparsity)
    masks, offset = {}, 0
    for name, s in scores.items():
        masks[name] = keep[offset : offset + s.numel()].view(s.shape)
        offset += s.numel()
    return Scope(masks)


def full_scope(model: nn.Module) -> Scope:
    """Every trainable parameter in scope (the unscoped baseline)."""
    return Scope(
        {
            n: torch.ones_like(p, dtype=torch.bool)
            for n, p in model.named_parameters()
            if p.requires_grad
        }
    )


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_sparsity(sparsity: float) -> None:
    if not _finite(sparsity) or not (0 < sparsity <= 1):
        raise InputError(
            f"sparsity must be in (0, 1] (fraction of parameters edited), got {sparsity!r}"
        )


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def _top_fraction(values: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask of the ``round(sparsity × n)`` largest values (at least one)."""
    values = torch.nan_to_num(values.detach().double(), nan=-math.inf)
    count = max(1, round(sparsity * values.numel()))
    keep = torch.zeros(values.numel(), dtype=torch.bool)
    keep[torch.topk(values.cpu(), count, sorted=False).indices] = True
    return keep


def _tensor_top_fraction(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The top fraction of one tensor; none of a tensor that was not scored (all −inf)."""
    if not bool((scores > -math.inf).any()):
        return torch.zeros(scores.shape, dtype=torch.bool)
    return _top_fraction(scores.flatten(), sparsity).view(scores.shape)


def _tensor_scope(scores: Mapping[str, torch.Tensor], sparsity: float) -> Scope:
    total = sum(s.numel() for s in scores.values())
    order = sorted(
        scores, key=lambda n: -torch.nan_to_num(scores[n].double(), nan=-1e300).mean().item()
    )
    masks = {n: torch.zeros(s.shape, dtype=torch.bool) for n, s in scores.items()}
    kept = 0
    for name in order:
        if kept and kept + scores[name].numel() > sparsity * total:
            continue
        masks[name][...] = True
        kept += scores[name].numel()
    return Scope(masks)
