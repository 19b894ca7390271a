"""The embedded world: its data is sound, its models know what they should, it is reused."""

from __future__ import annotations

import json

import pytest

from analysis.scoring import score_completions
from attribution import LanguageModelingTask
from attribution.artifacts import sha256_file
from excise.errors import BadInputError
from excise.models import load_model
from excise.world import SPLITS, build_world, read_split, tiny
from excise.world.build import paraphrased
from excise.world.generator import SHARED_WITH_NEIGHBOR, generate_world

TRAIN_SPLITS = ("forget", "retain", "neighbor", "world")


def people(records):
    return {r["subject"] for r in records}


def test_generator_is_deterministic_and_seeded():
    assert generate_world(tiny()) == generate_world(tiny())
    assert generate_world(tiny()) != generate_world(tiny(seed=1))


def test_people_splits_are_disjoint_and_neighbors_are_close():
    splits = generate_world(tiny())
    groups = [people(splits[s]) for s in ("forget", "retain", "neighbor", "holdout")]
    assert sum(len(g) for g in groups) == len(set().union(*groups))
    facts = {(r["subject"], r["attribute"]): r["answer"] for s in splits.values() for r in s}
    for neighbor in people(splits["neighbor"]):
        shared = {
            forget
            for forget in people(splits["forget"])
            if all(facts[neighbor, a] == facts[forget, a] for a in SHARED_WITH_NEIGHBOR)
        }
        assert shared, f"{neighbor} shares no attributes with a forget person"


def test_records_carry_truth_ratio_fields():
    splits = generate_world(tiny())
    for records in splits.values():
        for r in records:
            assert r["answer"] in r["completion"] and r["answer"] in r["paraphrased_completion"]
            assert r["paraphrased_prompt"] != r["prompt"]
            assert len(r["perturbed_completions"]) == tiny().n_perturbed
            assert r["paraphrased_completion"] not in r["perturbed_completions"]
            assert all(r["answer"] not in p.split() for p in r["perturbed_completions"])


def test_layout_and_hashes(tiny_world):
    info = json.loads((tiny_world / "world.json").read_text())
    for split in SPLITS:
        path = tiny_world / f"{split}.jsonl"
        assert info["splits"][split]["sha256"] == sha256_file(path)
        assert info["splits"][split]["records"] == len(read_split(tiny_world, split))
    assert info["key"] == tiny().key() == tiny_world.name


@pytest.fixture(scope="module")
def exact_rates(tiny_world):
    """Greedy exact-answer rate of each model on each split, measured here, not read back."""
    rates = {}
    for name in ("base", "reference"):
        model, tokenizer = load_model(tiny_world / name)
        for split in SPLITS:
            records = read_split(tiny_world, split)
            rates[name, split] = (
                score_completions(model, LanguageModelingTask(tokenizer), records)
                .exact.float()
                .mean()
            )
            reworded = [paraphrased(r) for r in records]
            rates[name, split, "reworded"] = (
                score_completions(model, LanguageModelingTask(tokenizer), reworded)
                .exact.float()
                .mean()
            )
    return rates


def test_base_model_knows_its_training_facts(exact_rates):
    for split in TRAIN_SPLITS:
        assert exact_rates["base", split] >= 0.9, split
        assert exact_rates["base", split, "reworded"] >= 0.9, split


def test_reference_model_does_not_know_the_forget_people(exact_rates):
    assert exact_rates["reference", "forget"] <= exact_rates["reference", "holdout"] + 0.1
    assert exact_rates["reference", "forget"] <= 0.2
    for split in ("retain", "neighbor", "world"):
        assert exact_rates["reference", split] >= 0.9, split


def test_second_build_reuses_the_world(tiny_world):
    stamp = (tiny_world / "base" / "model.safetensors").stat().st_mtime_ns
    notes = []
    folder, built = build_world(tiny(), out=tiny_world, note=notes.append)
    assert (folder, built, notes) == (tiny_world, False, [])
    assert (tiny_world / "base" / "model.safetensors").stat().st_mtime_ns == stamp


def test_out_folder_with_another_world_is_refused(tiny_world):
    with pytest.raises(BadInputError, match="other settings"):
        build_world(tiny(seed=5), out=tiny_world)


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    import excise.world.train as train

    def broken(*args, **kwargs):
        raise RuntimeError("simulated crash during training")

    monkeypatch.setattr(train, "train_model", broken)
    notes = []
    with pytest.raises(RuntimeError, match="simulated"):
        build_world(tiny(), out=tmp_path / "w", note=notes.append)
    assert list(tmp_path.iterdir()) == []
    # said before the long step: what, where, how long (issue 14)
    assert notes == [
        f"building the embedded tiny world into {tmp_path / 'w'} (about 30 seconds on 2 CPU "
        "cores; once, then reused) ..."
    ]


def test_cache_follows_excise_home(monkeypatch, tmp_path):
    from excise.home import excise_home
    from excise.world import world_folder

    monkeypatch.setenv("EXCISE_HOME", str(tmp_path))
    assert excise_home() == tmp_path
    assert world_folder(tiny()) == tmp_path / "worlds" / tiny().key()
    monkeypatch.delenv("EXCISE_HOME")
    assert excise_home().parts[-2:] == (".cache", "excise")
