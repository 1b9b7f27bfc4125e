"""Pretraining: schedule, evaluation maths, exact resume after SIGKILL, DDP, elastic resume, two nodes,
FSDP2, golden loss curve, bad input."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lm_fixtures import sigkill_after
from safetensors.torch import load_file

from gpt.checkpoint import OPTIMIZER, WEIGHTS, latest_checkpoint, load_model, step_dir
from gpt.config import ModelConfig
from gpt.data import ShardConfig, ShardDataset, shard_corpus
from gpt.io import read_json, read_manifest
from gpt.model import GPT
from gpt.optim import lr_at, param_groups
from gpt.scoring import evaluate_lm
from gpt.tokenizer import Tokenizer, TokenizerConfig
from gpt.train import Callbacks, TrainConfig, TrainingDiverged, resume_grad_accum, train

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden" / "pretrain_tiny_losses.json"
# One thread per process: the runs compared bit for bit must do their sums in the same order.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def corpus_text(seed: int, n_paragraphs: int = 400) -> str:
    """A deterministic toy corpus (always available, unlike tinyshakespeare)."""
    rng = random.Random(seed)
    subj = ["the king", "a fool", "my lord", "the queen", "this man", "our friend", "the ship", "her brother"]
    verb = ["loves", "sees", "betrays", "follows", "fears", "remembers", "calls", "answers"]
    obj = ["the crown", "his sword", "the sea", "a letter", "the night", "my heart", "the town", "a house"]
    tail = ["today", "again", "in silence", "with care", "at dawn", "for ever", "once more", "by the gate"]
    paragraphs = []
    for _ in range(n_paragraphs):
        n = rng.randint(2, 6)
        sentences = [
            f"{rng.choice(subj).capitalize()} {rng.choice(verb)} {rng.choice(obj)} {rng.choice(tail)}."
            for _ in range(n)
        ]
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs) + "\n"


def make_shards(root: Path, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    text = corpus_text(seed)
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    Tokenizer.train([text], root / "tok", TokenizerConfig(vocab_size=320, num_threads=1))
    shard_corpus(
        str(root / "corpus.txt"),
        root / "tok" / "tokenizer.model",
        root / "shards",
        ShardConfig(val_fraction=0.1, test_fraction=0.0),
    )
    return root / "shards"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("data"))


def tiny(**overrides) -> TrainConfig:
    return TrainConfig.preset("tiny", precision="fp32", **overrides)


@pytest.fixture(scope="module")
def short_run(shards, tmp_path_factory) -> Path:
    """4 steps, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("run")
    train(ModelConfig.preset("tiny"), tiny(max_steps=4, checkpoint_interval=2, keep_last=3), shards, out)
    return out


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gptflow.cli", "pretrain", *args]


def final_tensors(run: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run) / name))


def logged_losses(run: Path, key: str = "loss") -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


TWO_RANKS = ["--standalone", "--nproc_per_node=2"]  # torchrun options of a single-node 2-rank run
# The runs the 2-rank tests compare: 24 steps, checkpoints at 8, 16 and 24 (all kept), fp32, no dropout.
RUN_24 = ["--preset", "tiny", "--precision", "fp32", "--max-steps", "24", "--checkpoint-interval", "8"]
RUN_24 += ["--eval-interval", "24", "--keep-last", "3"]


def run_24(shards: Path, out: Path, *flags: str, torchrun: list[str] | None = None) -> list[str]:
    """`gptflow pretrain` with RUN_24 and ``flags``: one process, or under torchrun with its options."""
    cmd = cli(*RUN_24, "--data", str(shards), "--out", str(out), *flags)
    return cmd if torchrun is None else [sys.executable, "-m", "torch.distributed.run", *torchrun, *cmd[1:]]


@pytest.fixture(scope="module")
def ddp_run(shards, tmp_path_factory) -> Path:
    """The uninterrupted single-node 2-rank DDP run the elastic, two-node and FSDP runs are held to."""
    out = tmp_path_factory.mktemp("ddp")
    run_ok(run_24(shards, out, torchrun=TWO_RANKS))
    return out


def run_ok(cmd: list[str]) -> None:
    """Run a training command line to the end; its stderr's tail is the failure message."""
    proc = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Pieces


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(110, **kw) == pytest.approx(0.1) and lr_at(500, **kw) == pytest.approx(0.1)
    decay = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))


def test_biases_and_norms_are_not_weight_decayed():
    model = GPT(ModelConfig.preset("tiny"))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(
        names[id(p)].endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight"))
        for p in no_decay["params"]
    )
    assert "transformer.wte.weight" in {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_bits_per_byte_of_a_uniform_model_is_log2_vocab_per_byte(shards):
    ds = ShardDataset(shards, "val")
    tok = Tokenizer(shards / "tokenizer.model")
    model = GPT(ModelConfig.preset("tiny", vocab_size=tok.vocab_size))
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied: every logit is 0, every token has probability 1/V
    m = evaluate_lm(model, ds, 64, 8, tok.token_byte_lengths(), "cpu")
    assert m["val_loss"] == pytest.approx(math.log(tok.vocab_size), rel=1e-6)
    assert m["val_tokens"] == ds.num_tokens - 1
    ids = ds.window(1, ds.num_tokens - 1)
    assert m["val_bytes"] == int(tok.token_byte_lengths()[ids].sum())
    counted = int((tok.token_byte_lengths()[ids] > 0).sum())  # EOS targets: no bits, no bytes
    assert counted < m["val_tokens"]
    expected = counted * math.log2(tok.vocab_size) / m["val_bytes"]
    assert m["val_bpb"] == pytest.approx(expected, rel=1e-6)


def test_parallel_is_a_typed_config_field_and_fsdp_refuses_muon():
    assert TrainConfig.from_yaml(tiny(parallel="fsdp").to_yaml()).parallel == "fsdp"
    with pytest.raises(ValueError, match="parallel.*ddp, fsdp"):
        TrainConfig(parallel="zero3")
    with pytest.raises(ValueError, match="parallel='fsdp' needs optimizer='adamw'.*--parallel ddp"):
        TrainConfig(parallel="fsdp", optimizer="muon")


def test_resume_grad_accum_keeps_the_global_batch_or_names_the_world_sizes_that_can():
    two_ranks = {"loader": {"batch_size": 8}, "world_size": 2, "grad_accum": 1, "rng": [{}, {}]}
    assert resume_grad_accum(two_ranks, batch_size=8, world_size=1) == 2
    assert resume_grad_accum(two_ranks, batch_size=8, world_size=2) == 1
    with pytest.raises(ValueError, match=r"global batch is 16 sequences.*Resume on 1, 2 rank\(s\)"):
        resume_grad_accum(two_ranks, batch_size=8, world_size=4)
    # Written before elastic resume: no grad_accum or world_size of its own, the config's and the RNGs'.
    old = {"loader": {"batch_size": 4}, "rng": [{}, {}, {}], "train_config": {"grad_accum": 2}}
    assert resume_grad_accum(old, batch_size=4, world_size=1) == 6
    assert resume_grad_accum(old, batch_size=4, world_size=6) == 1


def test_train_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ValueError, match="precision.*auto, fp32, bf16"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    assert TrainConfig.from_yaml(tiny().to_yaml()) == tiny()


# ---------------------------------------------------------------------------------------------
# The run directory


class Recorder(Callbacks):
    def __init__(self):
        self.steps, self.evals, self.checkpoints = [], [], []

    def on_step(self, step, metrics):
        self.steps.append(step)

    def on_eval(self, step, metrics):
        self.evals.append((step, metrics["val_bpb"]))

    def on_checkpoint(self, step, path):
        self.checkpoints.append((step, Path(path).name))


def test_run_writes_loadable_checkpoints_best_model_and_manifest(shards, tmp_path):
    rec = Recorder()
    summary = train(
        ModelConfig.preset("tiny"),
        tiny(max_steps=6, checkpoint_interval=2, keep_last=2, eval_interval=3),
        shards,
        tmp_path,
        callbacks=rec,
    )
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step-000004", "step-000006"]
    assert (tmp_path / "latest").read_text().strip() == "checkpoints/step-000006"
    for d in (tmp_path / "checkpoints" / "step-000006", tmp_path / "best"):
        model, meta = load_model(d)
        assert meta["tokenizer_hash"] == Tokenizer(shards).hash and (d / "tokenizer.model").is_file()
        assert model.config.vocab_size == Tokenizer(shards).vocab_size  # from the tokenizer, not the preset
    assert rec.steps == [1, 2, 3, 4, 5, 6] and [s for s, _ in rec.evals] == [3, 6]
    assert rec.checkpoints == [(2, "step-000002"), (4, "step-000004"), (6, "step-000006")]
    manifest = read_manifest(tmp_path)
    assert manifest["stage"] == "pretrain" and manifest["metrics"]["steps"] == 6
    assert summary["best_val_bpb"] == min(b for _, b in rec.evals)


def test_max_time_stops_cleanly_with_an_evaluation_and_a_checkpoint(shards, tmp_path):
    summary = train(ModelConfig.preset("tiny"), tiny(max_steps=10_000, max_time=0.01), shards, tmp_path)
    assert summary["stopped_reason"] == "max_time" and summary["steps"] < 10_000
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, summary["steps"])
    assert summary["final_val_bpb"] is not None and (tmp_path / "manifest.json").is_file()


# ---------------------------------------------------------------------------------------------
# Exact resume, DDP, golden curve


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(shards, tmp_path):
    common = ["--preset", "tiny", "--precision", "fp32", "--data", str(shards)]
    common += ["--checkpoint-interval", "10", "--eval-interval", "20", "--keep-last", "3"]
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    a = subprocess.Popen(cli(*common, "--out", str(run_a)), env=ENV, cwd=REPO, stderr=subprocess.DEVNULL)
    b = subprocess.Popen(cli(*common, "--out", str(run_b)), env=ENV, cwd=REPO, stderr=subprocess.DEVNULL)
    sigkill_after(b, step_dir(run_b, 30) / "trainer_state.json", "step-30 checkpoint")
    assert not (run_b / "manifest.json").exists()
    killed_at = latest_checkpoint(run_b).name

    subprocess.run(
        cli(*common, "--out", str(run_b), "--resume"), env=ENV, cwd=REPO, check=True, capture_output=True
    )
    assert a.wait(timeout=120) == 0

    for name in (WEIGHTS, OPTIMIZER):
        ta, tb = final_tensors(run_a, name), final_tensors(run_b, name)
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"{name}:{key} differs after resuming from {killed_at}"
    state_a = read_json(latest_checkpoint(run_a) / "trainer_state.json")
    state_b = read_json(latest_checkpoint(run_b) / "trainer_state.json")
    assert state_a["step"] == state_b["step"] == 60
    assert state_a["losses"] == state_b["losses"]
    la, lb = logged_losses(run_a), logged_losses(run_b)
    assert sorted(lb) == list(range(1, 61))  # the killed run's records past its checkpoint were dropped
    assert [la[s] for s in range(31, 61)] == [lb[s] for s in range(31, 61)]


@pytest.mark.slow
def test_ddp_ranks_end_with_identical_weights_and_the_loss_decreases(shards, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    cmd += ["gptflow.cli", "pretrain", "--preset", "tiny", "--precision", "fp32", "--data", str(shards)]
    cmd += [
        "--out",
        str(tmp_path),
        "--max-steps",
        "12",
        "--eval-interval",
        "12",
        "--checkpoint-interval",
        "12",
    ]
    run_ok(cmd)
    metrics = read_manifest(tmp_path)["metrics"]
    assert metrics["world_size"] == 2
    sums = metrics["rank_weight_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    losses = logged_losses(tmp_path)
    assert np.mean([losses[s] for s in (11, 12)]) < np.mean([losses[s] for s in (1, 2)]) - 0.5
    load_model(latest_checkpoint(tmp_path))


def assert_same_checkpoint(run_a: Path, run_b: Path, atol: float = 0.0) -> None:
    """The last checkpoints of both runs hold the same tensors (bit for bit when ``atol`` is 0)."""
    for name in (WEIGHTS, OPTIMIZER):
        ta, tb = final_tensors(run_a, name), final_tensors(run_b, name)
        assert ta.keys() == tb.keys()
        for key in ta:
            assert ta[key].shape == tb[key].shape and ta[key].dtype == tb[key].dtype
            if atol == 0.0:
                assert torch.equal(ta[key], tb[key]), f"{name}:{key} differs"
            else:
                torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=atol, msg=f"{name}:{key}")


@pytest.mark.slow
def test_two_rank_run_killed_and_resumed_on_one_rank_is_bitwise_identical(shards, ddp_run, tmp_path):
    """Elastic resume: the 1-rank run keeps the global batch with grad_accum 2 and draws the same
    windows each step; micro-batch shapes, the halving of the loss and the sum of two gradients are
    the same sums DDP does, so with fp32, one thread per process and no dropout nothing differs."""
    run = tmp_path / "run"
    two_ranks = run_24(shards, run, torchrun=TWO_RANKS)
    killed = subprocess.Popen(two_ranks, env=ENV, cwd=REPO, stderr=subprocess.DEVNULL)
    sigkill_after(killed, step_dir(run, 8) / "trainer_state.json", "step-8 checkpoint")
    killed_at = read_json(latest_checkpoint(run) / "trainer_state.json")
    assert killed_at["world_size"] == 2 and killed_at["step"] in (8, 16)

    subprocess.run(run_24(shards, run, "--resume"), env=ENV, cwd=REPO, check=True, capture_output=True)
    manifest = read_manifest(run)
    assert manifest["metrics"]["world_size"] == 1 and manifest["config"]["train"]["grad_accum"] == 2
    assert_same_checkpoint(ddp_run, run)
    la, lb = logged_losses(ddp_run), logged_losses(run)
    assert sorted(lb) == list(range(1, 25))
    assert [lb[s] for s in range(killed_at["step"] + 1, 25)] == [
        la[s] for s in range(killed_at["step"] + 1, 25)
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_with_c10d_rendezvous_end_with_the_single_node_weights(shards, ddp_run, tmp_path):
    """Two torchrun launchers (one rank each) meet on 127.0.0.1 as two nodes would, over gloo."""
    endpoint = f"127.0.0.1:{free_port()}"
    launcher = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}"]
    launcher += ["--rdzv-id=two-node-test"]
    nodes = [
        subprocess.Popen(
            run_24(shards, tmp_path, torchrun=[*launcher, f"--node-rank={node}"]),
            env=ENV,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    for node in nodes:
        out, _ = node.communicate(timeout=300)
        assert node.returncode == 0, out[-3000:]
    metrics = read_manifest(tmp_path)["metrics"]
    assert metrics["world_size"] == 2
    assert metrics["rank_weight_checksums"] == read_manifest(ddp_run)["metrics"]["rank_weight_checksums"]
    assert logged_losses(tmp_path) == logged_losses(ddp_run)


@pytest.mark.slow
def test_fsdp_resumes_a_ddp_checkpoint_and_follows_the_ddp_run(shards, ddp_run, tmp_path):
    """FSDP2 on 2 gloo ranks continues the DDP run's step-8 checkpoint. Its forward and backward are
    DDP's maths, but the gradient norm is summed shard by shard, so clipping rounds differently:
    measured over these 16 steps, losses within 5e-7 and tensors within ~5e-6 of DDP's."""
    run = tmp_path / "run"
    shutil.copytree(ddp_run, run)
    for later in (16, 24):
        shutil.rmtree(step_dir(run, later))
    (run / "latest").write_text("checkpoints/step-000008\n")
    run_ok(run_24(shards, run, "--resume", "--parallel", "fsdp", torchrun=TWO_RANKS))
    assert read_manifest(run)["config"]["train"]["parallel"] == "fsdp"
    # Gathered into the usual files: same names, shapes and optimizer layout as DDP's, so it loads at
    # any world size (the elastic test resumes that format on 1 rank) and in the single-process tools.
    assert_same_checkpoint(ddp_run, run, atol=1e-4)
    opt_meta = [read_json(latest_checkpoint(r) / "trainer_state.json")["optimizer"] for r in (ddp_run, run)]
    assert opt_meta[0] == opt_meta[1]
    load_model(latest_checkpoint(run))
    load_model(run / "best")
    for key in ("loss", "grad_norm"):
        ddp, fsdp = logged_losses(ddp_run, key), logged_losses(run, key)
        assert sorted(fsdp) == list(range(1, 25))
        np.testing.assert_allclose([fsdp[s] for s in range(9, 25)], [ddp[s] for s in range(9, 25)], rtol=1e-5)
    assert logged_losses(ddp_run)[24] < logged_losses(ddp_run)[9]  # a curve worth following


def golden_run(shards: Path, out: Path) -> list[float]:
    train(ModelConfig.preset("tiny"), tiny(max_steps=20, checkpoint_interval=0), shards, out)
    return read_json(latest_checkpoint(out) / "trainer_state.json")["losses"]


def test_tiny_preset_reproduces_the_golden_loss_curve(tmp_path):
    # Own corpus and seed so the curve depends only on model, optimizer, schedule, tokenizer and loader.
    shards = make_shards(tmp_path / "data", seed=0)
    losses = golden_run(shards, tmp_path / "run")
    if os.environ.get("GPTFLOW_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        note = "tiny preset, fp32, max_steps=20, corpus_text(seed=0), vocab 320; regenerate with GPTFLOW_UPDATE_GOLDEN=1"
        GOLDEN.write_text(json.dumps({"note": note, "atol": 5e-4, "losses": losses}, indent=1) + "\n")
        pytest.skip(f"wrote {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    assert len(losses) == len(golden["losses"]) == 20
    np.testing.assert_allclose(losses, golden["losses"], rtol=0, atol=golden["atol"])


# ---------------------------------------------------------------------------------------------
# Bad input


def test_resuming_with_a_different_model_config_is_refused(short_run, shards):
    with pytest.raises(ValueError, match="model config differs.*n_layer: checkpoint 2 vs now 3"):
        train(ModelConfig.preset("tiny", n_layer=3), tiny(max_steps=6), shards, short_run, resume=True)


def test_resuming_on_shards_from_another_tokenizer_is_refused(short_run, tmp_path):
    other = make_shards(tmp_path / "other", seed=1)
    assert Tokenizer(other).vocab_size == 320  # same shape: only the tokenizer check can catch it
    with pytest.raises(ValueError, match="tokenizer"):
        train(ModelConfig.preset("tiny"), tiny(max_steps=6), other, short_run, resume=True)


def test_resuming_from_a_truncated_checkpoint_names_the_previous_one(short_run, shards, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    weights = step_dir(run, 4) / WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt.*step-000002"):
        train(ModelConfig.preset("tiny"), tiny(max_steps=6), shards, run, resume=True)


def test_a_fresh_run_refuses_a_directory_that_holds_checkpoints(short_run, shards):
    with pytest.raises(FileExistsError, match="--resume"):
        train(ModelConfig.preset("tiny"), tiny(max_steps=6), shards, short_run)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(shards, tmp_path, monkeypatch):
    forward, calls = GPT.forward, {"n": 0}

    def poisoned(self, idx, targets=None, **kw):
        out = forward(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] >= 5:
                return out[0], out[1] * float("nan")
        return out

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"step 5.*step-000004"):
        train(ModelConfig.preset("tiny"), tiny(max_steps=10, checkpoint_interval=2), shards, tmp_path)
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 4)
    assert not (tmp_path / "manifest.json").exists()
    model, meta = load_model(step_dir(tmp_path, 4))
    assert meta["step"] == 4 and all(torch.isfinite(p).all() for p in model.parameters())


def test_cli_reports_missing_shards_in_one_line(tmp_path, capsys):
    from gptflow.cli import main

    assert (
        main(["pretrain", "--preset", "tiny", "--data", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    )
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_cli_flags_override_yaml_which_overrides_the_preset(tmp_path):
    from gptflow.cli import build_parser
    from gptflow.commands.pretrain import build_configs

    (tmp_path / "c.yaml").write_text("model:\n  n_layer: 3\ntrain:\n  lr: 0.01\n  max_steps: 7\n")
    args = build_parser().parse_args(
        ["pretrain", "--preset", "tiny", "--data", "d", "--out", "o", "--config", str(tmp_path / "c.yaml")]
        + ["--max-steps", "9", "--model-n-embd", "32", "--compile"]
    )
    model_config, train_config = build_configs(args)
    assert (model_config.n_layer, model_config.n_embd, model_config.n_head) == (3, 32, 2)
    assert (train_config.lr, train_config.max_steps, train_config.compile) == (0.01, 9, True)
    assert train_config.batch_size == TrainConfig.PRESETS["tiny"]["batch_size"]


def test_compile_without_a_cpp_compiler_trains_eagerly_and_says_why(monkeypatch, caplog):
    """On CPU torch.compile builds C++ kernels: when inductor finds no compiler the first step would
    fail, so wrap() hands back the plain module (and warns); with one it compiles."""
    from torch._inductor import cpp_builder
    from torch._inductor.exc import InvalidCxxCompiler

    from gpt import parallel
    from gpt.device import Dist

    def no_compiler():
        raise InvalidCxxCompiler

    model = GPT(ModelConfig.preset("tiny", vocab_size=64))
    cpu = torch.device("cpu")
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: "g++")
    assert parallel.wrap(model, cpu, Dist(), compile=True) is not model  # compiled
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with caplog.at_level("WARNING", logger="gpt.parallel"):
        assert parallel.wrap(model, cpu, Dist(), compile=True) is model
    assert "C++ compiler" in caplog.text
    assert parallel.wrap(model, cpu, Dist(), compile=False) is model
