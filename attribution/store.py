"""Stores of tensors on disk: safe to resume, impossible to mix with another run.

A store folder holds::

    .excise.json               {"kind": "factors" | "scores" | "index", ...}
    arguments.json             what made it: arguments, the model's fingerprint, the
                               excise version and (scores) hashes of the data
    <name>.safetensors         one file per finished stage or result
    <name>.part-3.safetensors  the result of one part of the data while a stage runs

Each file is written atomically when its work finishes; a later run with the same
description loads what is finished instead of computing it again (the batch size may
change: results do not depend on it). A run with other arguments, another model or other
data is refused with a message that says which differs.

Factor folders (:class:`FactorStore`) keep ``covariance``, ``eigendecomposition`` and
``lambda`` (or ``diagonal``), with keys ``"<module>/<quantity>"``
(:meth:`attribution.curvature.Factors.load` reads them back). Score folders
(:class:`ScoreStore`) keep ``pairwise`` (and ``self``) with their ids in the metadata.
Index folders (:class:`IndexStore`) keep ``basis`` (what compresses a gradient) and one
``vectors.part-<start>-<stop>`` file per finished range of training examples, named by
the range so that parts built by different processes fit together
(:mod:`attribution.index`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from attribution.artifacts import (
    artifact_kind,
    atomic_directory,
    check_output_folder,
    give_usual_mode,
    package_version,
    write_json,
)
from attribution.errors import FactorMismatchError, InputError
from attribution.fingerprint import fingerprint_of, model_fingerprint, tensor_hash
from attribution.modules import layout_shape

RESULT_INDEPENDENT = ("batch_size",)  # results are the same for any batch size (tested)


class TensorStore:
    """A folder of safetensors files bound to one description (see the module docstring)."""

    kind = "tensors"
    MISSING: str | None = None  # the message for a folder that does not exist (None: the next)
    NOT_THIS_KIND = "not an excise tensor folder"
    OTHER_MODEL = "made for another model (fingerprints differ)"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @classmethod
    def existing(cls, folder: str | Path, model: nn.Module | None = None):
        """An existing folder of this kind; with ``model``, refused when made for another."""
        folder = Path(folder)
        if cls.MISSING is not None and not folder.exists():
            raise InputError(f"{folder}: {cls.MISSING}")
        if artifact_kind(folder) != cls.kind:
            raise InputError(f"{folder}: {cls.NOT_THIS_KIND}")
        store = cls(folder)
        if model is not None and store.description.get("model_fingerprint") != model_fingerprint(
            model
        ):
            raise FactorMismatchError(f"{folder}: {cls.OTHER_MODEL}")
        return store

    @property
    def description(self) -> dict[str, Any]:
        """The folder's ``arguments.json``: arguments, modules, model fingerprint ..."""
        return read_description(self.folder)

    @classmethod
    def open(cls, folder: str | Path, description: dict[str, Any]):
        """Create the folder, or check that an existing one was made by the same run."""
        folder = Path(folder)
        if artifact_kind(folder) == cls.kind:
            _check_matches(folder, read_description(folder), description)
        else:
            check_output_folder(folder, cls.kind)
            with atomic_directory(folder, cls.kind) as tmp:
                write_json(tmp / "arguments.json", description)
        return cls(folder)

    def load(self, name: str) -> dict[str, torch.Tensor] | None:
        """The tensors saved under ``name``, or ``None`` when that work never finished."""
        path = self.folder / f"{name}.safetensors"
        if not path.exists():
            return None
        with safe_open(path, "pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118

    def metadata(self, name: str) -> dict[str, str]:
        with safe_open(self.folder / f"{name}.safetensors", "pt") as handle:
            return handle.metadata() or {}

    def save(
        self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
    ) -> None:
        """Write ``tensors`` atomically as ``<name>.safetensors``."""
        flat = {key: t.detach().cpu().contiguous() for key, t in tensors.items()}
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.folder)
        os.close(fd)
        try:
            save_file(flat, tmp, metadata=metadata)
            give_usual_mode(tmp)
            os.replace(tmp, self.folder / f"{name}.safetensors")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def drop_parts(self, name: str) -> None:
        """Remove the partial results of ``name`` once the whole is saved."""
        for partial in self.folder.glob(f"{name}.part-*.safetensors"):
            partial.unlink(missing_ok=True)


class FactorStore(TensorStore):
    """Curvature factors of one model and one set of :class:`FactorArguments`."""

    kind = "factors"
    NOT_THIS_KIND = "not an excise factor folder"
    OTHER_MODEL = (
        "the factors were fitted for another model (fingerprints differ); "
        "fit factors for this model"
    )

    @classmethod
    def open_for(
        cls,
        folder: str | Path,
        arguments: Any,
        model: nn.Module,
        modules: list[str],
        fingerprint: str | None = None,
        train: Sequence[Any] | None = None,
    ) -> FactorStore:
        """Open ``folder`` for these factors (``fingerprint``: the model's, if known;
        ``train``: the examples they are fitted on — a folder begun on other data is
        refused, never resumed)."""
        named = dict(model.named_modules())
        description = {
            "arguments": arguments.to_dict(),
            "modules": modules,
            "module_shapes": {name: list(layout_shape(named[name])) for name in modules},
            "model_fingerprint": fingerprint or model_fingerprint(model),
            "train_sha256": examples_sha256(train) if train is not None else None,
            "excise_version": package_version(),
        }
        return cls.open(folder, description)

    def load_nested(self, name: str) -> dict[str, dict[str, torch.Tensor]] | None:
        flat = self.load(name)
        if flat is None:
            return None
        nested: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in flat.items():
            module, quantity = key.rsplit("/", 1)
            nested.setdefault(module, {})[quantity] = tensor
        return nested

    def save_nested(
        self,
        name: str,
        values: dict[str, dict[str, torch.Tensor]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        flat = {f"{m}/{q}": t for m, qs in values.items() for q, t in qs.items()}
        self.save(name, flat, metadata)


class ScoreStore(TensorStore):
    """Influence scores of one model, one factor fit, one query set and one train set."""

    kind = "scores"

    @classmethod
    def open_for(
        cls,
        folder: str | Path,
        model: nn.Module,
        queries,
        train,
        factors,
        arguments,
        fingerprint: str | None = None,
    ) -> ScoreStore:
        """Open ``folder`` for these scores (refused when it holds other scores);
        ``fingerprint``: the model's, when the caller has it (it is not hashed again)."""
        description = {
            "arguments": arguments.to_dict(),
            "factor_arguments": factors.arguments.to_dict(),
            "modules": factors.modules,
            "model_fingerprint": fingerprint or model_fingerprint(model),
            "queries_sha256": examples_sha256(queries),
            "train_sha256": examples_sha256(train),
            "excise_version": package_version(),
        }
        return cls.open(folder, description)


class IndexStore(TensorStore):
    """A gradient index (:mod:`attribution.index`) of one model, one factor fit, one set of
    index arguments and one training set."""

    kind = "index"
    MISSING = "no such index folder; build one with excise index"
    NOT_THIS_KIND = "not an excise index folder (see excise index)"
    OTHER_MODEL = (
        "the index was built for another model (fingerprints differ); build an index for this model"
    )
    PART = re.compile(r"^vectors\.part-(\d+)-(\d+)\.safetensors$")

    @classmethod
    def open_for(
        cls,
        folder: str | Path,
        arguments: Any,
        model: nn.Module,
        factors: Any,
        train: Sequence[Any],
        dimensions: dict[str, int],
        fingerprint: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> IndexStore:
        """Open ``folder`` for this index (refused when begun with other arguments, another
        model, other factors or other training data); ``extra``: more JSON-able facts the
        index must match (e.g. the command line's ``max_length``)."""
        named = dict(model.named_modules())
        description = {
            "arguments": arguments.to_dict(),
            "factor_arguments": factors.arguments.to_dict(),
            "factors_sha256": factors_sha256(factors),
            "modules": factors.modules,
            "module_shapes": {n: list(layout_shape(named[n])) for n in factors.modules},
            "dimensions": dimensions,
            "model_fingerprint": fingerprint or model_fingerprint(model),
            "train_sha256": examples_sha256(train),
            "n_train": len(train),
            **(extra or {}),
            "excise_version": package_version(),
        }
        return cls.open(folder, description)

    def part_path(self, start: int, stop: int) -> Path:
        """Where the vectors of training examples [start, stop) are saved."""
        return self.folder / f"vectors.part-{start}-{stop}.safetensors"

    def ranges(self) -> list[tuple[int, int]]:
        """The [start, stop) ranges of the finished parts, sorted."""
        found = (self.PART.match(p.name) for p in self.folder.iterdir())
        return sorted((int(m[1]), int(m[2])) for m in found if m)


def factors_sha256(factors: Any) -> str:
    """SHA-256 of every tensor of a :class:`~attribution.curvature.Factors` (the exact
    curvature an index was built with)."""
    hashes = {
        f"{module}/{key}": tensor_hash(tensor)
        for module, quantities in factors.tensors.items()
        for key, tensor in quantities.items()
    }
    return fingerprint_of(hashes)


def examples_sha256(examples: Sequence[Any]) -> str:
    """SHA-256 of examples as canonical JSON lines (what a score store was computed on)."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps(example, sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def read_description(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(folder) / "arguments.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"{folder}: unreadable arguments.json ({err})") from None


DESCRIBED = {  # the words for a description's keys in a refusal
    "train_sha256": "training data",
    "queries_sha256": "queries",
    "module_shapes": "module shapes",
    "factor_arguments": "factor arguments",
    "factors_sha256": "factors",
    "n_train": "training data",
    "dimensions": "dimensions",
}


def _check_matches(folder: Path, saved: dict[str, Any], wanted: dict[str, Any]) -> None:
    if saved.get("model_fingerprint") != wanted.get("model_fingerprint"):
        raise FactorMismatchError(f"{folder}: holds results for another model; use another folder")
    saved_arguments = saved.get("arguments", {})
    for key, value in wanted.get("arguments", {}).items():
        if key not in RESULT_INDEPENDENT and saved_arguments.get(key) != value:
            raise FactorMismatchError(
                f"{folder}: holds results made with {key}={saved_arguments.get(key)!r}, "
                f"this run asks {key}={value!r}; use another folder or the same arguments"
            )
    for key, value in wanted.items():
        if key not in ("arguments", "excise_version") and saved.get(key) != value:
            raise FactorMismatchError(
                f"{folder}: holds results for other {DESCRIBED.get(key, key)}; use another "
                "folder (or the same inputs to resume)"
            )
