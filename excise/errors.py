"""Typed errors of the front door.

Every error a user can cause is an :class:`attribution.errors.InputError` (the base class
shared by every layer); the front door raises :class:`BadInputError` for bad files,
folders and arguments. The CLI prints the message as one line and exits with code 2;
anything else is a bug and exits with code 1.

>>> str(BadInputError("data.jsonl: no records"))
'data.jsonl: no records'
"""

from __future__ import annotations

from attribution.errors import InputError


class BadInputError(InputError):
    """A file, folder or argument given to excise is wrong (one-line message)."""


WARNING = "warning: "  # a note that starts so is shown even with --quiet


def warn(note, sentences: list[str]) -> list[str]:
    """Pass each sentence to ``note`` as a warning; returns them (for the run's records)."""
    for sentence in sentences:
        note(WARNING + sentence)
    return sentences
