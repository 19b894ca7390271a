"""Each objective against a value computed by hand (float64, tiny batches)."""

from __future__ import annotations

import math

import torch

from unlearn import objectives as o


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_gradient_ascent_and_difference():
    assert o.gradient_ascent_loss(t(1.0, 3.0)).item() == -2.0
    assert o.gradient_difference_loss(t(1.0, 3.0), t(0.5, 1.5), retain_weight=2.0).item() == 0.0


def test_kl_loss_and_token_kl():
    p_ref = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]], dtype=torch.float64)
    p = torch.tensor([[[0.25, 0.75], [0.5, 0.5]]], dtype=torch.float64)
    mask = torch.tensor([[True, False]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # only token 0
    got = o.token_kl(p_ref.log(), p.log(), mask)
    assert math.isclose(got.item(), expected, rel_tol=1e-6)
    assert math.isclose(o.kl_loss(t(2.0), got, 3.0).item(), -2.0 + 3 * expected, rel_tol=1e-6)


def test_npo_matches_its_formula():
    log_p, log_ref, beta = t(-5.0, -1.0), t(-2.0, -2.0), 0.5
    expected = -(2 / beta) * (log_sigmoid(-beta * -3.0) + log_sigmoid(-beta * 1.0)) / 2
    assert math.isclose(o.npo_loss(log_p, log_ref, beta).item(), expected, rel_tol=1e-12)


def test_npo_falls_as_the_forget_answer_becomes_unlikely():
    ref = t(-2.0)
    assert o.npo_loss(t(-10.0), ref) < o.npo_loss(t(-2.0), ref) < o.npo_loss(t(-1.0), ref)


def test_simnpo_matches_its_formula():
    log_p, length, beta, delta = t(-6.0, -2.0), torch.tensor([3, 4]), 4.5, 0.5
    terms = [log_sigmoid(-(beta / 3) * -6.0 - delta), log_sigmoid(-(beta / 4) * -2.0 - delta)]
    expected = -(2 / beta) * sum(terms) / 2
    assert math.isclose(o.simnpo_loss(log_p, length, beta, delta).item(), expected, rel_tol=1e-12)


def test_idk_is_dpo_with_the_refusal_preferred():
    beta = 0.1
    margin = (-1.0 - -3.0) - (-2.0 - -2.5)  # (idk − idk_ref) − (forget − forget_ref)
    expected = -(2 / beta) * log_sigmoid(beta * margin)
    got = o.idk_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.5), beta)
    assert math.isclose(got.item(), expected, rel_tol=1e-12)


def test_rmu_uses_real_tokens_only():
    forget = torch.tensor([[[1.0, 1.0], [9.0, 9.0]]], dtype=torch.float64)
    retain = torch.tensor([[[2.0, 0.0], [5.0, 5.0]]], dtype=torch.float64)
    retain_ref = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    target = t(3.0, 1.0)
    mask = torch.tensor([[True, False]])
    expected = ((1 - 3) ** 2 + 0) / 2 + 0.5 * (2**2 + 0) / 2
    got = o.rmu_loss(forget, target, retain, retain_ref, mask, mask, retain_weight=0.5)
    assert math.isclose(got.item(), expected, rel_tol=1e-12)
