"""Where excise keeps what it builds and records."""

from __future__ import annotations

import os
from pathlib import Path


def excise_home() -> Path:
    """``$EXCISE_HOME``, default ``~/.cache/excise``."""
    return Path(os.environ.get("EXCISE_HOME") or Path.home() / ".cache" / "excise")


def default_ledger_path() -> Path:
    """``$EXCISE_HOME/ledger.sqlite``: where ``excise forget`` records deletion requests."""
    return excise_home() / "ledger.sqlite"
