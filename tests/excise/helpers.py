"""Small helpers shared by the command-line tests."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess

from attribution.artifacts import sha256_file


def write_jsonl(path, records):
    """Write ``records`` as JSON lines to ``path``; returns ``path``."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def folder_hashes(folder):
    """SHA-256 of every file directly in ``folder`` (to show an input was not touched)."""
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def error_lines(stderr):
    """The non-blank lines of ``stderr``."""
    return [line for line in stderr.splitlines() if line.strip()]


def long_record(words=80, id="long"):
    """A record longer than the tiny world's context of 64 tokens (its tokenizer reads
    one token per word)."""
    return {"id": id, "prompt": "Question:", "completion": " word" * words}


def run_in_process(*args):
    """``excise ARGS`` through :func:`excise.cli.main` in this process, its output captured;
    returns a ``subprocess.CompletedProcess`` like a subprocess run (for the many cases
    that stop at a bad argument, where starting an interpreter would be most of the cost).
    """
    from excise.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
