"""MaskedAdamW equals torch's AdamW inside the scope and never writes outside it."""

from __future__ import annotations

import torch

from unlearn.optimizer import MaskedAdamW


def test_full_mask_equals_torch_adamw():
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
    theirs = torch.nn.Parameter(ours.detach().clone())
    opt = MaskedAdamW(
        {"w": ours}, {"w": torch.ones(5, 4, dtype=torch.bool)}, lr=0.01, weight_decay=0.1
    )
    ref = torch.optim.AdamW([theirs], lr=0.01, weight_decay=0.1, eps=1e-8)
    for step in range(5):
        g = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        opt.step({"w": g})
        theirs.grad = g.clone()
        ref.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-9)


def test_out_of_scope_elements_are_never_written_even_with_weight_decay():
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(6, 3))
    q = torch.nn.Parameter(torch.randn(4))
    before_p, before_q = p.detach().clone(), q.detach().clone()
    mask = torch.rand(6, 3) < 0.3
    opt = MaskedAdamW(
        {"p": p, "q": q},
        {"p": mask, "q": torch.zeros(4, dtype=torch.bool)},
        lr=0.1,
        weight_decay=0.5,
    )
    assert opt.names == ["p"]
    for _ in range(3):
        opt.step({"p": torch.randn(6, 3), "q": torch.randn(4)}, max_norm=1.0)
    assert torch.equal(p.detach()[~mask], before_p[~mask])
    assert (p.detach()[mask] != before_p[mask]).all()
    assert torch.equal(q.detach(), before_q)
    assert sum(m.numel() for pair in opt.moments.values() for m in pair) == 2 * int(mask.sum())


def test_clipping_scales_the_in_scope_gradient_only():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = MaskedAdamW({"p": p}, {"p": torch.tensor([True, False])}, lr=1.0)
    norm = opt.step({"p": torch.tensor([3.0, 4.0])}, max_norm=1.0)
    assert norm == 3.0  # the out-of-scope 4 does not count
