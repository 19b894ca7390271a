"""``excise forget``: attribute → scope → unlearn → audit → ledger, on the world or user files.

The tiny world stands in for the default one (``--size tiny``); a few steps keep it fast.
"""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from analysis.ledger import Ledger
from attribution.artifacts import sha256_file
from excise.cli import FORGET_GUARD, main
from tests.excise.helpers import error_lines, long_record, write_jsonl


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
    # influence foresight: every split out of the forget set, ranked against the shift
    foresight = report["foresight"]
    assert set(foresight) == set(report["shift"]) - {"forget"}
    for split, entry in foresight.items():
        assert entry["n"] == len(report["shift"][split]["log_prob_change"]["per_example"])
        assert -1 <= entry["spearman"] <= 1
    assert "Influence foresight" in (out / "report.html").read_text()


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


def test_user_files_without_a_reference(tiny_world, home, tmp_path, capsys):
    """--model/--forget/--retain only: forget quality is marked unavailable, not invented.

    The retain set also holds two forget records, and --train holds only the retain set:
    the run goes on, with one warning line each (even under --quiet), in the report
    (JSON, HTML, Markdown) and forget.json (issue 15, item 15).
    """
    rows = {s: (tiny_world / f"{s}.jsonl").read_text().splitlines() for s in ("forget", "retain")}
    files = {
        "forget": tmp_path / "forget.jsonl",
        "retain": tmp_path / "retain.jsonl",
    }
    files["forget"].write_text("\n".join(rows["forget"][:6]) + "\n")
    files["retain"].write_text("\n".join(rows["retain"][:24] + rows["forget"][:2]) + "\n")
    before = sha256_file(files["forget"])
    out = tmp_path / "out"
    capsys.readouterr()
    code = forget_cli(
        *("--model", str(tiny_world / "base"), "--forget", str(files["forget"])),
        *("--retain", str(files["retain"]), "--train", str(files["retain"])),
        *("--out", str(out), "--ledger", str(tmp_path / "ledger.sqlite")),
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["forget_quality"]["after"]["available"] is False
    assert "neighbor" not in report["shift"]
    assert sha256_file(files["forget"]) == before
    first = json.loads(rows["forget"][0])["id"]
    expected = [
        f"2 of the 6 forget records are also in the retain split (e.g. {first!r}): they are "
        "asked to be forgotten and kept at once",
        "4 of the 6 forget records are not in the training set (--train), e.g. "
        f"{json.loads(rows['forget'][2])['id']!r}: attribution cannot rank them among the "
        "training examples, and their closure is not computed",
    ]
    assert report["warnings"] == expected
    assert json.loads((out / "forget.json").read_text())["warnings"] == expected
    stderr = error_lines(capsys.readouterr().err)
    assert stderr == [f"excise forget: warning: {w}" for w in expected]
    assert "forgotten and kept at once" in (out / "report.html").read_text()
    assert "## Warnings" in (out / "report.md").read_text()


def test_default_out_is_under_excise_home(home, tmp_path, world_run, capsys):
    """A Newton run into $EXCISE_HOME/runs: the step found, forgot, and stayed in scope.

    Measured (tiny world, ekfac scope 5 %, budget 0.5): η = 0.1 (η₀ = 0.2); forget loss
    0.0075 → 0.597, retain loss 0.0096 → 0.186; forget probability 0.993 → 0.579.
    """
    _, _, _ = world_run
    runs_before = set((home / "runs").iterdir()) if (home / "runs").exists() else set()
    capsys.readouterr()
    ledger = ("--ledger", str(tmp_path / "l.db"))
    code = forget_cli("--size", "tiny", *ledger, "--method", "newton", "--guard", "0")
    assert code == 0
    stdout = capsys.readouterr().out
    (out,) = set((home / "runs").iterdir()) - runs_before
    assert out.name.startswith("forget-")
    for name in ("report.html", "report.json", "forget.json", "unlearn/manifest.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "forget.json").read_text())
    manifest = json.loads((out / "unlearn" / "manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    # the Newton step: a line-searched η > 0 that raised the forget loss within the budget
    assert summary["unlearning"]["method"] == manifest["method"] == "newton"
    result, arguments = manifest["result"], manifest["arguments"]
    splits = summary["inputs"]["splits"]
    n_forget, n_retain = splits["forget"]["n"], splits["retain"]["n"]
    assert result["newton"]["eta0"] == pytest.approx(n_forget / (n_forget + n_retain))
    (iteration,) = result["newton"]["iterations"]  # newton_iterations defaults to 1
    assert iteration["eta"] > 0
    assert result["stopped"] == "steps" and result["steps_run"] == 1
    start, end = result["history"][0], result["history"][-1]
    assert end["forget_loss"] > start["forget_loss"]
    assert end["retain_loss"] <= start["retain_loss"] + arguments["retain_budget"]
    assert end["forget_loss"] < arguments["forget_target"]  # the reference's: not reached
    # the proof: every tensor without an in-scope element is bit-identical
    proof = manifest["proof"]
    assert proof["holds"] is True
    assert 0 < proof["out_of_scope_identical"] == proof["out_of_scope_tensors"]
    for row in proof["per_tensor"]:
        if row["in_scope"] == 0:
            assert row["identical"] and row["sha256_before"] == row["sha256_after"], row
    assert proof["changed_tensors"] == sum(not r["identical"] for r in proof["per_tensor"]) > 0
    # the audit agrees: only in-scope parameters changed, the forget set got less likely
    parameters, scope = report["parameters"], manifest["scope"]
    assert 0 < parameters["changed_parameters"] <= scope["edited"]
    assert parameters["total_parameters"] == scope["total"]
    unchanged = {m["name"] for m in parameters["modules"] if m["identical"]}
    assert {r["name"] for r in manifest["edited_per_tensor"] if r["edited"] == 0} <= unchanged
    # the headline has every field the printed summary reads, and forget.json copies it
    head = report["headline"]
    printed = {
        "forget_quality",
        "forget_probability_before",
        "forget_probability_after",
        "forget_probability_reference",
        "model_utility_before",
        "model_utility_after",
        "changed_parameters_fraction",
        "identical_tensors",
        "total_tensors",
    }
    assert printed <= set(head) and all(head[k] is not None for k in printed)
    assert {"retain", "neighbor"} <= set(report["shift"])
    assert summary["headline"] == head
    assert head["forget_probability_after"] < head["forget_probability_before"]
    assert head["identical_tensors"] == len(unchanged)
    unlearning = summary["unlearning"]
    assert unlearning["stopped"] == result["stopped"]
    assert unlearning["out_of_scope_identical"] == proof["out_of_scope_identical"]
    assert (
        f"unlearning: newton in the ekfac scope, {scope['edited']:,} of {scope['total']:,} "
        f"parameters; 1 steps (steps); {proof['out_of_scope_identical']}/"
        f"{proof['out_of_scope_tensors']} out-of-scope tensors bit-identical"
    ) in stdout.splitlines()
    assert stdout.strip().splitlines()[-1] == f"report: {out / 'report.html'}"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("model_only", "give --model, --forget and --retain together"),
        ("out_exists", "already exists"),
        ("empty_forget", "no records"),
        ("other_architecture", "differ"),
        ("ledger_not_sqlite", "ledger"),
        ("bad_sparsity", "sparsity"),
        ("negative_guard", "--guard -1"),
        ("expand_without_forget_in_train", "--expand needs every forget record"),
        ("record_past_context", "train record 'long': 84 tokens, more than the model's context"),
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
    elif case == "negative_guard":
        extra = ["--guard", "-1"]
    elif case == "expand_without_forget_in_train":
        extra = ["--expand", "--train", str(tiny_world / "retain.jsonl")]
    elif case == "record_past_context":
        retain = [json.loads(line) for line in (tiny_world / "retain.jsonl").open()]
        train = write_jsonl(tmp_path / "train.jsonl", [*retain, long_record()])
        extra = ["--train", str(train)]
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


def test_the_guard_set_comes_from_influence_and_joins_the_retain_set(
    tiny_world, home, tmp_path, capsys
):
    """--guard N: the N training examples outside the forget set with the largest predicted
    damage (column sums of the forget × train scores) are recorded and guarded."""

    from unlearn.guard import predicted_damage

    out = tmp_path / "out"
    code = forget_cli(
        *("--size", "tiny", "--method", "distill", "--guard", "8", "--guard-by", "influence"),
        *("--steps", "3", "--expand"),
        *("--relearn-steps", "0", "--out", str(out), "--ledger", str(tmp_path / "l.db")),
    )
    assert code == 0
    guard = json.loads((out / "forget.json").read_text())["attribution"]["guard"]
    with safe_open(out / "attribution" / "scores" / "pairwise.safetensors", "pt") as handle:
        scores = handle.get_tensor("scores")
        train_ids = json.loads(handle.metadata()["train_ids"])
    forget_ids = {json.loads(line)["id"] for line in (tiny_world / "forget.jsonl").open()}
    damage = predicted_damage(scores)
    ranked = [train_ids[i] for i in damage.argsort(descending=True).tolist()]
    expected = [i for i in ranked if i not in forget_ids][:8]
    assert guard["ids"] == expected and guard["n"] == 8
    assert sum(guard["by_split"].values()) == 8 and not forget_ids & set(guard["ids"])
    assert "guard: 8 training examples predicted to be damaged most" in capsys.readouterr().out
    assert guard["by"] == "influence"
    # the closure: non-forget examples a forget query ranks at or above its own record
    summary = json.loads((out / "forget.json").read_text())
    queries = [json.loads(line)["query_id"] for line in (out / "attribution" / "topk.jsonl").open()]
    own = [train_ids.index(q) for q in queries]
    self_scores = scores[range(len(own)), own]
    strong = {train_ids[j] for j in range(len(train_ids)) if (scores[:, j] >= self_scores).any()}
    closure = summary["attribution"]["closure"]
    assert set(closure["ids"]) == strong - forget_ids and summary["expanded"]
    manifest = json.loads((out / "unlearn" / "manifest.json").read_text())
    assert manifest["inputs"]["expanded_with"] == closure["ids"]
    assert manifest["inputs"]["guard"] == guard["ids"]


def test_the_default_guard_is_drawn_at_random_outside_the_forget_set(world_run, tiny_world):
    out, _, stdout = world_run
    guard = json.loads((out / "forget.json").read_text())["attribution"]["guard"]
    forget_ids = {json.loads(line)["id"] for line in (tiny_world / "forget.jsonl").open()}
    with safe_open(out / "attribution" / "scores" / "pairwise.safetensors", "pt") as handle:
        train_ids = json.loads(handle.metadata()["train_ids"])
    outside = [i for i in train_ids if i not in forget_ids]
    assert guard["by"] == "random" and guard["n"] == min(FORGET_GUARD, len(outside))
    assert len(set(guard["ids"])) == guard["n"] and set(guard["ids"]) <= set(outside)
    assert f"guard: {guard['n']} training examples drawn at random" in stdout


def test_a_run_keeps_its_row_and_verify_checks_the_folder(world_run, tmp_path, capsys):
    """Issue 15, item 6: OUT/ledger.json anchors the run's row; removing that row (and the
    head file) is found by ``excise ledger verify OUT``."""
    import shutil
    import sqlite3

    out, ledger_path, _ = world_run
    anchor = json.loads((out / "ledger.json").read_text())
    entry = Ledger(ledger_path, create=False).get(1)
    assert anchor == {"ledger": str(ledger_path), "id": 1, "entry_sha256": entry.entry_sha256}
    capsys.readouterr()
    assert main(["ledger", "verify", "--ledger", str(ledger_path), str(out)]) == 0
    assert f"{out}: request 1, as recorded" in capsys.readouterr().out
    copy = tmp_path / "copy.sqlite"
    shutil.copy(ledger_path, copy)  # the run's own ledger stays as it is
    con = sqlite3.connect(copy)
    con.execute("DROP TRIGGER requests_no_delete")
    con.execute("DELETE FROM requests")
    con.commit()
    con.close()
    moved = tmp_path / "run"
    shutil.copytree(out, moved)
    (moved / "ledger.json").write_text(json.dumps({**anchor, "ledger": str(copy)}))
    assert main(["ledger", "verify", "--ledger", str(copy), str(moved)]) == 2
    message = error_lines(capsys.readouterr().err)
    assert len(message) == 1 and "holds 0 requests but run" in message[0]


def test_a_run_killed_before_its_row_is_registered_once(tiny_world, home, tmp_path, capsys):
    """Issue 15, item 7: killed between putting the folder in place and writing the row,
    the run is found (a rerun into the same --out, verify) and ``excise ledger record``
    adds its row once."""
    from unittest import mock

    files = {}
    for split, n in (("forget", 4), ("retain", 16)):
        lines = (tiny_world / f"{split}.jsonl").read_text().splitlines()[:n]
        files[split] = write_jsonl(tmp_path / f"{split}.jsonl", map(json.loads, lines))
    out, ledger = tmp_path / "out", tmp_path / "ledger.sqlite"
    arguments = (
        *("--model", str(tiny_world / "base"), "--forget", str(files["forget"])),
        *("--retain", str(files["retain"]), "--out", str(out), "--ledger", str(ledger)),
        *("--relearn-steps", "0", "--guard", "0"),
    )
    with mock.patch.object(Ledger, "record", side_effect=KeyboardInterrupt):
        assert forget_cli(*arguments) == 130  # as if killed right after the rename
    assert (out / "forget.json").is_file() and not (out / "ledger.json").exists()
    assert Ledger(ledger, create=False).list() == []
    capsys.readouterr()
    assert forget_cli(*arguments) == 2
    assert f"register it with: excise ledger record {out}" in capsys.readouterr().err
    assert main(["ledger", "verify", "--ledger", str(ledger), str(out)]) == 2
    assert "a finished deletion with no row" in capsys.readouterr().err
    assert main(["ledger", "record", str(out)]) == 0  # the ledger the run named
    assert f"{out}: recorded as request 1 in {ledger}" in capsys.readouterr().out
    assert main(["ledger", "record", str(out)]) == 0
    assert "already recorded as request 1" in capsys.readouterr().out
    (entry,) = Ledger(ledger, create=False).list()
    summary = json.loads((out / "forget.json").read_text())
    assert entry.report_path == str(out / "report.html")
    assert (
        entry.after_fingerprint
        == json.loads((out / "report.json").read_text())["models"]["after"]["fingerprint"]
    )
    assert summary["ledger"]["entry"]["method"] == entry.method
    assert main(["ledger", "verify", "--ledger", str(ledger), str(out)]) == 0
    assert f"{out}: request 1, as recorded" in capsys.readouterr().out
