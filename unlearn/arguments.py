"""How to unlearn: one argument object, every field documented, checked and recorded.

The command line builds its options from these fields (their help, choices and
defaults), so the two cannot drift apart. Weights have distinct names: ``retain_weight``
is α, the retain term of an objective; the scope's β is
:attr:`unlearn.scope.ScopeArguments.retain_penalty`.

>>> UnlearnArguments(method="simnpo").effective_beta, UnlearnArguments().effective_beta
(4.5, 0.1)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from attribution.curvature import Damping
from attribution.errors import InputError
from unlearn.methods import METHODS
from unlearn.scope import check_choice

FALLBACK_BETA = 0.1  # β of a method that has no default of its own
STOPS = ("budget", "calibrated")


@dataclass(frozen=True)
class UnlearnArguments:
    """How to unlearn; every field is recorded in the manifest."""

    method: str = field(
        default="npo", metadata={"help": "the unlearning objective", "choices": tuple(METHODS)}
    )
    steps: int = field(default=60, metadata={"help": "optimizer steps"})
    lr: float = field(
        default=1e-3, metadata={"help": "learning rate (tiny models need more than 1e-5)"}
    )
    batch_size: int = field(default=8, metadata={"help": "forget and retain examples per step"})
    retain_weight: float = field(default=1.0, metadata={"help": "α of the retain term"})
    beta: float | None = field(
        default=None, metadata={"help": "β (default: NPO/IDK 0.1, SimNPO 4.5)"}
    )
    delta: float = field(default=0.0, metadata={"help": "SimNPO's margin δ"})
    weight_decay: float = field(default=0.01, metadata={"help": "decoupled, in scope only"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    rmu_layer: int | None = field(
        default=None, metadata={"help": "RMU's steered block (default: the middle one)"}
    )
    rmu_scale: float = field(
        default=2.0, metadata={"help": "RMU's c = scale × mean ‖h_l‖ on forget tokens"}
    )
    idk_text: str = field(default=" I don't know.", metadata={"help": "the IDK method's answer"})
    forget_target: float | None = field(
        default=None, metadata={"help": "stop at this forget loss (nats/token)"}
    )
    retain_budget: float | None = field(
        default=0.5, metadata={"help": "nats/token the retain loss may rise before a step back"}
    )
    eval_every: int = field(default=5, metadata={"help": "steps between measurements"})
    newton_iterations: int = field(
        default=1, metadata={"help": "newton: scoped steps, each with a fresh gradient"}
    )
    newton_max_scale: float = field(
        default=4096.0, metadata={"help": "newton: the line search tries η₀ × 4ᵏ up to this"}
    )
    damping: Damping = field(
        default_factory=Damping, metadata={"help": "newton: λ of the damped inverse"}
    )
    stop: str = field(
        default="budget",
        metadata={
            "help": "budget: the retain budget and forget target end a run; calibrated: it "
            "ends where its truth ratios best match never having learned (needs a holdout "
            "split or a reference model)",
            "choices": STOPS,
        },
    )
    strangers: tuple[str, ...] = field(
        default=(), metadata={"help": "distill: names the model never saw (the stranger pool)"}
    )
    seed: int = field(default=0, metadata={"help": "seeds the batch order"})

    def __post_init__(self) -> None:
        check_choice("method", self.method, tuple(METHODS))
        check_choice("stop", self.stop, STOPS)
        for name in ("steps", "batch_size", "eval_every", "newton_iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("lr", "retain_weight", "weight_decay", "max_grad_norm", "rmu_scale"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise InputError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.beta is not None and not self.beta > 0:
            raise InputError(f"beta must be > 0, got {self.beta!r}")
        for name in ("retain_budget", "forget_target"):  # None: switched off
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int | float) or not math.isfinite(value) or value < 0
            ):
                raise InputError(f"{name} must be a finite number >= 0 or none, got {value!r}")
        object.__setattr__(self, "damping", Damping.of(self.damping))
        strangers = tuple(self.strangers)
        if not all(isinstance(n, str) and n.strip() for n in strangers):
            raise InputError("strangers must be non-empty names")
        object.__setattr__(self, "strangers", strangers)

    @property
    def effective_beta(self) -> float:
        if self.beta is not None:
            return self.beta
        default = METHODS[self.method].default_beta
        return default if default is not None else FALLBACK_BETA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
