"""Command-line options built from the libraries' argument dataclasses.

Each option takes its name, type, help, choices and default from a dataclass field
(``field(metadata={"help": ..., "choices": ...})``), so the command line cannot drift from
the library: a new field is a new option. Options of one dataclass share a namespace
prefix (``dest="unlearn.lr"``), so two dataclasses may have fields of the same name;
:func:`from_options` builds the dataclass back from the parsed namespace.

>>> import argparse
>>> from attribution.curvature import Damping
>>> parser = argparse.ArgumentParser()
>>> add_options(parser, Damping, "damping", names={"value": "--damping"})
>>> args = parser.parse_args(["--damping", "0.5"])
>>> from_options(Damping, args, "damping")
Damping(value=0.5, factor=0.1)
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

SCALARS = (int, float, str)
DAMPING_OPTIONS = {"value": "--damping", "factor": "--damping-factor"}  # Damping's fields
FACTOR_FIELDS = (
    "strategy",
    "fisher",
    "dtype",
    "autocast",
    "lambda_fraction",
)  # FactorArguments' fields on the command line


def add_options(
    parser: argparse.ArgumentParser | Any,
    cls: type,
    prefix: str,
    *,
    names: Mapping[str, str] | None = None,
    skip: tuple[str, ...] = (),
    defaults: Mapping[str, Any] | None = None,
    helps: Mapping[str, str] | None = None,
) -> None:
    """An option per scalar field of ``cls`` (``--field-name`` unless ``names`` renames it).

    ``skip`` leaves fields out (the caller supplies them, e.g. the shared ``--seed``);
    ``defaults`` overrides a field's default for this command (shown in the help), and
    ``helps`` a field's help. A number that may be None (``float | None``) also takes
    ``none``.
    """
    names, defaults, helps = names or {}, defaults or {}, helps or {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = _scalar(hints[f.name])
        if f.name in skip or kind is None:
            continue
        if _optional(hints[f.name]) and kind is not str:
            kind = _or_none(kind)
        default = defaults.get(f.name, _default(f))
        help_text = helps.get(f.name, f.metadata.get("help", ""))
        if "default" not in help_text:  # the help may say it better (e.g. per method)
            shown = "none" if default is None else default
            help_text = f"{help_text} (default: {shown})".strip()
        parser.add_argument(
            names.get(f.name, "--" + f.name.replace("_", "-")),
            dest=f"{prefix}.{f.name}",
            metavar=None if f.metadata.get("choices") else f.name.upper(),
            type=kind,
            default=default,
            choices=f.metadata.get("choices"),
            help=help_text,
        )


def from_options(cls: type, args: argparse.Namespace, prefix: str, **given: Any) -> Any:
    """``cls`` from the options :func:`add_options` made (``given`` fills skipped fields)."""
    values = {
        f.name: getattr(args, f"{prefix}.{f.name}")
        for f in dataclasses.fields(cls)
        if hasattr(args, f"{prefix}.{f.name}")
    }
    return cls(**values, **given)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in (
        typing.get_args(hint)
    )


def _or_none(kind: type) -> Any:
    """``kind``, or None for ``none`` (an optional number switched off: ``--beta none``)."""

    def parse(text: str) -> Any:
        return None if text.strip().lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def _scalar(hint: Any) -> type | None:
    """``int``/``float``/``str`` for a field typed so (optionally ``| None``), else None."""
    if hint in SCALARS:
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(kinds) == 1 and kinds[0] in SCALARS:
            return kinds[0]
    return None
