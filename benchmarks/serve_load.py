"""Load test of ``gptflow serve`` on loopback: N concurrent clients x M completion requests each.

Starts the server in a subprocess (over ``--bundle``, or a freshly exported random tiny model), waits
for /health, runs the clients with httpx, stops the server, and prints one JSON object: errors
(must be 0), latency p50/p90/p99, requests/s and completion tokens/s. Loopback only; bounded by
``--deadline-s``.

    python benchmarks/serve_load.py                       # 32 clients x 20 requests, tiny model
    python benchmarks/serve_load.py --bundle artifacts/bundle --clients 8 --requests 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
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


def tiny_bundle(out: Path, preset: str) -> Path:
    """A randomly initialised model of ``preset`` with a small tokenizer, exported (needs torch)."""
    import torch

    from gpt.checkpoint import save_model
    from gpt.config import ModelConfig
    from gpt.export import ExportConfig, export_bundle
    from gpt.model import GPT
    from gpt.tokenizer import Tokenizer, TokenizerConfig

    rng = random.Random(0)
    words = ["the", "market", "rose", "as", "traders", "bought", "shares", "of", "tech", "firms", "while"]
    texts = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]
    tok = Tokenizer.train(texts, out / "tokenizer", TokenizerConfig(vocab_size=300))
    torch.manual_seed(0)
    ckpt = out / "checkpoint"
    save_model(ckpt, GPT(ModelConfig.preset(preset)), tokenizer_hash=tok.hash)
    shutil.copyfile(out / "tokenizer" / "tokenizer.model", ckpt / "tokenizer.model")
    export_bundle(ckpt, out / "bundle", ExportConfig(greedy_tokens=0, parity_decode_steps=4))
    return out / "bundle"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gptflow.cli", "serve", "--bundle", str(bundle), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", str(args.workers), "--queue-size", str(args.queue_size)]
    cmd += [
        "--max-tokens-cap",
        str(max(args.max_tokens, 16)),
        "--context-policy",
        "sliding",
        "--no-access-log",
    ]
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


async def load(url: str, args: argparse.Namespace) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    tokens = 0
    prompts = ["The market", "Shares of tech firms", "Bonds fell while", "Traders bought"]
    body = {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": 0}
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)

    async def client(c: httpx.AsyncClient, i: int) -> None:
        nonlocal tokens
        for j in range(args.requests):
            t0 = time.perf_counter()
            try:
                r = await c.post("/v1/completions", json={**body, "prompt": prompts[(i + j) % len(prompts)]})
                ok = r.status_code == 200
                key = str(r.status_code)
            except httpx.HTTPError as e:
                ok, key = False, type(e).__name__
            latencies.append(time.perf_counter() - t0)
            if ok:
                tokens += r.json()["usage"]["completion_tokens"]
            else:
                errors[key] = errors.get(key, 0) + 1

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=args.request_timeout_s) as c:
        for _ in range(3):  # warm-up: first ORT runs allocate
            await c.post("/v1/completions", json={**body, "prompt": "warm up"})
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client(c, i) for i in range(args.clients))), args.deadline_s)
        wall = time.perf_counter() - t0
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return round(1000 * lat[min(len(lat) - 1, int(p / 100 * len(lat)))], 2)

    n_err = sum(errors.values())
    return {
        "requests": len(lat),
        "errors": n_err,
        "error_kinds": errors,
        "zero_errors": n_err == 0,
        "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": round(1000 * lat[-1], 2)},
        "requests_per_s": round(len(lat) / wall, 2),
        "completion_tokens_per_s": round(tokens / wall, 1),
        "completion_tokens": tokens,
        "wall_s": round(wall, 3),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, help="bundle to serve (default: export a random model of --preset)")
    p.add_argument("--preset", default="tiny", help="model preset for the default random bundle")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=20, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--queue-size", type=int, default=None, help="default: --clients (so nothing is refused)")
    p.add_argument("--request-timeout-s", type=float, default=120.0)
    p.add_argument("--deadline-s", type=float, default=600.0, help="bound on the whole load phase")
    args = p.parse_args()
    args.queue_size = args.clients if args.queue_size is None else args.queue_size
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        bundle = args.bundle or tiny_bundle(Path(tmp), args.preset)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(bundle, port, args)
        try:
            wait_healthy(url, proc, timeout=120)
            result = asyncio.run(load(url, args))
            healthy_after = httpx.get(f"{url}/health", timeout=5).json()
        finally:
            code = stop_server(proc)
    report = {
        "benchmark": "serve_load",
        "bundle": str(args.bundle) if args.bundle else f"random {args.preset} (exported)",
        "clients": args.clients,
        "requests_per_client": args.requests,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "server": {"workers": args.workers, "queue_size": args.queue_size, "exit_code": code},
        **result,
        "pool_after": healthy_after["pool"],
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))
    return 0 if result["zero_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
