"""The task: encoding, the summed completion NLL, sampled labels and token scores,
each against a slow float64 reference on a tiny model."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from attribution.data import IGNORE_INDEX
from attribution.task import (
    LanguageModelingTask,
    TokenScores,
    batches,
    sample_labels,
    scored_batches,
)

from .models import VOCAB, random_examples, tiny_gpt2, tiny_llama

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
TASK = LanguageModelingTask(pad_id=0)
WORDS = ["<pad>", "<eos>", "Q", ":", "A", "yes", "no", "who", "is"]


@pytest.fixture(scope="module")
def tokenizer():
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


def examples(n=7, seed=0):
    """Random lengths and prompts, plus one example with no target at all."""
    found = random_examples(n - 1, seed=seed, min_len=3, max_len=9)
    found.append({"input_ids": [4, 5, 6], "labels": [IGNORE_INDEX] * 3})
    return found


def reference_log_probs(model, example):
    """Each example alone, unpadded: log p(label[t+1] | ids[:t+1]) in float64, by a loop."""
    ids = torch.tensor([example["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    rows = []
    for t in range(len(example["input_ids"]) - 1):
        label = example["labels"][t + 1]
        if label == IGNORE_INDEX:
            rows.append(None)
        else:
            rows.append(torch.log_softmax(logits[t], -1)[label].item())
    return rows, logits[:-1]


# --------------------------------------------------------------------------- encoding


def test_encode_and_collate_encoded_examples():
    task = LanguageModelingTask(pad_id=9, max_length=4)
    assert task.encode({"input_ids": [5, 6, 7, 8, 3], "labels": [-100, 6, 7, 8, 3]}) == {
        "input_ids": [5, 6, 7, 8],
        "labels": [-100, 6, 7, 8],
    }
    assert task.encode({"input_ids": [5, 6]}) == {"input_ids": [5, 6], "labels": [5, 6]}
    batch = task.collate(
        [{"input_ids": [5, 6, 7, 8, 3], "labels": [-100, -100, 7, 8, 3]}, {"input_ids": [4, 3]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [4, 3, 9, 9]]  # right padding
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [4, 3, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_encode_records_masks_the_prompt(tokenizer):
    task = LanguageModelingTask(tokenizer)
    assert task.pad_id == tokenizer.pad_token_id == 0
    qa = task.encode({"prompt": "Q : who is A :", "completion": " yes"})
    assert qa == {"input_ids": [2, 3, 7, 8, 4, 3, 5, 1], "labels": [-100] * 6 + [5, 1]}
    text = task.encode({"text": "who is A"})
    assert text == {"input_ids": [7, 8, 4, 1], "labels": [7, 8, 4, 1]}
    short = LanguageModelingTask(tokenizer, max_length=3).encode({"text": "who is A"})
    assert short == {"input_ids": [7, 8, 4], "labels": [7, 8, 4]}
    batch = task.collate([{"text": "who is A"}, {"prompt": "Q :", "completion": " no"}])
    assert batch["input_ids"].tolist() == [[7, 8, 4, 1], [2, 3, 6, 1]]
    assert batch["labels"].tolist() == [[7, 8, 4, 1], [-100, -100, 6, 1]]


def test_records_need_a_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        TASK.encode({"text": "who is A"})


# --------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("name", sorted(MODELS))
def test_loss_is_the_summed_completion_nll_of_a_loop(name):
    model = MODELS[name]()
    found = examples()
    batch = TASK.collate(found)
    loss = TASK.loss(model, batch)
    expected = []
    for example in found:
        rows, _ = reference_log_probs(model, example)
        expected.append(-sum(r for r in rows if r is not None))
    assert loss.shape == (len(found),) and loss.dtype == torch.float64
    torch.testing.assert_close(
        loss, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=0
    )
    assert loss[-1] == 0  # no target, no loss
    torch.testing.assert_close(TASK.measurement(model, batch), loss, rtol=0, atol=0)
    loss.sum().backward()  # the loss keeps the graph
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def per_example_generators(seeds):
    return [torch.Generator().manual_seed(1000 + s) for s in seeds]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sampled_labels_do_not_depend_on_batching(name):
    model = MODELS[name]()
    found = examples(8, seed=3)
    whole = TASK.loss(
        model, TASK.collate(found), sample=True, generator=per_example_generators(range(8))
    )
    for size in (1, 3, 5):
        parts = [
            TASK.loss(
                model,
                TASK.collate(found[i : i + size]),
                sample=True,
                generator=per_example_generators(range(i, min(i + size, 8))),
            )
            for i in range(0, 8, size)
        ]
        torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(whole, TASK.loss(model, TASK.collate(found)))  # labels were drawn


def test_sampled_labels_keep_the_mask_and_match_their_nll():
    model = tiny_llama()
    found = examples(6, seed=4)
    batch = TASK.collate(found)
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    drawn = sample_labels(logits, targets, per_example_generators(range(6)))
    assert ((drawn == IGNORE_INDEX) == (targets == IGNORE_INDEX)).all()
    assert drawn[targets != IGNORE_INDEX].min() >= 0 and drawn.max() < VOCAB
    assert (drawn != targets).any()  # a near-uniform model rarely repeats the data
    loss = TASK.loss(model, batch, sample=True, generator=per_example_generators(range(6)))
    expected = []
    for row, example in enumerate(found):
        ids = torch.tensor([example["input_ids"]])
        with torch.no_grad():
            own = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        expected.append(
            -sum(
                own[t, drawn[row, t]].item()
                for t in range(len(example["input_ids"]) - 1)
                if drawn[row, t] != IGNORE_INDEX
            )
        )
    torch.testing.assert_close(loss.detach(), torch.tensor(expected, dtype=torch.float64))
    one = TASK.loss(model, batch, sample=True, generator=torch.Generator().manual_seed(5))
    two = TASK.loss(model, batch, sample=True, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(one, two, rtol=0, atol=0)  # one generator: reproducible


# --------------------------------------------------------------------------- token scores


@pytest.mark.parametrize("name", sorted(MODELS))
def test_token_scores_equal_a_float64_reference(name):
    model = MODELS[name]()
    found = examples(6, seed=5)
    batch = TASK.collate(found)
    scores = TASK.token_scores(model, batch)
    assert scores.hidden_states is None
    assert scores.logits.shape == (6, batch["input_ids"].shape[1] - 1, VOCAB)
    for row, example in enumerate(found):
        rows, logits = reference_log_probs(model, example)
        n = len(rows)
        targets = [r is not None for r in rows]
        expected = torch.tensor([0.0 if r is None else r for r in rows], dtype=torch.float64)
        torch.testing.assert_close(scores.log_probs[row, :n], expected, rtol=1e-10, atol=1e-12)
        assert (scores.log_probs[row, n:] == 0).all() and not scores.mask[row, n:].any()
        assert scores.mask[row, :n].tolist() == targets
        assert scores.length[row].item() == sum(targets)
        nll = -expected.sum()
        torch.testing.assert_close(scores.nll[row], nll, rtol=1e-10, atol=1e-12)
        mean = nll / sum(targets) if any(targets) else torch.zeros((), dtype=torch.float64)
        torch.testing.assert_close(scores.mean_nll[row], mean, rtol=1e-10, atol=1e-12)
        correct = [
            targets[t] and logits[t].argmax().item() == example["labels"][t + 1] for t in range(n)
        ]
        assert scores.correct[row, :n].tolist() == correct
        assert not scores.correct[row, n:].any()
    assert scores.length[-1] == 0 and scores.mean_nll[-1] == 0
    torch.testing.assert_close(scores.nll, TASK.loss(model, batch), rtol=1e-12, atol=1e-12)


def test_correct_is_true_where_the_model_predicts_the_target():
    logits = torch.tensor([[[0.0, 3.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    scores = TokenScores(logits, torch.tensor([[1, 2, -100]]))
    assert scores.correct.tolist() == [[True, False, False]]
    assert scores.length.tolist() == [2]
    half = TokenScores(logits.half(), torch.tensor([[1, 2, -100]]))
    assert half.target_log_softmax.dtype == torch.float32  # never below float32
    assert half.log_probs.dtype == torch.float32
    torch.testing.assert_close(half.nll, scores.nll, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_token_scores_return_hidden_states_on_request(name):
    model = MODELS[name]()
    batch = TASK.collate(examples(4, seed=6))
    scores = TASK.token_scores(model, batch, hidden_states=True)
    layers = model.config.num_hidden_layers
    width = model.config.hidden_size
    assert isinstance(scores.hidden_states, tuple) and len(scores.hidden_states) == layers + 1
    for state in scores.hidden_states:
        assert state.shape == (*batch["input_ids"].shape, width)
    if name == "llama":  # hidden_states[0] is the token embedding (GPT-2 adds positions)
        embedded = model.get_input_embeddings()(batch["input_ids"])
        torch.testing.assert_close(scores.hidden_states[0], embedded, rtol=0, atol=0)
    assert scores.attention_mask is batch["attention_mask"]
    plain = TASK.token_scores(model, batch)
    torch.testing.assert_close(scores.log_probs, plain.log_probs, rtol=0, atol=0)


# --------------------------------------------------------------------------- batches


@pytest.mark.parametrize("size", [1, 2, 3, 7, 10])
def test_batches_cover_every_example_once_in_eval_mode(size):
    model = tiny_llama().train()
    model.model.layers[0].eval()  # a module's own flag must come back too
    flags = {name: m.training for name, m in model.named_modules()}
    found = examples(7, seed=7)
    seen = []
    for first, last, batch in batches(model, TASK, found, size, "test", progress=False):
        assert not any(m.training for m in model.modules())
        assert last - first == min(size, 7 - first) == batch["input_ids"].shape[0]
        expected = TASK.collate(found[first:last])
        for key, value in expected.items():
            assert torch.equal(batch[key], value)
        seen.extend(range(first, last))
    assert seen == list(range(7))
    assert {name: m.training for name, m in model.named_modules()} == flags


def test_batches_slice_and_restore_when_abandoned():
    model = tiny_llama().train()
    found = examples(7, seed=8)
    ranges = [(a, b) for a, b, _ in batches(model, TASK, found, 2, "t", False, start=2, stop=6)]
    assert ranges == [(2, 4), (4, 6)]
    stream = batches(model, TASK, found, 2, "test", progress=False)
    next(stream)
    assert not model.training
    stream.close()
    assert model.training and all(m.training for m in model.modules())


def test_scored_batches_run_without_gradients():
    model = tiny_gpt2().train()
    found = examples(5, seed=9)
    reference = TASK.token_scores(model.eval(), TASK.collate(found))
    model.train()
    rows = []
    for first, last, batch, scores in scored_batches(
        model, TASK, found, 2, "test", progress=False, hidden_states=True
    ):
        assert not model.training
        assert not scores.logits.requires_grad and not scores.nll.requires_grad
        assert len(scores.hidden_states) == model.config.n_layer + 1
        assert batch["input_ids"].shape[0] == last - first
        rows.append(scores.nll)
    assert model.training
    assert reference.nll.requires_grad  # outside scored_batches the graph is kept
    torch.testing.assert_close(torch.cat(rows), reference.nll.detach(), rtol=1e-10, atol=1e-12)
