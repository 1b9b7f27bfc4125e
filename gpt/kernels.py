"""The model's two hot spots, attention and GELU, kept out of ``gpt/model.py``.

Each is the same function as the plain PyTorch call it replaces (tests/test_model.py checks values
and gradients); they differ only in which kernels run: under torch.compile on CPU, and under CPU
bf16 autocast. Eager fp32 and CUDA take the plain calls; ONNX export too, except that a decode
step's cached attention traces as one op (``cached_attention``), written as onnxruntime's fused
attention (tests/test_export.py checks parity).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

# Longest sequence for which compiled CPU code writes causal attention out as matmuls (see below).
MATMUL_ATTENTION_MAX_T = 128


def use_matmul_attention(q: torch.Tensor) -> bool:
    """Whether to compute plain causal attention with ``causal_attention_matmul`` instead of SDPA.

    Only on CPU under torch.compile (not export), and only for short sequences. There inductor fuses
    the scale, mask and softmax around two batched matmuls, which beats the flash kernel when heads are
    small. Measured bf16 training steps: nanoGPT's CPU shape (T 64, hs 32) 21.6 -> 20.6 ms, the cpu
    preset's width at T 128 (hs 64) 6-16 % faster, at T 256 4 % slower. Eager mode keeps SDPA (faster
    there), and so do longer sequences, where the (T, T) scores this form stores cost memory too.
    Under bf16 autocast the forward runs in fp32 like SDPA's, but AOTAutograd traces the backward under
    the surrounding autocast, so its four matmuls run in bf16 (as eager bf16 attention would).
    """
    return (
        q.device.type == "cpu"
        and q.size(-2) <= MATMUL_ATTENTION_MAX_T
        and torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
    )


def causal_attention_matmul(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs) + causal mask) v, written out: (B, nh, T, hs) each -> (B, nh, T, hs)."""
    B, nh, T, hs = q.shape
    q, k, v = (t.reshape(B * nh, T, hs) for t in (q, k, v))
    mask = torch.full((T, T), float("-inf"), device=q.device, dtype=q.dtype).triu(1)  # -inf above diag
    att = torch.baddbmm(mask, q, k.transpose(1, 2), alpha=1.0 / math.sqrt(hs))  # (B*nh, T, T)
    att = F.dropout(att.softmax(dim=-1), dropout_p)
    return torch.bmm(att, v).view(B, nh, T, hs)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs) + mask) v in q's dtype: q (B, nh, T, hs), k and v (B, nh, S, hs).

    ``mask`` None means plain causal attention (training, a prefill without padding); otherwise a
    boolean (B or 1, 1, T, S) mask of the keys each query may see.
    """
    dtype = q.dtype
    fp32 = dtype == torch.bfloat16 and q.device.type == "cpu"
    if fp32:
        # torch 2.13's bf16 flash-attention backward on CPU is ~6x slower than fp32 (measured);
        # the matmuls around it stay bf16. Autocast would cast back to bf16, so it is paused.
        q, k, v = q.float(), k.float(), v.float()
    with torch.autocast("cpu", enabled=False) if fp32 else contextlib.nullcontext():
        if mask is None and use_matmul_attention(q):
            y = causal_attention_matmul(q, k, v, dropout_p)
        elif mask is None:  # the fused kernel builds the causal mask itself
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return y.to(dtype)


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past: tuple[torch.Tensor, torch.Tensor] | None,
    mask: torch.Tensor | None,
    dropout_p: float,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Append the new keys and values to the cache, then attend: q, k, v (B, T, nh, hs) and a past
    (B, nh, P, hs) -> y (B, T, nh * hs) and the cache (B, nh, P + T, hs).

    Inside ``onnx_attention()`` a step with a cache is one ``gptflow::cached_attention`` op, which
    gpt/export.py writes as onnxruntime's fused GroupQueryAttention; everywhere else it is the concat
    and ``attention`` below (what the op itself runs in PyTorch).
    """
    if _ONNX_ATTENTION and past is not None and mask is not None:
        y, k, v = torch.ops.gptflow.cached_attention(q, k, v, past[0], past[1], mask)
        return y, (k, v)
    return _attend_with_cache(q, k, v, past, mask, dropout_p)


def _attend_with_cache(q, k, v, past, mask, dropout_p):
    B, T, nh, hs = q.shape
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs)
    if past is not None:
        k = torch.cat([past[0], k], dim=2)  # (B, nh, S, hs)
        v = torch.cat([past[1], v], dim=2)
    y = attention(q, k, v, mask, dropout_p)  # (B, nh, T, hs)
    return y.transpose(1, 2).reshape(B, T, nh * hs), (k, v)


@torch.library.custom_op("gptflow::cached_attention", mutates_args=())
def _cached_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, (k, v) = _attend_with_cache(q, k, v, (past_k, past_v), mask, 0.0)  # never the op again
    return y, k, v


@_cached_attention_op.register_fake
def _(q, k, v, past_k, past_v, mask):
    B, T, nh, hs = q.shape
    S = past_k.shape[2] + T
    return q.new_empty(B, T, nh * hs), past_k.new_empty(B, nh, S, hs), past_v.new_empty(B, nh, S, hs)


_ONNX_ATTENTION = False


@contextlib.contextmanager
def onnx_attention():
    """Trace cached attention as the one ``gptflow::cached_attention`` op (for gpt/export.py)."""
    global _ONNX_ATTENTION
    was, _ONNX_ATTENTION = _ONNX_ATTENTION, True
    try:
        yield
    finally:
        _ONNX_ATTENTION = was


GELU_2K = 2.0 * math.sqrt(2.0 / math.pi)
GELU_C = 0.044715


class _GeluSigmoid(torch.autograd.Function):
    """x * sigmoid(2z), z = sqrt(2/pi) (x + 0.044715 x^3), keeping sigmoid(2z) for the backward.

    Left to itself, inductor saves x and recomputes the sigmoid (an exp and a division per element)
    in the backward kernel; keeping it turns that kernel into a few multiplies: the MLP's GELU
    fwd + bwd kernels went 1.52 -> 1.14 ms per step at nanoGPT's CPU shape (measured, bf16).
    d/dx = s + x s (1 - s) * 2 dz/dx, with 2 dz/dx = GELU_2K (1 + 3 * 0.044715 x^2). Under bf16
    autocast s is kept in bf16, like the other saved activations.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(GELU_2K * (x + GELU_C * x * x * x))
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, s = ctx.saved_tensors
        dz = GELU_2K * (1.0 + 3.0 * GELU_C * x * x)
        return grad * (s + x * s * (1.0 - s) * dz)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's "gelu_new": 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    Eager mode (and ONNX export) uses PyTorch's kernel. Under torch.compile the same function is
    written with 0.5 (1 + tanh z) = sigmoid(2z), because inductor's CPU code for tanh is slow: on a bf16
    (768, 512) input the sigmoid form compiled 2.6x faster forward, 1.9x with backward (measured).
    """
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        return _GeluSigmoid.apply(x)
    return F.gelu(x, approximate="tanh")
