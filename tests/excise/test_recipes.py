"""The command line's default recipe: distill with a holdout split, SimNPO without one."""

from __future__ import annotations

import pytest

from excise.cli import build_parser
from excise.commands.unlearn import arguments_from
from excise.recipes import RECIPES


def parsed(*argv):
    argv = ["unlearn", "--model", "m", "--forget", "f", "--retain", "r", "--out", "o", *argv]
    return build_parser(argv).parse_args(argv)


def test_with_a_holdout_the_default_is_distillation_with_its_recipe():
    notes = []
    options = arguments_from(parsed("--holdout", "h"), has_holdout=True, note=notes.append)
    arguments = options.unlearn
    assert arguments.method == "distill" and not notes
    for name, value in RECIPES["distill"].items():
        assert getattr(arguments, name) == value, name
    assert arguments.batch_size == 8  # no recipe names it: the library's default


def test_without_a_holdout_simnpo_runs_and_a_note_says_why():
    notes = []
    arguments = arguments_from(parsed(), has_holdout=False, note=notes.append).unlearn
    assert arguments.method == "simnpo" and arguments.steps == 120
    assert arguments.stop == "budget" and arguments.retain_budget == 0.5  # library defaults
    assert len(notes) == 1 and "--holdout" in notes[0]


def test_what_the_user_sets_wins_over_the_recipe():
    given = parsed("--method", "distill", "--lr", "1e-4", "--retain-budget", "none")
    arguments = arguments_from(given, has_holdout=True).unlearn
    assert arguments.lr == 1e-4 and arguments.steps == 400 and arguments.retain_budget is None
    arguments = arguments_from(parsed("--method", "npo"), has_holdout=True).unlearn
    assert (arguments.method, arguments.steps, arguments.lr) == ("npo", 60, 1e-3)
    budget = arguments_from(parsed("--retain-budget", "none"), has_holdout=False).unlearn
    assert budget.retain_budget is None  # "none" switches an optional number off


@pytest.mark.parametrize("value", ["nan-ish", "", "1e"])
def test_a_malformed_number_is_a_usage_error(value):
    with pytest.raises(SystemExit) as exit_:
        parsed("--retain-budget", value)
    assert exit_.value.code == 2
