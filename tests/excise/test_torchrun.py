"""The same commands under ``torchrun`` (2 processes, gloo): the results of one process,
each rank doing its share, rank 0 alone writing and printing; and a run killed with
SIGKILL in the middle resumes from its finished parts to the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from excise.world import read_split
from tests.excise.helpers import write_jsonl

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
N_TRAIN = 30


@pytest.fixture(scope="module")
def files(tiny_world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("torchrun")
    return {
        "model": tiny_world / "base",
        "train": write_jsonl(folder / "train.jsonl", read_split(tiny_world, "retain")[:N_TRAIN]),
        "query": write_jsonl(folder / "query.jsonl", read_split(tiny_world, "forget")[:4]),
        "forget": write_jsonl(folder / "forget.jsonl", read_split(tiny_world, "forget")[:8]),
        "retain": write_jsonl(folder / "retain.jsonl", read_split(tiny_world, "retain")[:16]),
    }


def _attribute_args(files, out, *extra):
    return [
        "attribute",
        *("--model", str(files["model"]), "--train", str(files["train"])),
        *("--query", str(files["query"]), "--out", str(out), "--quiet", *extra),
    ]


def _launch(nproc, args):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = [sys.executable, *(launcher if nproc > 1 else []), "-m", "excise", *args]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)


def _tensors(path):
    with safe_open(path, "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()  # noqa: SIM118


def test_attribute_under_torchrun_equals_one_process(files, tmp_path):
    # batch 1: every example's forward pass is the same whichever rank runs it (a float32
    # model's outputs depend on the padded batch it is in), and float64 sums (see --dtype).
    # K-FAC: EK-FAC refits Λ in an eigenbasis that sums added in another order may turn
    # within a cluster of equal eigenvalues (the head's); its two-process fit is checked
    # exactly on a float64 model in tests/attribution/test_distributed.py
    extra = ("--self", "--partitions", "2", "--dtype", "float64", "--batch-size", "1")
    extra += ("--strategy", "kfac")
    one = _launch(1, _attribute_args(files, tmp_path / "one", *extra))
    two = _launch(2, _attribute_args(files, tmp_path / "two", *extra))
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert two.stdout.strip() == str(tmp_path / "two")  # printed once, by rank 0
    for name in ("pairwise", "self"):
        ours, metadata = _tensors(tmp_path / "two" / "scores" / f"{name}.safetensors")
        theirs, _ = _tensors(tmp_path / "one" / "scores" / f"{name}.safetensors")
        torch.testing.assert_close(ours["scores"], theirs["scores"], rtol=1e-9, atol=1e-9)
    _, metadata = _tensors(tmp_path / "two" / "scores" / "pairwise.safetensors")
    counts = json.loads(metadata["examples_per_rank"])
    assert metadata["world_size"] == "2" and sum(counts) == N_TRAIN and max(counts) < N_TRAIN
    _, metadata = _tensors(tmp_path / "two" / "factors" / "covariance.safetensors")
    counts = json.loads(metadata["examples_per_rank"])
    assert sum(counts) == N_TRAIN and max(counts) < N_TRAIN
    rows = [json.loads(line) for line in (tmp_path / "two" / "topk.jsonl").read_text().splitlines()]
    assert len(rows) == 4


def test_unlearn_under_torchrun_writes_the_model_of_one_process(files, tmp_path):
    def unlearn(nproc, out):
        args = ["unlearn", "--model", str(files["model"]), "--forget", str(files["forget"])]
        args += ["--retain", str(files["retain"]), "--out", str(out), "--quiet"]
        args += ["--method", "npo", "--steps", "4", "--batch-size", "4", "--scope", "random"]
        return _launch(nproc, args)

    assert (one := unlearn(1, tmp_path / "one")).returncode == 0, one.stderr
    assert (two := unlearn(2, tmp_path / "two")).returncode == 0, two.stderr
    ours, _ = _tensors(tmp_path / "two" / "model" / "model.safetensors")
    theirs, _ = _tensors(tmp_path / "one" / "model" / "model.safetensors")
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-4, atol=1e-6)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["proof"]["out_of_scope_identical"] == manifest["proof"]["out_of_scope_tensors"]
    shares = manifest["result"]["data_parallel"]
    steps_run = manifest["result"]["steps_run"]  # 4 forget + 4 retain examples a step
    assert shares == {"world_size": 2, "examples_per_rank": [4 * steps_run] * 2}


SLOWED = """
import sys, time
import attribution.curvature as curvature, attribution.influence as influence
for module, name in ((curvature, "stage_sums"), (influence, "_columns")):
    def slow(*args, _real=getattr(module, name), **kwargs):
        time.sleep(0.4)  # so that the kill lands between two parts
        return _real(*args, **kwargs)
    setattr(module, name, slow)
from excise.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _kill_when(args, marker):
    """Run the slowed command until ``marker`` exists, then SIGKILL it."""
    victim = subprocess.Popen([sys.executable, "-c", SLOWED, *args], env=ENV)
    deadline = time.monotonic() + 300
    while not marker.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL and marker.exists()


def test_a_run_killed_with_sigkill_twice_resumes_to_the_uninterrupted_result(files, tmp_path):
    """Killed during the factor fit, then (resumed) during scoring, then run to the end."""
    out = tmp_path / "resumed"
    args = _attribute_args(files, out, "--partitions", "3")
    _kill_when(args, out / "factors" / "covariance.part-1.safetensors")
    assert not (out / "factors" / "covariance.safetensors").exists()
    _kill_when(args, out / "scores" / "pairwise.part-1.safetensors")
    assert not (out / "scores" / "pairwise.safetensors").exists()
    assert _launch(1, args).returncode == 0  # the second rerun finishes
    whole = _launch(1, _attribute_args(files, tmp_path / "whole", "--partitions", "3"))
    assert whole.returncode == 0
    for stage in ("factors/covariance", "factors/lambda", "scores/pairwise"):
        resumed, _ = _tensors(out / f"{stage}.safetensors")
        expected, _ = _tensors(tmp_path / "whole" / f"{stage}.safetensors")
        assert resumed.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(resumed[key], value), (stage, key)
    _, metadata = _tensors(out / "scores" / "pairwise.safetensors")
    assert int(metadata["examples_resumed"]) > 0  # the parts of the killed scoring
    _, metadata = _tensors(out / "factors" / "covariance.safetensors")
    assert int(metadata["examples_resumed"]) > 0  # the parts of the killed fit
    leftovers = [p.name for p in out.rglob("*.part-*") if p.name[0] != "."]
    assert leftovers == []
