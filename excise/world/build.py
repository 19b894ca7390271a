"""Build (or reuse) the embedded default world on disk.

Layout of a world folder (DESIGN.md)::

    base/  reference/        HF model folders (config, safetensors, tokenizer)
    forget.jsonl retain.jsonl neighbor.jsonl world.jsonl holdout.jsonl
    world.json               settings, sizes, hashes, how well each model knows each split

``base`` is trained on forget + retain + neighbor + world, ``reference`` on retain +
neighbor + world only (the "retrained without the forget set" gold standard). Both see
every trained fact in both of its phrasings (the record's question and its
``paraphrased_prompt``), so a model knows a fact rather than a sentence, and forgetting
can be tested on the reworded question too. General world facts are seen
``world_repeats`` times per epoch, as general knowledge is more frequent than one
person's biography. Both models start from the same initial weights.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from attribution.artifacts import (
    artifact_kind,
    atomic_directory,
    check_output_folder,
    package_version,
    sha256_file,
    write_json,
)
from excise.errors import BadInputError
from excise.home import excise_home
from excise.models import no_transformers_progress_bars
from excise.world.settings import FORMAT_VERSION, WorldSettings

SPLITS = ("forget", "retain", "neighbor", "world", "holdout")
TRAINED_ON = {
    "base": ("forget", "retain", "neighbor", "world"),
    "reference": ("retain", "neighbor", "world"),
}


def world_folder(settings: WorldSettings, home: str | Path | None = None) -> Path:
    """The cache folder of ``settings``: ``<home>/worlds/<size>-<hash>``."""
    return Path(home or excise_home()) / "worlds" / settings.key()


BUILD_TIME = {  # on 2 CPU cores; large: on one GPU
    "tiny": "about 30 seconds",
    "default": "about 2 minutes",
    "large": "hours on a CPU, minutes on a GPU",
}


def build_world(
    settings: WorldSettings,
    out: str | Path | None = None,
    progress: bool | None = None,
    note: Callable[[str], None] = lambda _: None,
    device: str = "cpu",
) -> tuple[Path, bool]:
    """Build the world of ``settings`` into ``out`` (default: the cache), or reuse it.

    Returns the folder and whether it was built now (``False``: reused as it was);
    ``note`` hears, before a build starts, what is built where and roughly how long it
    takes (measured on 2 CPU cores).
    """
    folder = Path(out) if out is not None else world_folder(settings)
    if _is_complete_world(folder, settings):
        return folder, False
    check_output_folder(folder, "world")
    if artifact_kind(folder) == "world" and (folder / "world.json").exists():
        raise BadInputError(
            f"--out {folder}: holds a world built with other settings; choose another folder"
        )
    size = settings.size
    note(
        f"building the embedded {size} world into {folder} ({BUILD_TIME.get(size, 'minutes')} "
        "on 2 CPU cores; once, then reused) ..."
    )
    started = time.perf_counter()
    with atomic_directory(folder, "world") as tmp:
        summary = _build_into(tmp, settings, progress, device)
        summary["build_seconds"] = round(time.perf_counter() - started, 1)
        write_json(tmp / "world.json", summary)
    return folder, True


def read_split(folder: str | Path, split: str) -> list[dict[str, Any]]:
    """The records of one split of a built world."""
    from excise.records import read_records

    return read_records(Path(folder) / f"{split}.jsonl")


def world_is_built(settings: WorldSettings, out: str | Path | None = None) -> bool:
    """Whether the world of ``settings`` is built in ``out`` (default: the cache)."""
    return _is_complete_world(Path(out) if out is not None else world_folder(settings), settings)


def _is_complete_world(folder: Path, settings: WorldSettings) -> bool:
    try:
        info = json.loads((folder / "world.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        artifact_kind(folder) == "world"
        and info.get("key") == settings.key()
        and all((folder / f"{s}.jsonl").exists() for s in SPLITS)
        and all((folder / m / "config.json").exists() for m in TRAINED_ON)
    )


def _build_into(
    folder: Path, settings: WorldSettings, progress: bool | None, device: str = "cpu"
) -> dict[str, Any]:
    from excise.world.generator import generate_world
    from excise.world.tokenizer import train_word_tokenizer
    from excise.world.train import train_model

    splits = generate_world(settings)
    tokenizer = train_word_tokenizer([*_all_texts(splits), settings.refusal])
    summary: dict[str, Any] = {
        "key": settings.key(),
        "format_version": FORMAT_VERSION,
        "excise_version": package_version(),
        "settings": settings.to_dict(),
        "splits": {},
        "models": {},
    }
    for split in SPLITS:
        path = folder / f"{split}.jsonl"
        _write_jsonl(path, splits[split])
        summary["splits"][split] = {"records": len(splits[split]), "sha256": sha256_file(path)}
    for name, trained_on in TRAINED_ON.items():
        records = [r for split in trained_on for r in splits[split]]
        records += splits["world"] * (settings.world_repeats - 1)
        model = train_model(
            with_paraphrases(records),
            tokenizer,
            settings,
            seed=settings.seed,
            desc=f"training {name}",
            progress=progress,
            device=device,
        )
        with no_transformers_progress_bars():
            model.save_pretrained(folder / name)
            tokenizer.save_pretrained(folder / name)
        summary["models"][name] = {
            "trained_on": list(trained_on),
            "train_records": 2 * len(records),
            "parameters": sum(p.numel() for p in model.parameters()),
            "exact_answer_rate": _exact_rates(model, tokenizer, splits),
        }
    return summary


def with_paraphrases(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each record, then the same fact in its other phrasing (question and answer)."""
    return [dict(r) for r in records] + [paraphrased(r) for r in records]


def paraphrased(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record asked and answered in its other phrasing."""
    return {
        **record,
        "id": f"{record['id']}#paraphrase",
        "prompt": record["paraphrased_prompt"],
        "completion": record["paraphrased_completion"],
    }


def _exact_rates(model, tokenizer, splits) -> dict[str, dict[str, float]]:
    """Fraction of questions whose greedy answer is exactly right, per split and phrasing."""
    from analysis.scoring import score_completions
    from attribution import LanguageModelingTask

    task = LanguageModelingTask(tokenizer)
    rates = {}
    for split in SPLITS:
        verbatim = score_completions(model, task, splits[split]).exact.float().mean()
        reworded = (
            score_completions(model, task, [paraphrased(r) for r in splits[split]])
            .exact.float()
            .mean()
        )
        rates[split] = {
            "question": round(verbatim.item(), 4),
            "reworded_question": round(reworded.item(), 4),
        }
    return rates


def _all_texts(splits: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    fields = ("prompt", "completion", "paraphrased_prompt", "paraphrased_completion")
    texts = [r[f] for records in splits.values() for r in records for f in fields]
    texts += [t for records in splits.values() for r in records for t in r["perturbed_completions"]]
    return texts


def _write_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    lines = (json.dumps(r, ensure_ascii=False) for r in records)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
