"""`--config` YAML merging, the same for every command: defaults < YAML file < command-line flags."""

from __future__ import annotations

import pytest

from gptflow.cli import build_parser
from gptflow.cli import main as cli

# Each command with a --config file, and the other arguments it needs to parse.
COMMANDS = {
    "tokenizer": [],
    "shard": [],
    "pretrain": ["--data", "d", "--out", "o"],
    "finetune": ["--task", "bbc-topic", "--checkpoint", "c", "--out", "o"],
    "export": ["--checkpoint", "c"],
}


def parse(argv: list[str]):
    return build_parser(argv).parse_args(argv)


def test_flags_override_the_file_which_overrides_only_the_task_defaults_it_names(tmp_path):
    from gpt.finetune import FinetuneConfig
    from gpt.tasks import get_task
    from gptflow.commands.finetune import build_config

    defaults = get_task("bbc-topic").finetune_defaults
    assert defaults["windows"] != FinetuneConfig().windows  # else the test could not tell them apart
    (tmp_path / "ft.yaml").write_text("lr: 0.001\nepochs: 2\n")
    args = parse(["finetune", *COMMANDS["finetune"], "--config", str(tmp_path / "ft.yaml"), "--epochs", "3"])
    config = build_config(args)
    assert config.lr == 0.001  # the file beats the task's default
    assert config.epochs == 3  # the flag beats the file
    assert config.windows == defaults["windows"]  # a key the file leaves out keeps the task's default


def test_file_fields_apply_over_the_dataclass_defaults(tmp_path):
    from gpt.data import ShardConfig
    from gptflow.args import merged_fields

    (tmp_path / "shard.yaml").write_text("val_fraction: 0.1\n")
    args = parse(["shard", "--config", str(tmp_path / "shard.yaml"), "--test-fraction", "0.2"])
    config = ShardConfig.from_dict(merged_fields(args, ShardConfig))
    assert (config.val_fraction, config.test_fraction) == (0.1, 0.2)
    assert config.shard_tokens == ShardConfig().shard_tokens


@pytest.mark.parametrize(
    "command, text, typo, field",
    [
        ("tokenizer", "vocab_sise: 300\n", "vocab_sise", "vocab_size"),
        ("shard", "val_fracton: 0.1\n", "val_fracton", "val_fraction"),
        # pretrain's file holds sections; a misspelt field inside one is the same mistake.
        ("pretrain", "train:\n  lrr: 0.1\n", "lrr", "lr"),
        ("finetune", "lrr: 0.1\n", "lrr", "lr"),
        ("export", "opsett: 17\n", "opsett", "opset"),
    ],
)
def test_unknown_key_fails_naming_the_key_and_the_file(command, text, typo, field, tmp_path, capsys):
    path = tmp_path / f"{command}.yaml"
    path.write_text(text)
    assert cli([command, *COMMANDS[command], "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and repr(typo) in err and f"did you mean {field!r}" in err
    assert "Traceback" not in err


def test_pretrain_section_that_is_not_a_mapping_is_an_error(tmp_path):
    from gptflow.commands.pretrain import build_configs

    path = tmp_path / "c.yaml"
    path.write_text("model:\n  n_layer: 3\ntrain: 3\n")
    with pytest.raises(ValueError, match=r"section `train:` must be a mapping of TrainConfig fields"):
        build_configs(parse(["pretrain", *COMMANDS["pretrain"], "--config", str(path)]))


def test_pretrain_unknown_section_is_an_error(tmp_path):
    from gptflow.commands.pretrain import build_configs

    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.01\n")  # a flat TrainConfig file where sections are expected
    with pytest.raises(ValueError, match=r"unknown section 'lr'.*`model:`, `train:`"):
        build_configs(parse(["pretrain", *COMMANDS["pretrain"], "--config", str(path)]))


@pytest.mark.parametrize("text", ["- lr\n- 0.1\n", "just a string\n"])
def test_file_that_is_not_a_mapping_is_an_error(text, tmp_path):
    from gpt.tokenizer import TokenizerConfig
    from gptflow.args import read_config_file

    path = tmp_path / "tok.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"must be a mapping of TokenizerConfig fields"):
        read_config_file(path, TokenizerConfig)


def test_empty_file_sets_nothing_and_a_missing_one_is_an_error(tmp_path):
    from gpt.tokenizer import TokenizerConfig
    from gptflow.args import read_config_file

    (tmp_path / "empty.yaml").write_text("")
    assert read_config_file(tmp_path / "empty.yaml", TokenizerConfig) == {}
    with pytest.raises(FileNotFoundError, match="--config file not found"):
        read_config_file(tmp_path / "missing.yaml", TokenizerConfig)
