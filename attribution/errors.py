"""Typed errors shared by every layer.

:class:`InputError` is the one base class of every error a user can cause — a bad file,
an unknown module name, factors fitted for another model. The command line prints its
message as one line and exits with code 2. Messages say what was expected, what was
found, and what to do.

>>> issubclass(InputError, ValueError)
True
>>> check_positive_ints("Demo", {"batch_size": 0})
Traceback (most recent call last):
    ...
attribution.errors.InputError: Demo.batch_size must be an integer >= 1, got 0
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


class InputError(ValueError):
    """The user's input is wrong; the message says what and how to fix it (one line)."""


class ModuleSelectionError(InputError):
    """The requested modules do not exist in the model, or cannot be tracked."""


class FactorMismatchError(InputError):
    """Stored factors were fitted for another model or with other arguments."""


class NonFiniteError(InputError):
    """A loss or a gradient is NaN or infinite."""


def check_positive_ints(owner: str, values: Mapping[str, Any]) -> None:
    """Refuse any of ``values`` (field name → value) that is not an integer >= 1 (a bool is
    not an integer here); ``owner`` names the arguments class in the message."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"{owner}.{name} must be an integer >= 1, got {value!r}")


def check_choice(owner: str, name: str, value: Any, choices: Iterable[str]) -> None:
    """Refuse a ``value`` that is none of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise InputError(f"{owner}.{name} must be one of {', '.join(choices)}; got {value!r}")
