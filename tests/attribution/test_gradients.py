"""Per-example gradients: hooks and torch.func against a for-loop of autograd.grad."""

from __future__ import annotations

import pytest
import torch

from attribution import LanguageModelingTask, per_example_gradients, select_modules
from attribution.errors import NonFiniteError
from attribution.gradients import per_example_gradients_func
from attribution.modules import from_parameter_gradients

from .models import random_examples, tiny_gpt2, tiny_llama, toy_lm

MODELS = {"toy": toy_lm, "llama": tiny_llama, "gpt2": tiny_gpt2}
TASK = LanguageModelingTask(pad_id=0)


def loop_gradients(model, examples, modules):
    """Slow and obvious: each example alone, unpadded, one autograd.grad."""
    rows = {name: [] for name in modules}
    for example in examples:
        batch = TASK.collate([example])
        for name, module in modules.items():
            params = [module.weight] + ([module.bias] if module.bias is not None else [])
            loss = TASK.loss(model, batch).sum()
            grads = torch.autograd.grad(loss, params)
            bias = grads[1] if len(grads) == 2 else None
            rows[name].append(from_parameter_gradients(module, grads[0], bias))
    return {name: torch.stack(r) for name, r in rows.items()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_hooks_equal_a_loop_of_autograd_on_padded_batches(name):
    model = MODELS[name]()
    modules = select_modules(model)
    examples = random_examples(5)  # different lengths: right padding, prompt masking
    hooks = per_example_gradients(model, TASK, TASK.collate(examples), modules)
    loop = loop_gradients(model, examples, modules)
    assert set(hooks) == set(loop)
    for module in modules:
        torch.testing.assert_close(hooks[module], loop[module], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_torch_func_equals_hooks(name):
    model = MODELS[name]()
    modules = select_modules(model)
    batch = TASK.collate(random_examples(4, seed=1))
    hooks = per_example_gradients(model, TASK, batch, modules)
    func = per_example_gradients_func(model, TASK, batch, modules)
    looped = per_example_gradients_func(model, TASK, batch, modules, vectorize=False)
    for module in modules:
        torch.testing.assert_close(func[module], hooks[module], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(looped[module], hooks[module], rtol=1e-10, atol=1e-12)


def test_layouts_with_and_without_bias():
    model = toy_lm()
    modules = select_modules(model, ["blocks.0", "blocks.1", "head"])
    grads = per_example_gradients(model, TASK, TASK.collate(random_examples(2)), modules)
    assert grads["blocks.0"].shape == (2, 6, 5 + 1)  # Linear with bias
    assert grads["blocks.1"].shape == (2, 4, 6 + 1)  # Conv1D(nf=4, nx=6)
    assert grads["head"].shape == (2, 23, 4)  # Linear without bias: no bias column


def test_leaves_no_trace_on_the_model():
    model = toy_lm()
    for p in model.parameters():
        p.requires_grad_(False)
    modules = select_modules(model)
    per_example_gradients(model, TASK, TASK.collate(random_examples(2)), modules)
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())


def test_hooks_are_removed_after_a_failure():
    model = toy_lm()
    with torch.no_grad():
        model.blocks[0].weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="NaN or infinite"):
        per_example_gradients(model, TASK, TASK.collate(random_examples(2)), select_modules(model))
    assert all(not m._forward_hooks for m in model.modules())


def test_sampled_labels_are_seeded_and_differ_from_the_data():
    model = tiny_llama()
    modules = select_modules(model)
    batch = TASK.collate(random_examples(3))

    def sampled(seed):
        g = torch.Generator().manual_seed(seed)
        return per_example_gradients(model, TASK, batch, modules, sample=True, generator=g)

    first, again, other = sampled(0), sampled(0), sampled(1)
    empirical = per_example_gradients(model, TASK, batch, modules)
    name = next(iter(modules))
    assert torch.equal(first[name], again[name])
    assert not torch.allclose(first[name], other[name])
    assert not torch.allclose(first[name], empirical[name])
