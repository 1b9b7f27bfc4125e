"""Load test of ``gptflow serve`` on loopback: continuous batching vs batching off, then overload.

For each model shape (random weights: the ``cpu`` preset and GPT-2 124M) and each server mode
((a) ``batched``: the default scheduler; (b) ``off``: ``--max-active 1``), one server subprocess
serves closed-loop clients (1, 8, 32 by default) that stream 64-token completions (``ignore_eos``,
so every completion has exactly ``--max-tokens`` tokens; ``usage`` gives the count). Per phase:
aggregate completion tokens/s, latency p50/p99 and time to first token (first text chunk) p50/p99.
The overload phase starts a server with its default ``max_active`` and ``queue_size`` and a short
``--overload-timeout-s``, fires ``--overload-clients`` requests at once, and reports the 503 rate
and whether any request got its answer later than its deadline (plus one decode step of grace).
Prints one JSON object. Loopback only; every phase is bounded in time.

    python benchmarks/serve_load.py                                  # both shapes, ~6 min
    python benchmarks/serve_load.py --shapes cpu --clients 1 8 --phase-s 4 --no-overload   # quick
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The market", "Shares of tech firms rose as", "Bonds fell while traders", "Traders bought"]


def random_bundle(out: Path, shape: str) -> Path:
    """A randomly initialised model of ``shape`` with a small tokenizer, exported without the parity
    check (that is the tests' job; this is what benchmarks/decode_latency.py does). Needs torch."""
    import torch

    sys.path.insert(0, str(ROOT))
    from gpt.bundle import CONFIG_FILE, ONNX_FILE, TOKENIZER_FILE, BundleConfig
    from gpt.config import ModelConfig
    from gpt.corpora import load_corpus
    from gpt.export import export_onnx
    from gpt.io import sha256_file
    from gpt.model import GPT
    from gpt.tokenizer import Tokenizer, TokenizerConfig

    bundle = out / shape
    if (bundle / CONFIG_FILE).is_file():
        return bundle
    # A 4096-piece BPE on BBC News: prompts are a few tokens, and the random model's output is mostly
    # whole pieces (a tiny vocabulary is mostly byte pieces, whose text is held back until complete).
    texts = [d.text for d in itertools.islice(load_corpus("bbc"), 600)]
    tok = Tokenizer.train(texts, out / f"tokenizer-{shape}", TokenizerConfig(vocab_size=4096))
    torch.manual_seed(0)
    preset = {"cpu": "cpu", "124m": "gpt2-124m"}[shape]
    model = GPT(ModelConfig.preset(preset)).eval()
    tmp = out / f".{shape}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    export_onnx(model, tmp / ONNX_FILE)
    shutil.copyfile(tok.path, tmp / TOKENIZER_FILE)
    config = BundleConfig(
        kind="lm",
        model=model.config.to_dict(),
        tokenizer_hash=sha256_file(tok.path),
        name=f"random-{shape}",
        kv_cache="in_place",
    )
    config.write(tmp)
    tmp.rename(bundle)
    return bundle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gptflow.cli", "serve", "--bundle", str(bundle), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--no-access-log", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not healthy after {timeout} s")


def stop_server(proc: subprocess.Popen) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(1000 * v[min(len(v) - 1, int(p / 100 * len(v)))], 1)


async def one_request(c: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict:
    """A streamed completion: status, time to first text, total latency, completion tokens."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft, tokens, error = None, 0, None
    try:
        async with c.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"status": r.status_code, "latency": time.perf_counter() - t0, "tokens": 0}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"].get("code") or "error"
                elif event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                elif ttft is None and any(ch["text"] for ch in event["choices"]):
                    ttft = time.perf_counter() - t0
    except httpx.HTTPError as e:
        return {"status": type(e).__name__, "latency": time.perf_counter() - t0, "tokens": 0}
    status = 200 if error is None else f"stream:{error}"
    return {"status": status, "latency": time.perf_counter() - t0, "ttft": ttft, "tokens": tokens}


async def closed_loop(
    url: str, clients: int, max_tokens: int, phase_s: float, stagger_s: float, bound_s: float
) -> dict:
    """``clients`` clients each send one request after another until ``phase_s`` has passed (each
    sends at least one); client i starts at i * stagger_s / clients, so arrivals are spread as in a
    running service rather than one burst. tokens/s counts completed tokens over the time until the
    last answer."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    results: list[dict] = []
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=bound_s) as c:
        for prompt in PROMPTS:  # warm-up: first ORT runs allocate
            await one_request(c, prompt, 4)
        t0 = time.perf_counter()

        async def client(i: int) -> None:
            await asyncio.sleep(i * stagger_s / clients)
            j = 0
            while j == 0 or time.perf_counter() - t0 < phase_s:
                results.append(await one_request(c, PROMPTS[(i + j) % len(PROMPTS)], max_tokens))
                j += 1

        await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(clients))), bound_s)
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    errors: dict[str, int] = {}
    for r in results:
        if r["status"] != 200:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    return {
        "clients": clients,
        "requests": len(results),
        "errors": errors,
        "completion_tokens": sum(r["tokens"] for r in ok),
        "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
        "latency_ms": {
            "p50": pct([r["latency"] for r in ok], 50),
            "p99": pct([r["latency"] for r in ok], 99),
        },
        "ttft_ms": {
            "p50": pct([r["ttft"] for r in ok if r["ttft"] is not None], 50),
            "p99": pct([r["ttft"] for r in ok if r["ttft"] is not None], 99),
        },
        "wall_s": round(wall, 2),
    }


async def overload(url: str, clients: int, max_tokens: int, timeout_s: float, bound_s: float) -> dict:
    """``clients`` requests at once against the default queue: how many were refused, and whether
    every answer (200, 503, 504 or a timeout event) came before the request's deadline."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=bound_s) as c:
        await one_request(c, "warm up", 4)
        results = await asyncio.wait_for(
            asyncio.gather(*(one_request(c, PROMPTS[i % len(PROMPTS)], max_tokens) for i in range(clients))),
            bound_s,
        )
    counts: dict[str, int] = {}
    for r in results:
        counts[str(r["status"])] = counts.get(str(r["status"]), 0) + 1
    latest = max(r["latency"] for r in results)
    return {
        "clients": clients,
        "status_counts": counts,
        "rate_503": round(counts.get("503", 0) / clients, 3),
        "deadline_s": timeout_s,
        "latest_answer_s": round(latest, 3),
        "answers_after_deadline": sum(r["latency"] > timeout_s + 1.0 for r in results),
        "latency_ms": {"p50": pct([r["latency"] for r in results], 50), "max": round(1000 * latest, 1)},
    }


def run_server(bundle: Path, extra: list[str], fn) -> tuple[dict, dict]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(bundle, port, extra)
    try:
        wait_healthy(url, proc, timeout=180)
        result = fn(url)
        health = httpx.get(f"{url}/health", timeout=5).json()
    finally:
        stop_server(proc)
    return result, health.get("scheduler", {})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["cpu", "124m"], choices=["cpu", "124m"])
    p.add_argument("--modes", nargs="+", default=["batched", "off"], choices=["batched", "off"])
    p.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument(
        "--phase-s", type=float, default=20.0, help="closed-loop time per phase (each client sends >= 1)"
    )
    p.add_argument("--stagger-s", type=float, default=5.0, help="clients start spread over this many seconds")
    p.add_argument("--bound-s", type=float, default=240.0, help="hard bound on one phase")
    p.add_argument("--overload", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--overload-shape", default="124m", choices=["cpu", "124m"])
    p.add_argument("--overload-clients", type=int, default=160)
    p.add_argument("--overload-timeout-s", type=float, default=30.0, help="the server's --timeout-s there")
    p.add_argument(
        "--server-args",
        default="--threads 1",
        help="extra `gptflow serve` flags for every server (default: one ORT thread: the loopback clients "
        "and the server's event loop share the cores with it)",
    )
    p.add_argument("--cache-dir", type=Path, help="keep the exported random bundles here between runs")
    args = p.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    t_start = time.perf_counter()
    report: dict = {
        "benchmark": "serve_load",
        "max_tokens": args.max_tokens,
        "server_args": args.server_args,
        "cpu_count": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],  # another busy process skews every figure
    }
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        cache = args.cache_dir or Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        shapes = list(dict.fromkeys(args.shapes + ([args.overload_shape] if args.overload else [])))
        bundles = {s: random_bundle(cache, s) for s in shapes}
        common = ["--max-tokens-cap", str(max(args.max_tokens, 16)), "--context-policy", "sliding"]
        common += shlex.split(args.server_args)
        for shape in args.shapes:
            report[shape] = {}
            for mode in args.modes:
                top = max(args.clients)
                extra = [*common, "--timeout-s", str(args.bound_s), "--queue-size", str(top)]
                extra += ["--max-active", str(top) if mode == "batched" else "1"]

                def phases(url: str) -> list[dict]:
                    return [
                        asyncio.run(
                            closed_loop(url, n, args.max_tokens, args.phase_s, args.stagger_s, args.bound_s)
                        )
                        for n in args.clients
                    ]

                results, stats = run_server(bundles[shape], extra, phases)
                report[shape][mode] = {"phases": results, "scheduler_after": stats}
                print(
                    f"{shape} {mode}: {[(r['clients'], r['tokens_per_s']) for r in results]}", file=sys.stderr
                )
            modes = report[shape]
            if {"batched", "off"} <= set(modes) and 1 in args.clients:
                top = max(args.clients)
                a = {r["clients"]: r for r in modes["batched"]["phases"]}
                b = {r["clients"]: r for r in modes["off"]["phases"]}
                report[shape]["at_top_clients"] = {
                    "clients": top,
                    "tokens_per_s_batched_over_off": round(
                        a[top]["tokens_per_s"] / b[top]["tokens_per_s"], 2
                    ),
                    "ttft_p50_over_single_client": round(
                        a[top]["ttft_ms"]["p50"] / a[1]["ttft_ms"]["p50"], 2
                    ),
                }
        if args.overload:
            extra = [*common, "--timeout-s", str(args.overload_timeout_s)]
            bound = args.overload_timeout_s * 3 + 30

            def flood(url: str) -> dict:
                return asyncio.run(
                    overload(url, args.overload_clients, args.max_tokens, args.overload_timeout_s, bound)
                )

            result, stats = run_server(bundles[args.overload_shape], extra, flood)
            report["overload"] = {"shape": args.overload_shape, **result, "scheduler_after": stats}
    report["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
