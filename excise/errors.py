"""Typed errors of the front door.

Every error a user can cause (a missing file, a malformed record, a model folder
without weights ...) is a :class:`BadInputError`: the CLI prints its message as one line
and exits with code 2. Anything else is a bug and exits with code 1.

>>> str(BadInputError("data.jsonl: no records"))
'data.jsonl: no records'
"""

from __future__ import annotations


class ExciseError(Exception):
    """Base class of the errors raised on purpose by the ``excise`` package."""


class BadInputError(ExciseError, ValueError):
    """The user's input is wrong; the message says what and how to fix it (one line)."""
