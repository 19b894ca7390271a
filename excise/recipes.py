"""The command line's default unlearning recipe: which method, and that method's settings.

``excise forget`` and ``excise unlearn`` default to the configuration that
``benchmarks/stranger.py`` measured closest to retraining (benchmarks/results/stranger.md):
**stranger distillation** with the calibrated stop, when there are records about people the
model never saw (a holdout split: the embedded world has one; ``--holdout FILE``). Without
them distillation has neither strangers nor a target, and the default is **SimNPO**
(120 steps under the retain budget), which is said in one note.

A method's recipe fills only the options the user left unset: ``--method simnpo --lr 1e-4``
keeps 1e-4, and an option that no recipe names keeps the library's default
(:class:`unlearn.UnlearnArguments`).

>>> settings({"method": BY_METHOD, "steps": BY_METHOD, "lr": 0.5}, has_holdout=True)
({'method': 'distill', 'steps': 400, 'lr': 0.5}, None)
>>> settings({"method": BY_METHOD, "steps": BY_METHOD}, has_holdout=False)[0]
{'method': 'simnpo', 'steps': 120}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class _ByMethod:
    """The default of an option that the chosen method's recipe sets."""

    def __repr__(self) -> str:
        return "the method's recipe"


BY_METHOD = _ByMethod()
BEST, WITHOUT_HOLDOUT = "distill", "simnpo"
RECIPES: dict[str, dict[str, Any]] = {
    "distill": {
        "lr": 1e-2,
        "steps": 400,
        "eval_every": 10,
        "retain_budget": None,  # the calibrated stop ends the run, not the retain loss
        "stop": "calibrated",
    },
    "simnpo": {"steps": 120},
}
RECIPE_FIELDS = ("method", *sorted({k for recipe in RECIPES.values() for k in recipe}))


def settings(given: Mapping[str, Any], has_holdout: bool) -> tuple[dict[str, Any], str | None]:
    """``given`` (UnlearnArguments field → value or :data:`BY_METHOD`) with every unset
    value filled from the method's recipe, and a note when the method was chosen for the
    data (no holdout: not distillation); unset fields no recipe names are dropped."""
    method, note = given.get("method", BY_METHOD), None
    if method is BY_METHOD:
        method = BEST if has_holdout else WITHOUT_HOLDOUT
        if not has_holdout:
            note = (
                f"no holdout records (people the model never saw): {BEST}, the default, needs "
                f"them; running {WITHOUT_HOLDOUT} instead (give --holdout FILE to distill)"
            )
    recipe = RECIPES.get(method, {})
    filled = {"method": method}
    for name, value in given.items():
        if name == "method":
            continue
        if value is not BY_METHOD:
            filled[name] = value
        elif name in recipe:
            filled[name] = recipe[name]
    return filled, note


def default_help() -> str:
    """The recipes, for the command's help."""
    parts = [f"{m}: " + ", ".join(f"{k}={v}" for k, v in r.items()) for m, r in RECIPES.items()]
    return (
        f"default method: {BEST} with a holdout split, else {WITHOUT_HOLDOUT}; recipes ("
        + "; ".join(parts)
        + ")"
    )
