"""TOFU's published evaluation logs (Llama-2-7b; ``../shared/data/tofu``), for tests that our
metric functions reproduce the field's numbers. Tests skip when the folder is absent."""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

import pytest

TOFU_LOGS = Path(
    os.environ.get("EXCISE_TOFU_LOGS")
    or Path(__file__).resolve().parents[3] / "shared" / "data" / "tofu"
)
SETS = {  # TOFU's file names → what they hold
    "eval_log.json": "retain",
    "eval_real_author_wo_options.json": "real_authors",
    "eval_real_world_wo_options.json": "world",
    "eval_log_forget.json": "forget",
}


@cache
def tofu_log(model: str) -> dict:
    """The aggregated log of one model (``full``, ``retain90``, ``retain95``, ``retain99``),
    keyed by our split names; skips the test when the logs are not there."""
    path = TOFU_LOGS / f"ft_epoch5_lr1e-05_llama2-7b_{model}_wd0.01.json"
    if not path.is_file():
        pytest.skip(f"TOFU's evaluation logs are not at {TOFU_LOGS} (set EXCISE_TOFU_LOGS)")
    raw = json.loads(path.read_text(encoding="utf-8"))
    return {SETS[name]: log for name, log in raw.items()}


def values(log: dict, field: str) -> list:
    """One field's per-question values, in question-id order."""
    return [log[field][key] for key in sorted(log[field], key=int)]
