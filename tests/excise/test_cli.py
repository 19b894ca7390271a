"""The command line: version, world, planned commands, and bad input as one line + exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from excise import __version__
from excise.cli import main


def run_cli(*args, env=None):
    """Run ``python -m excise`` in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "excise", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        timeout=300,
    )


def assert_one_line_error(result, message):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert message in lines[0]


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"excise {__version__}"


def test_version_does_not_import_torch():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "excise", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert "excise" in imported and "torch" not in imported


def test_world_reuse_prints_the_folder(tiny_world):
    home = tiny_world.parent.parent
    result = run_cli("world", "--size", "tiny", env={"EXCISE_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tiny_world)
    assert "reused" in result.stderr


def test_world_out_that_is_not_an_artifact_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    result = run_cli("world", "--size", "tiny", "--out", str(out))
    assert_one_line_error(result, "is not an excise artifact")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "precious"


def test_world_out_that_is_a_file_is_refused(tmp_path):
    out = tmp_path / "file"
    out.write_text("x")
    result = run_cli("world", "--size", "tiny", "--out", str(out))
    assert_one_line_error(result, "is a file")
    assert out.read_text() == "x"


@pytest.mark.parametrize("command", ["audit", "ledger"])
def test_commands_without_their_required_arguments_are_usage_errors(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command])
    assert exit_.value.code == 2
    assert "the following arguments are required" in capsys.readouterr().err


def test_unknown_arguments_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["forget", "--modle", "m"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --modle" in capsys.readouterr().err


def test_unknown_size_is_a_usage_error():
    result = run_cli("world", "--size", "huge")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
