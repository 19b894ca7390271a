"""AdamW that exists only inside a scope.

``torch.optim.AdamW`` with a gradient mask still shrinks every weight through its
decoupled weight decay and keeps moments for every element (WAGLE's released code edits
"unselected" weights this way). Here each parameter keeps the flat indices of its
in-scope elements; moments are stored for those alone, and the update — weight decay
included — is written to those alone, so an out-of-scope element is never written:

    m ← β₁ m + (1 − β₁) g_S,   v ← β₂ v + (1 − β₂) g_S²
    θ_S ← θ_S (1 − η w) − η m̂ / (√v̂ + ε),   m̂ = m / (1 − β₁ᵗ), v̂ = v / (1 − β₂ᵗ)

>>> import torch
>>> p = torch.nn.Parameter(torch.ones(4))
>>> mask = torch.tensor([True, False, True, False])
>>> opt = MaskedAdamW({"p": p}, {"p": mask}, lr=0.1, weight_decay=0.5)
>>> round(opt.step({"p": torch.ones(4)}), 4)  # the in-scope gradient norm, √2
1.4142
>>> [round(x, 4) for x in p.detach().tolist()]
[0.85, 1.0, 0.85, 1.0]
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from attribution.errors import InputError


class MaskedAdamW:
    """AdamW over the ``True`` elements of ``masks[name]`` for each parameter."""

    def __init__(
        self,
        params: Mapping[str, torch.nn.Parameter],
        masks: Mapping[str, torch.Tensor],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.t = 0
        self.entries: dict[str, tuple[torch.nn.Parameter, torch.Tensor]] = {}
        self.moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, mask in masks.items():
            if not bool(mask.any()):
                continue
            param = params[name]
            if not param.is_contiguous():
                raise InputError(f"parameter {name!r} is not contiguous; cannot edit it in place")
            index = mask.flatten().nonzero().squeeze(1).to(param.device)
            self.entries[name] = (param, index)
            zeros = torch.zeros(index.numel(), device=param.device, dtype=torch.float32)
            self.moments[name] = (zeros, zeros.clone())

    @property
    def names(self) -> list[str]:
        """The parameters with at least one in-scope element."""
        return list(self.entries)

    def scoped_gradients(
        self, gradients: Mapping[str, torch.Tensor | None]
    ) -> dict[str, torch.Tensor]:
        """The in-scope elements of each gradient, flat, in float32 (missing: zeros)."""
        out = {}
        for name, (param, index) in self.entries.items():
            g = gradients.get(name)
            out[name] = (
                torch.zeros(index.numel(), device=param.device)
                if g is None
                else g.reshape(-1)[index].float()
            )
        return out

    @torch.no_grad()
    def step(
        self, gradients: Mapping[str, torch.Tensor | None], max_norm: float | None = None
    ) -> float:
        """One update; returns the norm of the in-scope gradient (before clipping)."""
        scoped = self.scoped_gradients(gradients)
        norm = (
            torch.sqrt(sum((g**2).sum() for g in scoped.values())) if scoped else torch.tensor(0.0)
        )
        scale = 1.0
        if max_norm is not None and norm > max_norm:
            scale = max_norm / (norm.item() + 1e-12)
        self.t += 1
        beta1, beta2 = self.betas
        for name, (param, index) in self.entries.items():
            g = scoped[name] * scale
            m, v = self.moments[name]
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            m_hat = m / (1 - beta1**self.t)
            v_hat = v / (1 - beta2**self.t)
            flat = param.data.view(-1)
            values = flat[index].float() * (1 - self.lr * self.weight_decay)
            values -= self.lr * m_hat / (v_hat.sqrt() + self.eps)
            flat[index] = values.to(flat.dtype)
        return float(norm)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of the in-scope values (to restore a state later)."""
        return {n: p.data.view(-1)[i].clone() for n, (p, i) in self.entries.items()}

    @torch.no_grad()
    def restore(self, values: Mapping[str, torch.Tensor]) -> None:
        for name, (param, index) in self.entries.items():
            param.data.view(-1)[index] = values[name]
