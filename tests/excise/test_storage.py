"""Storage that refuses a write: one line, exit 2, nothing partial (issue 15, item 11).

A read-only output folder or ledger is made real by taking the command's power to write
there: a folder without write permission, and, when the tests run as root (who may
write anywhere), a command started without the capabilities that override file
permissions (``CAP_DAC_OVERRIDE``, ``CAP_DAC_READ_SEARCH``, dropped from its bounding set,
as ``capsh --drop`` does). A full disk is a file-size limit (``RLIMIT_FSIZE``): writes past
it fail with "File too large" as they would with "No space left on device".
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.ledger import Ledger, LedgerError
from tests.excise.helpers import error_lines

PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux permissions")


def drop_override(limit_bytes: int | None = None):
    """A ``preexec_fn``: no power over file permissions (and a file-size limit if given)."""

    def prepare():
        if limit_bytes is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, not the process
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
        if os.geteuid() == 0:
            libc = ctypes.CDLL(None, use_errno=True)
            for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
                libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0)

    return prepare


@pytest.fixture
def read_only_folder(tmp_path):
    """Make a folder read-only (for the command); skip where that cannot be enforced."""

    def make(path: Path) -> Path:
        path.mkdir(exist_ok=True)
        path.chmod(stat.S_IMODE(path.stat().st_mode) & ~0o222)
        return path

    probe = make(tmp_path / "probe")
    write = f"open({str(probe / 'x')!r}, 'w')"
    tried = subprocess.run([sys.executable, "-c", write], preexec_fn=drop_override())
    if tried.returncode == 0:
        pytest.skip("a read-only folder cannot be enforced for a command here")
    return make


def run_cli_limited(args, tmp_path: Path, limit_bytes: int | None = None):
    """``python -m excise ARGS`` without power over file permissions (see the docstring)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLCONFIGDIR": str(tmp_path / "mpl")}
    return subprocess.run(
        [sys.executable, "-m", "excise", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=drop_override(limit_bytes),
        timeout=300,
    )


def data(root: Path) -> list:
    """--model, --forget and --retain in ``root``."""
    splits = ("--forget", root / "forget.jsonl", "--retain", root / "retain.jsonl")
    return ["--model", root / "base", *splits]


def assert_one_line(result, message: str) -> None:
    lines = error_lines(result.stderr)
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, lines


def test_a_read_only_output_folder_is_refused_before_any_work(
    tiny_world, tmp_path, read_only_folder
):
    folder = read_only_folder(tmp_path / "read-only-out")
    for command in (
        ["unlearn", *data(tiny_world), "--out", folder / "out", "--steps", "1", "--quiet"],
        [
            *("audit", "--before", tiny_world / "base", "--after", tiny_world / "base"),
            *("--forget", tiny_world / "forget.jsonl", "--retain", tiny_world / "retain.jsonl"),
            *("--out", folder / "nested" / "out", "--quiet"),
        ],
    ):
        result = run_cli_limited(command, tmp_path)
        assert_one_line(result, f"cannot write in {folder}")
    assert list(folder.iterdir()) == []


def test_a_read_only_ledger_is_refused_before_any_work(tiny_world, tmp_path, read_only_folder):
    folder = tmp_path / "ledger-folder"
    folder.mkdir()
    Ledger(folder / "ledger.sqlite")
    (folder / "ledger.sqlite").chmod(0o444)
    read_only_folder(folder)
    before = sorted(p.name for p in folder.iterdir())
    out = tmp_path / "forget-out"
    ledger = folder / "ledger.sqlite"
    result = run_cli_limited(
        ["forget", *data(tiny_world), "--out", out, "--ledger", ledger, "--quiet"], tmp_path
    )
    assert_one_line(result, "cannot be written")
    assert not out.exists()
    assert sorted(p.name for p in folder.iterdir()) == before


def test_a_full_disk_while_writing_leaves_nothing(tiny_world, tmp_path):
    out = tmp_path / "full" / "out"
    out.parent.mkdir()
    command = ["unlearn", *data(tiny_world), "--out", out, "--steps", "1", "--method", "gd"]
    result = run_cli_limited(command, tmp_path, limit_bytes=64_000)  # the model is ~600 kB
    assert_one_line(result, "File too large")
    assert list(out.parent.iterdir()) == []  # no output, no temporary folder


def test_the_library_says_a_read_only_ledger_in_one_line(tmp_path, monkeypatch):
    """SQLite's own read-only refusal (a database opened read-only), as a LedgerError."""
    import sqlite3

    path = tmp_path / "ledger.sqlite"
    Ledger(path)
    original = sqlite3.connect

    def read_only(database, *args, **kwargs):
        return original(f"file:{database}?mode=ro", *args, uri=True, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", read_only)
    with pytest.raises(LedgerError, match="cannot be written"):
        Ledger(path).check_writable()
