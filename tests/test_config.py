"""ModelConfig: presets (one list of names for every user), YAML round-trip, and validation messages
that name the field."""

import argparse

import pytest

from gpt.config import PRESETS, ModelConfig
from gpt.train_config import TrainConfig


def test_yaml_round_trip_preserves_every_field():
    cfg = ModelConfig.preset("cpu", pos_encoding="rope", dropout=0.1, n_classes=5, bias=False)
    assert ModelConfig.from_yaml(cfg.to_yaml()) == cfg


def test_yaml_file_round_trip(tmp_path):
    cfg = ModelConfig.preset("tiny", pos_encoding="sinusoidal")
    path = tmp_path / "model.yaml"
    cfg.to_yaml(path)
    assert ModelConfig.from_yaml(path) == cfg


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n_embd=65, n_head=4), "n_embd"),
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size=-3), "vocab_size"),
        (dict(block_size=0), "block_size"),
        (dict(pos_encoding="alibi"), "pos_encoding"),
        (dict(dropout=1.5), "dropout"),
        (dict(n_classes=-1), "n_classes"),
        (dict(n_layer=2.5), "n_layer"),
    ],
)
def test_invalid_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kwargs)


def test_unknown_pos_encoding_lists_allowed_values():
    with pytest.raises(ValueError, match="sinusoidal, learned, rope"):
        ModelConfig(pos_encoding="alibi")


def test_unknown_yaml_field_is_rejected():
    with pytest.raises(ValueError, match="n_layers"):
        ModelConfig.from_yaml("n_layers: 3\n")


def test_unknown_preset_is_rejected():
    with pytest.raises(ValueError, match="tiny, cpu, gpt2-124m"):
        ModelConfig.preset("huge")


def test_every_model_preset_has_a_training_recipe_of_the_same_name():
    assert tuple(TrainConfig.PRESETS) == tuple(ModelConfig.PRESETS) == PRESETS


@pytest.mark.parametrize("command", ["pretrain", "pipeline"])
def test_cli_preset_choices_are_the_config_presets(command):
    from gptflow.cli import build_parser

    commands = next(a for a in build_parser([command])._actions if isinstance(a, argparse._SubParsersAction))
    option = next(a for a in commands.choices[command]._actions if a.dest == "preset")
    assert tuple(option.choices) == PRESETS
