"""The model loader: a real folder loads; broken or mismatched folders fail clearly."""

from __future__ import annotations

import shutil

import pytest

from excise.errors import BadInputError
from excise.models import check_model_folder, load_model


def copy_model(tiny_world, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_world / "base", folder)
    return folder


def test_loads_the_world_model_in_eval_mode(tiny_world):
    model, tokenizer = load_model(tiny_world / "base")
    assert not model.training
    assert model.config.model_type == "llama"
    assert len(tokenizer) == model.get_input_embeddings().weight.shape[0]


def test_missing_folder(tmp_path):
    with pytest.raises(BadInputError, match="no such model folder"):
        check_model_folder(tmp_path / "nope")


def test_a_file_is_not_a_model(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(BadInputError, match="not a file"):
        check_model_folder(path)


def test_folder_without_config(tiny_world, tmp_path):
    folder = copy_model(tiny_world, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(BadInputError, match=r"no config\.json"):
        load_model(folder)


def test_folder_without_weights(tiny_world, tmp_path):
    folder = copy_model(tiny_world, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(BadInputError, match="no weights"):
        load_model(folder)


def test_folder_without_tokenizer(tiny_world, tmp_path):
    folder = copy_model(tiny_world, tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(BadInputError, match="no tokenizer files"):
        load_model(folder)


def test_corrupt_weights(tiny_world, tmp_path):
    folder = copy_model(tiny_world, tmp_path)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BadInputError, match="cannot load the model"):
        load_model(folder)


def test_tokenizer_of_another_model(tiny_world, tmp_path):
    from transformers import AutoTokenizer

    folder = copy_model(tiny_world, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([f"extra{i}" for i in range(50)])  # more ids than embedding rows
    tokenizer.save_pretrained(folder)
    with pytest.raises(BadInputError, match="do not belong together"):
        load_model(folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_hidden_layers": 4}, "18 missing (e.g. model.layers.2."),  # 2-layer weights
        ({"num_hidden_layers": 1}, "9 unexpected (e.g. model.layers.1."),
        ({"intermediate_size": 96}, "of another shape"),
    ],
)
def test_a_config_that_disagrees_with_the_weights_is_refused_in_one_line(
    tiny_world, tmp_path, capfd, change, message
):
    """Issue 15, items 2 and 12: no random layers, and no multi-line load report."""
    import json

    folder = tmp_path / "model"
    shutil.copytree(tiny_world / "base", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(BadInputError, match=r"config\.json does not match the weights") as info:
        load_model(folder)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert "LOAD REPORT" not in capfd.readouterr().err
