"""ONNX export: parity with PyTorch for every position encoding, the bundle contract, int8, refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from deploy.runtime import GenerationConfig, load_bundle
from gpt.checkpoint import save_model
from gpt.config import ModelConfig
from gpt.export import ExportConfig, export_bundle
from gpt.generate import generate
from gpt.io import read_json
from gpt.model import GPT
from gpt.tokenizer import Tokenizer, TokenizerConfig

TEXT = (
    "The quick brown fox jumps over the lazy dog. Markets rose as investors cheered the news.\n"
    "She sells sea shells by the sea shore; the shells she sells are surely sea shells.\n"
) * 40


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer.train([TEXT], tmp_path_factory.mktemp("tok"), TokenizerConfig(vocab_size=300))


def make_checkpoint(path, tok: Tokenizer, seed: int = 0, meta=None, **model_kw) -> tuple[GPT, object]:
    torch.manual_seed(seed)
    model = GPT(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, **model_kw)).eval()
    meta = dict(meta or {})
    if model.config.n_classes:
        meta["labels"] = [f"class{i}" for i in range(model.config.n_classes)]
    save_model(path, model, tokenizer_hash=tok.hash, **meta)
    shutil.copyfile(tok.path, path / "tokenizer.model")
    return model, path


@pytest.fixture(scope="module", params=["learned", "sinusoidal", "rope"])
def exported(request, tok, tmp_path_factory):
    """One export per position encoding; the learned one also writes the int8 sibling (untrained)."""
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    model, ckpt = make_checkpoint(root / "ckpt", tok, pos_encoding=request.param)
    quantize = "int8" if request.param == "learned" else "none"
    result = export_bundle(ckpt, root / "bundle", ExportConfig(quantize=quantize), eval_text=TEXT[:1500])
    return request.param, model, result


def test_onnx_matches_torch_with_kv_cache_for_each_position_encoding(exported):
    _, _, result = exported
    parity = result["parity"]
    assert parity["prefill_max_abs_diff"] <= 1e-4  # left-padded batch of different lengths
    assert len(set(parity["batch_lengths"])) == 3
    assert parity["decode_steps"] == 50
    assert parity["decode_max_abs_diff"] <= 1e-4
    assert parity["greedy_identical"]


def test_cached_attention_is_one_fused_node_per_layer_and_both_graphs_match_torch(tok, tmp_path):
    """The default graph writes each layer's cached attention as one GroupQueryAttention (no softmax
    left, one mask bias for all layers); --no-fused-attention keeps the exporter's own nodes. Both match
    PyTorch over a left-padded prefill and 50 cached steps, with rotary and QK-norm on."""
    from gpt.export import export_onnx, lm_parity

    torch.manual_seed(0)
    model = GPT(
        ModelConfig.preset("tiny", vocab_size=tok.vocab_size, pos_encoding="rope", qk_norm=True)
    ).eval()
    ops = {}
    for fused in (True, False):
        path = export_onnx(model, tmp_path / f"fused-{fused}.onnx", fused_attention=fused)
        ops[fused] = [n.op_type for n in onnx.load(str(path)).graph.node]
        parity = lm_parity(model, path)
        assert parity["max_abs_diff"] <= 1e-5, (fused, parity)
    n_layer = model.config.n_layer
    assert ops[True].count("GroupQueryAttention") == n_layer
    assert "Softmax" not in ops[True] and ops[True].count("Where") == 1  # one mask bias, shared
    assert "GroupQueryAttention" not in ops[False] and ops[False].count("Softmax") == n_layer


def test_the_fused_graph_uses_onnxruntimes_layer_norm_and_gelu_kernels_and_still_matches_torch(tok, tmp_path):
    """GPT-2's recipe: every add + LayerNorm is one SkipLayerNormalization, every tanh GELU one
    FastGelu, and the attention op reads the qkv projection packed (no Split, no Reshape round
    trips). Same logits as PyTorch, so each rewrite kept the math."""
    from gpt.export import export_onnx, lm_parity

    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=tok.vocab_size)).eval()
    path = export_onnx(model, tmp_path / "model.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    n_layer = model.config.n_layer
    # ln_1 and ln_2 of every block (the first ln_1 adds the position embedding), ln_f
    assert ops.count("SkipLayerNormalization") == 2 * n_layer + 1 and "LayerNormalization" not in ops
    assert ops.count("FastGelu") == n_layer and "Tanh" not in ops and "Pow" not in ops
    assert ops.count("Reshape") <= 1, ops  # only the mask's
    assert "Split" not in ops  # the attention reads the qkv projection packed
    parity = lm_parity(model, path)
    assert parity["max_abs_diff"] <= 1e-5, parity


def test_the_fusion_rewrite_keeps_a_model_whose_weights_are_external_data(tok, tmp_path):
    """Models past protobuf's 2 GB keep their weights in model.onnx.data: the rewrite writes both files
    anew (swapped in by rename) and the graph still loads them and gives the same logits."""
    import onnxruntime as ort

    from gpt.export import export_onnx
    from gpt.onnx_ops import rewrite_decoder

    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=tok.vocab_size)).eval()
    inline = export_onnx(model, tmp_path / "inline.onnx")
    (tmp_path / "ext").mkdir()
    external = tmp_path / "ext" / "model.onnx"
    onnx.save_model(
        onnx.load(str(inline)),
        str(external),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    counts = rewrite_decoder(external)
    assert counts["logits_to_keep"] == 0  # export added it already: a second pass leaves it as it is
    assert sorted(p.name for p in external.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert external.stat().st_size < (external.parent / "model.onnx.data").stat().st_size  # still external
    ids = np.array([[5, 6, 7]], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(3)[None]}
    for x in ort.InferenceSession(str(inline)).get_inputs()[3:]:
        feed[x.name] = np.zeros((1, model.config.n_head, 0, model.config.head_dim), np.float32)
    a, b = (ort.InferenceSession(str(p)).run(["logits"], feed)[0] for p in (inline, external))
    assert np.abs(a - b).max() <= 1e-6
    last = ort.InferenceSession(str(external)).run(
        ["logits"], {**feed, "logits_to_keep": np.ones(1, np.int64)}
    )[0]
    assert last.shape == (1, 1, a.shape[-1]) and np.abs(last[:, 0] - a[:, -1]).max() <= 1e-6
    assert [n.op_type for n in onnx.load(str(external)).graph.node].count("Slice") == 1


def test_the_traced_attention_op_runs_in_pytorch_as_the_plain_path(tok):
    """Inside onnx_attention() a cached decode step goes through gptflow::cached_attention; run eagerly
    it must give the plain path's logits and cache (and not call itself again)."""
    from gpt import kernels

    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, pos_encoding="rope")).eval()
    ids = torch.randint(4, tok.vocab_size, (2, 5))
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        _, past = model.decode(ids[:, :3], None, mask[:, :3])
        plain, plain_cache = model.decode(ids[:, 3:], past, mask)
        with kernels.onnx_attention():
            traced, traced_cache = model.decode(ids[:, 3:], past, mask)
    assert torch.equal(plain, traced)
    flat = [
        (a, b) for pa, pb in zip(plain_cache, traced_cache, strict=True) for a, b in zip(pa, pb, strict=True)
    ]
    assert all(torch.equal(a, b) for a, b in flat)


def test_onnx_greedy_100_tokens_equal_pytorch_generate(exported, tok):
    _, model, result = exported
    lm = load_bundle(result["bundle"])
    prompt = tok.encode("The quick brown fox")
    expected = generate(model, prompt, max_new_tokens=100)  # > block_size 64: the window slides
    cfg = GenerationConfig(max_new_tokens=100, ignore_eos=True, context_policy="sliding")
    assert lm.generate_ids([prompt], cfg)[0] == expected


def test_bundle_has_graph_io_names_and_config(exported):
    pos_encoding, model, result = exported
    bundle = result["bundle"]
    m = onnx.load(f"{bundle}/model.onnx")
    names = [i.name for i in m.graph.input]
    L = model.config.n_layer
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:-1] == [f"past_key_values.{i}.{k}" for i in range(L) for k in ("key", "value")]
    assert names[-1] == "logits_to_keep"  # optional: its initializer, 0 (every position), is the default
    assert [i.name for i in m.graph.initializer if i.name == "logits_to_keep"] == ["logits_to_keep"]
    assert [o.name for o in m.graph.output] == ["logits"] + [
        f"present.{i}.{k}" for i in range(L) for k in ("key", "value")
    ]
    assert m.opset_import[0].version >= 18
    cfg = read_json(f"{bundle}/config.json")
    assert cfg["kind"] == "lm" and cfg["model"]["pos_encoding"] == pos_encoding
    assert cfg["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    assert cfg["context_length"] == model.config.block_size
    assert cfg["parity"]["max_abs_diff"] <= 1e-4
    assert len(cfg["source_checkpoint"]["sha256"]) == 64
    assert read_json(f"{bundle}/manifest.json")["stage"] == "export"


def test_tied_embedding_is_stored_once(exported):
    _, model, result = exported
    m = onnx.load(f"{result['bundle']}/model.onnx")
    init_bytes = sum(numpy_helper.to_array(t).nbytes for t in m.graph.initializer)
    wte_bytes = model.transformer.wte.weight.numel() * 4
    buffer_bytes = sum(b.numel() * 4 for b in model.buffers())  # sinusoidal / rope tables
    assert init_bytes < result["param_bytes"] + buffer_bytes + wte_bytes // 2


@pytest.fixture(scope="module")
def trained(tok, tmp_path_factory):
    """A tiny LM trained for a few seconds on TEXT (a random one would hide what quantization
    costs), exported with int8 and int4 siblings scored on TEXT."""
    root = tmp_path_factory.mktemp("quantized")
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, pos_encoding="rope"))
    ids = torch.tensor([tok.eos_id, *tok.encode(TEXT)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    T = model.config.block_size
    for _ in range(40):  # a few seconds; more memorises TEXT (bits per byte near 0, any cost huge)
        starts = torch.randint(0, len(ids) - T - 1, (8,))
        x = torch.stack([ids[s : s + T] for s in starts])
        y = torch.stack([ids[s + 1 : s + T + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_model(root / "ckpt", model.eval(), tokenizer_hash=tok.hash)
    shutil.copyfile(tok.path, root / "ckpt" / "tokenizer.model")
    cfg = ExportConfig(quantize="int8,int4", greedy_tokens=16, parity_decode_steps=8)
    return root, export_bundle(root / "ckpt", root / "bundle", cfg, eval_text=TEXT[:3000])


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_bundles_record_their_precision_and_stay_within_the_cost_limit(trained, precision):
    _, result = trained
    cfg = read_json(f"{result[f'bundle_{precision}']}/config.json")
    cost = cfg["quality_cost"]
    assert cfg["precision"] == precision and cfg["fp32_bundle"] == "bundle"
    assert cfg["quantization"]["bits"] == int(precision[-1])
    n_embd = cfg["model"]["n_embd"]  # 64: the defaults (int8 256, int4 128) halve to divide it
    assert cfg["quantization"]["block_size"] == ExportConfig().block_size(precision, n_embd) == 64
    ops = {n.op_type for n in onnx.load(f"{result[f'bundle_{precision}']}/model.onnx").graph.node}
    assert "MatMulNBits" in ops and ("GatherBlockQuantized" in ops) == (precision == "int4")
    assert cost["bits_per_byte_fp32"] < 4.0, "the fixture did not learn; the cost would prove little"
    assert 0 <= cost["bits_per_byte_rel_increase"] <= ExportConfig().max_bpb_increase
    assert cost["top1_agreement"] >= 0.9 and 0 < cost["greedy_agreement"] <= 1
    assert result[f"size_bytes_{precision}"] < result["size_bytes"]
    g = load_bundle(result[f"bundle_{precision}"]).generate("The", max_new_tokens=8, ignore_eos=True)[0]
    assert g.completion_tokens == 8


def test_int4_is_smaller_than_int8(trained):
    _, result = trained
    assert result["size_bytes_int4"] < result["size_bytes_int8"]


def test_a_quantized_bundle_that_costs_too_much_is_refused_and_nothing_is_lost(trained):
    root, result = trained
    before = sorted(p.name for p in (root / "bundle").iterdir())
    int4 = root / "bundle-int4"
    stamp = (int4 / "model.onnx").stat().st_mtime_ns
    cfg = ExportConfig(quantize="int4", max_bpb_increase=1e-9, greedy_tokens=4, parity_decode_steps=2)
    with pytest.raises(ValueError, match="max_bpb_increase"):
        export_bundle(root / "ckpt", root / "bundle", cfg, eval_text=TEXT[:3000])
    assert sorted(p.name for p in (root / "bundle").iterdir()) == before
    assert (int4 / "model.onnx").stat().st_mtime_ns == stamp  # the previous int4 bundle is intact


CLASSIFIER_INPUT = {"prompt_template": "Topic of: {input}\n", "max_len": 16, "windows": 3}


@pytest.fixture(scope="module")
def classifier(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    model, ckpt = make_checkpoint(root / "ckpt", tok, n_classes=3, meta=CLASSIFIER_INPUT)
    return model, export_bundle(ckpt, root / "bundle"), ckpt


def test_classifier_bundle_reads_texts_as_finetuning_did(classifier, tok):
    """Same windows (template, EOS, max_len, several windows per long text) and the same mean log-probs."""
    from gpt.task_data import classification_windows
    from gpt.task_model import class_log_probs
    from gpt.tasks import Task

    model, result, _ = classifier
    assert result["kind"] == "classifier" and result["parity"]["max_abs_diff"] <= 1e-4
    clf = load_bundle(result["bundle"])
    assert clf.labels == ["class0", "class1", "class2"]
    texts = ["The quick brown fox", "sea shells", "x", TEXT[:400], ""]  # TEXT[:400]: more than 3 windows
    task = Task(
        "t", "classification", "x.csv", ("accuracy",), prompt_template=CLASSIFIER_INPUT["prompt_template"]
    )
    groups = [classification_windows(tok, task, t, 16, 3) for t in texts]
    assert [clf.input_windows(t) for t in texts] == groups
    assert [len(g) for g in groups][3] == 3 and all(len(w) <= 16 for g in groups for w in g)
    want = class_log_probs(model, groups, 4, torch.device("cpu")).exp().numpy()
    out = clf.classify(texts, batch_size=4)
    for row, probs in zip(out, want, strict=True):
        assert row["label"] == clf.labels[int(probs.argmax())]
        assert np.allclose([row["probs"][k] for k in clf.labels], probs, atol=1e-5)


def test_failed_parity_writes_no_bundle(classifier, tmp_path, monkeypatch):
    _, result, ckpt = classifier
    # Reuse the graph already exported (saves an export); parity then fails on the impossible tolerance.
    monkeypatch.setattr(
        "gpt.export.export_onnx",
        lambda model, path, opset, fused: shutil.copyfile(f"{result['bundle']}/model.onnx", path),
    )
    with pytest.raises(ValueError, match="parity check failed"):
        export_bundle(ckpt, tmp_path / "b", ExportConfig(parity_atol=1e-30))
    assert not (tmp_path / "b").exists()
    assert list(tmp_path.iterdir()) == []  # no temp directory left behind either


def test_export_refuses_missing_or_foreign_tokenizer(tok, tmp_path):
    _, ckpt = make_checkpoint(tmp_path / "ckpt", tok)
    (ckpt / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        export_bundle(ckpt, tmp_path / "b")
    other = Tokenizer.train(
        [TEXT + "zebra quokka " * 50], tmp_path / "other", TokenizerConfig(vocab_size=300)
    )
    with pytest.raises(ValueError, match="not the one the checkpoint was trained with"):
        export_bundle(ckpt, tmp_path / "b", tokenizer=other.path)
    assert not (tmp_path / "b").exists()


def test_export_config_rejects_opset_17_and_unknown_quantization():
    with pytest.raises(ValueError, match="opset"):
        ExportConfig(opset=17)
    with pytest.raises(ValueError, match="quantize"):
        ExportConfig(quantize="int3")
    with pytest.raises(ValueError, match="quant_block_size"):
        ExportConfig(quantize="int4", quant_block_size=48)


def test_the_default_block_size_divides_the_models_width():
    """MatMulNBits pads every column to whole blocks: a block that does not divide n_embd reads zeros."""
    cfg = ExportConfig()
    assert [cfg.block_size("int8", n) for n in (768, 1024, 384, 64, 96)] == [256, 256, 128, 64, 32]
    assert [cfg.block_size("int4", n) for n in (768, 384, 64)] == [128, 128, 64]
    assert cfg.block_size("int8", 200) == 256  # no power of two >= 32 divides 200: the default stays
    assert ExportConfig(quant_block_size=32).block_size("int8", 768) == 32  # a setting is taken as given


def test_cli_generates_and_classifies_from_bundles(exported, classifier, capsys):
    from gptflow.cli import main

    pos_encoding, _, result = exported
    if pos_encoding != "learned":
        pytest.skip("the CLI is checked once")
    assert main(["generate", "--bundle", result["bundle"], "The quick", "-n", "5", "--stream"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert main(["classify", "--bundle", classifier[1]["bundle"], "sea shells"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["label"] in ("class0", "class1", "class2") and abs(sum(row["probs"].values()) - 1) < 1e-5
    assert main(["classify", "--bundle", result["bundle"], "x"]) == 2  # an LM bundle cannot classify
