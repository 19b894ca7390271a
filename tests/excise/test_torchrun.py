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


def _launch(nproc, args, env=ENV, only_rank_0_writes=None):
    """``excise ARGS`` in ``nproc`` processes; with ``only_rank_0_writes`` (a tmp folder), a
    rank other than 0 that puts a folder in place, writes a file atomically or opens a
    ledger fails the run."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    program = ["-m", "excise"]
    if only_rank_0_writes is not None:
        script = only_rank_0_writes / "only_rank_0_writes.py"
        script.write_text(ONLY_RANK_0_WRITES)
        program = [str(script)]
    command = [sys.executable, *(launcher if nproc > 1 else []), *program, *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


ONLY_RANK_0_WRITES = """
import os, sys
import analysis.ledger, attribution.artifacts as artifacts

def refuse(name):
    def refused(*args, **kwargs):
        raise AssertionError(f"rank {os.environ['RANK']} called {name}: only rank 0 writes")
    return refused

if os.environ.get("RANK", "0") != "0":
    artifacts._replace_folder = refuse("atomic_directory")
    artifacts.write_bytes = refuse("write_bytes")
    analysis.ledger.Ledger.__init__ = refuse("Ledger")  # opening may create the file
from excise.cli import main
sys.exit(main(sys.argv[1:]))
"""


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
    two = _launch(2, _attribute_args(files, tmp_path / "two", *extra), only_rank_0_writes=tmp_path)
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
    def unlearn_args(out):  # a random scope: the ekfac one's float32 scores differ (README)
        args = ["unlearn", "--model", str(files["model"]), "--forget", str(files["forget"])]
        args += ["--retain", str(files["retain"]), "--out", str(out), "--quiet"]
        return [*args, "--method", "npo", "--steps", "4", "--batch-size", "4", "--scope", "random"]

    def unlearn(nproc, out):
        return _launch(nproc, unlearn_args(out))

    assert (one := unlearn(1, tmp_path / "one")).returncode == 0, one.stderr
    two = _launch(2, unlearn_args(tmp_path / "two"), only_rank_0_writes=tmp_path)
    assert two.returncode == 0, two.stderr
    ours, _ = _tensors(tmp_path / "two" / "model" / "model.safetensors")
    theirs, _ = _tensors(tmp_path / "one" / "model" / "model.safetensors")
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-4, atol=1e-6)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["proof"]["out_of_scope_identical"] == manifest["proof"]["out_of_scope_tensors"]
    shares = manifest["result"]["data_parallel"]
    steps_run = manifest["result"]["steps_run"]  # 4 forget + 4 retain examples a step
    assert shares == {"world_size": 2, "examples_per_rank": [4 * steps_run] * 2}


def _forget_args(files, out, *extra):
    args = ["forget", "--model", str(files["model"]), "--forget", str(files["forget"])]
    args += ["--retain", str(files["retain"]), "--neighbor", str(files["query"])]
    args += ["--out", str(out), "--ledger", str(out.parent / f"{out.name}.sqlite")]
    return [*args, "--method", "npo", "--steps", "4", "--batch-size", "4", *extra]


def test_forget_under_torchrun_shares_the_work_and_rank_0_alone_writes(files, tmp_path):
    """Attribution and unlearning in shares (the same model as one process), then rank 0
    alone writes the folder, audits and records one ledger row; the others print nothing."""
    extra = ("--relearn-steps", "2", "--scope", "random")  # random: see the test above
    one = _launch(1, _forget_args(files, tmp_path / "one", *extra))
    assert one.returncode == 0, one.stderr
    two = _launch(2, _forget_args(files, tmp_path / "two", *extra), only_rank_0_writes=tmp_path)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("ledger: request 1 in") == 1  # printed once, by rank 0
    ours, _ = _tensors(tmp_path / "two" / "unlearn" / "model" / "model.safetensors")
    theirs, _ = _tensors(tmp_path / "one" / "unlearn" / "model" / "model.safetensors")
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-4, atol=1e-6)
    for stage in ("factors/covariance", "scores/pairwise"):
        _, metadata = _tensors(tmp_path / "two" / "attribution" / f"{stage}.safetensors")
        counts = json.loads(metadata["examples_per_rank"])  # the training set: 8 + 16
        assert metadata["world_size"] == "2" and counts == [12, 12], stage
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    expected = json.loads((tmp_path / "one" / "report.json").read_text())
    measured = {k: v for k, v in expected["headline"].items() if v is not None}
    assert measured.keys() == {k for k, v in report["headline"].items() if v is not None}
    for key, value in measured.items():
        assert report["headline"][key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
    summary = json.loads((tmp_path / "two" / "forget.json").read_text())
    assert summary["world_size"] == 2
    proof = summary["unlearning"]  # checked on rank 0
    assert proof["out_of_scope_identical"] == proof["out_of_scope_tensors"]
    assert json.loads((tmp_path / "two" / "ledger.json").read_text())["id"] == 1
    listed = _launch(2, ["ledger", "list", "--ledger", str(tmp_path / "two.sqlite"), "--json"])
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [row["id"] for row in rows] == [1]  # rank 0 alone printed


def test_audit_under_torchrun_is_rank_0s_audit(files, tmp_path):
    """Rank 0 audits as one process (it joins no group); the others exit at once."""
    args = ["audit", "--before", str(files["model"]), "--after", str(files["model"])]
    args += ["--forget", str(files["forget"]), "--retain", str(files["retain"])]
    args += ["--out", str(tmp_path / "two"), "--relearn-steps", "0", "--quiet"]
    two = _launch(2, args, only_rank_0_writes=tmp_path)
    assert two.returncode == 0, two.stderr
    assert two.stdout.strip() == str(tmp_path / "two")  # printed once
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["headline"]["changed_parameters_fraction"] == 0.0  # before = after


def test_forget_under_torchrun_refuses_to_build_the_world(tmp_path):
    """No rank waits while another builds the world: it is built first, in one process."""
    env = {**ENV, "EXCISE_HOME": str(tmp_path / "home")}
    run = _launch(2, ["forget", "--size", "tiny", "--out", str(tmp_path / "out")], env=env)
    assert run.returncode != 0
    assert "the embedded tiny world is not built yet" in run.stderr
    assert "excise world --size tiny" in run.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "home" / "worlds").exists()


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
