"""``excise audit``: report.json/html/md from two model folders and the split files.

A few records per split and two relearning steps keep it fast. Bad input (a missing or
empty file, models of another architecture or tokenizer, an --out that is an input or
someone's folder, bad numbers) exits 2 with one line and writes nothing.
"""

from __future__ import annotations

import json
import shutil

import pytest

from analysis.relearning import LEARNING_RATE, STEPS
from attribution.artifacts import artifact_kind, sha256_file
from excise.cli import build_parser, main
from excise.commands.audit import load_splits
from excise.commands.ledger import record_request
from tests.excise.helpers import error_lines, folder_hashes, long_record, write_jsonl

SPLITS = ("forget", "retain", "neighbor", "world", "holdout")
N = 4  # records per split


@pytest.fixture(scope="module")
def splits(tiny_world, tmp_path_factory):
    """The first N records of every split, as files."""
    folder = tmp_path_factory.mktemp("splits")
    for split in SPLITS:
        lines = (tiny_world / f"{split}.jsonl").read_text().splitlines()[:N]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return {split: folder / f"{split}.jsonl" for split in SPLITS}


def audit_cli(world, splits, out, *extra, before=None, after=None, only=SPLITS):
    files = [arg for s in only for arg in (f"--{s}", str(splits[s]))]
    return main(
        [
            "audit",
            "--before",
            str(before or world / "base"),
            "--after",
            str(after or world / "reference"),
            *files,
            "--out",
            str(out),
            "--relearn-steps",
            "2",
            "--device",
            "cpu",
            "--quiet",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def audited(tiny_world, splits, tmp_path_factory):
    """Base against reference, with the reference and every split; OUT and the base hashes."""
    before = folder_hashes(tiny_world / "base")
    out = tmp_path_factory.mktemp("audit") / "out"
    assert audit_cli(tiny_world, splits, out, "--reference", str(tiny_world / "reference")) == 0
    return out, before


def test_writes_the_three_reports(audited, tiny_world, splits):
    out, before = audited
    assert sorted(p.name for p in out.iterdir()) == [
        ".excise.json",
        "report.html",
        "report.json",
        "report.md",
    ]
    assert artifact_kind(out) == "audit"
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == "excise-audit/1"
    assert report["models"]["before"]["path"] == str(tiny_world / "base")
    assert report["models"]["reference"]["path"] == str(tiny_world / "reference")
    for split in SPLITS:
        assert report["splits"][split] == {"n": N, "sha256": sha256_file(splits[split])}
    assert report["forget_quality"]["after"]["available"]
    assert report["membership"]["available"]
    assert report["relearning"]["steps"] == 2
    assert report["headline"]["forget_probability_before"] > 0.5
    assert (out / "report.md").read_text().startswith("# excise audit")
    assert "<html" in (out / "report.html").read_text()
    assert folder_hashes(tiny_world / "base") == before  # the inputs are untouched


def test_the_report_can_be_recorded_in_the_ledger(audited, tmp_path, capsys):
    out, _ = audited
    report = json.loads((out / "report.json").read_text())
    ledger = tmp_path / "ledger.sqlite"
    scope = {"method": "ekfac", "fraction": 0.05}
    assert record_request(report, method="npo", scope=scope, report_path=out, ledger=ledger) == 1
    assert main(["ledger", "show", "1", "--json", "--ledger", str(ledger)]) == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry["before_fingerprint"] == report["models"]["before"]["fingerprint"]
    assert entry["after_fingerprint"] == report["models"]["after"]["fingerprint"]
    assert entry["forget_sha256"] == report["splits"]["forget"]["sha256"]
    assert entry["headline"] == report["headline"]
    assert entry["report_path"] == str(out)


def test_without_a_reference_forget_quality_is_unavailable_and_a_rerun_replaces(
    tiny_world, splits, tmp_path, capsys
):
    """A copy of the base model against itself, into a folder that holds an earlier audit."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_world / "base", copy)
    out = tmp_path / "out"
    assert audit_cli(tiny_world, splits, out, after=copy, only=("forget", "retain")) == 0
    first = (out / "report.json").read_text()
    code = main(
        [
            "audit",
            "--before",
            str(tiny_world / "base"),
            "--after",
            str(copy),
            "--forget",
            str(splits["forget"]),
            "--retain",
            str(splits["retain"]),
            "--out",
            str(out),
            "--relearn-steps",
            "0",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == str(out)
    assert "forget quality" in captured.err  # the headline, unless --quiet
    report = json.loads((out / "report.json").read_text())
    assert report != json.loads(first) and report["relearning"]["available"] is False
    assert report["forget_quality"]["after"]["available"] is False
    assert report["forget_quality"]["after"]["reason"] == "no reference model"
    assert report["headline"]["forget_quality"] is None
    assert report["membership"]["available"] is False
    parameters = report["parameters"]
    assert parameters["identical_tensors"] == parameters["total_tensors"] > 0
    assert set(report["metrics"]) == {"forget", "retain"}


def test_load_splits_reads_and_hashes(splits):
    records, hashes = load_splits({"forget": splits["forget"], "retain": splits["retain"]})
    assert [len(records[s]) for s in ("forget", "retain")] == [N, N]
    assert hashes == {s: sha256_file(splits[s]) for s in ("forget", "retain")}


def test_cli_defaults_follow_the_library():
    args = build_parser().parse_args(
        ["audit", "--before", "b", "--after", "a", "--forget", "f", "--retain", "r", "--out", "o"]
    )
    assert (args.relearn_steps, args.relearn_lr) == (STEPS, LEARNING_RATE)
    from analysis.truth import DEFAULT_QUESTION, QUESTIONS
    from excise.cli import TRUTH_QUESTIONS

    assert TRUTH_QUESTIONS == QUESTIONS and args.truth_question == DEFAULT_QUESTION


@pytest.fixture(scope="module")
def odd_models(tiny_world, tmp_path_factory):
    """Model folders that do not fit the base model: another width, another tokenizer."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from excise.models import load_model

    folder = tmp_path_factory.mktemp("odd")
    config = AutoConfig.from_pretrained(tiny_world / "base", local_files_only=True)
    config.intermediate_size //= 2
    torch.manual_seed(0)
    _, tokenizer = load_model(tiny_world / "base")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder / "narrow")
    tokenizer.save_pretrained(folder / "narrow")

    shutil.copytree(tiny_world / "base", folder / "retokenized")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / "retokenized" / name).unlink(missing_ok=True)
    vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3, "a": 4}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    other = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    other.save_pretrained(folder / "retokenized")

    (folder / "no-weights").mkdir()
    shutil.copy(tiny_world / "base" / "config.json", folder / "no-weights")
    return folder


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_forget", "no such file"),
        ("empty_neighbor", "no records"),
        ("bad_record", "needs 'prompt' and 'completion'"),
        ("narrow_after", "the before and after models differ"),
        ("narrow_reference", "the before and reference models differ"),
        ("other_tokenizer", "tokenizers have different vocabularies"),
        ("after_without_weights", "no weights"),
        ("out_is_before", "apart from the inputs"),
        ("out_inside_after", "apart from the inputs"),
        ("out_is_a_split_file", "apart from the inputs"),
        ("out_holds_other_files", "is not an excise artifact"),
        ("batch_size_zero", "--batch-size must be at least 1"),
        ("negative_relearn_steps", "--relearn-steps must be 0"),
        ("no_retain", "required: --retain"),
        ("record_past_context", "world record 'long': 84 tokens, more than the model's context"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    tiny_world, splits, odd_models, tmp_path, capsys, case, message
):
    before = folder_hashes(tiny_world / "base")
    out, extra, models, files, only = tmp_path / "out", [], {}, dict(splits), SPLITS
    if case == "missing_forget":
        files["forget"] = tmp_path / "nope.jsonl"
    elif case == "empty_neighbor":
        files["neighbor"] = write_jsonl(tmp_path / "empty.jsonl", [])
    elif case == "bad_record":
        files["world"] = write_jsonl(tmp_path / "bad.jsonl", [{"question": "?"}])
    elif case == "narrow_after":
        models["after"] = odd_models / "narrow"
    elif case == "narrow_reference":
        extra = ["--reference", str(odd_models / "narrow")]
    elif case == "other_tokenizer":
        models["after"] = odd_models / "retokenized"
    elif case == "after_without_weights":
        models["after"] = odd_models / "no-weights"
    elif case == "out_is_before":
        out = tiny_world / "base"
    elif case == "out_inside_after":
        out = tiny_world / "reference" / "audit"
    elif case == "out_is_a_split_file":
        out = splits["forget"]
    elif case == "out_holds_other_files":
        out.mkdir()
        (out / "notes.txt").write_text("precious")
    elif case == "batch_size_zero":
        extra = ["--batch-size", "0"]
    elif case == "record_past_context":
        files["world"] = write_jsonl(tmp_path / "long.jsonl", [long_record()])
    elif case == "negative_relearn_steps":
        extra = ["--relearn-steps", "-1"]
    elif case == "no_retain":
        only = ("forget",)
    capsys.readouterr()
    try:
        code = audit_cli(tiny_world, files, out, *extra, only=only, **models)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    assert code == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and message in lines[0], lines
    assert "Traceback" not in lines[0]
    if case == "out_holds_other_files":
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    else:
        assert not (tmp_path / "out").exists()
    assert not (tiny_world / "reference" / "audit").exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder
    assert folder_hashes(tiny_world / "base") == before
    assert splits["forget"].is_file()
