"""The two settings of the fidelity benchmark: data, model, training and measurement.

A setting holds a training set and a query set as excise examples, the excise ``Task``
that scores them, the tracked modules, and knows how to train a model on a subset of the
training set with a seed and how to measure each query's loss on a model. It also gives
the peers what they need (a kronfluence ``Task`` and dataset, dattri's per-example loss
and tensors), so every method sees the same model, data, loss and modules.

- :class:`DigitsSetting`: an MLP 64-128-10 (ReLU) on scikit-learn's bundled ``digits``
  (8×8 images scaled to [0, 1]); 1000 training images and 100 query images from the
  rest (seeded permutation). Loss and measurement: cross-entropy of the true label.
- :class:`WorldSetting`: the tiny embedded world's Llama (2 layers, width 64, trained
  from scratch with ``excise.world.train.train_model``). Training set: the question/answer
  records the world's ``base`` model is trained on (forget, retain, neighbor, world), in
  their first phrasing only; queries: the reworded questions and answers of the forget
  and retain people, so an attribution must carry over the rephrasing. Loss and
  measurement: the summed token NLL of the completion.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, TensorDataset

from attribution.task import sample_labels

# --- an excise Task for a classifier ---------------------------------------------------


class ClassificationTask:
    """The excise ``Task`` of a classifier: ℓ(z) = -log softmax(f(x))[y] per example.

    Examples are ``{"input_ids": features [d], "labels": class}``: excise's stages count
    a batch's examples from ``batch["input_ids"]``, so the features go under that key.
    ``sample=True`` draws y from the model's own prediction (the true Fisher).

    >>> task = ClassificationTask()
    >>> net = nn.Linear(2, 3)
    >>> batch = task.collate([{"input_ids": torch.zeros(2), "labels": 1}])
    >>> task.loss(net, batch).shape
    torch.Size([1])
    """

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        features = torch.stack([torch.as_tensor(e["input_ids"]) for e in examples])
        labels = torch.tensor([int(e["labels"]) for e in examples])
        return {"input_ids": features, "labels": labels}

    def loss(self, model, batch, sample: bool = False, generator=None) -> torch.Tensor:
        logits = model(batch["input_ids"])
        labels = batch["labels"]
        if sample:  # one "token" per example: [batch, 1, classes]
            labels = sample_labels(logits[:, None], labels[:, None], generator)[:, 0]
        return F.cross_entropy(logits, labels, reduction="none")

    def measurement(self, model, batch) -> torch.Tensor:
        return F.cross_entropy(model(batch["input_ids"]), batch["labels"], reduction="none")

    def token_mask(self, batch) -> None:
        return None


def _digest(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


# --- digits ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DigitsConfig:
    """Everything that decides the digits setting's data, models and measurements."""

    n_train: int = 1000
    n_queries: int = 100
    hidden: int = 128
    epochs: int = 50
    batch_size: int = 64
    learning_rate: float = 0.05  # SGD, momentum 0.9
    weight_decay: float = 1e-3
    data_seed: int = 0


class DigitsSetting:
    """MLP 64-hidden-10 on ``digits`` (see the module docstring)."""

    name = "digits"
    modules = ("0", "2")  # the two Linear layers of the Sequential

    def __init__(self, config: DigitsConfig = DigitsConfig(), data=None, name: str | None = None):
        self.config = config
        self.name = name or self.name
        features, labels = data if data is not None else _load_digits()
        features = torch.as_tensor(features, dtype=torch.float32)
        labels = torch.as_tensor(labels, dtype=torch.long)
        order = torch.randperm(
            len(labels), generator=torch.Generator().manual_seed(config.data_seed)
        )
        train, query = order[: config.n_train], order[config.n_train :][: config.n_queries]
        if len(train) < config.n_train or len(query) < config.n_queries:
            raise ValueError(f"{len(labels)} examples are too few for {config}")
        self.x_train, self.y_train = features[train], labels[train]
        self.x_query, self.y_query = features[query], labels[query]
        self.task = ClassificationTask()
        self.train = _examples(self.x_train, self.y_train)
        self.queries = _examples(self.x_query, self.y_query)
        self.n_features = features.shape[1]
        self.n_classes = int(labels.max()) + 1
        self._data_hash = hashlib.sha256(features.numpy().tobytes()).hexdigest()[:12]

    def key(self) -> str:
        return f"{self.name}-{_digest({**asdict(self.config), 'data': self._data_hash})}"

    def describe(self) -> dict[str, Any]:
        return {
            "model": f"MLP {self.n_features}-{self.config.hidden}-{self.n_classes}",
            "n_train": len(self.train),
            "n_queries": len(self.queries),
            **asdict(self.config),
        }

    def new_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(self.n_features, self.config.hidden),
            nn.ReLU(),
            nn.Linear(self.config.hidden, self.n_classes),
        )

    def fit(self, indices: Sequence[int], seed: int) -> nn.Module:
        """SGD (momentum 0.9, weight decay) on the training examples at ``indices``."""
        c = self.config
        model = self.new_model(seed)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=c.learning_rate, momentum=0.9, weight_decay=c.weight_decay
        )
        generator = torch.Generator().manual_seed(seed)
        index = torch.as_tensor(list(indices), dtype=torch.long)
        x, y = self.x_train[index], self.y_train[index]
        for _ in range(c.epochs):
            order = torch.randperm(len(index), generator=generator)
            for start in range(0, len(index), c.batch_size):
                batch = order[start : start + c.batch_size]
                loss = F.cross_entropy(model(x[batch]), y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return model.eval()

    @torch.no_grad()
    def query_losses(self, model: nn.Module) -> torch.Tensor:
        return F.cross_entropy(model(self.x_query), self.y_query, reduction="none")

    # peers

    def kronfluence_task(self):
        from kronfluence.task import Task

        modules = list(self.modules)

        class CrossEntropyTask(Task):
            def compute_train_loss(self, batch, model, sample=False):
                x, y = batch
                logits = model(x)
                if sample:
                    with torch.no_grad():
                        y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).squeeze(-1)
                return F.cross_entropy(logits, y, reduction="sum")

            def compute_measurement(self, batch, model):
                x, y = batch
                return F.cross_entropy(model(x), y, reduction="sum")

            def get_influence_tracked_modules(self):
                return modules

        return CrossEntropyTask()

    def tensors(self, which: str) -> tuple[torch.Tensor, ...]:
        """The training or query set as tensors (features, labels)."""
        return (self.x_train, self.y_train) if which == "train" else (self.x_query, self.y_query)

    def kronfluence_dataset(self, which: str) -> Dataset:
        return TensorDataset(*self.tensors(which))

    def dattri_loss(self, model: nn.Module):
        """Per-example cross-entropy ``loss(params, (x, y))`` for ``torch.func``."""

        def loss(params, data):  # (dattri's IF attributors pass [1, d] examples)
            x, y = data
            logits = torch.func.functional_call(model, params, (x.reshape(-1, x.shape[-1]),))
            return F.cross_entropy(logits, y.reshape(-1))

        return loss

    def dattri_layers(self, model: nn.Module) -> list[str] | None:
        return None  # every parameter is in a tracked module


def _load_digits():
    from sklearn.datasets import load_digits

    features, labels = load_digits(return_X_y=True)
    return features / 16.0, labels


def _examples(x: torch.Tensor, y: torch.Tensor) -> list[dict[str, Any]]:
    return [{"input_ids": xi, "labels": int(yi)} for xi, yi in zip(x, y, strict=True)]


# --- the tiny world LM -----------------------------------------------------------------

TRAIN_SPLITS = ("forget", "retain", "neighbor", "world")
QUERY_SPLITS = ("forget", "retain")


class WorldSetting:
    """The tiny embedded world's Llama (see the module docstring)."""

    name = "world"
    modules: tuple[str, ...] = ()  # set in __init__: what `excise attribute` tracks by default

    def __init__(self, epochs: int | None = None, max_queries: int | None = None):
        from excise.world.build import build_world, paraphrased, read_split
        from excise.world.settings import tiny

        world = tiny()
        if epochs is not None:
            from dataclasses import replace

            world = replace(world, epochs=epochs)
        self.world = world
        folder, _ = build_world(tiny(), progress=False)
        self.folder = folder
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder / "base")
        from attribution import LanguageModelingTask
        from attribution.data import encode_record, pad_token_id

        self.pad_id = pad_token_id(self.tokenizer)
        self.task = LanguageModelingTask(pad_id=self.pad_id)
        self.records = [r for split in TRAIN_SPLITS for r in read_split(folder, split)]
        queries = [paraphrased(r) for split in QUERY_SPLITS for r in read_split(folder, split)]
        self.query_records = queries[:max_queries]
        self.train = [encode_record(self.tokenizer, r) for r in self.records]
        self.queries = [encode_record(self.tokenizer, r) for r in self.query_records]
        self.longest = max(len(e["input_ids"]) for e in self.train)
        from attribution.modules import default_attribution_modules

        # the blocks' Linear layers and the (tied) unembedding lm_head, for every method
        self.modules = default_attribution_modules(self.new_model(0))

    def key(self) -> str:
        ids = [r["id"] for r in self.records] + [r["id"] for r in self.query_records]
        return f"{self.name}-{_digest({**self.world.to_dict(), 'ids': ids})}"

    def describe(self) -> dict[str, Any]:
        return {
            "model": f"Llama {self.world.n_layers} layers × {self.world.hidden_size}, "
            f"vocabulary {len(self.tokenizer)}",
            "n_train": len(self.train),
            "n_queries": len(self.queries),
            "train": f"{'+'.join(TRAIN_SPLITS)} records (first phrasing)",
            "queries": f"{'+'.join(QUERY_SPLITS)} records, reworded question and answer",
            "world": self.world.to_dict(),
        }

    def new_model(self, seed: int) -> nn.Module:
        from excise.world.train import tiny_llama

        torch.manual_seed(seed)
        return tiny_llama(self.world, self.tokenizer, max_positions=max(64, 2 * self.longest))

    def fit(self, indices: Sequence[int], seed: int) -> nn.Module:
        from excise.world.train import train_model

        records = [self.records[i] for i in indices]
        return train_model(records, self.tokenizer, self.world, seed=seed, progress=False)

    @torch.no_grad()
    def query_losses(self, model: nn.Module) -> torch.Tensor:
        batch = self.task.collate(self.queries)
        return self.task.measurement(model.eval(), batch)

    # peers

    def kronfluence_task(self):
        from attribution import select_modules
        from benchmarks.common import kronfluence_task

        return kronfluence_task(list(select_modules(self.new_model(0), self.modules)))

    def tensors(self, which: str) -> tuple[torch.Tensor, ...]:
        """The training or query set, right-padded: (input_ids, attention_mask, labels)."""
        batch = self.task.collate(self.train if which == "train" else self.queries)
        return batch["input_ids"], batch["attention_mask"], batch["labels"]

    def kronfluence_dataset(self, which: str) -> Dataset:
        names = ("input_ids", "attention_mask", "labels")
        return RowDataset(dict(zip(names, self.tensors(which), strict=True)))

    def dattri_loss(self, model: nn.Module):
        """Summed completion NLL ``loss(params, (ids, mask, labels))`` of one example.

        Run without the attention mask: with right padding and causal attention, padding
        never changes the outputs at real tokens (as excise's ``torch.func`` reference).
        """

        def loss(params, data):  # (dattri's IF attributors pass [1, L])
            ids, _, labels = data
            ids, labels = ids.reshape(-1, ids.shape[-1]), labels.reshape(-1, labels.shape[-1])
            out = torch.func.functional_call(model, params, (), {"input_ids": ids})
            logits, targets = out.logits[:, :-1], labels[:, 1:]
            keep = targets != -100
            nll = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
            return (nll * keep).sum()

        return loss

    def dattri_layers(self, model: nn.Module) -> list[str]:
        """The tracked modules' weights by the names dattri reads them under; a tied head's
        weight is the embedding's parameter (dattri differentiates the shared matrix)."""
        from attribution import select_modules

        names = {id(p): name for name, p in model.named_parameters()}
        found = [names[id(m.weight)] for m in select_modules(model, self.modules).values()]
        return list(dict.fromkeys(found))


class RowDataset(Dataset):
    """Rows of equally long tensors as dicts (the batches kronfluence's loader stacks)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = dict(tensors)

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: value[index] for name, value in self.tensors.items()}


SETTINGS = {"digits": DigitsSetting, "world": WorldSetting}
