"""Artifact folders: a marker that names them, atomic writes, and the artifact-kind check.

Shared by every layer's artifact store (factors, scores, unlearned models, reports, the
embedded world).

Every folder excise writes holds a small marker file, ``.excise.json``, with the kind of
artifact (``world``, ``attribution``, ``unlearning``, ``audit`` ...) and the package
version. A command refuses an ``--out`` folder that exists, is not empty and has no marker
of its kind, so a typo can never overwrite a user's files. Folders are built under a
temporary name next to their destination and renamed into place only when complete, so a
killed run leaves nothing half-written.

>>> import tempfile, pathlib
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> with atomic_directory(root / "out", "demo") as tmp:
...     _ = (tmp / "hello.txt").write_text("hi")
>>> sorted(p.name for p in (root / "out").iterdir())
['.excise.json', 'hello.txt']
>>> artifact_kind(root / "out")
'demo'
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from attribution.errors import InputError

MARKER = ".excise.json"


def artifact_kind(path: str | Path) -> str | None:
    """The kind recorded in ``path``'s marker, or ``None`` when it has no readable marker."""
    try:
        data = json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kind = data.get("kind") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


def check_output_folder(path: str | Path, kind: str) -> Path:
    """Refuse an ``--out`` that is a file or a non-empty folder that is no ``kind`` artifact,
    or where nothing can be written (:func:`check_writable`)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"--out {path}: exists and is a file; name a folder")
    check_writable(path)
    if not path.exists():
        return path
    if not any(path.iterdir()):
        return path
    found = artifact_kind(path)
    if found is None:
        raise InputError(
            f"--out {path}: exists and is not an excise artifact; choose a new or empty folder"
        )
    if found != kind:
        raise InputError(f"--out {path}: holds an excise {found!r} artifact, not {kind!r}")
    return path


def check_writable(path: str | Path) -> None:
    """Refuse an output path whose folder (or nearest existing parent) takes no new file:
    a file is created and removed there, so permissions, a read-only file system and a
    missing parent are all found before any work starts."""
    path = Path(path)
    folders = [path] if path.is_dir() else []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    for folder in [*folders, parent]:
        if not folder.is_dir():
            raise InputError(f"--out {path}: {folder} is not a folder")
        try:
            handle, probe = tempfile.mkstemp(prefix=".excise-probe.", dir=folder)
        except OSError as err:
            raise InputError(f"--out {path}: cannot write in {folder} ({err.strerror})") from None
        os.close(handle)
        os.unlink(probe)


@contextlib.contextmanager
def atomic_directory(final: str | Path, kind: str) -> Iterator[Path]:
    """Build a folder under a temporary name, then rename it to ``final`` in one step.

    On an exception the temporary folder is removed and ``final`` is left as it was. An
    existing ``final`` (empty, or an artifact of the same ``kind``) is replaced. The
    temporary name carries the process id; temporary folders of ``final`` left by a process
    that no longer runs (killed) are removed first (:func:`remove_stale_temporaries`).
    """
    final = check_output_folder(final, kind)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    prefix = f".{final.name}.{os.getpid()}."
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; give it the usual mode
    try:
        yield tmp
        write_json(tmp / MARKER, {"kind": kind, "excise_version": package_version()})
        give_usual_modes(tmp)
        _replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Remove ``.<final name>.<pid>.*.tmp`` folders beside ``final`` whose process is gone.

    Only folders of this name whose pid no longer runs are touched (a live writer, here or
    in another process, keeps its folder). Returns what was removed.
    """
    removed = []
    for path in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
        pid = path.name[len(final.name) + 2 :].split(".", 1)[0]
        if path.is_dir() and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON atomically (temporary file + rename)."""
    text = json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder + rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        give_usual_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def give_usual_mode(path: str | Path) -> None:
    """Make a file made by ``mkstemp`` (private) readable as files usually are."""
    os.chmod(path, 0o666 & ~_umask())


def give_usual_modes(folder: str | Path) -> None:
    """Every file and folder under ``folder`` with the modes the user's umask gives (some
    writers, e.g. safetensors, create files readable by their owner only)."""
    for path in Path(folder).rglob("*"):
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _replace_folder(new: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(f".{final.name}.{os.getpid()}.old")
        os.replace(final, old)
        os.replace(new, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, final)


def utc_timestamp(timespec: str = "seconds", compact: bool = False) -> str:
    """The current UTC time as ISO 8601 with a ``Z`` (the one clock of every artifact).

    ``timespec`` as :meth:`datetime.datetime.isoformat`; ``compact`` gives
    ``YYYYMMDD-HHMMSS`` (for folder names).

    >>> len(utc_timestamp()), utc_timestamp().endswith("Z"), len(utc_timestamp(compact=True))
    (20, True, 15)
    """
    import datetime

    now = datetime.datetime.now(datetime.UTC)
    if compact:
        return now.strftime("%Y%m%d-%H%M%S")
    return now.replace(tzinfo=None).isoformat(timespec=timespec) + "Z"


def package_version() -> str:
    """The installed version of the excise distribution, recorded in every artifact."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("excise")
    except PackageNotFoundError:  # a source tree that is not installed
        return "0.0.0+unknown"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    import hashlib

    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
