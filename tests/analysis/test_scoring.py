"""Teacher-forced completion scores against a per-example loop and against generation."""

from __future__ import annotations

import copy

import pytest
import torch

from analysis.scoring import score_completions
from attribution.data import encode_record
from attribution.task import LanguageModelingTask
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
    scores = score_completions(model, LanguageModelingTask(tokenizer), records, batch_size=4)
    with torch.no_grad():
        expected = [reference_nll(model, tokenizer, r) for r in records]
    assert torch.allclose(
        scores.nll.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-4
    )


def manual_log_softmax(logits):
    """log softmax written out: x − max − log Σ exp(x − max)."""
    shifted = logits - logits.max(-1, keepdim=True).values
    return shifted - shifted.exp().sum(-1, keepdim=True).log()


def test_scores_equal_a_float64_loop_one_record_at_a_time(base, tiny_world):
    model, tokenizer = base
    records = read_split(tiny_world, "forget")[:3] + read_split(tiny_world, "holdout")[:3]
    records.append({"text": records[0]["prompt"] + records[0]["completion"]})
    scores = score_completions(model, LanguageModelingTask(tokenizer), records, batch_size=3)
    wide = copy.deepcopy(model).double()
    for i, record in enumerate(records):
        encoded = encode_record(tokenizer, record)
        ids = torch.tensor([encoded["input_ids"]])
        with torch.no_grad():
            logp = manual_log_softmax(wide(input_ids=ids).logits[0])
        nll, n_tokens, n_correct = 0.0, 0, 0
        for t, label in enumerate(encoded["labels"]):
            if t > 0 and label != -100:
                nll -= logp[t - 1, label].item()
                n_tokens += 1
                n_correct += int(logp[t - 1].argmax().item() == label)
        assert scores.nll[i].item() == pytest.approx(nll, rel=1e-4, abs=1e-4)
        assert (scores.n_tokens[i].item(), scores.n_correct[i].item()) == (n_tokens, n_correct)
    assert scores.nll.dtype == torch.float32 and scores.n_tokens.dtype == torch.int64


def test_scores_do_not_depend_on_batch_size(base, tiny_world):
    model, tokenizer = base
    records = read_split(tiny_world, "world")
    one, many = (
        score_completions(model, LanguageModelingTask(tokenizer), records, batch_size=b)
        for b in (1, 16)
    )
    assert torch.allclose(one.nll, many.nll, atol=1e-4)
    assert torch.equal(one.n_correct, many.n_correct)


def test_exact_means_greedy_generation_reproduces_the_answer(base, tiny_world):
    model, tokenizer = base
    records = read_split(tiny_world, "forget")[:4] + read_split(tiny_world, "holdout")[:4]
    scores = score_completions(model, LanguageModelingTask(tokenizer), records)
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
