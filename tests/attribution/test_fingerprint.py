"""Model fingerprints: equal iff every state-dict tensor is bit-identical."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from torch import nn

from attribution.fingerprint import model_fingerprint, tensor_hash, tensor_hashes

from .models import tiny_gpt2, tiny_llama, toy_lm

MODELS = {"toy": toy_lm, "llama": tiny_llama, "gpt2": tiny_gpt2}


def reference_hash(tensor):
    """SHA-256 of dtype, shape and raw bytes, spelled out."""
    data = tensor.detach().contiguous()
    head = f"{data.dtype}|{tuple(data.shape)}|".encode()
    return hashlib.sha256(head + bytes(data.reshape(-1).view(torch.uint8).tolist())).hexdigest()


def test_tensor_hash_equals_a_reference():
    g = torch.Generator().manual_seed(0)
    cases = [
        torch.randn(3, 4, generator=g, dtype=torch.float64),
        torch.randn(5, generator=g).half(),
        torch.randn(2, 3, generator=g).bfloat16(),
        torch.tensor(7, dtype=torch.long),
        torch.tensor([True, False, True]),
    ]
    for tensor in cases:
        assert tensor_hash(tensor) == reference_hash(tensor)
    wide = torch.randn(4, 3, generator=g)
    assert tensor_hash(wide.t()) == tensor_hash(wide.t().contiguous())  # strides do not count


def test_tensor_hash_sees_dtype_shape_and_bits():
    x = torch.arange(6, dtype=torch.float32)
    assert tensor_hash(x) != tensor_hash(x.view(2, 3))  # same bytes, another shape
    assert tensor_hash(x) != tensor_hash(x.view(torch.int32))  # same bytes, another dtype
    assert tensor_hash(torch.tensor([0.0])) != tensor_hash(torch.tensor([-0.0]))
    y = x.clone()
    y[3] = torch.nextafter(y[3], torch.tensor(10.0))  # the smallest possible change
    assert tensor_hash(x) != tensor_hash(y)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fingerprint_is_stable_across_calls_and_copies(name):
    model = MODELS[name]()
    fingerprint = model_fingerprint(model)
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0
    assert model_fingerprint(model) == fingerprint
    assert model_fingerprint(copy.deepcopy(model)) == fingerprint
    assert model_fingerprint(MODELS[name](seed=0)) == fingerprint  # rebuilt from the seed
    fresh = MODELS[name](seed=1)
    assert model_fingerprint(fresh) != fingerprint
    fresh.load_state_dict(model.state_dict())
    assert model_fingerprint(fresh) == fingerprint
    assert tensor_hashes(fresh) == tensor_hashes(model)
    model(input_ids=torch.tensor([[3, 4, 5]]))  # a forward pass changes nothing
    assert model_fingerprint(model) == fingerprint


@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_element_changes_the_fingerprint_and_only_its_tensor_hash(name):
    model = MODELS[name]()
    fingerprint, hashes = model_fingerprint(model), tensor_hashes(model)
    state = model.state_dict()
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        index = (tensor.numel() - 1) // 2
        flat = tensor.view(-1)
        old = flat[index].clone()
        with torch.no_grad():
            flat[index] = torch.nextafter(old, old + 1)
        changed = {k for k, v in tensor_hashes(model).items() if v != hashes[k]}
        shared = {k for k, t in state.items() if t.data_ptr() == tensor.data_ptr()}
        assert changed == shared and key in changed  # tied tensors change together
        assert model_fingerprint(model) != fingerprint
        with torch.no_grad():
            flat[index] = old
    assert model_fingerprint(model) == fingerprint


def test_tensor_hashes_cover_every_state_dict_entry():
    model = tiny_gpt2()
    assert list(tensor_hashes(model)) == list(model.state_dict())
    assert "lm_head.weight" in tensor_hashes(model)  # tied to the embedding, still listed

    class WithBuffers(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 2)
            self.register_buffer("count", torch.tensor(3))
            self.register_buffer("scratch", torch.zeros(2), persistent=False)

    net = WithBuffers()
    assert set(tensor_hashes(net)) == {"linear.weight", "linear.bias", "count"}
    before = model_fingerprint(net)
    net.count += 1  # a persistent buffer is part of the model
    assert model_fingerprint(net) != before
    net.count -= 1
    net.scratch += 1  # a non-persistent one is not saved, so it is not fingerprinted
    assert model_fingerprint(net) == before
    assert tensor_hashes(net)["count"] == tensor_hash(torch.tensor(3))


def test_negative_control_a_swap_that_weaker_fingerprints_miss():
    """Two same-shaped tensors trade values: the multiset of hashes, the names, shapes and
    sums are unchanged, so fingerprints built from those would pass; ours must not."""
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)).double()
    hashes, fingerprint = tensor_hashes(net), model_fingerprint(net)

    def weak(model):  # names, shapes and the sorted tensor hashes, without their binding
        values = sorted(tensor_hashes(model).values())
        shapes = sorted((n, tuple(t.shape)) for n, t in model.state_dict().items())
        return hashlib.sha256(repr((values, shapes)).encode()).hexdigest()

    weak_before = weak(net)
    with torch.no_grad():
        first, second = net[0].weight.clone(), net[1].weight.clone()
        net[0].weight.copy_(second)
        net[1].weight.copy_(first)
    assert weak(net) == weak_before  # the control: a weak fingerprint is fooled
    assert model_fingerprint(net) != fingerprint
    assert tensor_hashes(net)["0.weight"] == hashes["1.weight"] != hashes["0.weight"]
