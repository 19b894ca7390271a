"""``excise ledger list | show ID | verify`` and :func:`excise.commands.ledger.record_request`.

The rows are recorded from small hand-written audit reports (no model is needed). A
missing or unreadable ledger, an unknown id, or a changed row exits 2 with one line.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from analysis.ledger import Ledger
from attribution.errors import InputError
from excise.cli import main
from excise.commands.ledger import entry_dict, record_request

HEADLINE = {
    "forget_quality": 0.4321,
    "forget_probability_before": 0.99,
    "forget_probability_after": 0.12,
    "model_utility_before": 0.8,
    "model_utility_after": 0.75,
}


def report(n: int) -> dict:
    return {
        "schema": "excise-audit/1",
        "models": {
            "before": {"path": "base", "fingerprint": f"{n}" * 64},
            "after": {"path": None, "fingerprint": "e" * 64},
            "reference": None,
        },
        "splits": {"forget": {"n": 3, "sha256": "f00d" * 16}},
        "headline": HEADLINE,
    }


@pytest.fixture
def ledger(tmp_path):
    path = tmp_path / "ledger.sqlite"
    scope = {"method": "ekfac", "fraction": 0.05, "edited": 1234}
    assert record_request(report(1), method="npo", scope=scope, report_path="runs/1", ledger=path)
    assert record_request(report(2), method="ga", scope="all", ledger=Ledger(path)) == 2
    return path


def ledger_cli(capsys, *args):
    capsys.readouterr()
    try:
        code = main(["ledger", *args])
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def assert_one_line(code, err, message):
    assert code == 2
    assert len(err) == 1 and message in err[0], err
    assert "Traceback" not in err[0]


def test_list_shows_one_line_per_request(ledger, capsys):
    code, out, err = ledger_cli(capsys, "list", "--ledger", str(ledger))
    assert code == 0 and not err
    header, first, second = out.splitlines()
    for column in ("id", "time (UTC)", "method", "scope", "forget set", "forget quality", "report"):
        assert column in header
    assert first.split()[0] == "1" and second.split()[0] == "2"
    assert "npo" in first and "ekfac 5.00%" in first and "f00df00df00d" in first
    assert "0.432" in first and "0.99→0.12" in first and "0.8→0.75" in first
    assert first.split()[-1] == str(Path("runs/1").resolve())  # recorded absolute
    assert "ga" in second and " all " in second and second.endswith("-")


def test_list_json_has_every_field(ledger, capsys):
    code, out, _ = ledger_cli(capsys, "list", "--json", "--ledger", str(ledger))
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["id"] for r in rows] == [1, 2]
    assert rows == [entry_dict(e) for e in Ledger(ledger).list()]
    assert rows[0]["scope"] == {"method": "ekfac", "fraction": 0.05, "edited": 1234}
    assert rows[1]["report_path"] is None


def test_show_prints_every_field(ledger, capsys):
    entry = Ledger(ledger).get(1)
    code, out, _ = ledger_cli(capsys, "show", "1", "--ledger", str(ledger))
    assert code == 0 and out.startswith("request 1\n")
    for name, value in entry_dict(entry).items():
        if name not in ("id", "headline", "scope"):
            assert f"{name}" in out and str(value) in out, name
    assert '"edited": 1234' in out
    assert all(f"{k}" in out and json.dumps(v) in out for k, v in HEADLINE.items())
    code, out, _ = ledger_cli(capsys, "show", "2", "--json", "--ledger", str(ledger))
    assert code == 0 and json.loads(out) == entry_dict(Ledger(ledger).get(2))


def test_verify_checks_the_chain(ledger, capsys):
    code, out, _ = ledger_cli(capsys, "verify", "--ledger", str(ledger))
    assert code == 0 and "2 request(s), hash chain intact" in out
    with sqlite3.connect(ledger) as con:  # a change made behind excise's back
        con.execute("DROP TRIGGER requests_no_UPDATE")
        con.execute("UPDATE requests SET method = 'kl' WHERE id = 1")
    code, _, err = ledger_cli(capsys, "verify", "--ledger", str(ledger))
    assert_one_line(code, err, "request 1 does not match its hash")


def test_the_default_ledger_lives_in_excise_home(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EXCISE_HOME", str(tmp_path))
    code, _, err = ledger_cli(capsys, "list")
    assert_one_line(code, err, "no such file; no request recorded yet")
    assert not (tmp_path / "ledger.sqlite").exists()  # reading never creates it
    record_request(report(3), method="npo", scope="all")
    code, out, _ = ledger_cli(capsys, "list")
    assert code == 0 and len(out.splitlines()) == 2


def test_an_empty_ledger_lists_nothing(tmp_path, capsys):
    Ledger(tmp_path / "empty.sqlite")
    code, out, err = ledger_cli(capsys, "list", "--ledger", str(tmp_path / "empty.sqlite"))
    assert code == 0 and out == "" and "no request recorded yet" in err[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("show", "9"), "no request with id 9; ids run from 1 to 2"),
        (("show", "first"), "a request id is a whole number"),
        (("show",), "the following arguments are required: id"),
        ((), "the following arguments are required: ACTION"),
        (("list", "--ledger", "{tmp}/missing.sqlite"), "no such file"),
        (("list", "--ledger", "{tmp}/garbage.sqlite"), "not a readable SQLite database"),
        (("verify", "--ledger", "{tmp}/other.sqlite"), "not an excise ledger"),
        (("list", "--ledger", "{tmp}"), "is a folder"),
    ],
)
def test_bad_input_exits_2_with_one_line(ledger, tmp_path, capsys, args, message):
    (tmp_path / "garbage.sqlite").write_bytes(b"not a database at all\n" * 10)
    with sqlite3.connect(tmp_path / "other.sqlite") as con:
        con.execute("CREATE TABLE notes (text TEXT)")
    args = [a.format(tmp=tmp_path) for a in args]
    if "--ledger" not in args and args:
        args += ["--ledger", str(ledger)]
    code, out, err = ledger_cli(capsys, *args)
    assert_one_line(code, err, message)
    assert out == ""
    assert not (tmp_path / "missing.sqlite").exists()
    assert (tmp_path / "garbage.sqlite").read_bytes() == b"not a database at all\n" * 10


def test_record_request_needs_a_forget_hash(tmp_path):
    without = report(4)
    without["splits"]["forget"]["sha256"] = None
    with pytest.raises(InputError, match="no SHA-256 of the forget set"):
        record_request(without, method="npo", scope="all", ledger=tmp_path / "l.sqlite")
    given = record_request(
        without, method="npo", scope="all", forget_sha256="ab" * 32, ledger=tmp_path / "l.sqlite"
    )
    assert Ledger(tmp_path / "l.sqlite").get(given).forget_sha256 == "ab" * 32
