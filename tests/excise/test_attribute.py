"""`excise attribute` end to end on the tiny world, and every kind of bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from excise.cli import main
from excise.world import read_split
from tests.excise.helpers import long_record, run_in_process, write_jsonl

from .test_cli import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def files(tiny_world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("attribute")
    train = read_split(tiny_world, "retain")[:40]
    planted = [dict(train[i], id=f"copy-of-{train[i]['id']}") for i in (3, 17, 29)]
    return {
        "model": tiny_world / "base",
        "train": write_jsonl(folder / "train.jsonl", train),
        "query": write_jsonl(folder / "query.jsonl", read_split(tiny_world, "forget")[:5]),
        "planted": write_jsonl(folder / "planted.jsonl", planted),
        "n_train": len(train),
    }


def attribute(files, out, *extra, query="query"):
    return main(
        [
            "attribute",
            "--model",
            str(files["model"]),
            "--train",
            str(files["train"]),
            "--query",
            str(files[query]),
            "--out",
            str(out),
            "--quiet",
            *extra,
        ]
    )


def test_writes_scores_topk_and_summary(files, tmp_path):
    out = tmp_path / "attr"
    assert attribute(files, out, "--self", "--per-module", "--top-k", "3") == 0
    with safe_open(out / "scores" / "pairwise.safetensors", "pt") as handle:
        scores = handle.get_tensor("scores")
        metadata = handle.metadata()
        assert any(key.startswith("module/") for key in handle.keys())  # noqa: SIM118
    assert list(scores.shape) == [5, files["n_train"]]
    assert len(json.loads(metadata["train_ids"])) == files["n_train"]
    with safe_open(out / "scores" / "self.safetensors", "pt") as handle:
        assert list(handle.get_tensor("scores").shape) == [files["n_train"]]
    rows = [json.loads(line) for line in (out / "topk.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(len(r["proponents"]) == 3 for r in rows)
    best = rows[0]["proponents"][0]
    assert best["score"] == pytest.approx(scores[0].max().item())
    assert "## Query" in (out / "summary.md").read_text()


def test_a_planted_duplicate_is_among_the_top_3_proponents(files, tmp_path):
    out = tmp_path / "planted"
    assert attribute(files, out, "--top-k", "3", query="planted") == 0
    for line in (out / "topk.jsonl").read_text().splitlines():
        row = json.loads(line)
        original = row["query_id"].removeprefix("copy-of-")
        assert original in [p["id"] for p in row["proponents"]], row["query_id"]


def test_a_rerun_reuses_factors_and_scores(files, tmp_path):
    out = tmp_path / "again"
    assert attribute(files, out, "--strategy", "kfac", "--fisher", "empirical") == 0
    stamp = (out / "factors" / "covariance.safetensors").stat().st_mtime_ns
    assert attribute(files, out, "--strategy", "kfac", "--fisher", "empirical") == 0
    assert (out / "factors" / "covariance.safetensors").stat().st_mtime_ns == stamp
    assert_exit_2(attribute(files, out, "--strategy", "ekfac"))


def test_lambda_fraction_fits_lambda_on_a_share_and_is_recorded(files, tmp_path):
    from attribution import Factors

    out = tmp_path / "share"
    assert attribute(files, out, "--lambda-fraction", "0.5") == 0
    assert Factors.load(out / "factors").arguments.lambda_fraction == 0.5
    with safe_open(out / "factors" / "lambda.safetensors", "pt") as handle:
        assert handle.metadata()["examples_per_rank"] == str([files["n_train"] // 2])
    with safe_open(out / "factors" / "covariance.safetensors", "pt") as handle:
        assert handle.metadata()["examples_per_rank"] == str([files["n_train"]])
    assert_exit_2(attribute(files, out))  # the folder's factors were fitted otherwise


def test_factors_reused_from_another_folder_and_refused_for_another_model(
    files, tmp_path, tiny_world
):
    first = tmp_path / "first"
    assert attribute(files, first, "--strategy", "kfac") == 0
    assert attribute(files, tmp_path / "second", "--factors", str(first / "factors")) == 0
    result = run_cli(
        "attribute",
        "--model",
        str(tiny_world / "reference"),
        "--train",
        str(files["train"]),
        "--query",
        str(files["query"]),
        "--factors",
        str(first / "factors"),
        "--out",
        str(tmp_path / "third"),
    )
    assert_one_line_error(result, "fitted for another model")
    assert not (tmp_path / "third").exists()


def assert_exit_2(code):
    assert code == 2


def assert_one_line_message(stderr, message):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--top-k", "1000"], "--top-k 1000: must be between 1 and the 40"),
        (["--modules", "model.layers.0.mlp.up_prj"], "no Linear/Conv1D modules matching"),
        (["--modules", "model.layers.0.mlp.up_proj", "lm_hed"], "no module named 'lm_hed'"),
        (["--max-length", "4"], "no completion tokens left"),
        (["--device", "cuda:7"], "no CUDA device"),
    ],
)
def test_bad_arguments_exit_2_and_write_nothing(files, tmp_path, extra, message):
    """As a user runs it: ``python -m excise`` in a subprocess."""
    out = tmp_path / "bad"
    assert_one_line_error(run_cli(*_bad_attribute_args(files, out, extra)), message)
    assert not out.exists()


def _bad_attribute_args(files, out, extra):
    args = ["attribute", "--model", str(files["model"]), "--train", str(files["train"])]
    return [*args, "--query", str(files["query"]), "--out", str(out), *extra]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        # numbers are checked before anything is fitted or written (issue 15, items 4 and 9)
        (["--damping", "inf"], "damping value must be a finite number"),
        (["--damping", "nan"], "damping value must be a finite number"),
        (["--max-length", "-5"], "max_length must be an integer >= 1"),
        (["--query-rank", "0"], "query_rank must be >= 1"),
        (["--cg-iterations", "-1"], "cg_iterations must be an integer >= 0"),
        (["--cg-curvature", "newton"], "invalid choice"),
        (["--lambda-fraction", "2"], "lambda_fraction must be in (0, 1]"),
        (["--lambda-fraction", "0.5", "--strategy", "kfac"], "applies to ekfac only"),
        (["--cg-iterations", "2", "--self"], "--self with --cg-iterations"),
        (["--choose-damping", "--damping", "0.1"], "--choose-damping with --damping"),
        (["--choose-damping", "--damping-factor", "1"], "--choose-damping with --damping"),
        (["--choose-damping", "--cg-iterations", "1"], "--choose-damping with --cg-iterations"),
        (["--choose-damping", "--search-steps", "0"], "steps must be an integer >= 1"),
        (["--choose-damping", "--search-perturbations", "2"], "perturbations must be >= 3"),
        (["--choose-damping", "--search-learning-rate", "nan"], "learning_rate must be > 0"),
        (["--choose-damping", "--search-optimizer", "lbfgs"], "invalid choice"),
        (["--choose-damping", "--search-margin", "-1"], "margin must be a finite number >= 0"),
    ],
)
def test_bad_numbers_and_option_pairs_exit_2_and_write_nothing(files, tmp_path, extra, message):
    """The same front door in this process (no interpreter start per case)."""
    out = tmp_path / "bad"
    assert_one_line_error(run_in_process(*_bad_attribute_args(files, out, extra)), message)
    assert not out.exists()


def test_missing_train_file(files, tmp_path):
    result = run_cli(
        "attribute",
        "--model",
        str(files["model"]),
        "--train",
        str(tmp_path / "nope.jsonl"),
        "--query",
        str(files["query"]),
        "--out",
        str(tmp_path / "o"),
    )
    assert_one_line_error(result, "no such file")


def test_mismatched_tokenizer(files, tmp_path, capsys):
    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(files["model"], model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_tokens([f"extra{i}" for i in range(40)])
    tokenizer.save_pretrained(model)
    result = run_cli(
        "attribute",
        "--model",
        str(model),
        "--train",
        str(files["train"]),
        "--query",
        str(files["query"]),
        "--out",
        str(tmp_path / "o"),
    )
    assert_one_line_error(result, "do not belong together")


def test_out_inside_the_model_folder_is_refused_like_unlearns(files, tmp_path):
    """One rule for every command (issue 15, item 10): --out apart from the inputs."""
    before = sorted(p.name for p in files["model"].iterdir())
    for out in (files["model"] / "scores", files["model"]):
        result = run_cli(
            "attribute",
            *("--model", str(files["model"]), "--train", str(files["train"])),
            *("--query", str(files["query"]), "--out", str(out)),
        )
        assert_one_line_error(result, "must be a folder apart from the inputs")
    assert sorted(p.name for p in files["model"].iterdir()) == before


def test_a_record_longer_than_the_context_is_refused_unless_cut(files, tmp_path):
    """Issue 15, item 8: one line before any work (no factors left behind); --max-length
    within the context cuts every record instead."""
    train = [json.loads(line) for line in files["train"].read_text().splitlines()]
    long_train = write_jsonl(tmp_path / "long.jsonl", [*train[:8], long_record()])
    base = ("--model", str(files["model"]), "--query", str(files["query"]))
    out = tmp_path / "o"
    result = run_cli("attribute", *base, "--train", str(long_train), "--out", str(out))
    assert_one_line_error(result, "train record 'long': 84 tokens, more than the model's")
    assert "--max-length" in result.stderr and not out.exists()
    result = run_cli(
        "attribute", *base, "--train", str(long_train), "--out", str(out), "--max-length", "65"
    )
    assert_one_line_error(result, "--max-length 65: more than the model's context of 64")
    assert not out.exists()
    assert attribute({**files, "train": long_train}, out, "--max-length", "32") == 0


def test_cg_iterations_solve_with_the_exact_curvature(files, tmp_path):
    """--cg-iterations: the scores move from the EK-FAC solution toward the exact solve
    (the library's convergence to the dense solve is tests/attribution/test_solve.py)."""
    plain, solved = tmp_path / "plain", tmp_path / "cg"
    assert attribute(files, plain) == 0
    assert (
        attribute(files, solved, "--cg-iterations", "3", "--factors", str(plain / "factors")) == 0
    )
    with safe_open(plain / "scores" / "pairwise.safetensors", "pt") as handle:
        before = handle.get_tensor("scores")
    with safe_open(solved / "scores" / "pairwise.safetensors", "pt") as handle:
        after = handle.get_tensor("scores")
    assert before.shape == after.shape and not before.equal(after)
    agreement = torch.corrcoef(torch.stack([before.flatten(), after.flatten()]))[0, 1]
    assert agreement > 0.5  # the same influence, refined
    hessian = tmp_path / "hessian"
    extra = (
        "--cg-iterations",
        "2",
        "--cg-curvature",
        "hessian",
        "--factors",
        str(plain / "factors"),
    )
    assert attribute(files, hessian, *extra) == 0
    with safe_open(hessian / "scores" / "pairwise.safetensors", "pt") as handle:
        assert torch.isfinite(handle.get_tensor("scores")).all()


def test_choose_damping_writes_its_choice_and_scores_with_it(files, tmp_path):
    """--choose-damping: OUT/damping.json holds every candidate's agreement; the scores are
    those of a run given the chosen factor by hand (the search leaves the model as it was)."""
    chosen, manual = tmp_path / "chosen", tmp_path / "manual"
    search = ("--search-perturbations", "4", "--search-steps", "3")
    assert attribute(files, chosen, "--choose-damping", *search) == 0
    record = json.loads((chosen / "damping.json").read_text())
    assert len(record["candidates"]) == len(record["arguments"]["factors"]) == 8  # 0.1 among them
    assert set(record["versus_default"]) >= {"mean", "stderr", "kept_default", "best"}
    assert record["chosen"] in [row["damping"] for row in record["candidates"]]
    assert "(chosen on data" in (chosen / "summary.md").read_text()
    factor = record["chosen"].split(" ")[0]
    assert (
        attribute(files, manual, "--damping-factor", factor, "--factors", str(chosen / "factors"))
        == 0
    )
    with safe_open(chosen / "scores" / "pairwise.safetensors", "pt") as handle:
        found = handle.get_tensor("scores")
    with safe_open(manual / "scores" / "pairwise.safetensors", "pt") as handle:
        expected = handle.get_tensor("scores")
    torch.testing.assert_close(found, expected)


def perturbed_copy(source, folder, seed=1, scale=0.02):
    """Another 'seed' of the model: a copy with every weight jittered, saved the same way."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=generator))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(folder)
    return folder


def test_ensemble_scores_are_the_mean_over_the_models(files, tmp_path):
    member = perturbed_copy(files["model"], tmp_path / "member")
    out = tmp_path / "ens"
    assert attribute(files, out, "--ensemble", str(member)) == 0
    with safe_open(out / "scores" / "pairwise.safetensors", "pt") as handle:
        main_scores = handle.get_tensor("scores")
    with safe_open(out / "ensemble" / "1" / "scores" / "pairwise.safetensors", "pt") as handle:
        member_scores = handle.get_tensor("scores")
    with safe_open(out / "scores" / "ensemble.safetensors", "pt") as handle:
        mean = handle.get_tensor("scores")
        assert json.loads(handle.metadata()["members"]) == ["--model", str(member)]
    assert not main_scores.equal(member_scores)  # two models, two sets of scores
    torch.testing.assert_close(mean, (main_scores + member_scores) / 2)
    best = torch.argmax(mean, dim=1)
    rows = [json.loads(line) for line in (out / "topk.jsonl").read_text().splitlines()]
    train_ids = [json.loads(line)["id"] for line in files["train"].read_text().splitlines()]
    assert [row["proponents"][0]["id"] for row in rows] == [train_ids[i] for i in best]
    assert "the mean over 2 models" in (out / "summary.md").read_text()
    assert attribute(files, out, "--ensemble", str(member)) == 0  # a rerun reuses every store


@pytest.mark.parametrize("kind", ["itself", "architecture", "tokenizer", "missing"])
def test_a_mismatched_ensemble_member_is_refused_before_any_work(files, tmp_path, kind):
    from transformers import AutoTokenizer

    member = tmp_path / "member"
    if kind == "itself":
        member = files["model"]
    elif kind != "missing":
        shutil.copytree(files["model"], member)
    if kind == "architecture":
        config = json.loads((member / "config.json").read_text())
        config["num_hidden_layers"] += 1
        (member / "config.json").write_text(json.dumps(config))
    if kind == "tokenizer":
        tokenizer = AutoTokenizer.from_pretrained(member)
        tokenizer.add_tokens(["zzz-extra"])
        tokenizer.save_pretrained(member)
    messages = {
        "itself": "the same model twice",
        "architecture": "another architecture than --model (num_hidden_layers differ)",
        "tokenizer": "its tokenizer does not match --model's",
        "missing": "no such model folder",
    }
    out = tmp_path / "o"
    result = run_cli(
        "attribute",
        "--model",
        str(files["model"]),
        "--train",
        str(files["train"]),
        "--query",
        str(files["query"]),
        "--out",
        str(out),
        "--ensemble",
        str(member),
    )
    assert_one_line_error(result, messages[kind])
    assert not out.exists()


def test_the_default_tracks_the_blocks_and_the_small_output_head(files, tmp_path):
    from attribution import Factors
    from excise.models import load_model

    out = tmp_path / "default"
    assert attribute(files, out) == 0
    model, _ = load_model(files["model"])
    modules = Factors.load(out / "factors", model).modules
    assert "lm_head" in modules and all(".layers." in m for m in modules if m != "lm_head")
    assert "15 tracked modules" in (out / "summary.md").read_text()
