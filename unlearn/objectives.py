"""Unlearning objectives as pure loss functions (lower is better for the unlearner).

Inputs are per-example quantities of a batch: ``nll`` the mean token NLL of the answer,
``log_prob`` the summed answer log-probability log p(y|x), ``length`` |y| in tokens;
``_ref`` marks the frozen original model. With α the retain weight and β the
inverse temperature:

- gradient ascent:      L = −mean(nll_f)
- gradient difference:  L = −mean(nll_f) + α mean(nll_r)
- KL:                   L = −mean(nll_f) + α mean(KL(p_ref ‖ p_θ) on retain tokens)
- NPO:                  L = −(2/β) mean log σ(−β (log p_θ(y_f) − log p_ref(y_f))) + α mean(nll_r)
- SimNPO:               L = −(2/β) mean log σ(−(β/|y_f|) log p_θ(y_f) − δ) + α mean(nll_r)
- IDK (DPO toward "I don't know"):
                        L = −(2/β) mean log σ(β [(log p_θ(y_idk) − log p_ref(y_idk))
                                                 − (log p_θ(y_f) − log p_ref(y_f))]) + α mean(nll_r)
- RMU:                  L = mean‖h_l(x_f) − c·u‖² + α mean‖h_l(x_r) − h_l^ref(x_r)‖²
                        (per token; h_l the state after block l, u a fixed random unit vector)

>>> import torch
>>> round(npo_loss(torch.tensor([-2.0]), torch.tensor([-2.0]), beta=1.0).item(), 4)  # 2 log 2
1.3863
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def gradient_ascent_loss(forget_nll: torch.Tensor) -> torch.Tensor:
    """−mean(nll_f): raise the forget set's loss."""
    return -forget_nll.mean()


def gradient_difference_loss(
    forget_nll: torch.Tensor, retain_nll: torch.Tensor, retain_weight: float = 1.0
) -> torch.Tensor:
    """−mean(nll_f) + α mean(nll_r).

    >>> gradient_difference_loss(torch.tensor([2.0, 4.0]), torch.tensor([1.0]), 0.5).item()
    -2.5
    """
    return -forget_nll.mean() + retain_weight * retain_nll.mean()


def kl_loss(
    forget_nll: torch.Tensor, retain_kl: torch.Tensor, retain_weight: float = 1.0
) -> torch.Tensor:
    """−mean(nll_f) + α mean(KL(p_ref ‖ p_θ)) on retain."""
    return -forget_nll.mean() + retain_weight * retain_kl.mean()


def npo_loss(
    forget_log_prob: torch.Tensor, forget_log_prob_ref: torch.Tensor, beta: float = 0.1
) -> torch.Tensor:
    """Negative preference optimisation: −(2/β) mean log σ(−β log(p_θ/p_ref)).

    At the start (p_θ = p_ref) it is 2 log 2 / β; it falls toward 0 as p_θ(y_f) falls.
    """
    ratio = forget_log_prob - forget_log_prob_ref
    return -(2.0 / beta) * F.logsigmoid(-beta * ratio).mean()


def simnpo_loss(
    forget_log_prob: torch.Tensor, length: torch.Tensor, beta: float = 4.5, delta: float = 0.0
) -> torch.Tensor:
    """SimNPO: −(2/β) mean log σ(−(β/|y|) log p_θ(y) − δ) (no reference model).

    >>> round(simnpo_loss(torch.tensor([-3.0]), torch.tensor([3]), beta=1.0).item(), 4)
    0.6265
    """
    return (
        -(2.0 / beta) * F.logsigmoid(-(beta / length.clamp(min=1)) * forget_log_prob - delta).mean()
    )


def idk_loss(
    idk_log_prob: torch.Tensor,
    idk_log_prob_ref: torch.Tensor,
    forget_log_prob: torch.Tensor,
    forget_log_prob_ref: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """DPO with the "I don't know" answer preferred over the forget answer."""
    margin = (idk_log_prob - idk_log_prob_ref) - (forget_log_prob - forget_log_prob_ref)
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()


def rmu_loss(
    forget_hidden: torch.Tensor,
    target: torch.Tensor,
    retain_hidden: torch.Tensor,
    retain_hidden_ref: torch.Tensor,
    forget_mask: torch.Tensor,
    retain_mask: torch.Tensor,
    retain_weight: float = 1.0,
) -> torch.Tensor:
    """Representation misdirection: MSE to c·u on forget tokens + α MSE to the frozen
    model's hidden states on retain tokens (masks select real tokens; hidden [B, T, d]).

    >>> h = torch.zeros(1, 2, 2); m = torch.tensor([[True, False]])
    >>> rmu_loss(h, torch.tensor([3.0, 4.0]), h, h, m, m).item()  # (9 + 16) / 2
    12.5
    """
    forget_error = ((forget_hidden - target) ** 2).mean(-1)[forget_mask].mean()
    retain_error = ((retain_hidden - retain_hidden_ref) ** 2).mean(-1)[retain_mask].mean()
    return forget_error + retain_weight * retain_error


def token_kl(logits_ref: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per example, the mean over masked tokens of KL(p_ref ‖ p_θ); logits [B, T, V].

    >>> z = torch.zeros(1, 1, 3)
    >>> token_kl(z, z, torch.tensor([[True]])).item()
    0.0
    """
    log_p_ref = F.log_softmax(logits_ref.float(), dim=-1)
    log_p = F.log_softmax(logits.float(), dim=-1)
    kl = (log_p_ref.exp() * (log_p_ref - log_p)).sum(-1)  # [B, T]
    return (kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)
