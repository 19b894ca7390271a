"""Module selection: defaults for Llama and GPT-2, names, regexes, clear errors."""

from __future__ import annotations

import pytest
import torch

from attribution import select_modules
from attribution.errors import ModuleSelectionError

from .models import tiny_gpt2, tiny_llama


def test_default_llama_is_every_linear_in_the_blocks():
    names = sorted(select_modules(tiny_llama()))
    assert len(names) == 2 * 7
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.1.mlp.down_proj" in names
    assert "lm_head" not in names


def test_default_gpt2_is_every_conv1d_in_the_blocks():
    names = sorted(select_modules(tiny_gpt2()))
    assert names == sorted(
        f"transformer.h.{i}.{m}"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )


def test_regex_keeps_only_trackable_modules():
    names = select_modules(tiny_llama(), r"layers\.1\.mlp")
    assert sorted(names) == [
        f"model.layers.1.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")
    ]


def test_unknown_name_suggests_close_ones():
    with pytest.raises(
        ModuleSelectionError, match=r"did you mean model\.layers\.0\.self_attn\.q_proj"
    ):
        select_modules(tiny_llama(), ["model.layers.0.self_attn.q_prj"])


def test_untrackable_module_by_name():
    with pytest.raises(ModuleSelectionError, match=r"only nn\.Linear and Conv1D"):
        select_modules(tiny_llama(), ["model.layers.0.input_layernorm"])


def test_nothing_matches():
    with pytest.raises(ModuleSelectionError, match="matching 'nope'"):
        select_modules(tiny_llama(), "nope")
    with pytest.raises(ModuleSelectionError, match="no Linear/Conv1D"):
        select_modules(torch.nn.Sequential(torch.nn.ReLU()))


def test_bad_regex():
    with pytest.raises(ModuleSelectionError, match="not a valid regex"):
        select_modules(tiny_llama(), "layers[")


def test_the_attribution_default_adds_a_small_output_head_only():
    from transformers import LlamaConfig, LlamaForCausalLM

    from attribution.modules import HEAD_LIMIT, default_attribution_modules

    from .models import tiny_gpt2, tiny_llama

    small = default_attribution_modules(tiny_llama())
    assert small[-1] == "lm_head" and set(small[:-1]) == set(select_modules(tiny_llama()))
    assert default_attribution_modules(tiny_gpt2())[-1] == "lm_head"
    config = LlamaConfig(
        vocab_size=HEAD_LIMIT + 1,
        hidden_size=8,
        intermediate_size=12,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    large = default_attribution_modules(LlamaForCausalLM(config))
    assert "lm_head" not in large and len(large) == 7  # q, k, v, o, gate, up, down
