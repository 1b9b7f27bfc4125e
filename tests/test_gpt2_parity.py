"""Parity with Hugging Face transformers' GPT2LMHeadModel (random init, saved locally, no hub)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gpt.generate import generate  # noqa: E402
from gpt.model import GPT  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=300,
        n_positions=64,
        n_embd=64,
        n_layer=3,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    # Random init leaves LayerNorms at 1/0 and biases at 0: perturb them so the mapping is really tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(path)  # safetensors by default
    return path, model


def test_logits_match_transformers(hf_dir):
    path, hf = hf_dir
    ours = GPT.from_hf_gpt2(path)
    assert not ours.training
    x = torch.randint(0, 300, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(x).logits
        out = ours(x)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max().item()


def test_20_greedy_tokens_match_transformers_generate(hf_dir):
    path, hf = hf_dir
    ours = GPT.from_hf_gpt2(path)
    prompt = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf.generate(
            prompt, max_new_tokens=20, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt)
        )
    ours_new = generate(ours, prompt[0], max_new_tokens=20)
    assert ours_new == ref[0, 8:].tolist()


def test_pickle_bin_checkpoint_loads_with_weights_only(hf_dir, tmp_path):
    path, hf = hf_dir
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours = GPT.from_hf_gpt2(tmp_path)
    x = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        assert torch.allclose(ours(x), hf(x).logits, atol=1e-5)


def test_missing_weights_is_a_clear_error(tmp_path, hf_dir):
    path, _ = hf_dir
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors or pytorch_model\.bin"):
        GPT.from_hf_gpt2(tmp_path)
