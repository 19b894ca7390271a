"""Shared fixtures: the tiny embedded world, built once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """Path of the tiny world, built through the command line into a fresh cache."""
    from excise.cli import main
    from excise.world import tiny, world_folder

    home = tmp_path_factory.mktemp("excise-home")
    previous = os.environ.get("EXCISE_HOME")
    os.environ["EXCISE_HOME"] = str(home)
    try:
        assert main(["world", "--size", "tiny", "--quiet"]) == 0
    finally:
        if previous is None:
            os.environ.pop("EXCISE_HOME")
        else:
            os.environ["EXCISE_HOME"] = previous
    return world_folder(tiny(), home)


@pytest.fixture(scope="session")
def world_tokenizer(tiny_world):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_world / "base", local_files_only=True)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped where there is none (the CPU suite)."""
    import pytest
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (benchmarks/gpu_check.sh runs these)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
