"""What ``excise attribute`` and ``excise index`` check and build from their common options:
the records fit the model's context, and the factor arguments (tracked modules included)."""

from __future__ import annotations

import argparse

from attribution import FactorArguments, select_modules
from attribution.modules import default_attribution_modules
from excise.context import check_fits_context, model_context
from excise.errors import BadInputError
from excise.options import from_options


def check_length(max_length: int | None, splits, tokenizer, model) -> None:
    """Records must fit the model's context, unless ``--max-length`` (within it) cuts them."""
    context = model_context(model)
    if max_length is None:
        hint = "shorten it, or pass --max-length N to cut every record to N tokens"
        check_fits_context(splits, tokenizer, context, hint)
    elif context is not None and max_length > context:
        raise BadInputError(
            f"--max-length {max_length}: more than the model's context of {context} tokens"
        )


def factor_arguments_of(args: argparse.Namespace, model) -> FactorArguments:
    modules = module_spec(args.modules, model)
    arguments = from_options(
        FactorArguments,
        args,
        "factors",
        modules=modules,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    select_modules(model, modules)  # unknown names fail here, before anything is written
    return arguments


def module_spec(values: list[str] | None, model) -> str | tuple[str, ...]:
    """Several values are module names; one value is a name if the model has it, else a regex;
    none: the blocks and a small output head (:func:`default_attribution_modules`)."""
    if not values:
        return default_attribution_modules(model)
    if len(values) == 1 and values[0] not in dict(model.named_modules()):
        return values[0]
    return tuple(values)
