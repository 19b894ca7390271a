"""The fidelity benchmark: the LDS against hand examples, exact influence against a loop,
and a smoke run of the quick pipeline on a minuscule synthetic classification setting."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.fidelity import lds, main, spearman_columns, subset_masks, summary
from benchmarks.fidelity_exact import exact_scores
from benchmarks.fidelity_settings import ClassificationTask


def test_lds_hand_example():
    # z0 lowers the query's loss (positive score), z2 raises it: the subset without z0
    # and with z2 must have the highest loss, the one with z0 and without z2 the lowest
    scores = torch.tensor([[1.0, 0.0, -1.0], [-1.0, 0.0, 1.0]])
    masks = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.bool)
    measured = torch.tensor([[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]])  # [subsets, queries]
    assert lds(scores, masks, measured).tolist() == pytest.approx([1.0, 1.0])
    assert lds(-scores, masks, measured).tolist() == pytest.approx([-1.0, -1.0])  # wrong sign


def test_lds_constant_loss_is_nan_and_left_out_of_the_mean():
    scores = torch.tensor([[1.0, 0.0, -1.0], [1.0, 0.0, -1.0]])
    masks = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.bool)
    measured = torch.tensor([[0.1, 0.3], [0.9, 0.3], [0.5, 0.3]])
    values = lds(scores, masks, measured)
    assert values[0].item() == pytest.approx(1.0) and math.isnan(values[1].item())
    stats = summary(values)
    assert stats["mean"] == pytest.approx(1.0) and stats["n"] == 1 and math.isnan(stats["stderr"])


def test_spearman_columns_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (12, 3), generator=generator).double()  # many ties
    y = torch.randn(12, 3, generator=generator, dtype=torch.float64)
    ours = spearman_columns(x, y)
    for j in range(3):
        assert ours[j].item() == pytest.approx(spearmanr(x[:, j], y[:, j]).statistic, abs=1e-12)


def test_subset_masks_are_halves_and_stable_when_more_are_drawn():
    few, more = subset_masks(11, 3), subset_masks(11, 5)
    assert (few.sum(1) == 5).all()
    assert torch.equal(few, more[:3])
    assert not torch.equal(more[0], more[1])


def test_exact_gauss_newton_scores_match_a_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randint(0, 3, (7,))
    xq, yq = torch.randn(2, 3, dtype=torch.float64), torch.randint(0, 3, (2,))
    result = exact_scores(model, x, y, xq, yq)
    params = list(model.parameters())

    def flat_grad(xi, yi):
        loss = F.cross_entropy(model(xi[None]), yi[None])
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    n = sum(p.numel() for p in params)
    gn = torch.zeros(n, n, dtype=torch.float64)
    for xi in x:  # G = mean Jᵀ (diag p − p pᵀ) J, J from one backward pass per logit
        logits = model(xi[None])[0]
        p = torch.softmax(logits, -1).detach()
        rows = [
            torch.cat(
                [g.flatten() for g in torch.autograd.grad(logits[k], params, retain_graph=True)]
            )
            for k in range(3)
        ]
        jac = torch.stack(rows)
        gn += jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac / len(x)
    lam = 0.1 * torch.linalg.eigvalsh(gn).mean()
    train = torch.stack([flat_grad(xi, yi) for xi, yi in zip(x, y, strict=True)])
    query = torch.stack([flat_grad(xi, yi) for xi, yi in zip(xq, yq, strict=True)])
    expected = query @ torch.linalg.solve(gn + lam * torch.eye(n, dtype=torch.float64), train.T)
    torch.testing.assert_close(result["scores"]["gauss_newton"], expected)
    assert result["matrices"]["gauss_newton"]["damping"] == pytest.approx(lam.item())


def test_classification_task_samples_labels_per_example():
    task = ClassificationTask()
    net = nn.Linear(2, 3)
    batch = task.collate([{"input_ids": torch.ones(2), "labels": 0}] * 4)
    generators = [torch.Generator().manual_seed(i) for i in range(4)]
    assert task.loss(net, batch, sample=True, generator=generators).shape == (4,)


def test_quick_pipeline_smoke(tmp_path):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(60, 6, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    config = {"n_train": 40, "n_queries": 6, "hidden": 8, "epochs": 3, "batch_size": 16}
    data = tmp_path / "data.pt"
    torch.save((x, y, config), data)
    argv = [
        "--quick", "--settings", "digits", "--methods",
        "excise-identity,excise-ekfac,excise-ekfac-chosen",
        "--subsets", "4", "--digits-data", str(data), "--results", str(tmp_path / "out"),
        "--cache", str(tmp_path / "cache"),
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / "fidelity.json").read_text())
    (digits,) = report["results"]
    assert digits["subsets"] == 4 and digits["seeds"] == 1
    for name in ("excise-identity", "excise-ekfac", "excise-ekfac-chosen"):
        entry = digits["methods"][name]
        assert -1 <= entry["lds"]["mean"] <= 1 and len(entry["per_query"]) == 6
    assert "excise-ekfac" in (tmp_path / "out" / "fidelity.md").read_text()
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*.pt"))
    assert len(cached) == 4 + 1  # four subsets × one seed, one full-data model
    assert main(argv) == 0  # a rerun reads every model from the cache
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.pt")) == cached


def test_a_pair_left_out_of_full_runs_is_reported_as_not_run(tmp_path, monkeypatch):
    from benchmarks import fidelity

    monkeypatch.setitem(fidelity.NOT_RUN, ("digits", "excise-identity"), "not run: too slow")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=generator)
    y = (x[:, 0] > 0).long()
    config = {"n_train": 30, "n_queries": 4, "hidden": 4, "epochs": 2, "batch_size": 16}
    torch.save((x, y, config), tmp_path / "data.pt")
    argv = [
        "--quick", "--settings", "digits", "--methods", "excise-identity,excise-ekfac",
        "--subsets", "3", "--digits-data", str(tmp_path / "data.pt"),
        "--results", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"),
    ]  # fmt: skip
    assert main(argv) == 0
    (digits,) = json.loads((tmp_path / "out" / "fidelity.json").read_text())["results"]
    assert digits["methods"]["excise-identity"] == {"not_run": "not run: too slow"}
    assert "| excise-identity | not run |" in (tmp_path / "out" / "fidelity.md").read_text()
