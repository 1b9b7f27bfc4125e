"""The OpenAI-compatible server (deploy/server.py) on loopback: SDK parity with the runtime, streaming,
validation (fuzzed), overload, time limits, disconnects and auth, over tiny exported bundles."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploy.runtime import GenerationConfig
from deploy.server import create_app, load_models, run_in_thread
from deploy.server_config import ServerConfig
from gptflow.commands.serve import resolve_model_uri

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LABELS = ["business", "sport", "tech"]
PROMPTS = ["the market", "市场 上涨 🙂", "news sport tech"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """A randomly initialised tiny LM and a 3-class classifier, exported with a freshly trained tokenizer.

    The export's own greedy check is skipped (greedy_tokens=0): it is tested with the export, and
    here the runtime itself is the reference the server must match.
    """
    import torch

    from gpt.checkpoint import save_model
    from gpt.config import ModelConfig
    from gpt.export import ExportConfig, export_bundle
    from gpt.model import GPT
    from gpt.tokenizer import Tokenizer, TokenizerConfig

    root = tmp_path_factory.mktemp("server")
    rng = random.Random(0)
    words = ["the", "market", "rose", "as", "traders", "bought", "shares", "of", "tech", "firms", "while"]
    words += ["bonds", "fell", "市场", "上涨", "🙂", "news", "sport"]
    texts = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]
    tok = Tokenizer.train(texts, root / "tokenizer", TokenizerConfig(vocab_size=300))
    torch.manual_seed(0)
    out = {}
    for name, extra in (("tiny-lm", {}), ("topics", {"n_classes": len(LABELS)})):
        ckpt = root / f"ckpt-{name}"
        meta = {"labels": LABELS} if extra else {}
        save_model(ckpt, GPT(ModelConfig.preset("tiny", **extra)), tokenizer_hash=tok.hash, **meta)
        shutil.copyfile(root / "tokenizer" / "tokenizer.model", ckpt / "tokenizer.model")
        export_bundle(ckpt, root / name, ExportConfig(greedy_tokens=0, parity_decode_steps=4))
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def models(bundles):
    lm, lm_name, classifiers = load_models(bundles["tiny-lm"], [bundles["topics"]])
    return lm, lm_name, classifiers


@pytest.fixture(scope="module")
def server(models):
    lm, lm_name, classifiers = models
    config = ServerConfig(api_key=KEY, workers=2, queue_size=8, max_tokens_cap=48, max_choices=8)
    with run_in_thread(create_app(lm, classifiers, config, lm_name=lm_name)) as url:
        yield url


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server, headers=AUTH, timeout=30) as c:
        yield c


def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=30)


def greedy(lm, prompt: str, max_tokens: int, **kw):
    return lm.generate(prompt, GenerationConfig(max_new_tokens=max_tokens, temperature=0.0, **kw))[0]


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


# --------------------------------------------------------------------------------------------
# The official openai SDK against the server


@pytest.mark.parametrize("prompt", PROMPTS)
def test_sdk_completion_equals_runtime_greedy_output(server, models, prompt):
    lm, lm_name, _ = models
    got = sdk(server).completions.create(model=lm_name, prompt=prompt, max_tokens=12, temperature=0)
    want = greedy(lm, prompt, 12)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (
        want.prompt_tokens,
        want.completion_tokens,
    )
    assert got.object == "text_completion" and got.model == lm_name and got.id.startswith("cmpl-")


def test_no_repeat_ngram_size_decodes_as_the_runtime_does(client, models):
    lm, _, _ = models
    body = {"prompt": "the market", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    want = greedy(lm, "the market", 40, ignore_eos=True, no_repeat_ngram_size=2)
    plain = greedy(lm, "the market", 40, ignore_eos=True)
    assert want.token_ids != plain.token_ids  # the guard changes this output (else the test proves nothing)
    got = client.post("/v1/completions", json={**body, "no_repeat_ngram_size": 2}).json()
    assert got["choices"][0]["text"] == want.text


@pytest.mark.parametrize("prompt", PROMPTS)
def test_sdk_stream_concatenates_to_runtime_greedy_output(server, models, prompt):
    lm, lm_name, _ = models
    chunks = list(
        sdk(server).completions.create(
            model=lm_name, prompt=prompt, max_tokens=12, temperature=0, stream=True
        )
    )
    want = greedy(lm, prompt, 12)
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == want.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_sdk_models_list_names_every_served_model(server, models):
    _, lm_name, classifiers = models
    assert [m.id for m in sdk(server).models.list()] == [lm_name, *classifiers]


def test_sdk_without_the_api_key_is_refused_with_401(server, models):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=models[1], prompt="x", max_tokens=2)
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "x"})  # no header at all, invalid body too
    assert_openai_error(r, 401)
    assert httpx.get(f"{server}/health").json()["status"] == "ok"  # health needs no key


# --------------------------------------------------------------------------------------------
# Completions: batches, sampling, stop, streaming wire format


def test_prompt_list_with_n_gives_choices_in_prompt_major_order(client, models):
    lm, _, _ = models
    body = {"prompt": PROMPTS[:2], "n": 2, "max_tokens": 8, "temperature": 0}
    r = client.post("/v1/completions", json=body).json()
    want = [greedy(lm, p, 8) for p in PROMPTS[:2]]
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in r["choices"]] == [want[0].text, want[0].text, want[1].text, want[1].text]
    assert r["usage"]["prompt_tokens"] == sum(w.prompt_tokens for w in want)
    assert r["usage"]["completion_tokens"] == 2 * sum(w.completion_tokens for w in want)


def test_seeded_sampling_is_reproducible_and_matches_the_runtime(client, models):
    lm, _, _ = models
    body = {"prompt": "the market", "max_tokens": 16, "temperature": 1.5, "top_p": 0.9, "seed": 7}
    a, b = (client.post("/v1/completions", json=body).json()["choices"][0]["text"] for _ in range(2))
    want = lm.generate("the market", GenerationConfig(max_new_tokens=16, temperature=1.5, top_p=0.9, seed=7))
    assert a == b == want[0].text
    other = client.post("/v1/completions", json={**body, "seed": 8}).json()["choices"][0]["text"]
    assert other != a


def test_stop_sequence_cuts_the_text_and_reports_stop(client, models):
    lm, _, _ = models
    full = greedy(lm, PROMPTS[1], 12).text
    stop = full[2:4]
    assert stop, f"greedy output {full!r} too short to pick a stop sequence"
    r = client.post(
        "/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0, "stop": [stop]}
    )
    choice = r.json()["choices"][0]
    assert choice["text"] == full[: full.index(stop)] and choice["finish_reason"] == "stop"


def test_raw_stream_is_sse_with_usage_and_done(client):
    body = {"prompt": "the market", "max_tokens": 6, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6


def test_empty_prompt_is_the_start_token_alone(client):
    r = client.post("/v1/completions", json={"prompt": "", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 1


# --------------------------------------------------------------------------------------------
# Validation: 4xx with an OpenAI-style body, never 5xx


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({}, 400, "prompt"),
        ({"prompt": 5}, 400, "prompt"),
        ({"prompt": []}, 400, "prompt"),
        ({"prompt": [1, 2, 3]}, 400, "prompt"),  # token-id prompts are not supported
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": 49}, 400, "max_tokens"),  # over the cap of 48
        ({"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
        ({"prompt": "x", "temperature": -0.1}, 400, "temperature"),
        ({"prompt": "x", "temperature": 2.5}, 400, "temperature"),
        ({"prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"prompt": "x", "top_p": 1.01}, 400, "top_p"),
        ({"prompt": "x", "n": 0}, 400, "n"),
        ({"prompt": "x", "n": 9}, 400, "n"),  # over max_choices
        ({"prompt": ["a", "b", "c"], "n": 3}, 400, "n"),
        ({"prompt": "x", "stream": "yes"}, 400, "stream"),
        ({"prompt": "x", "stop": ""}, 400, "stop"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"prompt": "x", "seed": -1}, 400, "seed"),
        ({"prompt": "x", "no_repeat_ngram_size": -1}, 400, "no_repeat_ngram_size"),
        ({"prompt": "x", "no_repeat_ngram_size": 2.0}, 400, "no_repeat_ngram_size"),
        ({"prompt": "x", "echo": True}, 400, "echo"),
        ({"prompt": "x", "logprobs": 2}, 400, "logprobs"),
        ({"prompt": "x", "logit_bias": {"5": 10}}, 400, "logit_bias"),
        ({"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
        ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
        ({"prompt": "x", "model": "topics"}, 400, "model"),  # a classifier
        ({"prompt": "x " * 200, "max_tokens": 4}, 400, "prompt"),  # longer than the 64-token context
        ({"prompt": "x " * 10, "max_tokens": 48}, 400, "max_tokens"),  # fits alone, not with max_tokens
    ],
)
def test_invalid_completion_requests_get_openai_style_4xx(client, body, status, param):
    assert_openai_error(client.post("/v1/completions", json=body), status, param)


@pytest.mark.parametrize(
    "raw",
    [b"{", b"[]", b"null", b'"prompt"', b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "\\ud800"}'],
)
def test_malformed_json_bodies_get_400(client, raw):
    r = client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert_openai_error(r, 400)


def test_body_over_the_size_limit_gets_413(client):
    r = client.post("/v1/completions", json={"prompt": "x" * 1_100_000})
    assert_openai_error(r, 413)


def test_prompt_over_the_token_cap_gets_400(models):
    lm, lm_name, _ = models
    app = create_app(lm, config=ServerConfig(max_prompt_tokens=4, context_policy="sliding"), lm_name=lm_name)
    with run_in_thread(app) as url:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "the market rose sharply", "max_tokens": 2})
        err = assert_openai_error(r, 400, "prompt")
        assert err["code"] == "context_length_exceeded"
        # Under the sliding policy a prompt within the cap may exceed the context with max_tokens.
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "the", "max_tokens": 100, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
PLAUSIBLE = {
    "model": st.sampled_from(["tiny-lm", "topics", "nope"]),
    "prompt": st.text(max_size=40) | st.lists(st.text(max_size=12), max_size=4),
    "max_tokens": st.integers(-2, 60),
    "temperature": st.floats(-1, 3),
    "top_p": st.floats(-0.5, 1.5),
    "top_k": st.integers(-2, 400),
    "n": st.integers(-1, 4),
    "stream": st.booleans(),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5),
    "seed": st.integers(-3, 2**64),
    "repetition_penalty": st.floats(-1, 12),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "echo": st.booleans(),
    "best_of": st.integers(0, 3),
    "user": st.text(max_size=8),
}
BODIES = st.fixed_dictionaries({}, optional={k: v | JSON for k, v in PLAUSIBLE.items()}) | JSON


@settings(
    max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
@given(body=BODIES)
def test_fuzzed_completion_bodies_never_get_5xx(server, body):
    with httpx.Client(base_url=server, headers=AUTH, timeout=30) as c:
        content = json.dumps(body).encode()  # may contain NaN/Infinity, which Python's json parser accepts
        with c.stream(
            "POST", "/v1/completions", content=content, headers={"Content-Type": "application/json"}
        ) as r:
            text = r.read().decode()
        assert r.status_code < 500, text
        if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
            assert text.rstrip().endswith("data: [DONE]"), text
        elif r.status_code == 200:
            assert len(json.loads(text)["choices"]) >= 1
        else:
            assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}


@settings(
    max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
@given(body=st.fixed_dictionaries({}, optional={"input": PLAUSIBLE["prompt"] | JSON, "model": JSON}) | JSON)
def test_fuzzed_classify_bodies_never_get_5xx(server, body):
    r = httpx.post(
        f"{server}/v1/classify",
        content=json.dumps(body),
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert r.status_code < 500, r.text


def test_server_is_healthy_after_the_fuzzing(client):
    # Module order runs this after the fuzz tests; it also holds on its own.
    health = client.get("/health").json()
    assert health["pool"]["running"] == 0 and health["scheduler"]["active"] == 0
    r = client.post("/v1/completions", json={"prompt": "the market", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200


# --------------------------------------------------------------------------------------------
# Classification


def test_classify_matches_the_runtime_classifier(client, models):
    _, _, classifiers = models
    texts = ["the market rose", "sport news", ""]
    r = client.post("/v1/classify", json={"input": texts})
    assert r.status_code == 200
    want = classifiers["topics"].classify(texts)
    got = r.json()["data"]
    assert [d["label"] for d in got] == [w["label"] for w in want]
    for d, w in zip(got, want, strict=True):
        assert d["probs"] == pytest.approx(w["probs"]) and sum(d["probs"].values()) == pytest.approx(1.0)
    assert client.post("/v1/classify", json={"text": "tech"}).json()["data"][0]["label"] in LABELS


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({}, 400),
        ({"input": []}, 400),
        ({"input": "a", "text": "b"}, 400),
        ({"input": 3}, 400),
        ({"input": "a", "model": "tiny-lm"}, 404),
        ({"input": ["a"] * 9}, 400),
    ],
)
def test_invalid_classify_requests_get_4xx(client, body, status):
    assert_openai_error(client.post("/v1/classify", json=body), status)


# --------------------------------------------------------------------------------------------
# Concurrency: overload, time limits, disconnects


class SlowLM:
    """Wraps the real LM: every session call waits for ``gate`` and takes at least ``delay`` seconds."""

    def __init__(self, lm, delay: float = 0.0):
        self.lm, self.delay, self.gate = lm, delay, threading.Event()
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def _forward(self, *args, **kwargs):
        self.gate.wait(timeout=30)
        time.sleep(self.delay)
        return self.lm._forward(*args, **kwargs)


def wait_until(predicate, timeout=10.0):
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, "condition not reached in time"
        time.sleep(0.01)


def scheduler_stats(url: str) -> dict:
    return httpx.get(f"{url}/health").json()["scheduler"]


def test_overload_answers_503_for_the_excess_and_recovers(models):
    lm, lm_name, _ = models
    slow = SlowLM(lm)
    slow.gate.clear()
    config = ServerConfig(max_active=1, queue_size=1, retry_after_s=2)
    app = create_app(slow, config=config, lm_name=lm_name)
    body = {"prompt": "the market", "max_tokens": 4, "temperature": 0}
    with run_in_thread(app) as url, ThreadPoolExecutor(8) as pool:
        admitted = [pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=30)]
        wait_until(lambda: scheduler_stats(url)["admitted"] == 1 and scheduler_stats(url)["queued"] == 0)
        admitted.append(pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=30))
        wait_until(
            lambda: scheduler_stats(url)["queued"] == 1
        )  # one decoding (held at the gate), one waiting
        burst = list(pool.map(lambda _: httpx.post(f"{url}/v1/completions", json=body, timeout=30), range(6)))
        for r in burst:
            assert_openai_error(r, 503)
            assert r.headers["retry-after"] == "2"
        slow.gate.set()
        want = greedy(lm, "the market", 4).text
        assert [f.result().json()["choices"][0]["text"] for f in admitted] == [want, want]
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200
        stats = scheduler_stats(url)
        assert (stats["active"], stats["queued"], stats["rejected"], stats["completed"]) == (0, 0, 6, 3)


def test_a_504_frees_its_row(models):
    lm, lm_name, _ = models
    slow = SlowLM(lm, delay=0.02)  # 48 tokens take about 1 s, well past the 0.3 s limit
    app = create_app(slow, config=ServerConfig(timeout_s=0.3), lm_name=lm_name)
    with run_in_thread(app) as url:
        body = {"prompt": "x", "max_tokens": 48, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=10)
        assert_openai_error(r, 504)
        stats = scheduler_stats(url)  # the 504 is sent once the row has left: no waiting here
        assert (stats["active"], stats["timed_out"]) == (0, 1)
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=10) as s:
            events = [line for line in s.iter_lines() if line]
        assert json.loads(events[-1][len("data: ") :])["error"]["code"] == "timeout"
        stats = scheduler_stats(url)
        assert (stats["active"], stats["timed_out"]) == (0, 2)


def test_client_disconnecting_mid_stream_frees_its_slot_within_one_step(models):
    lm, lm_name, _ = models
    slow = SlowLM(lm, delay=0.01)
    config = ServerConfig(max_tokens_cap=2000, context_policy="sliding")
    app = create_app(slow, config=config, lm_name=lm_name)
    with run_in_thread(app) as url:
        body = {"prompt": "x", "max_tokens": 2000, "stream": True, "temperature": 0, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=10) as s:
            lines = s.iter_lines()
            got = 0
            while got < 3:
                got += bool(next(lines))
            assert scheduler_stats(url)["active"] == 1
        wait_until(lambda: scheduler_stats(url)["cancelled"] == 1)
        stats = scheduler_stats(url)
        assert stats["active"] == 0 and stats["free_lag_steps_max"] <= 1, stats
        assert stats["steps"] < 1000  # it did not run on to 2000 tokens


def test_client_leaving_a_plain_request_frees_its_slot(models):
    lm, lm_name, _ = models
    slow = SlowLM(lm, delay=0.02)
    app = create_app(
        slow, config=ServerConfig(max_tokens_cap=2000, context_policy="sliding"), lm_name=lm_name
    )
    with run_in_thread(app) as url:
        body = {"prompt": "x", "max_tokens": 2000, "temperature": 0, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=body, timeout=0.5)
        wait_until(lambda: scheduler_stats(url)["cancelled"] == 1)
        stats = scheduler_stats(url)
        assert stats["active"] == 0 and stats["free_lag_steps_max"] <= 1, stats


# --------------------------------------------------------------------------------------------
# Honest results: streamed and plain agree, choice by choice


def stream_choices(client, body) -> tuple[list[str], list[str], dict | None]:
    """Texts and finish reasons per choice index, and the usage chunk, of a streamed request."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        events = [
            json.loads(line[len("data: ") :]) for line in r.iter_lines() if line and "[DONE]" not in line
        ]
    n = 1 + max(c["index"] for e in events for c in e["choices"])
    texts, reasons = [""] * n, [None] * n
    for e in events:
        for c in e["choices"]:
            texts[c["index"]] += c["text"]
            reasons[c["index"]] = c["finish_reason"] or reasons[c["index"]]
    usage = [e["usage"] for e in events if e.get("usage")]
    return texts, reasons, usage[0] if usage else None


def test_seeded_n3_gives_three_different_choices_the_same_streamed_and_not(client, models):
    lm, _, _ = models
    body = {"prompt": "the market", "n": 3, "max_tokens": 16, "temperature": 1.0, "seed": 11}
    plain = client.post("/v1/completions", json=body).json()["choices"]
    texts = [c["text"] for c in plain]
    assert len(set(texts)) == 3, texts
    streamed, reasons, _ = stream_choices(client, body)
    assert streamed == texts and reasons == [c["finish_reason"] for c in plain]
    cfg = GenerationConfig(max_new_tokens=16, temperature=1.0, seed=11)
    assert [g.text for g in lm.generate(["the market"] * 3, cfg)] == texts  # choice i = stream (seed, i)


@pytest.mark.parametrize(
    "extra",
    [
        {"temperature": 0},
        {"temperature": 1.2, "seed": 3, "n": 2},
        {"temperature": 0, "stop": ["e"]},
        {"temperature": 0.9, "top_k": 20, "seed": 5, "prompt": PROMPTS},
    ],
)
def test_streamed_usage_and_finish_reasons_equal_the_plain_ones(client, extra):
    body = {"prompt": PROMPTS[1], "max_tokens": 20, **extra}
    plain = client.post("/v1/completions", json=body).json()
    texts, reasons, usage = stream_choices(client, body)
    assert usage == plain["usage"]
    assert texts == [c["text"] for c in plain["choices"]]
    assert reasons == [c["finish_reason"] for c in plain["choices"]]


# --------------------------------------------------------------------------------------------
# Hardening


def test_foreign_host_header_is_refused_on_a_loopback_bind(server):
    r = httpx.get(f"{server}/health", headers={"Host": "evil.example:80"})
    assert r.status_code == 400
    assert httpx.get(f"{server}/health", headers={"Host": "localhost"}).status_code == 200


def test_docs_and_openapi_are_off_unless_asked_for(server, models):
    lm, lm_name, _ = models
    assert httpx.get(f"{server}/docs").status_code == 404
    assert httpx.get(f"{server}/openapi.json").status_code == 404
    with run_in_thread(create_app(lm, config=ServerConfig(docs=True), lm_name=lm_name)) as url:
        assert httpx.get(f"{url}/openapi.json").status_code == 200


def test_health_reveals_load_and_version_only_with_the_key(server):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    full = httpx.get(f"{server}/health", headers=AUTH).json()
    assert {"models", "version", "scheduler", "pool"} <= set(full)


def test_prompt_over_the_byte_limit_is_refused_before_tokenizing(models):
    lm, lm_name, _ = models

    class NoTokenizing(SlowLM):
        def _prompt_ids(self, text):
            raise AssertionError("tokenized a prompt over the byte limit")

    app = create_app(NoTokenizing(lm), config=ServerConfig(max_prompt_bytes=8), lm_name=lm_name)
    with run_in_thread(app) as url:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "市场 上涨", "max_tokens": 2})  # 13 bytes
        assert assert_openai_error(r, 400, "prompt")["code"] == "context_length_exceeded"


def test_a_body_that_never_arrives_gets_408(models):
    lm, lm_name, _ = models
    with run_in_thread(create_app(lm, config=ServerConfig(body_timeout_s=0.3), lm_name=lm_name)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            sock.sendall((head + "Content-Length: 100\r\n\r\n{").encode())
            t0 = time.monotonic()
            reply = sock.recv(4096).decode()
        assert reply.startswith("HTTP/1.1 408") and time.monotonic() - t0 < 3


# --------------------------------------------------------------------------------------------
# Deployment: torch-free, the CLI, MLflow model URIs


def test_server_imports_and_serves_without_torch(bundles):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from fastapi.testclient import TestClient\n"
        "from deploy.server import create_app, load_models\n"
        f"lm, name, clfs = load_models({str(bundles['tiny-lm'])!r}, [{str(bundles['topics'])!r}])\n"
        "r = TestClient(create_app(lm, clfs, lm_name=name), base_url='http://127.0.0.1').post('/v1/completions', json={'prompt': 'a'})\n"
        "assert r.status_code == 200, r.text\n"
        "assert 'torch' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=Path(__file__).parents[1])


def test_model_uri_resolves_to_the_bundle_inside_a_logged_model(bundles, tmp_path):
    logged = tmp_path / "model" / "artifacts" / "bundle"
    shutil.copytree(bundles["tiny-lm"], logged)
    (tmp_path / "model" / "MLmodel").write_text("flavors: {}\n")
    bundle, name = resolve_model_uri(str(tmp_path / "model"), tmp_path / "download")
    assert (bundle / "model.onnx").is_file() and name == "bundle"
    with pytest.raises(FileNotFoundError, match="holds no bundle"):
        resolve_model_uri(
            str(tmp_path / "download" / "model" / "artifacts" / "bundle" / "config.json"), tmp_path / "x"
        )


@pytest.mark.slow
def test_gptflow_serve_cli_starts_answers_and_stops(bundles):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "gptflow.cli",
        "serve",
        "--bundle",
        str(bundles["tiny-lm"]),
        "--port",
        str(port),
        "--classifier",
        str(bundles["topics"]),
        "--no-access-log",
    ]
    env = {**os.environ, "GPTFLOW_API_KEY": KEY}
    proc = subprocess.Popen(cmd, cwd=Path(__file__).parents[1], env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() - t0 < 60, "server did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(f"{url}/v1/models").status_code == 401  # key taken from GPTFLOW_API_KEY
        ids = [m["id"] for m in httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"]]
        assert ids == ["tiny-lm", "topics"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(timeout=15) == 0
            assert "Traceback" not in proc.stderr.read()
        finally:
            proc.kill()


@pytest.mark.slow
def test_promoting_a_new_version_while_a_stream_runs(bundles, tmp_path, caplog, monkeypatch):
    """The stream finishes on the old version, the next request is served by the new one; a version
    that fails to load keeps the old one and says why."""
    import logging

    import mlflow

    from deploy.registry import RegistryFollower, resolve
    from deploy.runtime import load_bundle

    def promote(bundle) -> None:
        """What a retrain does: log the bundle as the pyfunc model (artifact "bundle"), register it, move the alias."""
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(ROOT / "deploy" / "mlflow_model.py"),
            artifacts={"bundle": str(bundle)},
            pip_requirements=["onnxruntime", "sentencepiece", "numpy"],
        )
        version = mlflow.register_model(info.model_uri, "gptflow-lm").version
        mlflow.MlflowClient().set_registered_model_alias("gptflow-lm", "champion", version)

    old_uri = mlflow.get_tracking_uri()
    # set_tracking_uri exports MLFLOW_TRACKING_URI; monkeypatch puts the environment back afterwards.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI", ""))
    if not os.environ["MLFLOW_TRACKING_URI"]:
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("serve", (tmp_path / "artifacts").as_uri()))
    try:
        promote(bundles["tiny-lm"])
        bundle, name, version = resolve("models:/gptflow-lm@champion", tmp_path / "served")
        assert (name, version) == ("gptflow-lm", "1")

        def load(path):
            return SlowLM(load_bundle(path), delay=0.05)  # 60 tokens take ~3 s: the swap lands mid-stream

        app = create_app(load(bundle), config=ServerConfig(max_tokens_cap=64), lm_name=name, version=version)
        models = app.state.models
        follower = RegistryFollower(name, "champion", version, tmp_path / "served", load, models.swap, 3600)
        promote(bundles["tiny-lm"])  # v2 is champion
        body = {"prompt": "x", "max_tokens": 60, "temperature": 0, "ignore_eos": True}
        with run_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as c:
            old = models.served
            stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
            with c.stream("POST", "/v1/completions", json=stream) as s:
                lines = (line for line in s.iter_lines() if line)
                first = json.loads(next(lines)[len("data: ") :])
                assert follower.poll_once()
                assert old.scheduler.stats()["active"] == 1  # the stream was still decoding at the swap
                rest = list(lines)
            assert rest[-1] == "data: [DONE]"
            chunks = [first] + [json.loads(line[len("data: ") :]) for line in rest[:-1]]
            assert chunks[-1]["usage"]["completion_tokens"] == 60
            assert {ch["system_fingerprint"] for ch in chunks} == {"gptflow-lm:1"}
            r = c.post("/v1/completions", json=body).json()
            assert r["system_fingerprint"] == "gptflow-lm:2" and r["usage"]["completion_tokens"] == 60
            assert c.get("/v1/models").json()["data"][0]["version"] == "2"
            assert c.get("/health").json()["version"] == "2"
            wait_until(lambda: not old.scheduler.running)  # the old scheduler ends once drained

            broken = tmp_path / "broken"
            shutil.copytree(bundles["tiny-lm"], broken)
            (broken / "model.onnx").write_bytes(b"not an onnx graph")
            promote(broken)  # v3: champion, unloadable
            with caplog.at_level(logging.WARNING, logger="deploy.registry"):
                assert not follower.poll_once()
            assert (
                "version 3, which failed to load" in caplog.text and "still serving version 2" in caplog.text
            )
            assert c.post("/v1/completions", json=body).json()["system_fingerprint"] == "gptflow-lm:2"
    finally:
        mlflow.set_tracking_uri(old_uri)
