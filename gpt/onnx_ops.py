"""The decoder's cached attention as onnxruntime's fused MultiHeadAttention, for gpt/export.py.

``gpt.kernels.cached_attention`` traces as one ``gptflow::cached_attention`` op while exporting; this
module tells torch.onnx how to write it. (No ``from __future__ import annotations`` here: onnxscript
reads the FLOAT / BOOL annotations as values.)
"""

import math

import numpy as np
import onnxscript
from onnxscript import BOOL, FLOAT
from onnxscript import opset18 as op

MSFT = onnxscript.values.Opset("com.microsoft", 1)
MASKED = float(np.finfo(np.float32).min)  # additive bias of a key a query may not see


def attention_translation(cfg):
    """An onnxscript function for ``cfg``'s heads: q, k, v (B, T, nh, hs) viewed as (B, T, C), the
    past (B, nh, P, hs) and the boolean (B, 1, T, S) mask as an additive bias in; y (B, T, C) and the
    present (B, nh, S, hs) out. One node does the concat, the scores, the mask and the softmax (CPU and
    CUDA kernels); onnxruntime-genai runs the graph as before, its inputs and outputs unchanged."""
    heads, scale = cfg.n_head, 1.0 / math.sqrt(cfg.head_dim)

    @onnxscript.script(opset=MSFT, default_opset=op)
    def cached_attention(
        q: FLOAT, k: FLOAT, v: FLOAT, past_k: FLOAT, past_v: FLOAT, mask: BOOL
    ) -> tuple[FLOAT, FLOAT, FLOAT]:
        btc = op.Constant(value_ints=[0, 0, -1])
        bias = op.Where(mask, op.Constant(value_float=0.0), op.Constant(value_float=MASKED))
        y, present_k, present_v = MSFT.MultiHeadAttention(
            op.Reshape(q, btc),
            op.Reshape(k, btc),
            op.Reshape(v, btc),
            None,
            None,
            bias,
            past_k,
            past_v,
            num_heads=heads,
            scale=scale,
        )
        return y, present_k, present_v

    return cached_attention
