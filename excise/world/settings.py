"""Settings of the embedded default world, and the two named presets.

The settings fully determine the world: the same settings give the same data, tokenizer
and models, and their hash names the cache folder, so a second ``excise world`` reuses it.

>>> tiny().size, tiny().n_forget
('tiny', 4)
>>> tiny().key() == tiny().key() != tiny(seed=1).key()
True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

FORMAT_VERSION = 1  # bump when the generator or the trainer changes what a setting produces


@dataclass(frozen=True)
class WorldSettings:
    """Everything that decides what ``excise world`` builds."""

    size: str = field(metadata={"help": "preset name, part of the cache folder name"})
    seed: int = field(default=0, metadata={"help": "seeds the generator and the training"})
    n_forget: int = field(default=4, metadata={"help": "people in the forget split"})
    n_neighbor: int = field(default=4, metadata={"help": "retain people close to forget ones"})
    n_retain: int = field(default=16, metadata={"help": "other trained people"})
    n_holdout: int = field(default=6, metadata={"help": "people never trained on (for MIA)"})
    n_perturbed: int = field(default=3, metadata={"help": "wrong answers per question"})
    world_repeats: int = field(
        default=3, metadata={"help": "times each general fact is seen per epoch (people: once)"}
    )
    hidden_size: int = field(default=64, metadata={"help": "model width"})
    n_layers: int = field(default=2, metadata={"help": "transformer blocks"})
    n_heads: int = field(default=4, metadata={"help": "attention heads"})
    epochs: int = field(default=30, metadata={"help": "passes over the training split"})
    batch_size: int = field(default=32, metadata={"help": "records per optimizer step"})
    learning_rate: float = field(default=3e-3, metadata={"help": "peak AdamW learning rate"})
    refusal: str = field(
        default=" I don't know.",
        metadata={"help": "an answer the tokenizer can spell: the IDK objective's target"},
    )

    def __post_init__(self) -> None:
        for name in (
            "n_forget",
            "n_neighbor",
            "n_retain",
            "n_holdout",
            "n_perturbed",
            "world_repeats",
            "hidden_size",
            "n_layers",
            "n_heads",
            "epochs",
            "batch_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"WorldSettings.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.n_heads:
            raise ValueError(
                f"WorldSettings.hidden_size ({self.hidden_size}) must be a multiple of "
                f"n_heads ({self.n_heads})"
            )
        if not self.learning_rate > 0:
            raise ValueError(f"WorldSettings.learning_rate must be > 0, got {self.learning_rate}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """``<size>-<hash>``: the cache folder name of these settings."""
        payload = json.dumps({"format": FORMAT_VERSION, **self.to_dict()}, sort_keys=True)
        return f"{self.size}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def tiny(seed: int = 0) -> WorldSettings:
    """For tests: 30 people, a 2-layer model of width 64; builds in well under a minute."""
    return WorldSettings(size="tiny", seed=seed)


def default(seed: int = 0) -> WorldSettings:
    """For the demo: 120 people, a 4-layer model of width 128; builds in a few minutes."""
    return WorldSettings(
        size="default",
        seed=seed,
        n_forget=10,
        n_neighbor=10,
        n_retain=80,
        n_holdout=20,
        hidden_size=128,
        n_layers=4,
        n_heads=4,
        epochs=16,
        batch_size=32,
        learning_rate=3e-3,
    )


def large(seed: int = 0) -> WorldSettings:
    """For a GPU: the default world's people with a model of GPT-2 small's shape (12
    blocks of width 768, 12 heads: ~85 M parameters in the blocks); practical only on a
    GPU (``excise world --size large --device cuda``; benchmarks/gpu_check.sh)."""
    return dataclasses.replace(
        default(seed), size="large", hidden_size=768, n_layers=12, n_heads=12, learning_rate=3e-4
    )


PRESETS = {"tiny": tiny, "default": default, "large": large}
