"""gpt/bundle.py, the bundle format's one owner: config.json round-trips, refuses what it cannot read
with errors that name the file and the field, still reads what earlier code wrote; the module imports
nothing outside the standard library; its window rule is finetuning's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpt.bundle import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    SPECIAL_IDS,
    BundleConfig,
    ClassifierInput,
    classification_windows,
    genai_config,
    lm_io_names,
)
from gpt.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
HASH = "ab" * 32
LM_MODEL = ModelConfig.preset("tiny", vocab_size=300).to_dict()
CLF_MODEL = ModelConfig.preset("tiny", vocab_size=300, n_classes=3).to_dict()
TEXT = "The quick brown fox jumps over the lazy dog. Markets rose as investors cheered the news.\n" * 20


def classifier_config(**overrides) -> BundleConfig:
    fields = dict(
        kind="classifier",
        model=dict(CLF_MODEL),
        tokenizer_hash=HASH,
        labels=["business", "sport", "tech"],
        classifier_input=ClassifierInput(max_len=16, windows=3, prompt_template="Topic of: {input}\n"),
    )
    return BundleConfig(**{**fields, **overrides})


def write_raw(bundle: Path, data: dict) -> Path:
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / CONFIG_FILE).write_text(json.dumps(data), encoding="utf-8")
    return bundle / CONFIG_FILE


def test_config_round_trips_through_config_json(tmp_path):
    cfg = classifier_config(
        precision="int8",
        quantization={"method": "onnxruntime.quantize_dynamic", "weight_type": "QInt8"},
        name="topics",
        parity={"max_abs_diff": 1e-6},
        size_bytes=1234,
        extra={"written_by_a_newer_minor": [1, 2]},
    )
    path = cfg.write(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [CONFIG_FILE]  # the temp file was renamed, none is left
    back = BundleConfig.read(tmp_path)
    assert back == cfg
    shape = {k: getattr(back, k) for k in ("vocab_size", "context_length", "n_layer", "n_head", "head_dim")}
    assert shape == {"vocab_size": 300, "context_length": 64, "n_layer": 2, "n_head": 2, "head_dim": 32}
    assert back.n_classes == 3
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert (raw["format"], raw["format_version"]) == (FORMAT, FORMAT_VERSION)
    assert raw["tokenizer_hash"] == HASH and "tokenizer_sha256" not in raw
    assert raw["context_length"] == 64 and raw["special_ids"] == SPECIAL_IDS  # for readers outside Python
    assert raw["written_by_a_newer_minor"] == [1, 2]


def test_a_write_that_fails_validation_keeps_the_old_config(tmp_path):
    cfg = BundleConfig(kind="lm", model=dict(LM_MODEL), tokenizer_hash=HASH)
    path = cfg.write(tmp_path)
    before = path.read_bytes()
    cfg.labels = ["x"]  # an LM has no labels
    with pytest.raises(ValueError, match=rf"{CONFIG_FILE}: not written: .*'labels'"):
        cfg.write(tmp_path)
    assert path.read_bytes() == before


def test_a_newer_format_version_is_refused_naming_the_file(tmp_path):
    data = classifier_config().to_dict()
    path = write_raw(tmp_path / "b", {**data, "format_version": FORMAT_VERSION + 1})
    with pytest.raises(ValueError) as err:
        BundleConfig.read(tmp_path / "b")
    assert str(path) in str(err.value)
    assert f"format_version {FORMAT_VERSION + 1} is newer than this code reads" in str(err.value)


def test_an_unknown_format_is_refused(tmp_path):
    write_raw(tmp_path, {**classifier_config().to_dict(), "format": "someone-elses-bundle"})
    with pytest.raises(ValueError, match="unknown bundle format 'someone-elses-bundle'"):
        BundleConfig.read(tmp_path)


@pytest.mark.parametrize("field", ["kind", "model", "tokenizer_hash"])
def test_a_missing_field_is_named_with_the_file(tmp_path, field):
    data = classifier_config().to_dict()
    del data[field]
    path = write_raw(tmp_path, data)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: field '{field}' is missing"):
        BundleConfig.read(tmp_path)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"model": {**CLF_MODEL, "n_layer": "2"}}, "model.n_layer"),
        ({"model": {k: v for k, v in CLF_MODEL.items() if k != "n_head"}}, "model.n_head"),
        ({"labels": ["business", "sport"]}, "labels"),
        ({"labels": None}, "labels"),
        ({"classifier_input": {"windows": 2}}, "classifier_input.max_len"),
        (
            {"classifier_input": {"max_len": 16, "prompt_template": "no slot"}},
            "classifier_input.prompt_template",
        ),
        ({"classifier_input": {"max_len": 65}}, "classifier_input.max_len"),
        ({"kind": "lm"}, "kind"),
        ({"kind": "regressor"}, "kind"),
        ({"tokenizer_hash": "abc"}, "tokenizer_hash"),
        ({"special_ids": {"pad": 0}}, "special_ids"),
        ({"add_bos": "yes"}, "add_bos"),
        ({"kv_cache": "shared"}, "kv_cache"),
        ({"context_length": 128}, "context_length"),
    ],
)
def test_an_ill_typed_or_inconsistent_field_is_named(tmp_path, change, named):
    path = write_raw(tmp_path, {**classifier_config().to_dict(), **change})
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: .*'{named}'"):
        BundleConfig.read(tmp_path)


# What the code before gpt/bundle.py wrote: gpt/export.py (format_version 1) and the benchmarks
# (no format at all); both named the tokenizer hash "tokenizer_sha256".
OLD_EXPORT_LM = {
    "format": FORMAT,
    "format_version": 1,
    "kind": "lm",
    "precision": "fp32",
    "model": LM_MODEL,
    "context_length": 64,
    "vocab_size": 300,
    "special_ids": {"pad": 0, "unk": 1, "bos": 2, "eos": 3},
    "add_bos": False,
    "labels": None,
    "classifier_input": None,
    "opset": 18,
    "io": {"inputs": lm_io_names(2)[0]},
    "tokenizer_sha256": HASH,
    "source_checkpoint": {"path": "/ckpt", "sha256": "cd" * 32, "tokenizer_hash": None},
    "export_config": {"opset": 18, "quantize": "none"},
    "versions": {"torch": "2.13.0"},
    "parity": {"max_abs_diff": 3e-6},
    "size_bytes": 400000,
    "param_bytes": 390000,
}
OLD_EXPORT_CLASSIFIER = {
    **OLD_EXPORT_LM,
    "kind": "classifier",
    "model": CLF_MODEL,
    "labels": ["a", "b", "c"],
    "classifier_input": {"prompt_template": "{input}", "max_len": 64, "windows": 2},
}
OLD_BENCHMARK_LM = {
    "kind": "lm",
    "name": "random-cpu",
    "model": LM_MODEL,
    "context_length": 64,
    "special_ids": SPECIAL_IDS,
    "tokenizer_sha256": HASH,
}


@pytest.mark.parametrize("old", [OLD_EXPORT_LM, OLD_EXPORT_CLASSIFIER, OLD_BENCHMARK_LM])
def test_configs_written_before_gpt_bundle_still_load(tmp_path, old):
    write_raw(tmp_path, old)
    cfg = BundleConfig.read(tmp_path)
    assert cfg.tokenizer_hash == HASH  # the old key, under its one name now
    assert (cfg.kind, cfg.context_length, cfg.special_ids) == (old["kind"], 64, SPECIAL_IDS)
    assert cfg.name == old.get("name") and cfg.parity == old.get("parity")
    if old["kind"] == "classifier":
        assert cfg.labels == ["a", "b", "c"] and cfg.classifier_input == ClassifierInput(64, 2, "{input}")
    cfg.write(tmp_path)  # rewritten as the current version, nothing lost
    raw = json.loads((tmp_path / CONFIG_FILE).read_text(encoding="utf-8"))
    assert raw["format_version"] == FORMAT_VERSION and raw["tokenizer_hash"] == HASH
    assert "tokenizer_sha256" not in raw
    assert BundleConfig.read(tmp_path) == cfg


def test_bundle_module_imports_only_the_standard_library():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None\n"
        "before = set(sys.modules)\n"
        "import gpt.bundle\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(sorted(new - set(sys.stdlib_module_names) - {'gpt'}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_genai_config_names_the_graphs_inputs_and_outputs():
    cfg = BundleConfig(kind="lm", model=dict(LM_MODEL), tokenizer_hash=HASH)
    decoder = genai_config(cfg)["model"]["decoder"]
    inputs, outputs = lm_io_names(2)
    names = decoder["inputs"]
    past = [names[k] % i for i in range(2) for k in ("past_key_names", "past_value_names")]
    assert [names["input_ids"], names["attention_mask"], names["position_ids"], *past] == inputs
    names = decoder["outputs"]
    present = [names[k] % i for i in range(2) for k in ("present_key_names", "present_value_names")]
    assert [names["logits"], *present] == outputs
    assert (decoder["head_size"], decoder["num_hidden_layers"]) == (32, 2)
    # One past/present buffer only where the graph can write into it (and bundles before the field cannot).
    assert not genai_config(cfg)["search"]["past_present_share_buffer"]
    cfg.kv_cache = "in_place"
    assert genai_config(cfg)["search"]["past_present_share_buffer"]


def test_window_rule_cuts_pieces_and_drops_a_short_last_one():
    # max_len 10, no template: room for 8 input ids between the two EOS.
    eos = SPECIAL_IDS["eos"]
    ids = list(range(100, 117))  # 17 ids: pieces of 8, 8 and 1; 1 < 8 / 4, so the last is dropped
    assert classification_windows(ids, [], [], 10, windows=3) == [
        [eos, *ids[:8], eos],
        [eos, *ids[8:16], eos],
    ]
    ids = list(range(100, 118))  # 18 ids: the last piece has 2 = 8 / 4 ids and stays
    assert [len(w) for w in classification_windows(ids, [], [], 10, windows=3)] == [10, 10, 4]
    assert classification_windows(ids, [], [], 10, windows=1) == [[eos, *ids[:8], eos]]
    assert classification_windows([], [7], [8, 9], 10) == [[eos, 7, 8, 9, eos]]  # an empty text: one window
    with pytest.raises(ValueError, match="max_len=6 leaves no room"):
        classification_windows(ids, [7, 7], [8, 8], 6)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from gpt.tokenizer import Tokenizer, TokenizerConfig

    return Tokenizer.train([TEXT], tmp_path_factory.mktemp("tok"), TokenizerConfig(vocab_size=300))


@pytest.mark.parametrize("template", ["{input}", "Topic of: {input}\n", "Q: {input} A:"])
def test_window_rule_is_finetunings(tok, template):
    from gpt.task_data import classification_windows as finetune_windows
    from gpt.tasks import Task

    task = Task("t", "classification", "x.csv", ("accuracy",), prompt_template=template)
    pre, post = ClassifierInput(max_len=16, prompt_template=template).template_parts()
    pre_ids, post_ids = (tok.encode(pre) if pre else []), (tok.encode(post) if post else [])
    texts = ["", "x", "The quick brown fox", "sea shells by the sea shore", TEXT[:400]]
    seen = set()
    for text in texts:
        for max_len in (16, 24, 64):
            for windows in (1, 2, 3, 5):
                ours = classification_windows(tok.encode(text), pre_ids, post_ids, max_len, windows)
                assert ours == finetune_windows(tok, task, text, max_len, windows), (text, max_len, windows)
                seen.add(len(ours))
    assert {1, 2, 3, 5} <= seen  # the cases covered one window, several, and a cap at ``windows``
