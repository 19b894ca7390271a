"""Knowledge shift and parameter change: hand values, direct computations, the tiny world."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.scoring import score_completions
from analysis.shift import (
    StateMismatchError,
    bootstrap_mean_ci,
    knowledge_shift,
    layer_index,
    parameter_change,
    summarize_shift,
    token_shift,
)
from attribution.data import encode_record
from attribution.errors import InputError
from attribution.task import LanguageModelingTask
from excise.models import load_model
from excise.world import read_split


def test_bootstrap_is_a_seeded_percentile_interval():
    values = np.random.default_rng(3).normal(size=40)
    rng = np.random.default_rng(7)
    means = [values[rng.integers(0, 40, 40)].mean() for _ in range(1000)]  # the same draws
    expected = np.quantile(means, [0.025, 0.975])
    assert bootstrap_mean_ci(values, seed=7) == pytest.approx(tuple(expected))
    assert bootstrap_mean_ci(values, seed=7) == bootstrap_mean_ci(values, seed=7)
    assert bootstrap_mean_ci([2.5]) == (2.5, 2.5)


def test_summary_lists_the_largest_changes_first():
    records = [{"id": f"r{i}", "prompt": "Q", "completion": "A"} for i in range(12)]
    change = [0.1 * i * (-1) ** i for i in range(12)]
    kl = [0.01 * i for i in range(12)]
    out = summarize_shift(records, change, kl)
    assert out["n"] == 12
    assert [e["id"] for e in out["most_shifted"]] == [f"r{i}" for i in range(11, 1, -1)]
    assert out["most_shifted"][0]["log_prob_change"] == pytest.approx(-1.1)
    assert out["log_prob_change"]["mean"] == pytest.approx(np.mean(change))
    assert out["log_prob_change"]["median"] == pytest.approx(np.median(change))
    assert out["kl"]["per_example"] == pytest.approx(kl)
    low, high = out["log_prob_change"]["ci_low"], out["log_prob_change"]["ci_high"]
    assert low <= out["log_prob_change"]["mean"] <= high


def test_layer_index():
    assert layer_index("model.layers.3.mlp.up_proj.weight") == 3
    assert layer_index("model.layers.12.self_attn.q_proj.weight") == 12
    assert layer_index("transformer.h.0.attn.c_attn.bias") == 0
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_index("model.norm.weight") is None


def test_parameter_change_by_hand():
    before = {"model.layers.1.w": torch.zeros(2, 3), "lm_head.weight": torch.ones(4)}
    after = {"model.layers.1.w": torch.zeros(2, 3), "lm_head.weight": torch.ones(4)}
    after["lm_head.weight"][1:3] = torch.tensor([3.0, -3.0])  # changes 2 and -4
    out = parameter_change(before, after)
    assert (out["total_tensors"], out["identical_tensors"]) == (2, 1)
    assert (out["total_parameters"], out["changed_parameters"]) == (10, 2)
    first, second = out["modules"]
    assert (first["name"], first["layer"], first["identical"], first["l2"]) == (
        "model.layers.1.w",
        1,
        True,
        0.0,
    )
    assert (second["layer"], second["changed"], second["fraction_changed"]) == (None, 2, 0.5)
    assert second["l2"] == pytest.approx(np.sqrt(4 + 16))


def test_parameter_change_refuses_different_tensors():
    with pytest.raises(StateMismatchError):
        parameter_change({"a": torch.zeros(2)}, {"b": torch.zeros(2)})
    with pytest.raises(InputError):
        parameter_change({"a": torch.zeros(2)}, {"a": torch.zeros(3)})


@pytest.fixture(scope="module")
def models(tiny_world):
    return load_model(tiny_world / "base"), load_model(tiny_world / "reference")


def test_a_model_against_itself_moves_nothing(models, tiny_world):
    (base, tokenizer), _ = models
    records = read_split(tiny_world, "neighbor")[:6]
    out = knowledge_shift(base, base, LanguageModelingTask(tokenizer), records)
    assert out["log_prob_change"]["per_example"] == [0.0] * 6
    assert out["kl"]["per_example"] == [0.0] * 6
    assert (out["kl"]["ci_low"], out["kl"]["ci_high"]) == (0.0, 0.0)


def test_shift_matches_scores_and_a_direct_kl(models, tiny_world):
    (base, tokenizer), (reference, _) = models
    records = read_split(tiny_world, "forget")[:4] + read_split(tiny_world, "retain")[:3]
    task = LanguageModelingTask(tokenizer)
    change, kl = token_shift(base, reference, task, records, batch_size=3)
    before, after = (score_completions(m, task, records) for m in (base, reference))
    assert change == pytest.approx((before.nll - after.nll).double().numpy(), abs=1e-3)
    assert (kl >= 0).all() and kl[:4].mean() > kl[4:].mean()  # forget facts moved most
    encoded = encode_record(tokenizer, records[0])
    ids = torch.tensor([encoded["input_ids"]])
    with torch.no_grad():
        p, q = (
            torch.log_softmax(m(input_ids=ids).logits[0].double(), -1) for m in (base, reference)
        )
    rows = [t - 1 for t, label in enumerate(encoded["labels"]) if label != -100]
    direct = (p[rows].exp() * (p[rows] - q[rows])).sum(-1).mean()
    assert kl[0] == pytest.approx(float(direct), rel=1e-4)
