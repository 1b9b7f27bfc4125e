"""The GPT: a decoder-only transformer, readable top to bottom.

H0 = E[x] + P; L pre-LN blocks (causal self-attention, then a GELU MLP, each with a residual);
a final LayerNorm and an LM head trained with next-token cross-entropy. Options from the speedrun
recipes (modded-nanogpt), all off by default: a ReLU² MLP, QK-norm, zero-initialised output
projections and a soft cap on the logits. Parameter names follow GPT-2 / Hugging Face
(``transformer.wte``, ``transformer.h.{i}.attn.c_attn``, ``ln_f``...) so that loading a GPT-2
checkpoint is a name mapping (plus a transpose of HF's Conv1D weights). The CPU fast
paths for attention and GELU (the same functions, other kernels) live in ``gpt/kernels.py``.

Shapes: B batch, T new tokens, P cached (past) tokens, S = P + T keys, C n_embd, nh heads, hs head size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.config import ModelConfig
from gpt.kernels import _GeluSigmoid as _GeluSigmoid  # re-exported: tests name it as gpt.model's
from gpt.kernels import cached_attention, gelu_tanh
from gpt.kernels import causal_attention_matmul as causal_attention_matmul  # re-exported, likewise

# One (key, value) pair per layer, each (B, nh, P, hs).
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)); (n_pos, dim)."""
    pos = torch.arange(n_pos, dtype=torch.float64).unsqueeze(1)  # (n_pos, 1)
    two_i = torch.arange(0, dim, 2, dtype=torch.float64)  # (dim/2,)
    angle = pos / torch.pow(10000.0, two_i / dim)  # (n_pos, dim/2)
    table = torch.zeros(n_pos, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle)
    return table.float()


def rope_tables(n_pos: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for rotary embeddings (half-split layout, as in GPT-NeoX/Llama); each (n_pos, hs/2)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angle = torch.arange(n_pos, dtype=torch.float64).unsqueeze(1) * inv_freq  # (n_pos, hs/2)
    return torch.cos(angle).float(), torch.sin(angle).float()


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2, the MLP nonlinearity of the modded-nanogpt speedrun (activation="relu2")."""
    return F.relu(x).square()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, nh, hs) by per-position angles; cos/sin are (B, T, 1, hs/2) or (T, 1, hs/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class HeadRMSNorm(nn.RMSNorm):
    """RMSNorm whose gain takes the input's dtype: under bf16 autocast, a bf16 input with an fp32 gain
    would miss the fused kernel (PyTorch warns and falls back to the unfused ops)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # QK-norm: RMSNorm over each head's hs features, one learned gain shared by the heads.
        self.q_norm = HeadRMSNorm(config.head_dim, eps=config.layer_norm_eps) if config.qk_norm else None
        self.k_norm = HeadRMSNorm(config.head_dim, eps=config.layer_norm_eps) if config.qk_norm else None
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        q, k, v = (t.view(B, T, nh, hs) for t in self.c_attn(x).split(self.n_embd, dim=2))  # (B, T, nh, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # the cache keeps normalised keys
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        dropout_p = self.dropout if self.training else 0.0
        y, present = cached_attention(q, k, v, past, mask, dropout_p)  # (B, T, C), cache (B, nh, S, hs)
        return self.resid_dropout(self.c_proj(y)), present


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.act = relu_squared if config.activation == "relu2" else gelu_tanh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope, mask, past):
        a, present = self.attn(self.ln_1(x), rope, mask, past)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        modules = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
        )
        if config.pos_encoding == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        self.score = nn.Linear(config.n_embd, config.n_classes, bias=False) if config.n_classes > 0 else None

        # Fixed tables are buffers, not parameters, and are not saved (persistent=False).
        if config.pos_encoding == "sinusoidal":
            self.register_buffer(
                "pos_table", sinusoidal_table(config.block_size, config.n_embd), persistent=False
            )
        if config.pos_encoding == "rope":
            cos, sin = rope_tables(config.block_size, config.head_dim, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2L) so the residual stream's variance stays put.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
                if config.zero_init_proj:  # after the draw, so that every other weight is as without it
                    nn.init.zeros_(p)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ----------------------------------------------------------------------------------------
    # Sizes

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Unique parameters (tied weights once). ``non_embedding`` drops token/position tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel()
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs per token (PaLM appendix B): 2N forward (+4N backward) plus attention scores.

        N counts the weights that take part in a matmul: the blocks and the LM head (the embedding
        lookup costs no FLOPs; with tied weights the head still multiplies).
        """
        cfg = self.config
        T = seq_len or cfg.block_size
        n_matmul = self.num_parameters(non_embedding=True) + cfg.vocab_size * cfg.n_embd
        attn = 2 * cfg.n_layer * T * cfg.n_embd  # q@k^T and att@v per token, forward, x2 flops per MAC
        forward = 2 * n_matmul + attn
        return 3 * forward if training else forward

    # ----------------------------------------------------------------------------------------
    # Forward passes

    def _position_rows(
        self, table: torch.Tensor, position_ids: torch.Tensor | None, past_len: int, T: int
    ) -> torch.Tensor:
        """Rows of a per-position table for the new tokens: (T, d) by default, else (B, T, d).

        Default positions (continuing after the past) are a slice, whose backward is a sum over the
        batch; looking ids up scatters instead, which compiled CPU code does with slow atomic adds
        (nanoGPT's CPU shape: that backward kernel took 0.94 ms of a 22 ms step, the slice 0.25 ms).
        """
        if position_ids is None:
            if past_len + T > table.size(0):
                raise ValueError(
                    f"positions {past_len}..{past_len + T - 1} exceed block_size {table.size(0)}"
                )
            return table[past_len : past_len + T]
        return F.embedding(position_ids, table)

    def hidden_states(
        self,
        idx: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Final-norm hidden states (B, T, C) and the per-layer (key, value) cache (B, nh, S, hs).

        ``attention_mask`` is (B, S) with 1 for real tokens and 0 for padding, over past + new tokens.
        ``position_ids`` is (B, T); by default positions continue after the past.
        """
        B, T = idx.shape
        past_len = 0 if not past_key_values else past_key_values[0][0].size(2)
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.pos_encoding == "learned":
            x = x + self._position_rows(self.transformer.wpe.weight, position_ids, past_len, T)
        elif self.config.pos_encoding == "sinusoidal":
            x = x + self._position_rows(self.pos_table, position_ids, past_len, T)
        rope = None
        if self.config.pos_encoding == "rope":
            cos = self._position_rows(self.rope_cos, position_ids, past_len, T)  # ([B,] T, hs/2)
            sin = self._position_rows(self.rope_sin, position_ids, past_len, T)
            rope = (cos.unsqueeze(-2), sin.unsqueeze(-2))  # ([B,] T, 1, hs/2): broadcast over heads
        x = self.transformer.drop(x)

        mask = None
        if attention_mask is not None or past_len > 0:
            # Columns from the mask when there is one, so that the exported graph never reads the
            # cache's length: a runtime may pass a buffer longer than its tokens (gpt/onnx_ops.py).
            mask_past = past_len if attention_mask is None else attention_mask.size(1) - T
            mask = self._attention_mask(attention_mask, B, T, mask_past, idx.device)
        presents: KVCache = []
        for i, block in enumerate(self.transformer.h):
            x, present = block(x, rope, mask, past_key_values[i] if past_key_values else None)
            presents.append(present)
        return self.transformer.ln_f(x), presents

    @staticmethod
    def _attention_mask(attention_mask, B: int, T: int, past_len: int, device) -> torch.Tensor:
        """Boolean (B, 1, T, S) mask: causal over absolute positions, minus padded keys.

        A query may always see its own key, so that a padded query row is never fully masked
        (which would make softmax NaN and poison the cache); its output is never used.
        """
        S = past_len + T
        k_pos = torch.arange(S, device=device)  # (S,)
        q_pos = torch.arange(T, device=device) + past_len  # (T,)
        causal = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)  # (T, S)
        mask = causal.unsqueeze(0).unsqueeze(0)  # (1, 1, T, S)
        if attention_mask is not None:
            keep = attention_mask.to(torch.bool).view(B, 1, 1, S)
            diag = k_pos.unsqueeze(0) == q_pos.unsqueeze(1)  # (T, S)
            mask = (mask & keep) | diag
        return mask

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """LM-head logits (..., vocab) of hidden states (..., C), soft-capped if the config says so."""
        logits = self.lm_head(h)
        cap = self.config.logit_softcap
        if cap:
            # In fp32 under autocast: near the cap bf16 cannot tell logits apart (its step at 30 is 0.125).
            logits = cap * torch.tanh(logits.float() / cap)
        return logits

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ):
        """Logits (B, T, vocab); with ``targets`` (B, T) also the mean cross-entropy (ignore_index -100)."""
        if idx.size(1) > self.config.block_size:
            raise ValueError(f"sequence length {idx.size(1)} exceeds block_size {self.config.block_size}")
        h, _ = self.hidden_states(idx, attention_mask, position_ids)
        logits = self.lm_logits(h)  # (B, T, vocab)
        if targets is None:
            return logits
        loss = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100
        )
        return logits, loss

    def decode(
        self,
        idx: torch.Tensor,
        past_key_values: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """One incremental step: logits (B, T, vocab) for the new tokens and the updated cache."""
        h, presents = self.hidden_states(idx, attention_mask, position_ids, past_key_values)
        return self.lm_logits(h), presents

    def classify(
        self,
        idx: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        class_weights: torch.Tensor | None = None,
    ):
        """Class logits (B, n_classes) from the pooled hidden states; with ``labels`` also the loss.

        ``config.pooling``: "last" pools at the last non-pad token (left or right padding: the last
        index whose mask is 1); "mean" averages the non-pad tokens. Without a mask, tokens equal to
        ``config.pad_token_id`` count as padding.
        """
        if self.score is None:
            raise ValueError("this model has no classification head; build it with ModelConfig.n_classes > 0")
        if attention_mask is None:
            attention_mask = (idx != self.config.pad_token_id).long()
        B, T = idx.shape
        # Left padding shifts positions so that the first real token is at position 0.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        h, _ = self.hidden_states(idx, attention_mask, position_ids)  # (B, T, C)
        if self.config.pooling == "mean":
            m = attention_mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
            pooled = (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # (B, C)
        else:
            ar = torch.arange(T, device=idx.device)
            last = (attention_mask.long() * ar).argmax(dim=-1)  # (B,) index of the last real token
            pooled = h[torch.arange(B, device=idx.device), last]  # (B, C)
        logits = self.score(pooled)  # (B, n_classes)
        if labels is None:
            return logits
        return logits, F.cross_entropy(logits.float(), labels, weight=class_weights)

    # ----------------------------------------------------------------------------------------
    # Loading Hugging Face GPT-2

    @classmethod
    def from_hf_gpt2(cls, path: str | Path) -> GPT:
        """Load a local Hugging Face GPT-2 directory (config.json + model.safetensors or pytorch_model.bin)."""
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"no config.json in {path}; expected a Hugging Face GPT-2 directory")
        hf = json.loads(cfg_file.read_text(encoding="utf-8"))
        if hf.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"{cfg_file}: model_type={hf.get('model_type')!r}, expected 'gpt2'")
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(
                f"{cfg_file}: activation_function={act!r} is not supported (GPT-2 uses gelu_new)"
            )
        config = ModelConfig(
            vocab_size=hf["vocab_size"],
            block_size=hf["n_positions"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            dropout=0.0,
            bias=True,
            pos_encoding="learned",
            tie_weights=hf.get("tie_word_embeddings", True),
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        )
        sd_hf = _load_hf_state_dict(path)
        model = cls(config)
        sd = model.state_dict()
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        loaded = set()
        for name, tensor in sd_hf.items():
            key = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
            if key.endswith((".attn.bias", ".attn.masked_bias")) or key not in sd:
                continue  # HF's causal-mask buffers; we build masks on the fly
            if key.endswith(transposed):
                tensor = tensor.t()  # HF Conv1D stores (in, out); nn.Linear wants (out, in)
            if tensor.shape != sd[key].shape:
                raise ValueError(
                    f"{path}: {name} has shape {tuple(tensor.shape)}, expected {tuple(sd[key].shape)}"
                )
            sd[key].copy_(tensor)
            loaded.add(key)
        missing = [k for k in sd if k not in loaded and not (k == "lm_head.weight" and config.tie_weights)]
        if missing:
            raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
        return model.eval()


def _load_hf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read weights without executing pickle: safetensors, else torch.load(weights_only=True)."""
    st = path / "model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    pt = path / "pytorch_model.bin"
    if pt.is_file():
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")
