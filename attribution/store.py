"""The factor store: fitted curvature on disk, safe to resume and impossible to misuse.

A factor folder holds::

    .excise.json               {"kind": "factors", ...}
    arguments.json             the FactorArguments, tracked modules and their shapes,
                               the model's fingerprint and the excise version
    covariance.safetensors     one file per finished stage, keys "<module>/<quantity>"
    eigendecomposition.safetensors
    lambda.safetensors  (or diagonal.safetensors)
    lambda.part-3.safetensors  the sums of one part of the data while a stage runs

Each part and stage is written atomically when it finishes; a later run with the same
arguments on the same model loads what is finished instead of refitting it (the batch
size may change: factors do not depend on it). A run with other arguments, or on
another model, is refused with a message that says which differs.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from attribution.artifacts import (
    artifact_kind,
    atomic_directory,
    check_output_folder,
    package_version,
    write_json,
)
from attribution.errors import FactorMismatchError, InputError
from attribution.fingerprint import model_fingerprint
from attribution.modules import layout_shape

KIND = "factors"
RESULT_INDEPENDENT = ("batch_size",)  # factors are the same for any batch size (tested)


class FactorStore:
    """A factor folder bound to one set of arguments and one model."""

    def __init__(self, folder: Path):
        self.folder = folder

    @classmethod
    def open(
        cls, folder: str | Path, arguments: Any, model: nn.Module, modules: list[str]
    ) -> FactorStore:
        """Create the folder, or check that an existing one matches this run."""
        folder = Path(folder)
        description = describe(arguments, model, modules)
        if artifact_kind(folder) == KIND:
            _check_matches(folder, _read_arguments(folder), description)
        else:
            check_output_folder(folder, KIND)
            with atomic_directory(folder, KIND) as tmp:
                write_json(tmp / "arguments.json", description)
        return cls(folder)

    @classmethod
    def load(cls, folder: str | Path, model: nn.Module | None = None):
        """The :class:`~attribution.curvature.Factors` saved in ``folder``.

        With ``model``, refuse factors fitted for another model.
        """
        from attribution.curvature import STAGES, FactorArguments, Factors

        folder = Path(folder)
        if artifact_kind(folder) != KIND:
            raise InputError(f"{folder}: not an excise factor folder")
        saved = _read_arguments(folder)
        if model is not None and saved["model_fingerprint"] != model_fingerprint(model):
            raise FactorMismatchError(
                f"{folder}: the factors were fitted for another model (fingerprints differ); "
                "fit factors for this model"
            )
        arguments = FactorArguments(**saved["arguments"])
        store = cls(folder)
        tensors: dict[str, dict[str, torch.Tensor]] = {name: {} for name in saved["modules"]}
        for stage in STAGES[arguments.strategy]:
            values = store.load_stage(stage)
            if values is None:
                raise InputError(f"{folder}: stage {stage!r} was never finished; fit again")
            for name, quantities in values.items():
                tensors[name].update(quantities)
        return Factors(arguments, tensors)

    def load_stage(self, stage: str) -> dict[str, dict[str, torch.Tensor]] | None:
        """A finished stage's tensors, or ``None`` when it was never finished."""
        return self._load(f"{stage}.safetensors")

    def save_stage(self, stage: str, values: dict[str, dict[str, torch.Tensor]]) -> None:
        """Save a finished stage, then drop the partial sums it was made from."""
        self._save(f"{stage}.safetensors", values)
        for partial in self.folder.glob(f"{stage}.part-*.safetensors"):
            partial.unlink(missing_ok=True)

    def load_partial(self, stage: str, part: int) -> dict[str, dict[str, torch.Tensor]] | None:
        """The saved sums of one part of the data, or ``None``."""
        return self._load(f"{stage}.part-{part}.safetensors")

    def save_partial(
        self, stage: str, part: int, values: dict[str, dict[str, torch.Tensor]]
    ) -> None:
        self._save(f"{stage}.part-{part}.safetensors", values)

    def _load(self, filename: str) -> dict[str, dict[str, torch.Tensor]] | None:
        path = self.folder / filename
        if not path.exists():
            return None
        result: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in load_file(path).items():
            module, quantity = key.rsplit("/", 1)
            result.setdefault(module, {})[quantity] = tensor
        return result

    def _save(self, filename: str, values: dict[str, dict[str, torch.Tensor]]) -> None:
        """Write ``values`` as ``<module>/<quantity>`` tensors, atomically."""
        flat = {
            f"{m}/{q}": t.detach().cpu().contiguous()
            for m, qs in values.items()
            for q, t in qs.items()
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", suffix=".tmp", dir=self.folder)
        os.close(fd)
        try:
            save_file(flat, tmp)
            os.replace(tmp, self.folder / filename)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def describe(arguments: Any, model: nn.Module, modules: list[str]) -> dict[str, Any]:
    """What a factor folder records about the run that made it."""
    named = dict(model.named_modules())
    return {
        "arguments": arguments.to_dict(),
        "modules": modules,
        "module_shapes": {name: list(layout_shape(named[name])) for name in modules},
        "model_fingerprint": model_fingerprint(model),
        "excise_version": package_version(),
    }


def _read_arguments(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "arguments.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"{folder}: unreadable arguments.json ({err})") from None


def _check_matches(folder: Path, saved: dict[str, Any], wanted: dict[str, Any]) -> None:
    if saved.get("model_fingerprint") != wanted["model_fingerprint"]:
        raise FactorMismatchError(
            f"{folder}: holds factors fitted for another model; use another folder"
        )
    for key, value in wanted["arguments"].items():
        if key in RESULT_INDEPENDENT:
            continue
        if saved.get("arguments", {}).get(key) != value:
            raise FactorMismatchError(
                f"{folder}: holds factors fitted with {key}={saved['arguments'].get(key)!r}, "
                f"this run asks {key}={value!r}; use another folder or the same arguments"
            )
    if saved.get("modules") != wanted["modules"]:
        raise FactorMismatchError(f"{folder}: holds factors for other modules; use another folder")
