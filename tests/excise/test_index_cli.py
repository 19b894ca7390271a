"""`excise index` and `excise attribute --index` on the tiny world, and every bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from attribution.index import Index
from excise.cli import main
from excise.world import read_split
from tests.excise.helpers import error_lines, write_jsonl


@pytest.fixture(scope="module")
def files(tiny_world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("index")
    train = read_split(tiny_world, "retain")[:40]
    return {
        "model": tiny_world / "base",
        "other_model": tiny_world / "reference",
        "train": write_jsonl(folder / "train.jsonl", train),
        "other_train": write_jsonl(folder / "other.jsonl", train[:-1]),
        "query": write_jsonl(folder / "query.jsonl", read_split(tiny_world, "forget")[:5]),
        "folder": folder,
    }


@pytest.fixture(scope="module")
def indexed(files):
    """`excise index` at full dimension (the default), and its factors."""
    out = files["folder"] / "indexed"
    assert main(["index", *data(files), "--out", str(out), "--quiet"]) == 0
    return out


def data(files, model="model", train="train"):
    return ["--model", str(files[model]), "--train", str(files[train])]


def attribute(files, out, *extra, model="model", train="train"):
    argv = ["attribute", *data(files, model, train), "--query", str(files["query"])]
    return main([*argv, "--out", str(out), "--quiet", *extra])


def scores_of(out):
    with safe_open(out / "scores" / "pairwise.safetensors", "pt") as handle:
        return handle.get_tensor("scores"), handle.metadata()


def test_index_then_attribute_equals_plain_attribute(files, indexed, tmp_path):
    plain, fast = tmp_path / "plain", tmp_path / "fast"
    assert attribute(files, plain, "--factors", str(indexed / "factors")) == 0
    assert attribute(files, fast, "--index", str(indexed)) == 0
    expected, _ = scores_of(plain)
    found, metadata = scores_of(fast)
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
    assert len(json.loads(metadata["train_ids"])) == 40
    rows = [json.loads(line) for line in (fast / "topk.jsonl").read_text().splitlines()]
    plain_rows = [json.loads(line) for line in (plain / "topk.jsonl").read_text().splitlines()]
    assert [r["proponents"][0]["id"] for r in rows] == [
        r["proponents"][0]["id"] for r in plain_rows
    ]
    summary = (fast / "summary.md").read_text()
    assert "gradient index (method eigen, dimension full (exact)" in summary
    assert not (fast / "factors").exists()  # no factor fit, no pass over the training data
    assert attribute(files, fast, "--index", str(indexed / "index")) == 0  # the store itself


def test_the_summary_line_and_a_resumed_build(files, indexed, capsys):
    part = indexed / "index" / "vectors.part-0-40.safetensors"
    stamp = part.stat().st_mtime_ns
    assert main(["index", *data(files), "--out", str(indexed)]) == 0
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("excise index: 40 examples, 15 modules, ")
    assert "stored floats per example" in lines[0] and lines[0].endswith(" s")
    assert part.stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_a_compressed_projection_index_is_close_and_says_so(files, indexed, tmp_path):
    out = tmp_path / "small"
    extra = ("--factors", str(indexed / "factors"), "--method", "projection")
    argv = ["index", *data(files), "--out", str(out), "--quiet", *extra, "--dimension", "1024"]
    assert main(argv) == 0
    assert attribute(files, tmp_path / "a", "--index", str(out)) == 0
    assert attribute(files, tmp_path / "b", "--factors", str(indexed / "factors")) == 0
    found, expected = scores_of(tmp_path / "a")[0], scores_of(tmp_path / "b")[0]
    per_query = [
        torch.corrcoef(torch.stack(pair))[0, 1] for pair in zip(found, expected, strict=True)
    ]
    assert 0.5 < sum(per_query) / len(per_query) < 0.9999  # close, not exact
    assert "dimension 1024 per module" in (tmp_path / "a" / "summary.md").read_text()
    assert not (out / "factors").exists()  # --factors: none fitted


def test_a_float16_index_halves_the_disk_and_scores_nearly_alike(files, indexed, tmp_path):
    out = tmp_path / "half"
    extra = ("--factors", str(indexed / "factors"), "--storage", "float16")
    assert main(["index", *data(files), "--out", str(out), "--quiet", *extra]) == 0
    name = "vectors.part-0-40.safetensors"
    with safe_open(out / "index" / name, "pt") as handle:
        assert handle.get_tensor("vectors").dtype == torch.float16
    ratio = (out / "index" / name).stat().st_size / (indexed / "index" / name).stat().st_size
    assert 0.49 < ratio < 0.51, ratio
    assert attribute(files, tmp_path / "a", "--index", str(out)) == 0
    assert attribute(files, tmp_path / "b", "--index", str(indexed)) == 0
    half, full = scores_of(tmp_path / "a")[0], scores_of(tmp_path / "b")[0]
    assert half.dtype == torch.float32 and not torch.equal(half, full)
    for found, expected in zip(half, full, strict=True):
        assert torch.corrcoef(torch.stack([found, expected]))[0, 1] > 0.999
    assert (
        "stored floats per training example, in float16)"
        in (tmp_path / "a" / "summary.md").read_text()
    )


def test_dtype_float64_builds_the_index_in_float64(files, tmp_path):
    out = tmp_path / "double"
    assert main(["index", *data(files), "--out", str(out), "--quiet", "--dtype", "float64"]) == 0
    with safe_open(out / "index" / "vectors.part-0-40.safetensors", "pt") as handle:
        assert handle.get_tensor("vectors").dtype == torch.float64
    assert Index.load(out / "index").arguments.dtype == "float64"


def one_line_error(capsys, argv, message):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    lines = error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1 and message in lines[0], lines


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dimension", "0"], "dimension must be an integer >= 1 or None, got 0"),
        (["--dimension", "many"], "invalid"),
        (["--method", "pca"], "invalid choice"),
        (["--storage", "int8"], "argument --storage: invalid choice: 'int8'"),
        (["--strategy", "identity"], "identity factors have none"),
        (["--factors", "/nonexistent/factors"], "not an excise factor folder"),
    ],
)
def test_bad_index_arguments_exit_2_and_write_nothing(files, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    one_line_error(capsys, ["index", *data(files), "--out", str(out), *extra], message)
    assert not out.exists()


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (["--self"], "--index with --self"),
        (["--per-token"], "--index with --per-token"),
        (["--per-module"], "--index with --per-module"),
        (["--cg-iterations", "2"], "--index with --cg-iterations"),
        (["--choose-damping"], "--index with --choose-damping"),
        (["--ensemble", "elsewhere"], "--index with --ensemble"),
        (["--query-rank", "2"], "--index with --query-rank"),
        (["--modules", "lm_head"], "--index with --modules"),
        (["--strategy", "kfac"], "--index with --strategy: the index fixes the factors"),
        (["--fisher", "empirical"], "--index with --fisher: the index fixes the factors"),
        (["--dtype", "float64"], "--index with --dtype: the index's vectors were computed"),
        (["--autocast", "bfloat16"], "--index with --autocast: the index's vectors were"),
        (["--partitions", "2"], "--index with --partitions: the index is built"),
        (["--lambda-fraction", "0.5"], "--index with --lambda-fraction: the index fixes"),
        (["--cg-curvature", "hessian"], "--index with --cg-curvature: the index scores with"),
        (["--search-steps", "5"], "--index with --search-steps: the index's damping is baked"),
        (["--search-perturbations", "4"], "--index with --search-perturbations"),
        (["--search-learning-rate", "0.1"], "--index with --search-learning-rate"),
        (["--search-optimizer", "sgd"], "--index with --search-optimizer"),
        (["--search-margin", "1"], "--index with --search-margin"),
        (["--damping", "0.5"], "built with damping 0.1 × mean eigenvalue, this run asks 0.5"),
        (["--max-length", "32"], "built with --max-length None, this run asks 32"),
    ],
)
def test_attribute_with_an_index_refuses_what_it_cannot_honour(
    files, indexed, tmp_path, capsys, flag, message
):
    out = tmp_path / "bad"
    argv = ["attribute", *data(files), "--query", str(files["query"]), "--out", str(out)]
    one_line_error(capsys, [*argv, "--index", str(indexed), *flag], message)
    assert not out.exists()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no such index folder"),
        ("not an index", "not an excise index folder"),
        ("other model", "the index was built for another model"),
        ("other training data", "built on other training data than --train"),
        ("unfinished", "the index holds 0 of its 40 training examples"),
    ],
)
def test_a_wrong_index_is_refused_before_any_work(files, indexed, tmp_path, capsys, case, message):
    index, model, train = indexed, "model", "train"
    if case == "missing":
        index = tmp_path / "nowhere"
    elif case == "not an index":
        index = indexed / "factors"
    elif case == "other model":
        model = "other_model"
    elif case == "other training data":
        train = "other_train"
    else:  # a build killed before its first part: copy the folder without its vectors
        import shutil

        index = tmp_path / "unfinished"
        shutil.copytree(indexed, index)
        for part in (index / "index").glob("vectors.part-*"):
            part.unlink()
    out = tmp_path / "bad"
    argv = ["attribute", *data(files, model, train), "--query", str(files["query"])]
    one_line_error(capsys, [*argv, "--out", str(out), "--index", str(index)], message)
    assert not out.exists()
