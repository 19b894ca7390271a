"""Typed errors shared by every layer.

:class:`InputError` is the one base class of every error a user can cause — a bad file,
an unknown module name, factors fitted for another model. The command line prints its
message as one line and exits with code 2. Messages say what was expected, what was
found, and what to do.

>>> issubclass(InputError, ValueError)
True
"""

from __future__ import annotations


class InputError(ValueError):
    """The user's input is wrong; the message says what and how to fix it (one line)."""


class ModuleSelectionError(InputError):
    """The requested modules do not exist in the model, or cannot be tracked."""


class FactorMismatchError(InputError):
    """Stored factors were fitted for another model or with other arguments."""


class NonFiniteError(InputError):
    """A loss or a gradient is NaN or infinite."""
