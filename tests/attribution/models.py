"""Tiny models built from configs (nothing is downloaded), in float64 for exact tests."""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

VOCAB = 23


class ToyLM(nn.Module):
    """Embedding → Linear (bias) → tanh → Conv1D → tanh → Linear (no bias): every case."""

    def __init__(self, vocab: int = VOCAB, width: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList([nn.Linear(width, 6), Conv1D(4, 6)])
        self.head = nn.Linear(4, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        h = torch.tanh(self.blocks[0](h))
        h = torch.tanh(self.blocks[1](h))
        return self.head(h)


def toy_lm(seed: int = 0) -> ToyLM:
    torch.manual_seed(seed)
    return ToyLM().double().eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        intermediate_size=12,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).double().eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=8,
        n_layer=2,
        n_head=2,
        n_positions=32,
        bos_token_id=1,
        eos_token_id=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).double().eval()


def random_examples(
    n: int, seed: int = 0, min_len: int = 3, max_len: int = 9, prompt: int = 2
) -> list[dict[str, list[int]]]:
    """Sequences of random lengths; the first ``prompt`` tokens carry no loss."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        labels = [-100] * prompt + ids[prompt:]
        examples.append({"input_ids": ids, "labels": labels})
    return examples
