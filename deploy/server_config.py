"""Settings of the inference server (``gptflow serve``): stdlib only, so the CLI can build its flags cheaply."""

from __future__ import annotations

import math
from dataclasses import dataclass

CONTEXT_POLICIES = ("error", "sliding")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServerConfig:
    """Limits and wiring of the OpenAI-compatible server; every field is a ``gptflow serve`` flag."""

    host: str = "127.0.0.1"  # interface to bind; loopback unless you mean to expose the server
    port: int = 8000  # TCP port (0 picks a free one)
    max_active: int = 32  # sequences the language model decodes together (continuous batching; 1 = off)
    batch_rows: int | None = (
        None  # rows per decode call, groups taking turns so a new prompt waits for one short call (unset: 8 on CPU, all on CUDA; 0 = all)
    )
    threads: int = 0  # ONNX Runtime intra-op threads per model (0 = one per core)
    queue_size: int = 32  # requests that may wait for a sequence slot (or a classifier worker); beyond: 503
    workers: int = 2  # threads running classifier calls (the language model has its own scheduler thread)
    max_tokens_cap: int = 256  # largest max_tokens a completion request may ask for
    default_max_tokens: int = 16  # max_tokens when a request leaves it out (OpenAI's default)
    max_prompt_tokens: int = 4096  # longest prompt or text to classify, in tokens
    max_prompt_bytes: int = 100_000  # longest prompt or text in UTF-8 bytes, checked before tokenizing
    max_choices: int = 16  # prompts x n in one completion request, texts in one classify request
    max_body_bytes: int = 1_000_000  # larger request bodies get 413
    body_timeout_s: float = 10.0  # a request body not fully received in this time gets 408
    limit_concurrency: int = 512  # open connections + tasks uvicorn allows; beyond, it answers 503
    timeout_s: float = 60.0  # per-request limit incl. queueing: 504, or an error event mid-stream
    api_key: str | None = None  # require "Authorization: Bearer <key>" on /v1/* (or set GPTFLOW_API_KEY)
    model_name: str | None = None  # id the language model is served under; unset: the bundle name
    context_policy: str = "error"  # error: prompt + max_tokens must fit the context | sliding: window slides
    retry_after_s: int = 1  # Retry-After header value on 503 (server busy)
    docs: bool = False  # serve /docs and /openapi.json
    allowed_hosts: tuple[
        str, ...
    ] = ()  # Host headers accepted (unset: loopback names on a loopback bind, any otherwise)

    def __post_init__(self) -> None:
        for name in (
            "max_active",
            "workers",
            "max_tokens_cap",
            "default_max_tokens",
            "max_prompt_tokens",
            "max_prompt_bytes",
            "max_choices",
            "max_body_bytes",
            "retry_after_s",
            "limit_concurrency",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ServerConfig.{name}={value!r} must be an integer >= 1")
        if self.batch_rows is not None and (not isinstance(self.batch_rows, int) or self.batch_rows < 0):
            raise ValueError(
                f"ServerConfig.batch_rows={self.batch_rows!r} must be an integer >= 0 (0 = all rows)"
            )
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(
                f"ServerConfig.threads={self.threads!r} must be an integer >= 0 (0 = one per core)"
            )
        if not isinstance(self.queue_size, int) or self.queue_size < 0:
            raise ValueError(f"ServerConfig.queue_size={self.queue_size!r} must be an integer >= 0")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"ServerConfig.port={self.port!r} must be in [0, 65535] (0 = any free port)")
        for name in ("timeout_s", "body_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or math.isnan(value) or value <= 0:
                raise ValueError(f"ServerConfig.{name}={value!r} must be a positive number of seconds")
        self.allowed_hosts = tuple(self.allowed_hosts)
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError(
                f"ServerConfig.default_max_tokens={self.default_max_tokens} exceeds "
                f"max_tokens_cap={self.max_tokens_cap}; lower it or raise --max-tokens-cap"
            )
        if self.context_policy not in CONTEXT_POLICIES:
            raise ValueError(
                f"ServerConfig.context_policy={self.context_policy!r} is not allowed; "
                f"choose one of {', '.join(CONTEXT_POLICIES)}"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("ServerConfig.api_key is empty; pass a non-empty key or leave it out")

    def trusted_hosts(self) -> list[str] | None:
        """Host headers to accept; None: any (a non-loopback bind without --allowed-hosts)."""
        if self.allowed_hosts:
            return list(self.allowed_hosts)
        return [*LOOPBACK_HOSTS, "[::1]"] if self.host in LOOPBACK_HOSTS else None
