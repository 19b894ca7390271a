"""``excise forget``: attribute → scope → unlearn → audit → ledger, on the world or user files.

The tiny world stands in for the default one (``--size tiny``); a few steps keep it fast.
"""

from __future__ import annotations

import json

import pytest

from analysis.ledger import Ledger
from attribution.artifacts import sha256_file
from excise.cli import main
from tests.excise.helpers import error_lines


@pytest.fixture
def home(tiny_world, monkeypatch):
    """$EXCISE_HOME holding the tiny world already built (so it is reused, not rebuilt)."""
    monkeypatch.setenv("EXCISE_HOME", str(tiny_world.parent.parent))
    return tiny_world.parent.parent


def forget_cli(*args):
    return main(["forget", "--steps", "4", "--quiet", *args])


@pytest.fixture(scope="module")
def world_run(tiny_world, tmp_path_factory):
    """One run on the embedded (tiny) world with no data named; its out, ledger and stdout."""
    import os
    from contextlib import redirect_stdout
    from io import StringIO

    folder = tmp_path_factory.mktemp("forget")
    previous = os.environ.get("EXCISE_HOME")
    os.environ["EXCISE_HOME"] = str(tiny_world.parent.parent)
    try:
        with redirect_stdout(StringIO()) as stdout:
            code = forget_cli(
                *("--size", "tiny", "--steps", "20", "--relearn-steps", "2"),
                *("--out", str(folder / "out"), "--ledger", str(folder / "l.db")),
            )
    finally:
        if previous is None:
            os.environ.pop("EXCISE_HOME")
        else:
            os.environ["EXCISE_HOME"] = previous
    assert code == 0
    return folder / "out", folder / "l.db", stdout.getvalue()


def test_the_world_run_writes_every_stage(world_run):
    out, _, _ = world_run
    for name in ("report.json", "report.html", "report.md", "forget.json"):
        assert (out / name).is_file(), name
    assert (out / "attribution" / "factors").is_dir()
    assert (out / "attribution" / "topk.jsonl").is_file()
    assert (out / "unlearn" / "model" / "model.safetensors").is_file()
    assert (out / "unlearn" / "scope.safetensors").is_file()
    summary = json.loads((out / "forget.json").read_text())
    assert summary["schema"] == "excise-forget/1"
    attribution = summary["attribution"]
    assert attribution["queries"] == summary["inputs"]["splits"]["forget"]["n"]
    assert attribution["precision"] > attribution["chance"]  # the forget data are found
    unlearning = summary["unlearning"]
    assert unlearning["out_of_scope_identical"] == unlearning["out_of_scope_tensors"]
    report = json.loads((out / "report.json").read_text())
    assert report["forget_quality"]["after"]["available"]  # the world has a reference
    assert set(report["shift"]) >= {"neighbor", "retain", "world"}
    head = report["headline"]
    assert head["forget_probability_after"] < head["forget_probability_before"]


def test_the_unlearned_model_moves_toward_the_reference(world_run):
    """Measured (tiny world, SimNPO, 20 steps): KS statistic 0.958 → 0.75, p 3e-12 → 8e-7."""
    out, _, _ = world_run
    report = json.loads((out / "report.json").read_text())
    quality = report["forget_quality"]
    assert quality["after"]["ks_statistic"] < quality["before"]["ks_statistic"]
    assert quality["after"]["p_value"] > 100 * quality["before"]["p_value"]
    head = report["headline"]
    reference = head["forget_probability_reference"]
    assert abs(head["forget_probability_after"] - reference) < abs(
        head["forget_probability_before"] - reference
    )


def test_the_request_is_in_the_ledger_and_the_report_path_printed(world_run):
    out, ledger_path, stdout = world_run
    (entry,) = Ledger(ledger_path, create=False).list()
    assert entry.report_path == str(out / "report.html")
    summary = json.loads((out / "forget.json").read_text())
    assert entry.forget_sha256 == summary["inputs"]["splits"]["forget"]["sha256"]
    lines = stdout.strip().splitlines()
    assert lines[-1] == f"report: {out / 'report.html'}"
    assert any("forget quality" in line for line in lines)
    assert Ledger(ledger_path, create=False).verify() == 1


def test_user_files_without_a_reference(tiny_world, home, tmp_path):
    """--model/--forget/--retain only: forget quality is marked unavailable, not invented."""
    files = {}
    for split, n in (("forget", 6), ("retain", 24)):
        lines = (tiny_world / f"{split}.jsonl").read_text().splitlines()[:n]
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text("\n".join(lines) + "\n")
    before = sha256_file(files["forget"])
    out = tmp_path / "out"
    code = forget_cli(
        "--model",
        str(tiny_world / "base"),
        "--forget",
        str(files["forget"]),
        "--retain",
        str(files["retain"]),
        "--out",
        str(out),
        "--ledger",
        str(tmp_path / "ledger.sqlite"),
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["forget_quality"]["after"]["available"] is False
    assert "neighbor" not in report["shift"]
    assert sha256_file(files["forget"]) == before


def test_default_out_is_under_excise_home(home, tmp_path, world_run):
    _, _, _ = world_run
    code = forget_cli("--size", "tiny", "--ledger", str(tmp_path / "l.db"), "--method", "newton")
    assert code == 0
    runs = list((home / "runs").iterdir())
    assert any((run / "report.html").is_file() for run in runs)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("model_only", "give --model, --forget and --retain together"),
        ("out_exists", "already exists"),
        ("empty_forget", "no records"),
        ("other_architecture", "differ"),
        ("ledger_not_sqlite", "ledger"),
        ("bad_sparsity", "sparsity"),
    ],
)
def test_bad_input_exits_2_with_one_line(tiny_world, home, tmp_path, capsys, case, message):
    out, ledger = tmp_path / "out", tmp_path / "ledger.sqlite"
    runs = set((home / "runs").iterdir()) if (home / "runs").exists() else set()
    data = [
        "--model",
        str(tiny_world / "base"),
        "--forget",
        str(tiny_world / "forget.jsonl"),
        "--retain",
        str(tiny_world / "retain.jsonl"),
    ]
    extra = []
    if case == "model_only":
        data = data[:2]
    elif case == "out_exists":
        out.mkdir()
    elif case == "empty_forget":
        (tmp_path / "empty.jsonl").write_text("")
        data[3] = str(tmp_path / "empty.jsonl")
    elif case == "other_architecture":
        extra = ["--reference", str(_other_model(tiny_world, tmp_path))]
    elif case == "ledger_not_sqlite":
        ledger.write_text("not a database\n")
    elif case == "bad_sparsity":
        extra = ["--sparsity", "2"]
    capsys.readouterr()  # what building the inputs printed
    code = forget_cli(*data, *extra, "--out", str(out), "--ledger", str(ledger))
    assert code == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and message in lines[0], lines
    assert case == "out_exists" or not out.exists()
    assert (set((home / "runs").iterdir()) if (home / "runs").exists() else set()) == runs


def _other_model(tiny_world, tmp_path):
    """The world's tokenizer on a model with one layer fewer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_world / "base")
    config.num_hidden_layers = max(1, config.num_hidden_layers - 1)
    folder = tmp_path / "other"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_world / "base").save_pretrained(folder)
    return folder
