"""Properties of the GPT: causality, KV-cache parity, positions, size, heads, and that it learns."""

import math

import pytest
import torch
from lm_fixtures import decode_stepwise

import gpt.model as gm
from gpt.config import ModelConfig
from gpt.model import GPT, causal_attention_matmul, gelu_tanh, sinusoidal_table

POS = ["learned", "sinusoidal", "rope"]


def tiny(pos_encoding="learned", **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig.preset("tiny", pos_encoding=pos_encoding, **kw)).eval()


@pytest.mark.parametrize("pos", POS)
def test_future_tokens_do_not_change_past_logits(pos):
    model = tiny(pos)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, model.config.vocab_size, (2, 32), generator=g)
    base = model(x)
    for t in (0, 7, 31):
        changed = x.clone()
        changed[:, t] = (changed[:, t] + 1) % model.config.vocab_size
        out = model(changed)
        assert torch.allclose(out[:, :t], base[:, :t], atol=1e-6, rtol=0), (
            f"logits before position {t} changed"
        )
        assert not torch.allclose(out[:, t], base[:, t]), "the changed position itself must change"


@pytest.mark.parametrize("pos", POS)
def test_kv_cache_prefill_plus_30_steps_matches_full_forward(pos):
    model = tiny(pos)
    x = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(2))
    full = model(x)
    stepwise, past = decode_stepwise(model, x, prefill=10)
    assert past[0][0].shape == (3, model.config.n_head, 40, model.config.head_dim)
    assert (stepwise - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("pos", POS)
def test_left_padding_with_mask_and_positions_matches_unpadded(pos):
    model = tiny(pos)
    x = torch.randint(4, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    ref = model(x)
    pad = 5
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), x], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], dim=1)
    pos_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(padded, attention_mask=mask, position_ids=pos_ids)
    assert torch.isfinite(out).all()
    assert (out[:, pad:] - ref).abs().max().item() <= 1e-5


def test_sinusoidal_table_matches_the_formula():
    n_pos, d = 50, 16
    table = sinusoidal_table(n_pos, d)
    for pos in (0, 1, 17, 49):
        for i in range(d // 2):
            angle = pos / (10000 ** (2 * i / d))
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoidal_model_has_no_position_parameters():
    model = tiny("sinusoidal")
    assert "transformer.wpe.weight" not in dict(model.named_parameters())
    assert "pos_table" not in model.state_dict()  # fixed, rebuilt at load time


def test_gpt2_124m_preset_has_exactly_124439808_parameters():
    with torch.device("meta"):
        model = GPT(ModelConfig.preset("gpt2-124m"))
    assert model.config.pos_encoding == "learned" and model.config.tie_weights
    assert model.num_parameters() == 124_439_808


def test_tied_head_shares_the_embedding():
    model = tiny()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    untied = tiny(tie_weights=False)
    assert untied.num_parameters() == model.num_parameters() + model.config.vocab_size * model.config.n_embd


def test_residual_projections_use_scaled_init():
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", n_layer=8, n_embd=256, n_head=4))
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.1)
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_loss_ignores_minus_100_targets():
    model = tiny()
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    y = torch.randint(0, model.config.vocab_size, (2, 16))
    logits, loss = model(x, y)
    masked = y.clone()
    masked[:, :8] = -100
    _, loss_masked = model(x, masked)
    expected = torch.nn.functional.cross_entropy(
        logits[:, 8:].reshape(-1, logits.size(-1)), y[:, 8:].reshape(-1)
    )
    assert loss_masked.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() != pytest.approx(loss_masked.item(), rel=1e-3)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_classification_head_ignores_left_and_right_padding(pooling):
    model = tiny(n_classes=3, pooling=pooling)
    x = torch.randint(4, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(4))
    ref = model.classify(x)
    assert ref.shape == (1, 3)
    zeros = torch.zeros(1, 4, dtype=torch.long)
    right = model.classify(torch.cat([x, zeros], 1), attention_mask=torch.cat([torch.ones_like(x), zeros], 1))
    left = model.classify(torch.cat([zeros, x], 1), attention_mask=torch.cat([zeros, torch.ones_like(x)], 1))
    assert torch.allclose(right, ref, atol=1e-5)
    assert torch.allclose(left, ref, atol=1e-5)


def test_mean_pooling_averages_the_real_tokens_hidden_states():
    model = tiny(n_classes=3, pooling="mean")
    x = torch.randint(4, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(x)
    mask[1, 6:] = 0
    h, _ = model.hidden_states(x, mask, (mask.cumsum(-1) - 1).clamp(min=0))
    expected = torch.stack([h[0].mean(0), h[1, :6].mean(0)]) @ model.score.weight.t()
    assert torch.allclose(model.classify(x, mask), expected, atol=1e-5)


def test_classify_without_head_is_a_clear_error():
    with pytest.raises(ValueError, match="n_classes"):
        tiny().classify(torch.zeros(1, 4, dtype=torch.long))


def test_flops_per_token_counts_forward_and_backward():
    model = tiny()
    cfg = model.config
    fwd = model.flops_per_token(training=False)
    assert model.flops_per_token(training=True) == pytest.approx(3 * fwd)
    n = model.num_parameters(non_embedding=True) + cfg.vocab_size * cfg.n_embd
    assert fwd == pytest.approx(2 * n + 2 * cfg.n_layer * cfg.block_size * cfg.n_embd)


def test_tiny_model_overfits_two_fixed_batches():
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=64, block_size=32))
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 64, (4, 33), generator=g) for _ in range(2)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(300):
        data = batches[step % 2]
        _, loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        final = max(model(b[:, :-1], b[:, 1:])[1].item() for b in batches)
    assert final < 0.1, f"tiny model failed to memorise 2 batches: loss {final:.3f}"


def test_bf16_autocast_on_cpu_tracks_fp32_and_keeps_the_cache_usable():
    model = tiny()
    x = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(7))
    ref_logits, ref_loss = model(x, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(x, x)
        loss.backward()
        _, past = model.decode(x[:, :8])
        step, _ = model.decode(x[:, 8:9], past)
    assert abs(loss.item() - ref_loss.item()) < 0.05
    assert (logits.float() - ref_logits).abs().max().item() < 0.1
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert (step.float()[:, 0] - ref_logits[:, 8]).abs().max().item() < 0.1


def test_compiled_model_matches_eager_logits_and_gradients():
    """Compiled on CPU, the model takes another GELU formula and writes attention out as matmuls
    (gpt.model.gelu_tanh, causal_attention_matmul); the results must not move."""
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=64, n_layer=1, dropout=0.0))
    x = torch.randint(0, 64, (2, 16))
    _, loss = model(x, x)
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    logits, loss_c = torch.compile(model)(x, x)
    loss_c.backward()
    torch.testing.assert_close(logits, model(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_c, loss, atol=1e-6, rtol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-5, rtol=1e-4, msg=n)


def test_matmul_attention_matches_sdpa_values_and_gradients():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 20, 8, dtype=torch.float64, generator=g) for _ in range(3))
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    y = causal_attention_matmul(*ours)
    y_ref = torch.nn.functional.scaled_dot_product_attention(*ref, is_causal=True)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)
    (y * y_ref.detach()).sum().backward()
    (y_ref * y_ref.detach()).sum().backward()
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("pos", POS)
def test_positions_past_block_size_are_a_clear_error(pos):
    model = tiny(pos)
    n = model.config.block_size
    _, past = model.decode(torch.zeros(1, n - 1, dtype=torch.long))
    model.decode(torch.zeros(1, 1, dtype=torch.long), past)  # position n - 1: the last one
    _, past = model.decode(torch.zeros(1, n, dtype=torch.long))
    with pytest.raises(ValueError, match=f"exceed block_size {n}"):
        model.decode(torch.zeros(1, 1, dtype=torch.long), past)


def test_gelu_tanh_forms_agree():
    x = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    sigmoid_form = x * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))
    torch.testing.assert_close(gelu_tanh(x), sigmoid_form, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.compile(gelu_tanh)(x), sigmoid_form, atol=1e-12, rtol=0)


def test_gelu_tanh_gradient_compiled_matches_pytorch_gelu():
    """The compiled form has a hand-written backward (gpt.model._GeluSigmoid); check it against autograd."""
    x = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    grad_out = torch.randn(4001, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ref = x.clone().requires_grad_()
    torch.nn.functional.gelu(ref, approximate="tanh").backward(grad_out)
    ours = x.clone().requires_grad_()
    torch.compile(gelu_tanh)(ours).backward(grad_out)
    torch.testing.assert_close(ours.grad, ref.grad, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(
        gm._GeluSigmoid.apply, (torch.randn(40, dtype=torch.float64, requires_grad=True),)
    )
