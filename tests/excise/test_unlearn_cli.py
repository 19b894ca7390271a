"""``excise unlearn``: a new model folder, the scope, a manifest that proves the scope held.

Bad input (empty forget set, forget = retain, sparsity outside (0, 1], unknown method or
scope, factors for another model, an --out that is an input) exits 2 with one line and
writes nothing; the input model folder is never touched.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from attribution.artifacts import sha256_file
from excise.cli import main
from tests.excise.helpers import error_lines, folder_hashes, long_record, write_jsonl
from unlearn import Scope


def unlearn_cli(world, out, *extra, forget=None, retain=None, model=None):
    return main(
        [
            "unlearn",
            "--model",
            str(model or world / "base"),
            "--forget",
            str(forget or world / "forget.jsonl"),
            "--retain",
            str(retain or world / "retain.jsonl"),
            "--out",
            str(out),
            "--steps",
            "3",
            "--quiet",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def edited(tiny_world, tmp_path_factory):
    """One ekfac-scoped NPO run through the command line; the base folder's hashes before."""
    before = folder_hashes(tiny_world / "base")
    out = tmp_path_factory.mktemp("unlearn") / "out"
    assert unlearn_cli(tiny_world, out, "--sparsity", "0.05", "--method", "npo") == 0
    return out, before


def test_writes_model_scope_and_manifest(edited, tiny_world):
    out, before = edited
    assert (out / "model" / "config.json").is_file()
    assert (out / "model" / "model.safetensors").is_file()
    assert (out / "model" / "tokenizer.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema"] == "excise-unlearn/1"
    assert manifest["method"] == "npo" and manifest["scope"]["method"] == "ekfac"
    assert manifest["scope"]["fraction"] == pytest.approx(0.05, abs=1e-4)
    assert manifest["inputs"]["forget"]["sha256"] == sha256_file(tiny_world / "forget.jsonl")
    assert manifest["result"]["steps_run"] == 3
    proof = manifest["proof"]
    assert proof["out_of_scope_identical"] == proof["out_of_scope_tensors"]
    assert folder_hashes(tiny_world / "base") == before  # the input is untouched


def test_reloaded_model_equals_the_input_outside_the_scope(edited, tiny_world):
    out, _ = edited
    original = load_file(tiny_world / "base" / "model.safetensors")
    unlearned = load_file(out / "model" / "model.safetensors")
    scope = Scope.load(out / "scope.safetensors")
    assert original.keys() == unlearned.keys()
    moved = 0
    for name, tensor in original.items():
        mask = scope.masks.get(name, torch.zeros_like(tensor, dtype=torch.bool))
        changed = tensor != unlearned[name]
        assert not (changed & ~mask).any(), name
        moved += int(changed.sum())
    assert moved > 0


def test_factors_are_saved_and_reused_but_not_for_another_model(edited, tiny_world, tmp_path):
    out, _ = edited
    assert unlearn_cli(tiny_world, tmp_path / "again", "--factors", str(out / "factors")) == 0
    code = unlearn_cli(
        tiny_world,
        tmp_path / "other",
        "--factors",
        str(out / "factors"),
        model=tiny_world / "reference",
    )
    assert code == 2
    assert not (tmp_path / "other").exists()


OPTIONS_ONLY = {  # bad-input cases that differ from a good run by their options alone
    "sparsity_zero": ("--sparsity", "0"),
    "sparsity_above_one": ("--sparsity", "1.5"),
    "unknown_method": ("--method", "forgetall"),
    "unknown_scope": ("--scope", "everything"),
    "distill_without_holdout": ("--method", "distill"),
    "negative_damping": ("--damping", "-1"),
    "negative_retain_budget": ("--retain-budget", "-1"),
    "nan_retain_budget": ("--retain-budget", "nan"),
    "nan_forget_target": ("--forget-target", "nan"),
}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty_forget", "no records"),
        ("same_sets", "identical"),
        ("sparsity_zero", "sparsity"),
        ("sparsity_above_one", "sparsity"),
        ("unknown_method", "invalid choice"),
        ("unknown_scope", "invalid choice"),
        ("out_is_model", "must be a new folder"),
        ("out_inside_model", "must be a new folder"),
        ("missing_forget", "no such file"),
        ("distill_without_holdout", "needs --holdout"),
        ("distill_holdout_without_subject", "name pool is empty"),
        ("distill_forget_without_subject", "add 'subject' fields"),
        ("negative_damping", "damping value must be"),
        ("negative_retain_budget", "retain_budget must be a finite number >= 0 or none"),
        ("nan_retain_budget", "retain_budget must be a finite number >= 0 or none"),
        ("nan_forget_target", "forget_target must be a finite number >= 0 or none"),
        ("record_past_context", "forget record 'long': 84 tokens, more than the model's context"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    tiny_world, tmp_path, capsys, case, message
):
    before = folder_hashes(tiny_world / "base")
    out, extra, files = tmp_path / "out", list(OPTIONS_ONLY.get(case, ())), {}
    if case == "empty_forget":
        files["forget"] = write_jsonl(tmp_path / "empty.jsonl", [])
    elif case == "same_sets":
        files["retain"] = tiny_world / "forget.jsonl"
    elif case == "out_is_model":
        out = tiny_world / "base"
    elif case == "out_inside_model":
        out = tiny_world / "base" / "edited"
    elif case == "missing_forget":
        files["forget"] = tmp_path / "nope.jsonl"
    elif case == "record_past_context":
        files["forget"] = write_jsonl(tmp_path / "long.jsonl", [long_record()])
    elif case == "distill_holdout_without_subject":
        plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "Q", "completion": " A"}])
        extra = ["--method", "distill", "--holdout", str(plain)]
    elif case == "distill_forget_without_subject":  # and no holdout prompt matches
        records = [{"id": "a", "prompt": "Q: what is x?\nA:", "completion": " y"}]
        files["forget"] = write_jsonl(tmp_path / "anonymous.jsonl", records)
        extra = ["--method", "distill", "--holdout", str(tiny_world / "holdout.jsonl")]
    try:
        code = unlearn_cli(tiny_world, out, *extra, **files)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    assert code == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and message in lines[0], lines
    assert "Traceback" not in lines[0]
    assert not (tmp_path / "out").exists()
    assert not (tiny_world / "base" / "edited").exists()
    assert folder_hashes(tiny_world / "base") == before


@pytest.mark.parametrize("method", ["gd", "newton"])
def test_a_local_gpt2_folder_with_tied_embeddings(tiny_world, world_tokenizer, tmp_path, method):
    """Another architecture (Conv1D, tied input/output embeddings) through the same command."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(world_tokenizer), n_embd=32, n_layer=2, n_head=2)
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(config).save_pretrained(folder)
    world_tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    extra = ["--method", method, "--scope", "ekfac", "--ranking", "per_tensor"]
    assert unlearn_cli(tiny_world, out, *extra, "--retain-budget", "5", model=folder) == 0
    proof = json.loads((out / "manifest.json").read_text())["proof"]
    assert proof["out_of_scope_identical"] == proof["out_of_scope_tensors"] > 0
    original = load_file(folder / "model.safetensors")
    unlearned = load_file(out / "model" / "model.safetensors")
    assert any(not torch.equal(original[n], unlearned[n]) for n in original)


def test_distill_infers_subjects_from_the_holdout_and_says_so(tiny_world, tmp_path, capsys):
    def anonymous(split):
        rows = [json.loads(line) for line in (tiny_world / f"{split}.jsonl").open()]
        plain = [{k: v for k, v in r.items() if k != "subject"} for r in rows]
        return write_jsonl(tmp_path / f"{split}.jsonl", plain), rows

    (forget, named), (holdout, held) = anonymous("forget"), anonymous("holdout")
    out = tmp_path / "out"
    inputs = ("--model", str(tiny_world / "base"), "--forget", str(forget))
    extra = ("--method", "distill", "--holdout", str(holdout), "--steps", "2", "--out", str(out))
    code = main(["unlearn", *inputs, "--retain", str(tiny_world / "retain.jsonl"), *extra])
    assert code == 0
    assert f"inferred for {len(named)} of {len(named)}" in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    strangers = set(manifest["arguments"]["strangers"])
    assert strangers and strangers <= {r["subject"] for r in held}
    assert all("subject" not in json.loads(line) for line in forget.open())  # input untouched


def test_a_bfloat16_model_stays_bfloat16_and_the_proof_hashes_its_files(tiny_world, tmp_path):
    """Computed in float32, written in the input's dtype; every hash in the manifest is of
    a tensor as it is on disk (input file before, output file after)."""
    from transformers import AutoModelForCausalLM

    from attribution.fingerprint import tensor_hash

    folder = tmp_path / "bf16"
    model = AutoModelForCausalLM.from_pretrained(tiny_world / "base", dtype=torch.bfloat16)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_world / "base" / name).exists():
            (folder / name).write_bytes((tiny_world / "base" / name).read_bytes())
    out = tmp_path / "out"
    extra = ("--method", "gd", "--lr", "0.01", "--sparsity", "0.05", "--retain-budget", "none")
    assert unlearn_cli(tiny_world, out, *extra, model=folder) == 0
    original = load_file(folder / "model.safetensors")
    unlearned = load_file(out / "model" / "model.safetensors")
    assert {t.dtype for t in unlearned.values()} == {torch.bfloat16}
    size = (out / "model" / "model.safetensors").stat().st_size
    assert size < 1.01 * (folder / "model.safetensors").stat().st_size  # not float32's twice
    assert json.loads((out / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    manifest = json.loads((out / "manifest.json").read_text())
    rows = {row["name"]: row for row in manifest["proof"]["per_tensor"]}
    for name, tensor in original.items():
        assert rows[name]["sha256_before"] == tensor_hash(tensor), name
        assert rows[name]["sha256_after"] == tensor_hash(unlearned[name]), name
    proof = manifest["proof"]
    assert proof["holds"] and proof["changed_tensors"] > 0


def test_shared_forget_and_retain_records_run_with_one_warning(tiny_world, tmp_path, capsys):
    """Issue 15, item 15: a warning line (shown under --quiet) and the manifest says it."""
    forget = [json.loads(line) for line in (tiny_world / "forget.jsonl").open()][:4]
    retain = [json.loads(line) for line in (tiny_world / "retain.jsonl").open()][:20]
    files = {
        "forget": write_jsonl(tmp_path / "forget.jsonl", forget),
        "retain": write_jsonl(tmp_path / "retain.jsonl", [*retain, forget[1]]),
    }
    capsys.readouterr()
    assert unlearn_cli(tiny_world, tmp_path / "out", "--scope", "all", **files) == 0
    warning = (
        f"1 of the 4 forget records are also in the retain split (e.g. {forget[1]['id']!r}): "
        "they are asked to be forgotten and kept at once"
    )
    assert error_lines(capsys.readouterr().err) == [f"excise unlearn: warning: {warning}"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["warnings"] == [warning]


def test_a_streamed_retain_set_gives_the_same_model(edited, tiny_world, tmp_path, monkeypatch):
    """The retain file read lazily from its Arrow copy (the factor fit over forget +
    retain, the scope, the retain batches, the monitor) edits the weights bit for bit as
    the in-memory list does."""
    from excise.commands import unlearn as command
    from excise.streaming import RecordTable

    opened = []

    def spy(path):
        opened.append(RecordTable(path))
        return opened[-1]

    monkeypatch.setattr(command, "open_records", spy)
    monkeypatch.setenv("EXCISE_HOME", str(tmp_path / "home"))
    out = tmp_path / "streamed"
    assert unlearn_cli(tiny_world, out, "--sparsity", "0.05", "--method", "npo") == 0
    assert len(opened) == 1 and isinstance(opened[0], RecordTable)
    streamed = load_file(out / "model" / "model.safetensors")
    in_memory = load_file(edited[0] / "model" / "model.safetensors")
    assert streamed.keys() == in_memory.keys()
    assert all(torch.equal(streamed[k], in_memory[k]) for k in streamed)
