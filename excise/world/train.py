"""Train a tiny Llama-architecture causal LM from scratch on question/answer records.

Plain AdamW with linear warm-up and cosine decay, loss on completion tokens only; seeded
so that the same records and settings give the same weights on the same machine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from attribution.data import collate, encode_record, pad_token_id
from attribution.progress import hidden
from excise.world.settings import WorldSettings


def tiny_llama(settings: WorldSettings, tokenizer: Any, max_positions: int) -> LlamaForCausalLM:
    """A freshly initialised Llama of the world's size for ``tokenizer``'s vocabulary."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=4 * settings.hidden_size,
        num_hidden_layers=settings.n_layers,
        num_attention_heads=settings.n_heads,
        num_key_value_heads=settings.n_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def train_model(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    settings: WorldSettings,
    seed: int,
    desc: str = "training",
    progress: bool | None = None,
    device: str = "cpu",
) -> LlamaForCausalLM:
    """Train a new tiny Llama on ``records`` for ``settings.epochs`` epochs on ``device``
    (returned on the CPU)."""
    torch.manual_seed(seed)
    encoded = [encode_record(tokenizer, r) for r in records]
    longest = max(len(e["input_ids"]) for e in encoded)
    model = tiny_llama(settings, tokenizer, max_positions=max(64, 2 * longest)).to(device)
    model.train()
    steps_per_epoch = math.ceil(len(encoded) / settings.batch_size)
    total = settings.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, betas=(0.9, 0.98), weight_decay=0.01
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(total))
    generator = torch.Generator().manual_seed(seed)
    pad = pad_token_id(tokenizer)
    bar = tqdm(total=total, desc=desc, disable=hidden(progress))
    for _ in range(settings.epochs):
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for start in range(0, len(order), settings.batch_size):
            batch = collate([encoded[i] for i in order[start : start + settings.batch_size]], pad)
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    return model.cpu()


def _warmup_cosine(total: int, warmup_fraction: float = 0.05):
    warmup = max(1, int(warmup_fraction * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
