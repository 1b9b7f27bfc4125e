"""The decoder's cached attention as onnxruntime's fused GroupQueryAttention, for gpt/export.py.

``gpt.kernels.cached_attention`` traces as one ``gptflow::cached_attention`` op while exporting; this
module tells torch.onnx how to write it. (No ``from __future__ import annotations`` here: onnxscript
reads the FLOAT / BOOL annotations as values.)
"""

import math

import numpy as np
import onnxscript
from onnxscript import BOOL, FLOAT, INT32
from onnxscript import opset18 as op

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
