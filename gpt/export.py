"""ONNX export: a checkpoint becomes a self-contained inference bundle, verified against PyTorch.

The decoder is exported as ONE graph with optimum-compatible names (``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.{i}.key/value`` -> ``logits``, ``present.{i}.key/value``); an empty
past (length 0) is the prefill. A classifier exports ``input_ids, attention_mask -> logits``.

A bundle directory holds ``model.onnx``, ``tokenizer.model``, ``config.json`` (an LM also
``genai_config.json``, for onnxruntime-genai) and, written last, ``manifest.json``; ``gpt/bundle.py``
owns their names and schemas. It is built in a temp directory and renamed into place only after
``onnx.checker`` and the parity check (onnxruntime vs PyTorch logits, greedy tokens) pass, so a bundle
that exists is a bundle that was verified. The runtime that reads it is ``deploy/runtime.py`` (no torch).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from gpt.bundle import (
    CONFIG_FILE,
    GENAI_CONFIG_FILE,
    ONNX_FILE,
    SPECIAL_IDS,
    TOKENIZER_FILE,
    BundleConfig,
    ClassifierInput,
    classifier_io_names,
    genai_config,
    lm_io_names,
)
from gpt.config import ConfigBase, _one_of, _positive, _whole
from gpt.io import MANIFEST, atomic_write_json, sha256_file, write_manifest

if TYPE_CHECKING:
    from gpt.model import GPT

# torch is imported inside the functions: the CLI builds its parser from ExportConfig without it.

log = logging.getLogger(__name__)

Quantize = Literal["none", "int8", "int4", "int8,int4"]
QUANTIZE = get_args(Quantize)
BITS = {"int8": 8, "int4": 4}
EXTERNAL_DATA_BYTES = 1_900_000_000  # protobuf's 2 GB limit, with room for the graph itself
# Weights per scale when ExportConfig.quant_block_size is 0, measured with onnxruntime 1.32 on the
# 124M shape (our runtime, batch 1) and the trained cpu-preset LM (held-out BBC text, 100 kB):
#   int8  block 256 vs 128: 180.3 vs 172.0 tok/s, 128 new tokens, same run (2026-12-05); bits per byte
#         +0.0017 % vs +0.0011 %, top-1 agreement 0.993 vs 0.994 (block 32: 55 tok/s where 128 ran 61).
#   int4  block 128: +0.23 % bits per byte, top-1 0.914; block 256 ran 2.9 % faster but +0.26 %, top-1
#         0.900; block 32 / 64 / 128 ran 126 / 147 / 161 tok/s (2026-12-03, 64 new tokens).
DEFAULT_BLOCK_SIZE = {"int8": 256, "int4": 128}


@dataclass
class ExportConfig(ConfigBase):
    """How to export a checkpoint to an ONNX bundle."""

    opset: int = 18  # ONNX opset; >= 18 (the dynamo exporter's opset 17 emits an invalid Split)
    quantize: str = "none"  # none | int8 | int4 | int8,int4: also write <out>-int8 / <out>-int4 (weight-only)
    quant_block_size: int = (
        0  # weights per scale, a power of two >= 16; 0 = int8 256 / int4 128, halved to divide n_embd
    )
    # 124M shape, int4, batch 1: accuracy level 4 ran 80.5 tok/s, level 0 39.3 (see quantize_weights).
    quant_accuracy_level: int = 4  # MatMulNBits compute: 4 = int8 activations per row and block, 0 = fp32
    max_bpb_increase: float = 0.03  # refuse a quantized LM whose eval bits per byte rise more (relative)
    parity_atol: float = 1e-4  # largest |logits(onnxruntime) - logits(PyTorch)| a bundle may have
    parity_decode_steps: int = 50  # cached decode steps compared after the padded-batch prefill
    greedy_tokens: int = 100  # greedy tokens that must equal gpt.generate's (capped by the context)
    # The decoder's cached attention as one onnxruntime GroupQueryAttention node per layer, which can
    # write the cache in place (BundleConfig.kv_cache "in_place"). 124M shape, our runtime, 2026-12-03,
    # same run, in-place vs concatenating steps over that graph: batch 1 fp32 / int8 / int4 46.3 /
    # 152.0 / 163.1 vs 45.8 / 116.3 / 144.6 tok/s, batch 8 245.8 / 419.4 / 369.9 vs 201.8 / 358.5 /
    # 305.3. onnxruntime has CUDA kernels for it in fp16/bf16 only: on CUDA an fp32 graph's attention
    # runs on the CPU provider (correct, slower; export --no-fused-attention there). Off: the
    # exporter's own concat / matmul / softmax nodes, which runtimes other than onnxruntime read.
    fused_attention: bool = True
    add_bos: bool = False  # prompts start with BOS, not EOS (pretraining puts EOS before documents)
    seed: int = 0  # seed for the random parity prompts

    def __post_init__(self) -> None:
        if not isinstance(self.opset, int) or self.opset < 18:
            raise ValueError(
                f"ExportConfig.opset={self.opset!r} must be an integer >= 18 "
                "(opset 17 with the dynamo exporter produces an invalid Split)"
            )
        _one_of(self, "quantize", QUANTIZE)
        _positive(self, "parity_atol", "max_bpb_increase")
        b = self.quant_block_size
        if not isinstance(b, int) or (b != 0 and (b < 16 or b & (b - 1))):
            raise ValueError(f"ExportConfig.quant_block_size={b!r} must be 0 or a power of two >= 16")
        _one_of(self, "quant_accuracy_level", (0, 1, 2, 3, 4))

    def block_size(self, precision: str, n_embd: int = 0) -> int:
        """Weights per scale for ``precision``: ``quant_block_size`` when set; else the largest of
        ``DEFAULT_BLOCK_SIZE``, its half, ... (not below 32) that divides ``n_embd``, every quantized
        matrix's input width being n_embd or 4 * n_embd; the default itself when none does.
        MatMulNBits pads each column to whole blocks: at n_embd 384 a block of 256 would read 33 %
        more weight bytes than one of 128."""
        if self.quant_block_size:
            return self.quant_block_size
        block = DEFAULT_BLOCK_SIZE[precision]
        while n_embd % block and block > 32:
            block //= 2
        return block if n_embd % block == 0 else DEFAULT_BLOCK_SIZE[precision]

    @property
    def precisions(self) -> list[str]:
        """The quantized siblings to write, in order."""
        return [] if self.quantize == "none" else self.quantize.split(",")
        _whole(self, "parity_decode_steps", "greedy_tokens", "seed")


# --------------------------------------------------------------------------------------------
# The graph


def export_onnx(model: GPT, path: Path, opset: int = 18, fused_attention: bool = True) -> Path:
    """Write ``model`` as one ONNX graph (decoder with KV cache, or classifier) to ``path``.

    ``fused_attention``: the decoder's cached attention becomes one onnxruntime GroupQueryAttention
    node per layer (``gpt.onnx_ops``) instead of the exporter's concat, matmul, mask and
    softmax nodes, and residual + LayerNorm and GELU become onnxruntime's fused kernels too."""
    import torch
    import torch.nn as nn

    from gpt import kernels
    from gpt.onnx_ops import attention_translation, rewrite_decoder

    class DecoderForExport(nn.Module):
        """``GPT.decode`` with the cache as nested lists (the exporter flattens them in order)."""

        def __init__(self, model: GPT):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, past_key_values):
            past = [(k, v) for k, v in past_key_values]
            logits, presents = self.model.decode(input_ids, past, attention_mask, position_ids)
            return logits, [[k, v] for k, v in presents]

    class ClassifierForExport(nn.Module):
        def __init__(self, model: GPT):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model.classify(input_ids, attention_mask)

    cfg = model.config
    model = model.eval().cpu()
    Dim = torch.export.Dim
    batch, seq, past = Dim("batch_size"), Dim("sequence_length"), Dim("past_sequence_length")
    # Example sizes >= 2 so that torch.export does not specialise a dimension to 0 or 1.
    B, T, P = 2, 3, 4
    ids = torch.randint(4, cfg.vocab_size, (B, T))
    if cfg.n_classes > 0:
        wrapper: torch.nn.Module = ClassifierForExport(model)
        args: tuple = (ids, torch.ones(B, T, dtype=torch.long))
        dynamic: Any = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
        inputs, outputs = classifier_io_names()
    else:
        wrapper = DecoderForExport(model)
        kv = [
            [torch.zeros(B, cfg.n_head, P, cfg.head_dim), torch.zeros(B, cfg.n_head, P, cfg.head_dim)]
            for _ in range(cfg.n_layer)
        ]
        pos = torch.arange(P, P + T).expand(B, T)
        args = (ids, torch.ones(B, P + T, dtype=torch.long), pos, kv)
        dynamic = {
            "input_ids": {0: batch, 1: seq},
            # past + seq: torch.export derives the relation from the model's own shape checks.
            "attention_mask": {0: batch, 1: Dim.DYNAMIC},
            "position_ids": {0: batch, 1: seq},
            "past_key_values": [[{0: batch, 2: past}, {0: batch, 2: past}] for _ in range(cfg.n_layer)],
        }
        inputs, outputs = lm_io_names(cfg.n_layer)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = param_bytes > EXTERNAL_DATA_BYTES
    fuse = fused_attention and cfg.n_classes == 0
    table = {torch.ops.gptflow.cached_attention.default: attention_translation(cfg)} if fuse else None
    fusing = kernels.onnx_attention() if fuse else contextlib.nullcontext()
    with torch.no_grad(), _quiet_exporter(), fusing:
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            dynamic_shapes=dynamic,
            input_names=inputs,
            output_names=outputs,
            opset_version=opset,
            external_data=external,
            custom_translation_table=table,
            verbose=False,
        )
    program.save(str(path), external_data=external)
    if cfg.n_classes == 0:
        log.debug("decoder rewrites: %s", rewrite_decoder(path, fuse=fuse))
        _name_mask_axis(path, external)
    return path


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints progress lines and logs every optimizer pass at INFO; keep them at DEBUG."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)  # also its "torchvision is not installed" warnings
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if out.getvalue():
            log.debug("exporter output:\n%s", out.getvalue())


def _name_mask_axis(path: Path, external: bool) -> None:
    """Give attention_mask's second axis a readable symbol (the exporter names it like 's53')."""
    import onnx

    if external:
        return  # rewriting a > 2 GB model just for a name is not worth it
    m = onnx.load(str(path))
    for value in m.graph.input:
        if value.name == "attention_mask":
            value.type.tensor_type.shape.dim[1].dim_param = "past_sequence_length + sequence_length"
    onnx.save(m, str(path))


# --------------------------------------------------------------------------------------------
# Parity: onnxruntime vs PyTorch on the same inputs.


def _no_grad(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


def _ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _random_prompts(cfg, lengths: list[int], gen) -> list[list[int]]:
    """Random prompts of the given lengths (ids >= 4, never special)."""
    import torch

    return [torch.randint(4, cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths]


@_no_grad
def lm_parity(model: GPT, onnx_path: Path, decode_steps: int = 50, seed: int = 0) -> dict[str, Any]:
    """Max |Δlogits| over a prefill of a left-padded batch of different lengths, then cached steps.

    The PyTorch side is ``gpt.generate.KVBatch`` (the loop generation uses); onnxruntime is fed the
    same inputs, PyTorch's greedy choice included, so that the caches stay comparable.
    """
    import torch

    from gpt.generate import KVBatch

    cfg = model.config
    sess = _ort_session(onnx_path)
    gen = torch.Generator().manual_seed(seed)
    longest = max(3, min(13, cfg.block_size // 4))
    lengths = [longest, max(1, longest // 2), longest - 2]
    steps = min(decode_steps, cfg.block_size - longest)
    batch = KVBatch(model)
    logits = batch.prefill(_random_prompts(cfg, lengths, gen))
    empty = np.zeros((len(lengths), cfg.n_head, 0, cfg.head_dim), dtype=np.float32)
    in_names, out_names = lm_io_names(cfg.n_layer)
    ort_past = [empty] * (2 * cfg.n_layer)
    prefill_delta, decode_delta = 0.0, 0.0
    for step in range(steps + 1):
        if step:
            logits = batch.step(logits[:, -1, :].argmax(-1))
        ids, mask, pos = (t.numpy() for t in batch.inputs)
        out = sess.run(out_names, dict(zip(in_names, [ids, mask, pos, *ort_past], strict=True)))
        diff = np.abs(out[0] - logits.numpy())  # (B, T, V)
        if step == 0:
            prefill_delta = float(diff[mask.astype(bool)].max())  # padded rows are never used
        else:
            decode_delta = max(decode_delta, float(diff.max()))
        ort_past = out[1:]
    return {
        "prefill_max_abs_diff": prefill_delta,
        "decode_max_abs_diff": decode_delta,
        "max_abs_diff": max(prefill_delta, decode_delta),
        "batch_lengths": lengths,
        "decode_steps": steps,
    }


@_no_grad
def greedy_parity(model: GPT, bundle_dir: Path, n_tokens: int, atol: float, seed: int = 0) -> dict[str, Any]:
    """Greedy tokens from the torch-free runtime vs ``gpt.generate``, within one context window.

    A mismatch is accepted only where PyTorch's top two logits are closer than the tolerance (a
    tie that float rounding may break either way); it is reported as such.
    """
    import torch

    from deploy.runtime import GenerationConfig, load_bundle
    from gpt.generate import generate

    cfg = model.config
    gen = torch.Generator().manual_seed(seed + 1)
    n_prompt = max(1, min(8, cfg.block_size // 4))
    prompt = torch.randint(4, cfg.vocab_size, (n_prompt,), generator=gen).tolist()
    n = min(n_tokens, cfg.block_size - n_prompt)
    expected = generate(model, prompt, max_new_tokens=n)
    lm = load_bundle(bundle_dir, providers=["CPUExecutionProvider"])
    got = lm.generate_ids([prompt], GenerationConfig(max_new_tokens=n, ignore_eos=True))[0]
    result: dict[str, Any] = {"greedy_tokens": n, "greedy_identical": got == expected}
    if got != expected:
        i = next((j for j, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), min(len(got), n))
        logits = model(torch.tensor([prompt + expected[:i]]))[0, -1]
        top2 = torch.topk(logits, 2).values
        margin = float(top2[0] - top2[1])
        result.update(first_mismatch=i, top2_margin=margin, tie=margin <= 2 * atol)
    return result


@_no_grad
def classifier_parity(model: GPT, onnx_path: Path, seed: int = 0) -> dict[str, Any]:
    import torch

    from gpt.generate import left_pad

    cfg = model.config
    sess = _ort_session(onnx_path)
    gen = torch.Generator().manual_seed(seed)
    longest = max(3, min(24, cfg.block_size))
    ids, mask = left_pad(
        _random_prompts(cfg, [longest, max(1, longest // 2), longest - 2], gen), cfg.pad_token_id
    )
    out = sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    ref = model.classify(ids, mask).numpy()
    return {
        "max_abs_diff": float(np.abs(out - ref).max()),
        "argmax_identical": bool((out.argmax(-1) == ref.argmax(-1)).all()),
    }


# --------------------------------------------------------------------------------------------
# Quantization


def _fold_weight_transposes(src: Path, dst: Path) -> None:
    """Replace Transpose(initializer) by a transposed initializer, so that the quantizers see the
    tied LM head as a MatMul weight. (The fp32 graph keeps the Transpose: its weight is stored once.)"""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    inits = {x.name: x for x in m.graph.initializer}
    for node in list(m.graph.node):
        if node.op_type == "Transpose" and node.input[0] in inits:
            arr = numpy_helper.to_array(inits[node.input[0]])
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            folded = np.ascontiguousarray(arr.transpose(perm) if perm else arr.T)
            m.graph.initializer.append(numpy_helper.from_array(folded, node.output[0]))
            m.graph.node.remove(node)
    onnx.save(m, str(dst))


def quantize_weights(
    src: Path, dst: Path, bits: int, block_size: int = 32, accuracy_level: int = 4
) -> dict[str, Any]:
    """Weight-only, block-wise round-to-nearest quantization (onnxruntime's ``MatMulNBitsQuantizer``):
    every MatMul weight becomes a ``MatMulNBits`` of ``bits`` bits with one fp32 scale per
    ``block_size`` inputs (symmetric, no zero points); at 4 bits the embedding Gather is quantized
    too (``GatherBlockQuantized``; the quantizer does not do 8-bit Gathers). Activations stay fp32 in
    the graph; ``accuracy_level`` 4 lets the kernel quantize each row's activations per block to int8,
    which depends on that row only: a row decodes the same alone or in a batch, unlike
    ``quantize_dynamic``'s one scale per tensor. Returns what the bundle records as ``quantization``."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    ops = ("MatMul", "Gather") if bits == 4 else ("MatMul",)
    pre = dst.with_name("pre_quant.onnx")
    _fold_weight_transposes(src, pre)
    settings = dict(block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level, bits=bits)
    algo = DefaultWeightOnlyQuantConfig(**settings, op_types_to_quantize=ops)
    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level, quiet.level = quiet.level, logging.WARNING  # it logs every node at INFO
    try:
        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(pre)), **settings, op_types_to_quantize=ops, algo_config=algo
        )
        with np.errstate(divide="ignore", invalid="ignore"):  # all-zero blocks (it handles them)
            quantizer.process()
        external = pre.stat().st_size > EXTERNAL_DATA_BYTES
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=external)
    finally:
        quiet.level = level
        pre.unlink(missing_ok=True)
    return {
        "method": "onnxruntime.MatMulNBitsQuantizer (RTN, symmetric)",
        "bits": bits,
        "block_size": block_size,
        "accuracy_level": accuracy_level,
        "op_types": list(ops),
    }


def quantize_int8(src: Path, dst: Path) -> None:
    """``quantize_dynamic`` int8 (one activation scale per tensor): what optimum and most tools
    ship; our int8 bundles use ``quantize_weights(bits=8)`` instead. Kept for comparisons."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    pre = dst.with_name("pre_quant.onnx")
    _fold_weight_transposes(src, pre)
    logging.getLogger().disabled, was = True, logging.getLogger().disabled  # quiet its pre-process hint
    try:
        quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8)
    finally:
        logging.getLogger().disabled = was
        pre.unlink(missing_ok=True)


def _quality_cost(
    fp32_dir: Path, q_dir: Path, precision: str, kind: str, eval_text: str | None, seed: int
) -> dict:
    """What quantization costs: for an LM bits per byte on ``eval_text`` and the share of its tokens
    whose top-1 prediction stays the same; for a classifier label agreement; for both the logits
    gap on random prompts."""
    from deploy.runtime import load_bundle

    fp32 = load_bundle(fp32_dir, providers=["CPUExecutionProvider"])
    quant = load_bundle(q_dir, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    n = max(2, min(32, fp32.max_context))
    ids = rng.integers(4, fp32.config.vocab_size, size=(4, n)).tolist()
    a, b = fp32.logits(ids), quant.logits(ids)
    cost: dict[str, Any] = {
        "max_abs_logit_diff": float(np.abs(a - b).max()),
        "top1_agreement_random": float((a.argmax(-1) == b.argmax(-1)).mean()),
    }
    if kind == "lm":
        cost["greedy_agreement"] = _greedy_agreement(fp32, quant, eval_text)
    if eval_text and kind == "lm":
        bpb32, bpbq = fp32.bits_per_byte(eval_text), quant.bits_per_byte(eval_text)
        cost.update(
            eval_bytes=len(eval_text.encode("utf-8")),
            bits_per_byte_fp32=bpb32,
            **{f"bits_per_byte_{precision}": bpbq},
            bits_per_byte_rel_increase=(bpbq - bpb32) / bpb32,
            top1_agreement=_top1_agreement(fp32, quant, eval_text),
        )
    elif eval_text and kind == "classifier":
        texts = [t for t in eval_text.splitlines() if t.strip()]
        pa, pb = fp32.classify(texts), quant.classify(texts)
        cost.update(
            eval_texts=len(texts),
            label_agreement=float(np.mean([x["label"] == y["label"] for x, y in zip(pa, pb, strict=True)])),
            max_prob_diff=float(
                max(
                    abs(x["probs"][k] - y["probs"][k])
                    for x, y in zip(pa, pb, strict=True)
                    for k in x["probs"]
                )
            ),
        )
    else:
        cost["note"] = "no eval text given: pass eval_text (--eval-text FILE) to measure bits per byte"
    return cost


def _greedy_agreement(fp32, quant, text: str | None, n: int = 32) -> float:
    """How far the quantized model's greedy continuation follows fp32's: the shared prefix of
    ``n`` greedy tokens after each of 4 prompts (from ``text``, else the start token), over 4 * n."""
    from deploy.runtime import GenerationConfig

    n = max(1, min(n, fp32.max_context // 2))
    ids = fp32.encode(text) if text else []
    room = fp32.max_context - n - 1
    prompts = [ids[i * room : i * room + min(room, 16)] or [fp32.start_id] for i in range(4)]
    cfg = GenerationConfig(max_new_tokens=n, ignore_eos=True)
    shared = 0
    for x, y in zip(fp32.generate_ids(prompts, cfg), quant.generate_ids(prompts, cfg), strict=True):
        shared += next((i for i, (u, v) in enumerate(zip(x, y, strict=True)) if u != v), n)
    return shared / (4 * n)


def _top1_agreement(fp32, quant, text: str, max_windows: int = 8) -> float:
    """Share of the text's positions (up to ``max_windows`` context windows) where both models'
    most likely next token is the same."""
    ids = fp32.encode(text)
    w = fp32.max_context
    windows = [ids[s : s + w] for s in range(0, len(ids), w)][:max_windows]
    same = total = 0
    for win in windows:
        a, b = fp32.logits([win])[0], quant.logits([win])[0]
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(win)
    return same / total if total else float("nan")


# --------------------------------------------------------------------------------------------
# The stage


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` onto ``out``; an existing ``out`` must be a bundle (or empty) to be replaced."""
    if out.exists():
        if any(out.iterdir()) and not (out / MANIFEST).is_file() and not (out / CONFIG_FILE).is_file():
            raise FileExistsError(f"{out} exists and is not a bundle; choose another --out or remove it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _classifier_input(meta: dict, block_size: int) -> ClassifierInput:
    """How finetuning encoded a text (gpt.bundle.classification_windows), for the runtime to repeat."""
    return ClassifierInput(
        prompt_template=str(meta.get("prompt_template") or "{input}"),
        max_len=int(min(meta.get("max_len") or block_size, block_size)),
        windows=int(meta.get("windows") or 1),
    )


def _labels(meta: dict, n_classes: int) -> list[str]:
    labels = meta.get("labels")
    if labels is None:
        log.warning("checkpoint has no 'labels'; naming classes 0..%d", n_classes - 1)
        return [str(i) for i in range(n_classes)]
    if len(labels) != n_classes:
        raise ValueError(
            f"checkpoint labels {labels} has {len(labels)} names but the head has n_classes={n_classes}; "
            "fix 'labels' in model.json"
        )
    return [str(x) for x in labels]


def _tokenizer_file(checkpoint_dir: Path, meta: dict, tokenizer: Path | None) -> tuple[Path, str]:
    path = Path(tokenizer) if tokenizer else checkpoint_dir / TOKENIZER_FILE
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer not found: {path}; put the sentencepiece model the checkpoint was trained with "
            f"beside it as {TOKENIZER_FILE}, or pass --tokenizer PATH"
        )
    digest = sha256_file(path)
    expected = meta.get("tokenizer_hash")
    if expected and expected != digest:
        raise ValueError(
            f"tokenizer {path} (sha256 {digest[:12]}) is not the one the checkpoint was trained with "
            f"(tokenizer_hash {str(expected)[:12]}); pass the matching tokenizer with --tokenizer"
        )
    return path, digest


def export_bundle(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    config: ExportConfig | None = None,
    eval_text: str | None = None,
    tokenizer: str | Path | None = None,
) -> dict[str, Any]:
    """Export ``checkpoint_dir`` to a verified bundle at ``out_dir`` (and ``<out_dir>-int8`` /
    ``<out_dir>-int4`` if asked).

    Returns ``{"bundle", "bundle_int8"?, "kind", "parity", "size_bytes", "param_bytes", ...}``.
    Raises ``ValueError`` (and writes nothing) when the graph fails ``onnx.checker`` or parity.
    """
    import onnx

    from gpt.checkpoint import WEIGHTS, load_model, read_model_meta

    config = config or ExportConfig()
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    meta = read_model_meta(checkpoint_dir)
    tok_path, tok_sha = _tokenizer_file(checkpoint_dir, meta, tokenizer)
    model, meta = load_model(checkpoint_dir)
    cfg = model.config
    kind = "classifier" if cfg.n_classes > 0 else "lm"
    labels = _labels(meta, cfg.n_classes) if kind == "classifier" else None
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        t0 = time.perf_counter()
        onnx_path = export_onnx(model, tmp / ONNX_FILE, config.opset, config.fused_attention)
        export_s = time.perf_counter() - t0
        onnx.checker.check_model(str(onnx_path), full_check=True)
        shutil.copyfile(tok_path, tmp / TOKENIZER_FILE)
        bundle_config = BundleConfig(
            kind=kind,
            model=cfg.to_dict(),
            tokenizer_hash=tok_sha,
            special_ids=dict(SPECIAL_IDS),
            add_bos=config.add_bos,
            labels=labels,
            classifier_input=_classifier_input(meta, cfg.block_size) if kind == "classifier" else None,
            generation=meta.get("generation") if kind == "lm" else None,
            kv_cache="in_place" if kind == "lm" and config.fused_attention else "concat",
            opset=config.opset,
            io={"inputs": [i.name for i in onnx.load(str(onnx_path), load_external_data=False).graph.input]},
            source_checkpoint={
                "path": str(checkpoint_dir.resolve()),
                "sha256": sha256_file(checkpoint_dir / WEIGHTS),
                "tokenizer_hash": meta.get("tokenizer_hash"),
            },
            export_config=config.to_dict(),
            versions=_versions(),
        )
        bundle_config.write(tmp)  # the runtime reads it during the greedy check
        if kind == "lm":
            atomic_write_json(tmp / GENAI_CONFIG_FILE, genai_config(bundle_config))

        t0 = time.perf_counter()
        if kind == "lm":
            parity = lm_parity(model, onnx_path, config.parity_decode_steps, config.seed)
            parity.update(greedy_parity(model, tmp, config.greedy_tokens, config.parity_atol, config.seed))
            greedy_ok = parity["greedy_identical"] or parity.get("tie", False)
        else:
            parity = classifier_parity(model, onnx_path, config.seed)
            greedy_ok = parity["argmax_identical"]
        parity["atol"] = config.parity_atol
        parity["seconds"] = round(time.perf_counter() - t0, 3)
        if not (parity["max_abs_diff"] <= config.parity_atol and greedy_ok):
            raise ValueError(
                f"ONNX parity check failed for {checkpoint_dir}: {parity}; no bundle was written. "
                "If only the tolerance is exceeded, a larger --parity-atol may be justified; otherwise "
                "the export is wrong (report it)"
            )
        size = (tmp / ONNX_FILE).stat().st_size
        bundle_config.parity, bundle_config.size_bytes, bundle_config.param_bytes = parity, size, param_bytes
        bundle_config.write(tmp)
        result: dict[str, Any] = {
            "bundle": str(out_dir),
            "kind": kind,
            "parity": parity,
            "size_bytes": size,
            "param_bytes": param_bytes,
            "export_seconds": round(export_s, 3),
        }
        write_manifest(
            tmp,
            stage="export",
            config=config.to_dict(),
            inputs={
                "checkpoint": str(checkpoint_dir),
                "weights_sha256": bundle_config.source_checkpoint["sha256"],
            },
            files={n: {"sha256": sha256_file(tmp / n)} for n in (ONNX_FILE, TOKENIZER_FILE, CONFIG_FILE)},
            metrics={"parity_max_abs_diff": parity["max_abs_diff"], "size_bytes": size},
        )
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "exported %s (%s, %.1f MB, %.1f MB of parameters), parity max |Δlogits| %.2e",
        out_dir,
        kind,
        size / 1e6,
        param_bytes / 1e6,
        parity["max_abs_diff"],
    )
    for precision in config.precisions:
        result.update(_export_quantized(out_dir, precision, config, kind, eval_text))
    return result


def _export_quantized(
    fp32_dir: Path, precision: str, config: ExportConfig, kind: str, eval_text: str | None
) -> dict[str, Any]:
    """Write ``<fp32_dir>-<precision>`` from the verified fp32 bundle; refuse it (writing nothing)
    when its bits per byte on ``eval_text`` rise more than ``config.max_bpb_increase``."""
    out = fp32_dir.with_name(f"{fp32_dir.name}-{precision}")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        import onnx

        cfg = BundleConfig.read(fp32_dir)
        how = quantize_weights(
            fp32_dir / ONNX_FILE,
            tmp / ONNX_FILE,
            BITS[precision],
            config.block_size(precision, cfg.model["n_embd"]),
            config.quant_accuracy_level,
        )
        onnx.checker.check_model(str(tmp / ONNX_FILE))
        shutil.copyfile(fp32_dir / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        if (fp32_dir / GENAI_CONFIG_FILE).is_file():  # same inputs and outputs
            shutil.copyfile(fp32_dir / GENAI_CONFIG_FILE, tmp / GENAI_CONFIG_FILE)
        cfg.precision, cfg.quantization = precision, how
        graph = onnx.load(str(tmp / ONNX_FILE), load_external_data=False)
        cfg.opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))  # int4: 21
        cfg.parity = None  # not expected to match PyTorch to 1e-4; its cost is measured below
        cfg.write(tmp)
        cost = _quality_cost(fp32_dir, tmp, precision, kind, eval_text, config.seed)
        rise = cost.get("bits_per_byte_rel_increase")
        if rise is not None and rise > config.max_bpb_increase:
            raise ValueError(
                f"{precision} raises bits per byte on the eval text by {100 * rise:.2f} % "
                f"(fp32 {cost['bits_per_byte_fp32']:.4f}, {precision} {cost[f'bits_per_byte_{precision}']:.4f}), "
                f"more than max_bpb_increase={config.max_bpb_increase}; no {out.name} was written "
                "(a smaller --quant-block-size costs less; a larger --max-bpb-increase accepts it)"
            )
        size = (tmp / ONNX_FILE).stat().st_size
        cfg.quality_cost, cfg.size_bytes, cfg.fp32_bundle = cost, size, fp32_dir.name
        cfg.write(tmp)
        write_manifest(
            tmp,
            stage=f"export-{precision}",
            inputs={"fp32_bundle": str(fp32_dir), "onnx_sha256": sha256_file(fp32_dir / ONNX_FILE)},
            files={n: {"sha256": sha256_file(tmp / n)} for n in (ONNX_FILE, TOKENIZER_FILE, CONFIG_FILE)},
            metrics={**{k: v for k, v in cost.items() if isinstance(v, int | float)}, "size_bytes": size},
        )
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s bundle %s (%.1f MB), quality cost %s", precision, out, size / 1e6, cost)
    return {
        f"bundle_{precision}": str(out),
        f"quality_cost_{precision}": cost,
        f"size_bytes_{precision}": size,
    }


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
