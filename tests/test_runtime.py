"""The torch-free runtime: batching, streaming of multi-byte text, stops, context policies, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy import runtime
from deploy.runtime import DecodeBatch, GenerationConfig, load_bundle
from gpt.checkpoint import save_model
from gpt.config import ModelConfig
from gpt.export import ExportConfig, export_bundle, quantize_int8, quantize_weights
from gpt.model import GPT
from gpt.tokenizer import Tokenizer, TokenizerConfig

ROOT = Path(__file__).resolve().parents[1]
TEXT = (
    "The quick brown fox jumps over the lazy dog. Markets rose as investors cheered the news.\n"
    "She sells sea shells by the sea shore; the shells she sells are surely sea shells.\n"
) * 40
# English-only tokenizer: these characters come out as 3- and 4-byte fallback sequences.
MULTIBYTE = " 你好，世界！😀🎉 ok 数据"
FAST = ExportConfig(parity_decode_steps=4, greedy_tokens=8)  # full parity is tested in test_export.py


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer.train([TEXT], tmp_path_factory.mktemp("tok"), TokenizerConfig(vocab_size=300))


def _export(model: GPT, tok: Tokenizer, root: Path) -> Path:
    save_model(root / "ckpt", model, tokenizer_hash=tok.hash)
    shutil.copyfile(tok.path, root / "ckpt" / "tokenizer.model")
    return Path(export_bundle(root / "ckpt", root / "bundle", FAST)["bundle"])


@pytest.fixture(scope="module")
def random_lm(tok, tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, pos_encoding="rope")).eval()
    return load_bundle(_export(model, tok, tmp_path_factory.mktemp("lm")))


@pytest.fixture(scope="module")
def scripted_lm(tok, tmp_path_factory):
    """A model whose greedy output after the prompt "The" is MULTIBYTE then EOS.

    Blocks contribute nothing (zeroed output projections), so the residual stream is the one-hot
    position embedding; the LM head maps position q to the token wanted after it.
    """
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, tie_weights=False)
    model = GPT(cfg).eval()
    script = tok.encode(MULTIBYTE) + [tok.eos_id]
    # The prompt is EOS + "The": the position of its last token gives the first new token.
    start = len(tok.encode("The"))
    with torch.no_grad():
        for block in model.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
        model.transformer.wte.weight.zero_()
        model.transformer.wpe.weight.copy_(torch.eye(cfg.block_size, cfg.n_embd))
        model.lm_head.weight.zero_()
        for i, token in enumerate(script):
            model.lm_head.weight[token, start + i] += 10.0
        for q in range(start + len(script), cfg.block_size):
            model.lm_head.weight[tok.eos_id, q] += 10.0
    return load_bundle(_export(model, tok, tmp_path_factory.mktemp("scripted")))


def test_streamed_pieces_join_to_generated_text_for_chinese_and_emoji(scripted_lm):
    prompt = "The"
    g = scripted_lm.generate(prompt, max_new_tokens=60)[0]
    assert g.text == MULTIBYTE and g.finish_reason == "stop"
    pieces = list(scripted_lm.stream(prompt, max_new_tokens=60))
    assert "".join(pieces) == g.text
    assert all("\ufffd" not in p for p in pieces)  # no piece ends inside a UTF-8 character
    assert len(pieces) > 5


def test_stop_string_ends_text_and_stream_agrees(scripted_lm):
    g = scripted_lm.generate("The", max_new_tokens=60, stop=["世界"])[0]
    assert g.text == " 你好，" and g.finish_reason == "stop"
    assert "".join(scripted_lm.stream("The", max_new_tokens=60, stop=["世界"])) == g.text


def test_stream_stops_when_consumer_stops(scripted_lm):
    stream = scripted_lm.stream("The", max_new_tokens=60)
    first = next(stream)
    stream.close()  # must not raise, and the generator is finished
    assert first and next(stream, None) is None


@pytest.fixture(scope="module")
def quantized_lms(random_lm, tmp_path_factory) -> dict:
    """random_lm's bundle as our int8 and int4 siblings (the graphs `gptflow export --quantize` writes)."""
    root = tmp_path_factory.mktemp("quantized")
    lms = {"fp32": random_lm}
    for precision, bits in (("int8", 8), ("int4", 4)):
        out = root / precision
        shutil.copytree(random_lm.bundle, out)
        quantize_weights(random_lm.bundle / "model.onnx", out / "model.onnx", bits)
        lms[precision] = load_bundle(out)
    return lms


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_batch_of_four_prompts_gives_each_prompt_alone_tokens(quantized_lms, precision):
    # A row decodes the same alone or among others (the server batches strangers together): the
    # quantized graphs scale activations per row, never over the batch.
    lm = quantized_lms[precision]
    prompts = ["The quick brown fox", "sea", "Markets rose as investors cheered the news", ""]
    cfg = GenerationConfig(max_new_tokens=20, ignore_eos=True)
    batch = lm.generate(prompts, cfg)
    for prompt, got in zip(prompts, batch, strict=True):
        assert got.token_ids == lm.generate(prompt, cfg)[0].token_ids
    assert len({tuple(g.token_ids) for g in batch}) > 1, "degenerate outputs would prove little"
    assert batch[3].prompt_tokens == 1  # an empty prompt is the start token alone


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_a_rows_logits_do_not_depend_on_its_batch_mates_unlike_dynamic_int8(
    quantized_lms, random_lm, tmp_path, precision
):
    # quantize_dynamic (optimum's int8) takes one activation scale over the whole batch, so the same
    # row's logits move with its batch-mates; our bundles' graphs do not. If the first assertion
    # starts to fail, onnxruntime changed and the choice in gpt.export.quantize_weights deserves a look.
    out = tmp_path / "dynamic"
    shutil.copytree(random_lm.bundle, out)
    quantize_int8(random_lm.bundle / "model.onnx", out / "model.onnx")
    row = random_lm.encode("The quick brown fox")
    loud = [4 + (i * 37) % 290 for i in range(len(row))]
    for lm, moves in ((load_bundle(out), True), (quantized_lms[precision], False)):
        shift = np.abs(lm.logits([row])[0] - lm.logits([row, loud])[0]).max()
        assert (shift > 1e-4) if moves else (shift <= 1e-5), (lm.config.precision, shift)


def test_prompts_start_with_eos_as_pretraining_documents_do_unless_the_bundle_asks_for_bos(
    random_lm, tmp_path
):
    ids = random_lm.encode("The quick")
    assert random_lm._prompt_ids("The quick") == [random_lm.eos_id, *ids]
    cfg = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    g = random_lm.generate("The quick", cfg)[0]
    assert g.prompt_tokens == len(ids) + 1
    assert g.token_ids == random_lm.generate_ids([[random_lm.eos_id, *ids]], cfg)[0]
    assert random_lm.generate_ids([[]], cfg) == random_lm.generate_ids([[random_lm.eos_id]], cfg)
    bos = tmp_path / "bos"
    shutil.copytree(random_lm.bundle, bos)
    config = json.loads((bos / "config.json").read_text())
    (bos / "config.json").write_text(json.dumps({**config, "add_bos": True}))
    assert load_bundle(bos)._prompt_ids("The quick") == [random_lm.bos_id, *ids]


def test_sampling_is_reproducible_with_a_seed_and_respects_top_k(random_lm):
    cfg = GenerationConfig(max_new_tokens=30, temperature=1.0, top_k=3, top_p=0.9, seed=7, ignore_eos=True)
    a = random_lm.generate("The quick", cfg)[0].token_ids
    assert a == random_lm.generate("The quick", cfg)[0].token_ids
    greedy = random_lm.generate("The quick", max_new_tokens=30, ignore_eos=True)[0].token_ids
    assert a != greedy or len(set(a)) > 1  # sampling does not silently fall back to greedy


def test_repetition_penalty_changes_a_repetitive_greedy_output(random_lm):
    plain = random_lm.generate("sea", max_new_tokens=30, ignore_eos=True)[0].token_ids
    penalized = random_lm.generate("sea", max_new_tokens=30, ignore_eos=True, repetition_penalty=5.0)[
        0
    ].token_ids
    assert len(set(penalized)) > len(set(plain))


def test_no_repeat_guard_decodes_as_torch_does_and_defaults_to_the_bundles_setting(random_lm, tmp_path):
    from gpt.bundle import BundleConfig
    from gpt.generate import generate_batch

    torch.manual_seed(0)  # the random_lm fixture's weights
    model = GPT(ModelConfig.preset("tiny", vocab_size=random_lm.vocab_size, pos_encoding="rope")).eval()
    prompt = [random_lm.start_id, *random_lm.encode("sea")]
    torch_ids = generate_batch(model, [prompt], max_new_tokens=30, no_repeat_ngram_size=2)[0]
    cfg = GenerationConfig(max_new_tokens=30, ignore_eos=True, no_repeat_ngram_size=2)
    assert random_lm.generate_ids([prompt], cfg)[0] == torch_ids
    plain = random_lm.generate_ids([prompt], max_new_tokens=30, ignore_eos=True)[0]
    assert plain != torch_ids  # the guard changed this output
    bundle = tmp_path / "bundle"
    shutil.copytree(random_lm.bundle, bundle)
    config = BundleConfig.read(bundle)
    config.generation = {"no_repeat_ngram_size": 2}
    config.write(bundle)
    lm = load_bundle(bundle)
    assert lm.generate_ids([prompt], max_new_tokens=30, ignore_eos=True)[0] == torch_ids
    assert lm.generate_ids([prompt], GenerationConfig(max_new_tokens=30, ignore_eos=True))[0] == plain
    config.generation = {"no_repeat_ngram_sise": 2}
    with pytest.raises(ValueError, match="no_repeat_ngram_sise"):
        config.write(bundle)


def test_context_overflow_errors_or_slides_by_policy(random_lm):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 10
    assert len(random_lm.encode(long_prompt)) > random_lm.max_context
    with pytest.raises(ValueError, match="context_policy='sliding'"):
        random_lm.generate(long_prompt, max_new_tokens=5)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        random_lm.generate("The", max_new_tokens=random_lm.max_context)  # prompt fits, output does not
    g = random_lm.generate(long_prompt, max_new_tokens=80, context_policy="sliding", ignore_eos=True)[0]
    assert g.completion_tokens == 80 and g.prompt_tokens == random_lm.max_context


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"max_new_tokens": -1},
        {"repetition_penalty": 0.0},
        {"context_policy": "truncate"},
        {"stop": [""]},
    ],
)
def test_invalid_sampling_values_are_rejected(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        GenerationConfig(**bad)


def test_bundle_without_tokenizer_or_with_a_foreign_one_is_refused(random_lm, tmp_path):
    broken = tmp_path / "b"
    shutil.copytree(random_lm.bundle, broken)
    (broken / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_bundle(broken)
    other = Tokenizer.train(
        [TEXT + "zebra quokka " * 50], tmp_path / "other", TokenizerConfig(vocab_size=300)
    )
    shutil.copyfile(other.path, broken / "tokenizer.model")
    with pytest.raises(ValueError, match="not the tokenizer this model was exported with"):
        load_bundle(broken)


def test_bits_per_byte_is_positive_and_scores_long_text(random_lm):
    bpb = random_lm.bits_per_byte(TEXT[:600])  # longer than the context: scored in windows
    assert 0 < bpb < 20
    assert len(random_lm.logprobs(TEXT[:600])) == len(random_lm.encode(TEXT[:600]))


@pytest.mark.slow
def test_runtime_and_infer_script_work_where_torch_cannot_be_imported(random_lm, tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None  # import torch fails\n")
    env = {**os.environ, "PYTHONPATH": str(shim)}
    code = (
        "import sys\n"
        "try:\n    import torch\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('torch importable')\n"
        f"sys.path.insert(0, {str(ROOT / 'deploy')!r})\n"
        "import runtime, json\n"
        f"lm = runtime.load_bundle({str(random_lm.bundle)!r})\n"
        "g = lm.generate(['The quick', 'sea'], max_new_tokens=6, ignore_eos=True)\n"
        "print(json.dumps([x.completion_tokens for x in g]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [6, 6]
    script = [sys.executable, str(ROOT / "deploy" / "infer.py"), "--bundle", str(random_lm.bundle)]
    out = subprocess.run(
        [*script, "The quick", "-n", "8", "--stream"], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_an_in_place_cache_decodes_as_the_concatenating_one(random_lm, monkeypatch):
    """Decode steps that write into the cache buffers give the concatenating steps' logits, through
    rows of different lengths joining mid-way, leaving early, and buffers that run out of room."""
    assert random_lm.in_place_cache  # the default export writes an in-place graph
    concat = load_bundle(random_lm.bundle, providers=["CPUExecutionProvider"])
    concat.kv_in_place = False
    monkeypatch.setattr(runtime, "KV_ROOM", 3)  # regrow every few steps
    logits = {}
    for lm in (random_lm, concat):
        seen = logits.setdefault(lm.in_place_cache, [])
        forward = lm._forward

        def record(*args, forward=forward, seen=seen, **kw):
            out = forward(*args, **kw)
            seen.append(out[0][:, -1].copy())
            return out

        monkeypatch.setattr(lm, "_forward", record)
        batch = DecodeBatch(lm)
        rows = [
            lm.new_row(lm.encode(t), GenerationConfig(max_new_tokens=n, ignore_eos=True))
            for t, n in (("The quick brown fox", 12), ("sea", 5), ("a b c d e f g", 20))
        ]
        batch.join(rows[:2])
        for _ in range(4):
            batch.step()
        batch.join(rows[2:])
        while batch.rows:
            batch.step()
    assert len(logits[True]) == len(logits[False]) > 20
    for a, b in zip(logits[True], logits[False], strict=True):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-6


def test_a_prefill_asks_only_for_the_logits_it_samples_from(random_lm):
    """The graph's optional logits_to_keep: a generating prefill gets the last position's logits
    (the vocabulary projection of the others skipped); unfed, every position's, as scoring needs."""
    plain = load_bundle(random_lm.bundle, providers=["CPUExecutionProvider"])
    plain.use_io_binding = False
    assert random_lm.keeps_last and plain.keeps_last
    ids = np.array([[1, 40, 41, 42, 43], [0, 0, 1, 50, 51]], dtype=np.int64)
    mask = (ids > 0).astype(np.int64)
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    for lm in (random_lm, plain):
        full, _ = lm._forward(ids, mask, pos, lm._empty_past(2))
        last, _ = lm._forward(ids, mask, pos, lm._empty_past(2), last_only=True)
        assert full.shape == (2, 5, lm.vocab_size) and last.shape == (2, 1, lm.vocab_size)
        assert np.abs(last[:, 0] - full[:, -1]).max() <= 1e-5
    assert random_lm.logits([[1, 40, 41]]).shape == (1, 3, random_lm.vocab_size)
    # Generation reads only the last position, so nothing it returns changes; the tokens equal torch's
    # (export's greedy parity) and the plain step's (below).
    calls = []
    real = random_lm._forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(random_lm, "_forward", lambda *a, **k: calls.append(k.get("last_only")) or real(*a, **k))
        random_lm.generate_ids([[1, 40, 41]], GenerationConfig(max_new_tokens=3, ignore_eos=True))
    assert calls[0] is True  # the prefill


def test_lean_step_gives_the_plain_steps_logits_and_tokens(random_lm):
    # The lean step (IOBinding, cache kept in OrtValues, logits written into numpy) is the default;
    # plain session.run with fresh numpy arrays is the reference.
    plain = load_bundle(random_lm.bundle, providers=["CPUExecutionProvider"])
    plain.use_io_binding = False
    assert random_lm.use_io_binding
    ids = np.array([[1, 40, 41, 42], [1, 50, 51, 52]], dtype=np.int64)
    mask, pos = np.ones((2, 4), np.int64), np.broadcast_to(np.arange(4), (2, 4)).astype(np.int64)
    past_a, past_b = random_lm._empty_past(2), plain._empty_past(2)
    for step in range(6):
        a, past_a = random_lm._forward(ids, mask, pos, past_a)
        b, past_b = plain._forward(ids, mask, pos, past_b)
        assert np.abs(a - b).max() <= 1e-6, step
        ids = a[:, -1:].argmax(-1)
        mask = np.ones((2, mask.shape[1] + 1), np.int64)
        pos = pos[:, -1:] + 1
    assert not isinstance(past_a[0], np.ndarray)  # the cache never left onnxruntime
    cfg = GenerationConfig(max_new_tokens=20, ignore_eos=True)
    prompts = ["The quick brown fox", "sea"]
    assert [g.token_ids for g in plain.generate(prompts, cfg)] == [
        g.token_ids for g in random_lm.generate(prompts, cfg)
    ]
