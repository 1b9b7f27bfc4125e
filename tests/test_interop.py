"""Engines beyond our runtime run the exported graph: onnxruntime-genai (from the bundle's
genai_config.json) generates our greedy tokens, and the Triton repository that ``gptflow export
--triton-repo`` writes describes the graph's real inputs and outputs."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import onnx
import pytest
from lm_fixtures import random_lm_checkpoint

from deploy.runtime import load_bundle
from gptflow.cli import main as cli

PROMPTS = ["The quick brown fox", "Markets", "sea shells by the"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """A random tiny LM exported through the CLI with --triton-repo; (bundle, triton model dir)."""
    root = tmp_path_factory.mktemp("interop")
    random_lm_checkpoint(root, seed=1)
    argv = ["export", "--checkpoint", str(root / "ckpt"), "--out", str(root / "bundle")]
    argv += ["--greedy-tokens", "8", "--parity-decode-steps", "4", "--triton-repo", str(root / "triton")]
    assert cli([*argv, "--triton-name", "gptflow-lm"]) == 0
    return root / "bundle", root / "triton" / "gptflow-lm"


def test_onnxruntime_genai_generates_our_greedy_tokens(exported):
    og = pytest.importorskip("onnxruntime_genai", reason="pip install 'gptflow[interop]' (onnxruntime-genai)")
    bundle, _ = exported
    lm = load_bundle(bundle)
    assert lm.config.kv_cache == "in_place"  # so onnxruntime-genai shares one past/present buffer
    assert json.loads((bundle / "genai_config.json").read_text())["search"]["past_present_share_buffer"]
    engine = og.Model(str(bundle))  # reads genai_config.json
    for prompt in PROMPTS:
        ids = lm.encode(prompt)
        ours = lm.generate_ids([ids], max_new_tokens=24)[0]  # stops at EOS (not included)
        params = og.GeneratorParams(engine)
        params.set_search_options(max_length=len(ids) + 24, do_sample=False)
        generator = og.Generator(engine, params)
        generator.append_tokens(ids)
        theirs = []
        while not generator.is_done():
            generator.generate_next_token()
            theirs.append(int(generator.get_next_tokens()[0]))
        if theirs and theirs[-1] == lm.eos_id:
            theirs.pop()
        assert len(set(ours)) > 1, "degenerate greedy output; the comparison would prove little"
        assert theirs == ours, prompt


def parse_pbtxt_tensors(text: str, section: str) -> list[dict]:
    body = re.search(rf"^{section} \[(.*?)^\]", text, re.S | re.M).group(1)
    out = []
    for entry in re.findall(r"\{(.*?)\}", body, re.S):
        out.append(
            {
                "name": re.search(r'name: "([^"]+)"', entry).group(1),
                "data_type": re.search(r"data_type: (\w+)", entry).group(1),
                "dims": [int(d) for d in re.search(r"dims: \[([^\]]*)\]", entry).group(1).split(",")],
            }
        )
    return out


def test_triton_config_matches_the_graphs_inputs_and_outputs(exported):
    bundle, model_dir = exported
    text = (model_dir / "config.pbtxt").read_text()
    assert 'backend: "onnxruntime"' in text and 'name: "gptflow-lm"' in text and "max_batch_size: 0" in text
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    types = {onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.FLOAT: "TYPE_FP32"}

    def real(values):
        return [
            {
                "name": v.name,
                "data_type": types[v.type.tensor_type.elem_type],
                "dims": [
                    d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim
                ],
            }
            for v in values
        ]

    # An input with an initializer is optional (logits_to_keep, default every position): Triton is
    # given only the required ones, so its clients get the whole logits as before.
    defaults = {i.name for i in graph.initializer}
    assert parse_pbtxt_tensors(text, "input") == real([v for v in graph.input if v.name not in defaults])
    assert "logits_to_keep" in [v.name for v in graph.input] and "logits_to_keep" in defaults
    assert parse_pbtxt_tensors(text, "output") == real(graph.output)
    names = [v.name for v in graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and "past_key_values.1.value" in names
    copied = model_dir / "1" / "model.onnx"
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(copied) == digest(bundle / "model.onnx")
    assert (model_dir / "1" / "tokenizer.model").is_file()
