"""The speedrun recipe options (ReLU², QK-norm, zero-init projections, logit soft-cap, untied head, Muon):
off by default; each keeps causality, KV-cache parity and ONNX parity; Muon + AdamW checkpoints
and resumes like one optimizer."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lm_fixtures import decode_stepwise
from safetensors.torch import load_file, save_file
from test_train import make_shards

from gpt.checkpoint import OPTIMIZER, WEIGHTS, check_same_model, save_model, step_dir, write_latest
from gpt.config import ModelConfig
from gpt.export import ExportConfig, export_bundle, export_onnx, lm_parity
from gpt.io import read_json
from gpt.model import GPT, relu_squared
from gpt.optim import (
    MuonWithAdamW,
    build_muon_adamw,
    build_optimizer,
    build_train_optimizer,
    flatten_optimizer_state,
    muon_adamw_split,
    set_lr,
    unflatten_optimizer_state,
)
from gpt.task_model import completion_loss
from gpt.tokenizer import Tokenizer, TokenizerConfig
from gpt.train import TrainConfig, train

# Each option alone, then all of them at once (with an untied head and RoPE).
OPTIONS = {
    "relu2": dict(activation="relu2"),
    "qk_norm": dict(qk_norm=True),
    "zero_init_proj": dict(zero_init_proj=True),
    "softcap": dict(logit_softcap=2.0),
    "untied": dict(tie_weights=False),
}
ALL = dict(activation="relu2", qk_norm=True, zero_init_proj=True, logit_softcap=2.0, tie_weights=False)
CASES = {**OPTIONS, "all": ALL, "all_rope": {**ALL, "pos_encoding": "rope"}}


def recipe_model(seed: int = 0, scale: float = 4.0, **kw) -> GPT:
    """A tiny GPT whose matrices are scaled up (and zero-initialised projections filled in), so that
    the blocks matter and the soft cap saturates: otherwise a fresh model's logits stay near 0."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig.preset("tiny", **kw))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight") and model.config.zero_init_proj:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            if p.dim() == 2:
                p.mul_(scale)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Configs


def test_defaults_keep_gpt2s_recipe():
    cfg, train_cfg = ModelConfig(), TrainConfig()
    assert (cfg.activation, cfg.qk_norm, cfg.zero_init_proj, cfg.logit_softcap) == ("gelu", False, False, 0.0)
    assert train_cfg.optimizer == "adamw"
    for preset in ModelConfig.PRESETS:
        c = ModelConfig.preset(preset)
        assert (c.activation, c.qk_norm, c.zero_init_proj, c.logit_softcap) == ("gelu", False, False, 0.0)
        assert TrainConfig.preset(preset).optimizer == "adamw"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(activation="swiglu"), "activation='swiglu' is not allowed; choose one of gelu, relu2"),
        (dict(qk_norm="yes"), "qk_norm='yes' must be true or false"),
        (dict(zero_init_proj=1), "zero_init_proj=1 must be true or false"),
        (dict(logit_softcap=-1.0), "logit_softcap=-1.0 must be a finite number >= 0"),
        (dict(logit_softcap=float("inf")), "logit_softcap=inf must be"),
        (dict(logit_softcap=float("nan")), "logit_softcap=nan must be"),
        (dict(logit_softcap=True), "logit_softcap=True must be"),
    ],
)
def test_model_options_reject_bad_values_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(optimizer="sgd"), "optimizer"),
        (dict(muon_lr=0.0), "muon_lr"),
        (dict(muon_momentum=1.0), "muon_momentum"),
        (dict(muon_momentum=-0.1), "muon_momentum"),
        (dict(muon_weight_decay=-0.1), "muon_weight_decay"),
        (dict(muon_ns_steps=0), "muon_ns_steps"),
        (dict(muon_ns_steps=100), "muon_ns_steps"),
        (dict(muon_nesterov="no"), "muon_nesterov"),
        (dict(muon_adjust_lr="spectral"), "muon_adjust_lr"),
    ],
)
def test_muon_settings_reject_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}="):
        TrainConfig(**kwargs)


def test_recipe_options_round_trip_through_yaml(tmp_path):
    model_cfg = ModelConfig.preset("tiny", **CASES["all_rope"])
    assert ModelConfig.from_yaml(model_cfg.to_yaml()) == model_cfg
    train_cfg = TrainConfig.preset(
        "tiny", optimizer="muon", muon_lr=0.05, muon_nesterov=False, muon_ns_steps=4
    )
    train_cfg.to_yaml(tmp_path / "train.yaml")
    assert TrainConfig.from_yaml(tmp_path / "train.yaml") == train_cfg


def test_pretrain_help_lists_the_new_flags_and_they_parse(capsys):
    from gptflow.cli import build_parser, main
    from gptflow.commands.pretrain import build_configs

    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = capsys.readouterr().out
    for flag in ("--optimizer", "--muon-lr", "--muon-momentum", "--muon-nesterov", "--muon-weight-decay"):
        assert flag in text
    for flag in ("--muon-ns-steps", "--muon-adjust-lr", "--model-activation", "--model-qk-norm"):
        assert flag in text
    assert "--model-zero-init-proj" in text and "--model-logit-softcap" in text
    args = build_parser().parse_args(
        ["pretrain", "--preset", "tiny", "--data", "d", "--out", "o", "--optimizer", "muon"]
        + ["--muon-lr", "0.05", "--no-muon-nesterov", "--model-activation", "relu2", "--model-qk-norm"]
        + ["--model-zero-init-proj", "--model-logit-softcap", "30", "--no-model-tie-weights"]
    )
    model_cfg, train_cfg = build_configs(args)
    assert (train_cfg.optimizer, train_cfg.muon_lr, train_cfg.muon_nesterov) == ("muon", 0.05, False)
    assert model_cfg == ModelConfig.preset(
        "tiny", activation="relu2", qk_norm=True, zero_init_proj=True, logit_softcap=30.0, tie_weights=False
    )


# ---------------------------------------------------------------------------------------------
# The model


@pytest.mark.parametrize("case", CASES)
def test_future_tokens_do_not_change_past_logits_with_recipe_options(case):
    model = recipe_model(**CASES[case])
    x = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    base = model(x)
    for t in (0, 9, 31):
        changed = x.clone()
        changed[:, t] = (changed[:, t] + 1) % model.config.vocab_size
        out = model(changed)
        assert torch.allclose(out[:, :t], base[:, :t], atol=1e-5, rtol=0), f"logits before {t} changed"
        assert not torch.allclose(out[:, t], base[:, t]), "the changed position itself must change"


@pytest.mark.parametrize("case", CASES)
def test_kv_cache_decode_matches_full_forward_with_recipe_options(case):
    model = recipe_model(**CASES[case])
    x = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(2))
    full = model(x)
    stepwise, past = decode_stepwise(model, x, prefill=10)
    assert (stepwise - full).abs().max().item() <= 1e-4


def test_relu2_mlp_is_relu_squared():
    model = recipe_model(activation="relu2")
    mlp = model.transformer.h[0].mlp
    x = torch.randn(2, 5, model.config.n_embd)
    expected = mlp.c_proj(F.relu(mlp.c_fc(x)) ** 2)
    assert torch.allclose(mlp(x), expected, atol=1e-6, rtol=0)
    assert torch.equal(relu_squared(torch.tensor([-2.0, 0.0, 3.0])), torch.tensor([0.0, 0.0, 9.0]))


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    for qk_norm in (True, False):
        model = recipe_model(qk_norm=qk_norm)
        base = model(x)
        C = model.config.n_embd
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.c_attn.weight[: 2 * C].mul_(7.0)  # the q and k rows; v untouched
                block.attn.c_attn.bias[: 2 * C].mul_(7.0)
        delta = (model(x) - base).abs().max().item()
        assert (delta < 1e-4) if qk_norm else (delta > 1e-2), f"qk_norm={qk_norm}: |Δlogits| {delta}"
    names = dict(recipe_model(qk_norm=True).named_parameters())
    assert names["transformer.h.1.attn.q_norm.weight"].shape == (32,)  # one gain per head feature
    assert "transformer.h.1.attn.k_norm.weight" in names and "transformer.h.0.attn.q_norm.bias" not in names


def test_qk_norm_under_bf16_autocast_tracks_fp32_without_a_dtype_warning():
    model = recipe_model(qk_norm=True)
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(5))
    ref = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Mismatch dtype between input and weight": the unfused path
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert (out.float() - ref).abs().max().item() < 0.1


def test_zero_init_proj_zeroes_only_the_output_projections():
    torch.manual_seed(0)
    ref = GPT(ModelConfig.preset("tiny"))
    torch.manual_seed(0)
    zero = GPT(ModelConfig.preset("tiny", zero_init_proj=True))
    for (name, a), (_, b) in zip(ref.state_dict().items(), zero.state_dict().items(), strict=True):
        if name.endswith("c_proj.weight"):
            assert not b.any() and a.any(), name
        else:
            assert torch.equal(a, b), f"{name} differs: the other weights must be drawn as without the option"
    x = torch.randint(0, 512, (2, 8))
    _, loss = zero(x, x)
    loss.backward()
    assert zero.transformer.h[0].attn.c_proj.weight.grad.abs().sum() > 0  # it can still learn


def test_softcap_bounds_logits_and_is_cap_tanh_of_the_uncapped_ones():
    cap = 1.0
    capped = recipe_model(logit_softcap=cap)
    plain = GPT(capped.config.replace(logit_softcap=0.0)).eval()
    plain.load_state_dict(capped.state_dict())
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(4))
    raw, out = plain(x), capped(x)
    assert raw.abs().max() > 2 * cap, "the test model's logits should reach well past the cap"
    assert out.abs().max() < cap
    assert torch.allclose(out, cap * torch.tanh(raw / cap), atol=1e-6, rtol=0)
    # Training sees the capped logits, and so does completion finetuning's loss.
    y = torch.randint(0, 512, (2, 16))
    _, loss = capped(x, y)
    assert loss.item() == pytest.approx(F.cross_entropy(out.view(-1, 512), y.view(-1)).item(), rel=1e-6)
    labels = torch.full_like(y, -100)
    labels[:, 8:] = y[:, 8:]
    expected = F.cross_entropy(out[:, 8:].reshape(-1, 512), y[:, 8:].reshape(-1))
    assert completion_loss(capped, x, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_softcap_logits_stay_fp32_under_cpu_bf16_autocast():
    model = recipe_model(logit_softcap=2.0)
    x = torch.randint(0, 512, (1, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.float32 and out.abs().max() < 2.0


def test_checkpoints_from_before_the_options_still_resume_and_init():
    cfg = ModelConfig.preset("tiny")
    new = ("activation", "qk_norm", "zero_init_proj", "logit_softcap")
    old = {k: v for k, v in cfg.to_dict().items() if k not in new}
    check_same_model(old, cfg, Path("old-run"))  # no error: the defaults are how it was trained
    assert GPT(ModelConfig.from_dict(old)).state_dict().keys() == GPT(cfg).state_dict().keys()
    with pytest.raises(ValueError, match="qk_norm: checkpoint False vs now True"):
        check_same_model(old, cfg.replace(qk_norm=True), Path("old-run"))


def test_untied_head_works_with_every_other_option():
    model = recipe_model(**ALL)
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    x = torch.randint(0, 512, (2, 16))
    _, loss = model.train()(x, x)
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.transformer.wte.weight.grad is not None


# ---------------------------------------------------------------------------------------------
# Muon + AdamW


def test_muon_takes_the_block_matrices_and_adamw_the_rest_by_name():
    model = GPT(ModelConfig.preset("tiny", n_layer=2))
    muon, adamw = muon_adamw_split(model)
    assert muon == [
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    block_rest = [
        f"transformer.h.{i}.{m}"
        for i in range(2)
        for m in ("ln_1.weight", "ln_1.bias", "attn.c_attn.bias", "attn.c_proj.bias")
        + ("ln_2.weight", "ln_2.bias", "mlp.c_fc.bias", "mlp.c_proj.bias")
    ]
    tied = [
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.ln_f.weight",
        "transformer.ln_f.bias",
    ]
    assert sorted(adamw) == sorted(tied + block_rest)  # the tied head is the embedding, on AdamW

    untied = GPT(ModelConfig.preset("tiny", tie_weights=False, qk_norm=True, bias=False, n_classes=3))
    muon, adamw = muon_adamw_split(untied)
    assert len(muon) == 8 and all(n.startswith("transformer.h.") and n.endswith(".weight") for n in muon)
    expected = ["lm_head.weight", "score.weight", "transformer.wte.weight", "transformer.wpe.weight"]
    expected += ["transformer.ln_f.weight"]
    expected += [f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("ln_1", "ln_2")]
    expected += [f"transformer.h.{i}.attn.{m}.weight" for i in range(2) for m in ("q_norm", "k_norm")]
    assert sorted(adamw) == sorted(expected)


def test_muon_adamw_groups_hold_those_tensors_and_set_lr_scales_muons():
    model = GPT(ModelConfig.preset("tiny", tie_weights=False, qk_norm=True))
    opt = build_train_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02), "cpu")
    assert isinstance(opt, MuonWithAdamW)
    named = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay, muon = ([named[id(p)] for p in g["params"]] for g in opt.param_groups)
    assert sorted(decay) == ["lm_head.weight", "transformer.wpe.weight", "transformer.wte.weight"]
    assert sorted(no_decay) == sorted(n for n, p in model.named_parameters() if p.dim() == 1)
    assert muon == muon_adamw_split(model)[0]
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    set_lr(opt, 5e-4)
    assert [g["lr"] for g in opt.param_groups[:2]] == [5e-4, 5e-4]
    assert opt.param_groups[2]["lr"] == pytest.approx(0.01)  # muon_lr x the schedule's fraction of lr
    adamw_only = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu")
    set_lr(adamw_only, 5e-4)
    assert all(g["lr"] == 5e-4 for g in adamw_only.param_groups)


def _step(model, opt, seed: int) -> None:
    x = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    model(x, x)[1].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_muon_adamw_state_round_trips_through_safetensors_bitwise(tmp_path):
    kw = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu", muon_lr=0.05)
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", **ALL))
    opt = build_muon_adamw(model, **kw, muon_weight_decay=0.01)
    for s in range(3):
        _step(model, opt, s)
    tensors, meta = flatten_optimizer_state(opt)
    assert any(k.endswith(".momentum_buffer") for k in tensors) and any(
        k.endswith(".exp_avg") for k in tensors
    )
    save_file(tensors, str(tmp_path / OPTIMIZER))
    meta = json.loads(json.dumps(meta))  # as trainer_state.json stores it
    restored = unflatten_optimizer_state(load_file(str(tmp_path / OPTIMIZER)), meta)

    clone = GPT(model.config)
    clone.load_state_dict(model.state_dict())
    opt2 = build_muon_adamw(clone, **{**kw, "muon_lr": 1.0})
    opt2.load_state_dict(restored)
    assert opt2.param_groups[2]["lr_scale"] == opt.param_groups[2]["lr_scale"]
    assert opt2.param_groups[2]["weight_decay"] == 0.01
    for m, o in ((model, opt), (clone, opt2)):
        set_lr(o, 3e-3)
        _step(m, o, 10)
    for (name, a), b in zip(model.named_parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b), name

    adamw = build_optimizer(clone, 1e-3, 0.1, (0.9, 0.95), "cpu")
    with pytest.raises(ValueError, match="resume with the optimizer the run started with"):
        opt2.load_state_dict(unflatten_optimizer_state(*flatten_optimizer_state(adamw)))


# ---------------------------------------------------------------------------------------------
# Pretraining with Muon


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def muon_run(shards, tmp_path_factory):
    """Every option at once, Muon + AdamW, 16 steps with checkpoints at 8 and 16."""
    out = tmp_path_factory.mktemp("muon")
    model_cfg = ModelConfig.preset("tiny", **ALL)
    train_cfg = TrainConfig.preset(
        "tiny", precision="fp32", optimizer="muon", max_steps=16, checkpoint_interval=8, eval_interval=8
    )
    train(model_cfg, train_cfg, shards, out)
    return out, model_cfg, train_cfg


def test_tiny_pretraining_with_muon_lowers_the_loss(muon_run):
    out, _, _ = muon_run
    state = read_json(step_dir(out, 16) / "trainer_state.json")
    losses = state["losses"]
    assert len(losses) == 16 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    assert state["evals"][-1]["val_loss"] < state["evals"][0]["val_loss"]
    assert state["optimizer"]["param_groups"][-1]["ns_steps"] == 5  # the Muon group, in the checkpoint


def test_muon_resume_from_the_middle_is_bitwise_identical(muon_run, shards, tmp_path):
    out, model_cfg, train_cfg = muon_run
    run = tmp_path / "resumed"
    shutil.copytree(out, run)
    shutil.rmtree(step_dir(run, 16))
    (run / "manifest.json").unlink()
    write_latest(run, step_dir(run, 8))
    train(model_cfg, train_cfg, shards, run, resume=True)
    for name in (WEIGHTS, OPTIMIZER):
        a, b = load_file(str(step_dir(out, 16) / name)), load_file(str(step_dir(run, 16) / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs after resuming from step 8"
    state_a = read_json(step_dir(out, 16) / "trainer_state.json")
    state_b = read_json(step_dir(run, 16) / "trainer_state.json")
    assert state_a["losses"] == state_b["losses"]


def test_resuming_a_muon_run_with_adamw_is_refused(muon_run, shards, tmp_path):
    out, model_cfg, train_cfg = muon_run
    run = tmp_path / "other"
    shutil.copytree(out, run)
    with pytest.raises(ValueError, match="optimizer='muon', this run asks for 'adamw'.*--optimizer muon"):
        train(model_cfg, train_cfg.replace(optimizer="adamw", max_steps=20), shards, run, resume=True)


# ---------------------------------------------------------------------------------------------
# ONNX


@pytest.mark.parametrize("case", OPTIONS)
def test_onnx_matches_torch_with_kv_cache_for_each_option_alone(case, tmp_path):
    model = recipe_model(**OPTIONS[case])
    parity = lm_parity(model, export_onnx(model, tmp_path / "model.onnx"), decode_steps=20)
    assert parity["max_abs_diff"] <= 1e-4, parity


def test_onnx_bundle_with_every_option_matches_torch_and_greedy_tokens(tmp_path):
    text = "The quick brown fox jumps over the lazy dog. Markets rose as investors cheered the news.\n" * 40
    tok = Tokenizer.train([text], tmp_path / "tok", TokenizerConfig(vocab_size=300))
    model = recipe_model(vocab_size=tok.vocab_size, **CASES["all_rope"])
    save_model(tmp_path / "ckpt", model, tokenizer_hash=tok.hash)
    shutil.copyfile(tok.path, tmp_path / "ckpt" / "tokenizer.model")
    result = export_bundle(tmp_path / "ckpt", tmp_path / "bundle", ExportConfig())
    parity = result["parity"]
    assert parity["prefill_max_abs_diff"] <= 1e-4 and parity["decode_max_abs_diff"] <= 1e-4, parity
    assert parity["decode_steps"] == 50 and parity["greedy_identical"], parity
    assert read_json(tmp_path / "bundle" / "config.json")["model"]["logit_softcap"] == 2.0
