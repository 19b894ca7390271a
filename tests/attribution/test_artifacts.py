"""Artifact folders and files: written atomically, refused over foreign data."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re

import pytest

from attribution import artifacts
from attribution.artifacts import (
    MARKER,
    artifact_kind,
    atomic_directory,
    package_version,
    sha256_file,
    utc_timestamp,
    write_bytes,
    write_json,
)
from attribution.errors import InputError


def listing(folder):
    """Every path under ``folder`` (relative, sorted), hidden ones included."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def build(final, kind, files):
    existed = final.exists()
    with atomic_directory(final, kind) as tmp:
        assert tmp.parent == final.parent and tmp != final  # a sibling: the rename is atomic
        assert final.exists() == existed  # untouched until the folder is complete
        for name, text in files.items():
            (tmp / name).write_text(text)
    return final


# --------------------------------------------------------------------------- folders


def test_atomic_directory_writes_the_marker_and_the_files(tmp_path):
    final = build(tmp_path / "deep" / "out", "scores", {"a.txt": "a"})
    assert listing(tmp_path / "deep") == ["out", f"out/{MARKER}", "out/a.txt"]
    assert json.loads((final / MARKER).read_text()) == {
        "kind": "scores",
        "excise_version": package_version(),
    }
    assert artifact_kind(final) == "scores"
    assert (final / "a.txt").read_text() == "a"
    assert final.stat().st_mode & 0o777 == 0o777 & ~umask()


def test_an_exception_leaves_nothing(tmp_path):
    with (
        pytest.raises(RuntimeError, match="killed"),
        atomic_directory(tmp_path / "out", "x") as tmp,
    ):
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("killed")
    assert listing(tmp_path) == []


def test_an_exception_keeps_the_previous_artifact(tmp_path):
    final = build(tmp_path / "out", "x", {"old.txt": "old"})
    before = listing(tmp_path)
    with pytest.raises(KeyboardInterrupt), atomic_directory(final, "x") as tmp:
        (tmp / "new.txt").write_text("new")
        raise KeyboardInterrupt
    assert listing(tmp_path) == before
    assert (final / "old.txt").read_text() == "old"


def test_a_same_kind_artifact_or_an_empty_folder_is_replaced(tmp_path):
    final = build(tmp_path / "out", "x", {"old.txt": "old"})
    build(final, "x", {"new.txt": "new"})
    assert listing(tmp_path) == ["out", f"out/{MARKER}", "out/new.txt"]  # no .old, no .tmp
    empty = tmp_path / "empty"
    empty.mkdir()
    build(empty, "y", {"b.txt": "b"})
    assert artifact_kind(empty) == "y" and (empty / "b.txt").read_text() == "b"


def test_foreign_data_is_refused_and_untouched(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("notes")
    other = build(tmp_path / "other", "audit", {"report.json": "{}"})
    before = listing(tmp_path)
    cases = [
        (user, "not an excise artifact"),
        (a_file, "is a file"),
        (other, "'audit' artifact, not 'scores'"),
    ]
    for path, message in cases:
        with pytest.raises(InputError, match=re.escape(message)):
            build(path, "scores", {"x.txt": "x"})
    assert listing(tmp_path) == before
    assert (user / "thesis.tex").read_text() == "precious" and a_file.read_text() == "notes"
    assert artifact_kind(other) == "audit"


def test_a_broken_marker_names_no_kind(tmp_path):
    (tmp_path / MARKER).write_text("not json")
    assert artifact_kind(tmp_path) is None
    (tmp_path / MARKER).write_text('{"kind": 3}')
    assert artifact_kind(tmp_path) is None
    assert artifact_kind(tmp_path / "missing") is None


# --------------------------------------------------------------------------- files


def test_write_json_round_trips_and_overwrites(tmp_path):
    path = tmp_path / "args.json"
    data = {"damping": 0.1, "modules": ["a", "b"], "name": "λ-Ölton", "nested": {"k": None}}
    write_json(path, data)
    assert json.loads(path.read_text(encoding="utf-8")) == data
    assert "λ-Ölton" in path.read_text(encoding="utf-8")  # not escaped
    assert path.read_text().endswith("}\n")
    write_json(path, [1, 2])
    assert json.loads(path.read_text()) == [1, 2]
    assert listing(tmp_path) == ["args.json"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask()


def test_write_bytes_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "blob.bin"
    write_bytes(path, b"\x00first")
    assert path.read_bytes() == b"\x00first"

    def fail(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(artifacts.os, "replace", fail)
    with pytest.raises(OSError, match="disk gone"):
        write_bytes(path, b"second")
    assert path.read_bytes() == b"\x00first"
    assert listing(tmp_path) == ["blob.bin"]  # the temporary file is gone


def test_write_json_refuses_what_json_cannot_hold(tmp_path):
    path = tmp_path / "args.json"
    write_json(path, {"ok": True})
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": True}
    assert listing(tmp_path) == ["args.json"]


# --------------------------------------------------------------------------- stamps


def test_utc_timestamp_format():
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    stamp = utc_timestamp()
    after = datetime.datetime.now(datetime.UTC)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z", stamp)
    parsed = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert before <= parsed <= after
    assert re.fullmatch(
        r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z", utc_timestamp("milliseconds")
    )
    compact = utc_timestamp(compact=True)
    assert re.fullmatch(r"\d{8}-\d{6}", compact)
    parsed = datetime.datetime.strptime(compact, "%Y%m%d-%H%M%S").replace(tzinfo=datetime.UTC)
    assert before <= parsed <= datetime.datetime.now(datetime.UTC)


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 3 * 4096 + 7])
def test_sha256_file_equals_hashlib(tmp_path, size):
    data = os.urandom(size)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == expected
    assert sha256_file(path, chunk=4096) == expected
    assert sha256_file(str(path), chunk=7) == expected


def test_sha256_file_tells_files_apart(tmp_path):
    (tmp_path / "a").write_bytes(b"same length 1")
    (tmp_path / "b").write_bytes(b"same length 2")
    assert sha256_file(tmp_path / "a") != sha256_file(tmp_path / "b")


def test_files_written_private_get_the_umasks_usual_mode(tmp_path):
    """safetensors creates files 0600; an artifact's files get the user's usual mode."""
    import stat

    import torch
    from safetensors.torch import save_file

    mask = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out", "demo") as folder:
            save_file({"x": torch.zeros(2)}, str(folder / "weights.safetensors"))
            (folder / "sub").mkdir(mode=0o700)
            os.chmod(folder / "weights.safetensors", 0o600)  # as some writers leave it
    finally:
        os.umask(mask)
    out = tmp_path / "out"
    assert stat.S_IMODE((out / "weights.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "sub").stat().st_mode) == 0o755
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_temporaries_of_a_killed_writer_are_removed_and_a_live_ones_kept(tmp_path):
    """After a kill -9 the hidden temporary folder stays; the next write of the same
    output removes it, never one whose process still runs (issue 15, item 13)."""
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead = tmp_path / f".out.{int(gone.stdout)}.abc123.tmp"
    live = tmp_path / f".out.{os.getpid()}.def456.tmp"
    other = tmp_path / f".other.{int(gone.stdout)}.abc123.tmp"
    for folder in (dead, live, other):
        folder.mkdir()
    with atomic_directory(tmp_path / "out", "demo") as folder:
        assert folder.name.startswith(f".out.{os.getpid()}.")
    assert not dead.exists() and live.exists() and other.exists()
    assert (tmp_path / "out" / ".excise.json").is_file()
