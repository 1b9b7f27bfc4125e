"""ONNX for gpt/export.py: the decoder's cached attention as onnxruntime's fused GroupQueryAttention,
and the rewrites of the exported graph (onnxruntime's fused kernels, last-position logits).

``gpt.kernels.cached_attention`` traces as one ``gptflow::cached_attention`` op while exporting; this
module tells torch.onnx how to write it. (No ``from __future__ import annotations`` here: onnxscript
reads the FLOAT / BOOL annotations as values.)
"""

import math

import numpy as np
import onnxscript
from onnxscript import BOOL, FLOAT, INT32
from onnxscript import opset18 as op

from gpt.bundle import LOGITS, LOGITS_TO_KEEP

MSFT = onnxscript.values.Opset("com.microsoft", 1)
MASKED = float(np.finfo(np.float32).min)  # additive bias of a key a query may not see


def attention_translation(cfg):
    """An onnxscript function for ``cfg``'s heads: q, k, v (B, T, nh, hs) viewed as (B, T, C), the
    past (B, nh, P, hs) and the boolean (B, 1, T, S) mask as an additive bias in; y (B, T, C) and the
    present out. One node appends to the cache and does the scores, the mask and the softmax.

    GroupQueryAttention (with as many key/value heads as query heads) rather than MultiHeadAttention,
    because it can write the new keys and values in place: given a past buffer of capacity >= S
    bound as its own present output, it writes only the new columns S - T .. S - 1 (``seqlens_k`` =
    S - 1 for every row; left padding is in the bias, as in the concatenating form). Given a past of
    exactly P = S - T columns it concatenates, as before. S comes from the mask alone, so the graph
    never reads the past's length."""
    heads, scale = cfg.n_head, 1.0 / math.sqrt(cfg.head_dim)

    @onnxscript.script(opset=MSFT, default_opset=op)
    def cached_attention(
        q: FLOAT, k: FLOAT, v: FLOAT, past_k: FLOAT, past_v: FLOAT, mask: BOOL
    ) -> tuple[FLOAT, FLOAT, FLOAT]:
        btc = op.Constant(value_ints=[0, 0, -1])
        bias = op.Where(mask, op.Constant(value_float=0.0), op.Constant(value_float=MASKED))
        total = op.Shape(mask, start=3, end=4)  # [S]
        seqlens = op.Expand(op.Sub(total, op.Constant(value_ints=[1])), op.Shape(mask, start=0, end=1))
        y, present_k, present_v = MSFT.GroupQueryAttention(
            op.Reshape(q, btc),
            op.Reshape(k, btc),
            op.Reshape(v, btc),
            past_k,
            past_v,
            op.Cast(seqlens, to=INT32.dtype),  # (B,): S - 1 for every row
            op.Cast(op.Squeeze(total), to=INT32.dtype),
            None,
            None,
            None,
            bias,
            num_heads=heads,
            kv_num_heads=heads,
            scale=scale,
        )
        return y, present_k, present_v

    return cached_attention


def rewrite_decoder(path, fuse: bool = True) -> dict[str, int]:
    """Rewrite the exported decoder at ``path`` in place, in one load and one save: onnxruntime's
    fused kernels (``fuse``; see ``_fuse_for_onnxruntime``) and the optional ``logits_to_keep`` input
    (``_add_logits_to_keep``). Returns how many of each rewrite was made."""
    import onnx_ir as ir

    model = ir.load(str(path))
    counts = _fuse_for_onnxruntime(model) if fuse else {}
    counts["logits_to_keep"] = _add_logits_to_keep(model)
    _save_over(model, path)
    return counts


def _fuse_for_onnxruntime(model) -> dict[str, int]:
    """Residual add (+ bias) + LayerNorm -> SkipLayerNormalization and GPT-2's tanh GELU -> FastGelu
    (onnxscript's own ORT fusion rules), each Reshape pair that only undoes itself (q/k/v viewed as
    heads, then back as (B, T, C) for the attention op) removed, and the attention reading q, k, v
    packed where they come straight from the qkv projection. Returns how many of each.

    Why: a batch-1 decode step is a few hundred small nodes, and onnxruntime's graph optimizer does
    none of these on our graph (measured, 124M shape, batch 1, int4: 370 -> 164 nodes, 4.07 -> 3.68 ms
    a step; then reading qkv packed, 152 nodes, 3.58 -> 3.42 ms in another run).
    The MatMuls are left as they are, for the weight-only quantizer to find."""
    from onnx_ir.passes.common import ShapeInferencePass
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter.ort_fusions.gelu import fuse_gelu
    from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_layer_normalization

    ShapeInferencePass()(model)
    optimize(model)
    counts = {"reshape_round_trips": _drop_reshape_round_trips(model)}
    optimize(model)
    counts["skip_layer_norm"] = fuse_skip_layer_normalization(model)
    counts["fast_gelu"] = fuse_gelu(model)
    counts["packed_qkv"] = _pack_qkv(model)
    optimize(model)
    return counts


def _save_over(model, path) -> None:
    """Save an onnx_ir ``model`` over ``path`` (and its ``.data`` external weights when it has them),
    each file written beside it first and renamed into place."""
    import os
    import tempfile
    from pathlib import Path

    import onnx_ir as ir

    path = Path(path)
    data = path.with_name(path.name + ".data")
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".rewrite-") as tmp:
        out = Path(tmp) / path.name
        ir.save(model, str(out), external_data=data.name if data.exists() else None)
        if data.exists():
            os.replace(Path(tmp) / data.name, data)
        os.replace(out, path)


_POSITION_WISE = {"Mul", "Div", "Tanh"}  # what may follow the head: a logit soft-cap


def _add_logits_to_keep(model) -> int:
    """Give the decoder an optional input ``logits_to_keep`` (int64, shape [1], default 0 = every
    position): with N > 0 the head reads only the last N positions, so a prefill that only samples
    from its last position skips the vocabulary projection of the rest (124M shape, our runtime, 8
    prompts of 256 tokens to their first token: fp32 2.44 -> 1.65 s, int8 1.92 -> 1.29 s). Callers
    that do not feed it (parity checks, scoring, onnxruntime-genai, Triton) get every position, as
    before. Returns 1, or 0 where the graph has the input already."""
    import onnx_ir as ir

    graph = model.graph
    if any(v.name == LOGITS_TO_KEEP for v in graph.inputs):
        return 0
    head = next(v for v in graph.outputs if v.name == LOGITS).producer()
    while head is not None and head.op_type in _POSITION_WISE:  # to its one computed input
        computed = [x.producer() for x in head.inputs if x is not None and x.producer() is not None]
        computed = [n for n in computed if n.op_type != "Constant"]
        head = computed[0] if len(computed) == 1 else None
    if head is None or head.op_type != "MatMul":
        raise ValueError("no MatMul found behind the decoder's logits output to slice the positions of")

    def constant(name: str, value: int) -> ir.Value:
        v = ir.Value(
            name=name,
            shape=ir.Shape([1]),
            type=ir.TensorType(ir.DataType.INT64),
            const_value=ir.tensor(np.array([value], dtype=np.int64), name=name),
        )
        graph.register_initializer(v)
        return v

    keep = constant(LOGITS_TO_KEEP, 0)
    graph.inputs.append(keep)  # an input with an initializer: optional, the initializer its default
    start = ir.node("Neg", [keep])
    sliced = ir.node(
        "Slice", [head.inputs[0], start.outputs[0], constant("keep_end", 2**63 - 1), constant("keep_axis", 1)]
    )
    graph.insert_before(head, [start, sliced])
    head.replace_input_with(0, sliced.outputs[0])
    return 1


def _drop_reshape_round_trips(model) -> int:
    """Bypass Reshape(Reshape(x)) whose output has x's own (symbolic) shape: a no-op pair."""
    dropped = 0
    for node in list(model.graph):
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx"):
            continue
        inner = node.inputs[0].producer()
        if inner is None or inner.op_type != "Reshape":
            continue
        x, y = inner.inputs[0], node.outputs[0]
        if x.shape is None or y.shape is None or x.shape != y.shape:
            continue
        if any(not isinstance(d, int) and d.value is None for d in x.shape):
            continue  # an anonymous dimension: equal names prove nothing
        if y.is_graph_output():
            continue
        y.replace_all_uses_with(x)
        dropped += 1
    return dropped


def _pack_qkv(model) -> int:
    """GroupQueryAttention(q, k, v) of the three equal outputs of one Split of X along the last axis ->
    GroupQueryAttention(X, None, None): the op's packed-qkv form, one node and one copy fewer."""
    packed = 0
    for node in model.graph:
        if node.op_type != "GroupQueryAttention" or any(x is None for x in node.inputs[:3]):
            continue
        split = node.inputs[0].producer()
        if split is None or split.op_type != "Split" or len(split.inputs) > 1:
            continue  # explicit split sizes: not necessarily q, k, v of equal width
        if split.attributes.get_int("axis", 0) not in (-1, 2) or list(split.outputs) != list(node.inputs[:3]):
            continue
        node.replace_input_with(0, split.inputs[0])
        node.replace_input_with(1, None)
        node.replace_input_with(2, None)
        packed += 1
    return packed
