"""Load a local Hugging Face causal-LM folder, safely and with clear errors.

Only local folders are read (``local_files_only=True``); nothing is fetched from a hub,
and a model's own Python code runs only when the user asks (``trust_remote_code``).
Weights are read from safetensors, or from PyTorch ``.bin`` files with
``weights_only=True`` (transformers' loader), never with pickle's full power.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attribution.precision import mark_stored
from excise.errors import BadInputError

if TYPE_CHECKING:
    import torch

WEIGHT_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def check_model_folder(path: str | Path) -> Path:
    """Raise :class:`BadInputError` unless ``path`` holds a config, weights and a tokenizer."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{path}: no such model folder")
    if not path.is_dir():
        raise BadInputError(f"{path}: a model must be a Hugging Face folder, not a file")
    if not (path / "config.json").exists():
        raise BadInputError(f"{path}: not a Hugging Face model folder (no config.json)")
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise BadInputError(f"{path}: no weights (*.safetensors or pytorch_model*.bin) found")
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise BadInputError(
            f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the tokenizer "
            "into the model folder with tokenizer.save_pretrained"
        )
    return path


def load_model(
    path: str | Path, dtype: Any = None, trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a local folder; the model in eval mode on the CPU.

    ``dtype`` is a ``torch.dtype``. By default the model is held in float32 and each
    tensor's dtype on disk is recorded (:mod:`attribution.precision`): a bfloat16 model
    is computed in float32, hashed and saved in bfloat16. The tokenizer must fit the
    model: every token id it can produce must have a row in the model's input embedding.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_model_folder(path)
    options = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **options)
    except Exception as err:  # transformers raises many types for unreadable tokenizers
        raise BadInputError(f"{path}: cannot load the tokenizer ({_first_line(err)})") from None
    try:
        with no_transformers_progress_bars(), _transformers_errors_only():
            model, report = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype or torch.float32, output_loading_info=True, **options
            )
    except Exception as err:  # and for unreadable configs or weights
        if "ignore_mismatched_sizes" in str(err):  # raised (not reported) for other shapes
            raise BadInputError(
                f"{path}: config.json does not match the weights: tensors of another shape; "
                "fix the config or the weight files"
            ) from None
        raise BadInputError(f"{path}: cannot load the model ({_first_line(err)})") from None
    check_weights_match_config(report, path)
    check_tokenizer_fits(model, tokenizer, path)
    if dtype is None:
        mark_stored(model, model_stored_dtypes(model, weight_dtypes(path)))
    model.eval()
    return model, tokenizer


_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def weight_dtypes(path: str | Path) -> dict[str, Any]:
    """Tensor name → ``torch.dtype`` of every floating tensor in a folder's weight files.

    Safetensors headers are read without reading the tensors; ``.bin`` files are mapped
    (``mmap``, ``weights_only``), not loaded. An unreadable file gives no entries (the
    loader has read it already, so this only happens for exotic layouts).
    """
    import torch

    found: dict[str, Any] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        for name, entry in _safetensors_header(file).items():
            dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype") if isinstance(entry, dict) else "")
            if dtype and name != "__metadata__":
                found[name] = getattr(torch, dtype)
    if not found:
        for file in sorted(Path(path).glob("pytorch_model*.bin")):
            with contextlib.suppress(Exception):
                state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
                found.update(
                    {
                        k: v.dtype
                        for k, v in state.items()
                        if torch.is_tensor(v) and v.is_floating_point()
                    }
                )
    return found


def model_stored_dtypes(model: Any, on_disk: dict[str, Any]) -> dict[str, Any]:
    """State-dict name → the dtype its tensor had on disk.

    Names are matched as written; when the files hold one floating dtype only, every
    floating tensor of the model takes it (tensors renamed or tied by the loader came
    from those files, so the cast back is exact).
    """
    state = model.state_dict()
    kinds = set(on_disk.values())
    if len(kinds) == 1:
        (only,) = kinds
        return {name: only for name, tensor in state.items() if tensor.is_floating_point()}
    return {name: on_disk[name] for name in state if name in on_disk}


def _safetensors_header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON)."""
    import json

    try:
        with file.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 0 < size < 100_000_000:
                return {}
            header = json.loads(handle.read(size))
    except (OSError, ValueError):
        return {}
    return header if isinstance(header, dict) else {}


@contextlib.contextmanager
def no_transformers_progress_bars() -> Iterator[None]:
    """Hide transformers' own progress bars (loading, saving); ours tell the story."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def check_weights_match_config(report: dict[str, Any], where: str | Path = "model") -> None:
    """Refuse a model whose weight files and config.json disagree (transformers' loading
    report: keys missing from the files are initialised at random, unexpected ones are
    dropped, mismatched shapes are re-initialised — each would be a silently wrong model).

    >>> check_weights_match_config({"missing_keys": [], "unexpected_keys": []})
    >>> check_weights_match_config({"missing_keys": ["layers.3.w"]})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    excise.errors.BadInputError: model: config.json does not match the weights: 1 missing ...
    """
    problems = []
    for key, what in (
        ("missing_keys", "missing"),
        ("unexpected_keys", "unexpected"),
        ("mismatched_keys", "of another shape"),
    ):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in report.get(key) or ())
        if keys:
            problems.append(f"{len(keys)} {what} (e.g. {keys[0]})")
    if problems:
        raise BadInputError(
            f"{where}: config.json does not match the weights: {', '.join(problems)}; fix the "
            "config or the weight files"
        )


@contextlib.contextmanager
def _transformers_errors_only() -> Iterator[None]:
    """transformers' warnings (e.g. its multi-line load report) off; we report in one line."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def check_tokenizer_fits(model: Any, tokenizer: Any, where: str | Path = "model") -> None:
    """Refuse a tokenizer whose ids run past the model's embedding rows."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise BadInputError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's embedding "
            f"has {rows} rows; they do not belong together"
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def choose_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else the CPU) or a named torch device that exists."""
    import torch

    from excise.distributed import local_device

    name = local_device(name)  # under torchrun with CUDA: this rank's GPU
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BadInputError(
            f"--device {name!r} is not a torch device (cpu, cuda, cuda:1 ...)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"--device {name}: no CUDA device is available; use --device cpu")
    return device
