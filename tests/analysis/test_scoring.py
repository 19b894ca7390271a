"""Teacher-forced completion scores against a per-example loop and against generation."""

from __future__ import annotations

import pytest
import torch

from analysis.scoring import score_completions
from attribution.data import encode_record
from excise.models import load_model
from excise.world import read_split


@pytest.fixture(scope="module")
def base(tiny_world):
    return load_model(tiny_world / "base")


def reference_nll(model, tokenizer, record):
    """Slow and obvious: one record, log-softmax, sum over completion tokens, float64."""
    encoded = encode_record(tokenizer, record)
    ids = torch.tensor([encoded["input_ids"]])
    logits = model(input_ids=ids).logits[0].double()
    logprobs = torch.log_softmax(logits, -1)
    total = 0.0
    for t in range(1, len(encoded["input_ids"])):
        if encoded["labels"][t] != -100:
            total -= logprobs[t - 1, encoded["labels"][t]].item()
    return total


def test_nll_matches_a_per_example_loop(base, tiny_world):
    model, tokenizer = base
    records = read_split(tiny_world, "retain")[:5] + read_split(tiny_world, "holdout")[:5]
    scores = score_completions(model, tokenizer, records, batch_size=4)
    with torch.no_grad():
        expected = [reference_nll(model, tokenizer, r) for r in records]
    assert torch.allclose(
        scores.nll.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-4
    )


def test_scores_do_not_depend_on_batch_size(base, tiny_world):
    model, tokenizer = base
    records = read_split(tiny_world, "world")
    one, many = (score_completions(model, tokenizer, records, batch_size=b) for b in (1, 16))
    assert torch.allclose(one.nll, many.nll, atol=1e-4)
    assert torch.equal(one.n_correct, many.n_correct)


def test_exact_means_greedy_generation_reproduces_the_answer(base, tiny_world):
    model, tokenizer = base
    records = read_split(tiny_world, "forget")[:4] + read_split(tiny_world, "holdout")[:4]
    scores = score_completions(model, tokenizer, records)
    for record, exact in zip(records, scores.exact.tolist(), strict=True):
        prompt = tokenizer(record["prompt"], return_tensors="pt")
        answer = encode_record(tokenizer, record)
        n_answer = sum(label != -100 for label in answer["labels"])
        out = model.generate(
            **prompt, max_new_tokens=n_answer, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        generated = out[0, prompt["input_ids"].shape[1] :].tolist()
        assert (generated == answer["input_ids"][-n_answer:]) == exact
    assert scores.exact[:4].all() and not scores.exact[4:].any()
