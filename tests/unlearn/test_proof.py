"""The scope proof: per-tensor hashes before and after, and the verdict they give."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from attribution.fingerprint import tensor_hash
from tests.attribution.models import tiny_llama
from unlearn.optimizer import MaskedAdamW
from unlearn.proof import (
    ScopeViolation,
    check_proof,
    parameter_owners,
    scope_proof,
    state_hashes,
)
from unlearn.scope import Scope


def tied_gpt2(tie=True):
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32, tie_word_embeddings=tie
    )
    return GPT2LMHeadModel(config).eval()


def half_mask(param):
    """In scope: every other element."""
    return (torch.arange(param.numel()) % 2 == 0).view(param.shape)


def nudge(model, name, index=0):
    """Add 1 to one element of parameter (or state-dict entry) ``name``."""
    with torch.no_grad():
        model.state_dict()[name].view(-1)[index] += 1


def llama_scope(model):
    params = dict(model.named_parameters())
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    masks = {n: half_mask(params[n]) for n in names}
    masks["model.norm.weight"] = torch.zeros_like(params["model.norm.weight"], dtype=torch.bool)
    return Scope(masks)


def test_the_proof_holds_when_only_in_scope_elements_change():
    model = tiny_llama()
    scope = llama_scope(model)
    before = state_hashes(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in scope.masks:
                param[scope.masks[name]] += 0.5
    proof = scope_proof(before, state_hashes(model), scope, model)
    state = model.state_dict()
    assert [r["name"] for r in proof["per_tensor"]] == list(state)
    for row in proof["per_tensor"]:
        mask = scope.masks.get(row["name"])
        assert row["in_scope"] == (0 if mask is None else int(mask.sum()))
        assert row["sha256_before"] == before[row["name"]]
        assert row["sha256_after"] == tensor_hash(state[row["name"]])
        assert row["identical"] == (row["in_scope"] == 0)
    assert proof["holds"] is True
    assert proof["tensors"] == len(state)
    assert proof["changed_tensors"] == 2
    assert proof["out_of_scope_tensors"] == proof["out_of_scope_identical"] == len(state) - 2
    check_proof(proof)  # does not raise


def test_the_proof_holds_after_masked_adamw_with_weight_decay():
    """PEFT's check: a few real update steps, then everything outside the scope is equal."""
    model = tiny_llama()
    scope = llama_scope(model)
    before = state_hashes(model)
    params = dict(model.named_parameters())
    optimizer = MaskedAdamW(params, scope.masks, lr=0.1, weight_decay=0.5)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    for _ in range(3):
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()  # every parameter gets a gradient
        optimizer.step({n: p.grad for n, p in params.items()})
    proof = scope_proof(before, state_hashes(model), scope, model)
    assert proof["holds"] and proof["changed_tensors"] == 2


def test_an_out_of_scope_change_fails_and_is_named():
    model = tiny_llama()
    scope = llama_scope(model)
    before = state_hashes(model)
    nudge(model, "model.layers.1.mlp.down_proj.weight", 5)
    nudge(model, "model.norm.weight")  # listed in the scope, but with no element in it
    proof = scope_proof(before, state_hashes(model), scope, model)
    assert proof["holds"] is False
    assert proof["out_of_scope_tensors"] - proof["out_of_scope_identical"] == 2
    with pytest.raises(ScopeViolation) as caught:
        check_proof(proof)
    message = str(caught.value)
    assert "model.layers.1.mlp.down_proj.weight" in message and "model.norm.weight" in message
    assert "q_proj" not in message and "up_proj" not in message


def test_a_single_bit_outside_the_scope_is_caught():
    model = tiny_llama()
    scope = llama_scope(model)
    before = state_hashes(model)
    with torch.no_grad():
        weight = model.model.layers[0].self_attn.v_proj.weight
        weight.view(-1)[3] = torch.nextafter(weight.view(-1)[3], torch.tensor(9.0).double())
    proof = scope_proof(before, state_hashes(model), scope, model)
    assert not proof["holds"]
    with pytest.raises(ScopeViolation, match=r"model\.layers\.0\.self_attn\.v_proj\.weight"):
        check_proof(proof)


def test_tied_weights_count_as_in_scope_with_the_parameter_they_share():
    model = tied_gpt2()
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    assert "lm_head.weight" not in dict(model.named_parameters())
    owners = parameter_owners(model)
    assert owners["lm_head.weight"] == "transformer.wte.weight"
    assert all(owners[n] == n for n in dict(model.named_parameters()))

    wte = model.transformer.wte.weight
    scope = Scope({"transformer.wte.weight": half_mask(wte)})
    before = state_hashes(model)
    nudge(model, "transformer.wte.weight")  # the head changes with it
    proof = scope_proof(before, state_hashes(model), scope, model)
    rows = {r["name"]: r for r in proof["per_tensor"]}
    assert rows["lm_head.weight"]["in_scope"] == rows["transformer.wte.weight"]["in_scope"] > 0
    assert not rows["lm_head.weight"]["identical"]
    assert proof["holds"] and proof["changed_tensors"] == 2

    other = Scope(
        {"transformer.h.0.mlp.c_fc.weight": half_mask(model.transformer.h[0].mlp.c_fc.weight)}
    )
    before = state_hashes(model)
    nudge(model, "transformer.wte.weight")
    proof = scope_proof(before, state_hashes(model), other, model)
    assert not proof["holds"]
    with pytest.raises(ScopeViolation) as caught:
        check_proof(proof)
    assert "transformer.wte.weight" in str(caught.value) and "lm_head.weight" in str(caught.value)


def test_untied_heads_are_their_own_owners():
    model = tied_gpt2(tie=False)
    assert parameter_owners(model)["lm_head.weight"] == "lm_head.weight"
    scope = Scope({"transformer.wte.weight": half_mask(model.transformer.wte.weight)})
    before = state_hashes(model)
    nudge(model, "lm_head.weight")
    proof = scope_proof(before, state_hashes(model), scope, model)
    assert not proof["holds"]
    with pytest.raises(ScopeViolation, match=r"lm_head\.weight"):
        check_proof(proof)


def test_a_missing_or_extra_state_dict_entry_breaks_the_proof():
    model = tiny_llama()
    scope = llama_scope(model)
    before = state_hashes(model)
    for dropped in ("model.layers.1.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight"):
        after = {k: v for k, v in before.items() if k != dropped}  # out of scope, in scope
        proof = scope_proof(before, after, scope, model)
        assert proof["holds"] is False
        row = next(r for r in proof["per_tensor"] if r["name"] == dropped)
        assert row["sha256_after"] is None and row["identical"] is False
        with pytest.raises(ScopeViolation):
            check_proof(proof)
    extra = {**before, "model.new.weight": "0" * 64}
    proof = scope_proof(before, extra, scope, model)
    assert proof["holds"] is False
    with pytest.raises(ScopeViolation):
        check_proof(proof)
    assert scope_proof(before, dict(before), scope, model)["holds"] is True  # the control
