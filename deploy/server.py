"""OpenAI-compatible HTTP server over exported ONNX bundles (``gptflow serve``); torch-free.

Endpoints: ``POST /v1/completions`` (plain and server-sent-event streaming), ``GET /v1/models``,
``POST /v1/classify`` (classifier bundles), ``GET /health``.

Behaviour under load and bad input:
- Model calls run on a bounded pool of worker threads sharing one ONNX Runtime session per model.
  At most ``workers + queue_size`` requests are admitted; the next one gets 503 with ``Retry-After``.
- Each request has ``timeout_s`` from arrival (queueing included). A plain request that runs out of
  time gets 504 (a request still queued is dropped, one already running finishes in the background
  and holds its worker until then); a stream that runs out of time stops generating and ends with an
  error event, which the openai SDK raises as ``APIError``.
- A streaming client that disconnects stops its generation at the next token.
- Every field is validated; bad requests get 4xx with an OpenAI-style body
  ``{"error": {"message", "type", "param", "code"}}``, never 5xx. Bodies above ``max_body_bytes`` get 413.
- Sampling defaults follow OpenAI (temperature 1, top_p 1, max_tokens 16); temperature 0 is greedy.
  ``top_k`` and ``repetition_penalty`` are accepted as extensions. OpenAI fields this server does
  not implement (``echo``, ``logprobs``, ``best_of``, penalties, ``logit_bias``, ``suffix``) are
  accepted only at their neutral values; unknown fields are rejected.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy.runtime import GenerationConfig, load_bundle
from deploy.server_config import ServerConfig

log = logging.getLogger(__name__)

MAX_STOP = 4  # stop sequences per request, as OpenAI allows
MAX_STOP_CHARS = 256
SEED_MAX = 2**63 - 1


# --------------------------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "server_busy",
    504: "timeout",
}


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body")
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {err.get('msg')}", code="json_invalid")
    if not loc:
        return APIError(
            400,
            f"request body: {err.get('msg')}; send a JSON object with 'Content-Type: application/json'",
            code=err.get("type"),
        )
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return APIError(400, f"{'.'.join(loc)}: {err.get('msg')}{more}", param=loc[0], code=err.get("type"))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = _STATUS_TYPES.get(
            exc.status_code, "invalid_request_error" if exc.status_code < 500 else "server_error"
        )
        return APIError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return APIError(500, "internal server error; see the server log", type="server_error").response()


class BodyLimit:
    """ASGI middleware: buffer the request body up to ``max_bytes`` (413 beyond), then replay it.

    After the body is replayed, ``receive`` passes through so streaming responses still see disconnects.
    """

    def __init__(self, app: Callable, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = APIError(413, f"request body exceeds {self.max_bytes} bytes", code="body_too_large")
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await too_large.response()(scope, receive, send)
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away before sending the body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await too_large.response()(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> dict:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


# --------------------------------------------------------------------------------------------
# Worker pool


class Overloaded(Exception):
    pass


class WorkerPool:
    """A thread pool that admits at most ``workers + queue_size`` jobs; the next ``submit`` raises Overloaded."""

    def __init__(self, workers: int, queue_size: int):
        self.workers, self.capacity = workers, workers + queue_size
        self._executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="gptflow-serve")
        self._lock = threading.Lock()
        self.admitted = 0  # queued + running
        self.running = 0
        self.rejected = 0

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        with self._lock:
            if self.admitted >= self.capacity:
                self.rejected += 1
                raise Overloaded
            self.admitted += 1

        def job() -> Any:
            with self._lock:
                self.running += 1
            try:
                return fn()
            finally:
                with self._lock:
                    self.running -= 1

        try:
            future = self._executor.submit(job)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(lambda _: self._release())  # also fires when a queued job is cancelled
        return future

    def _release(self) -> None:
        with self._lock:
            self.admitted -= 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "workers": self.workers,
                "capacity": self.capacity,
                "running": self.running,
                "queued": self.admitted - self.running,
                "rejected": self.rejected,
            }

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# Request bodies


def _check_text(value: Any) -> Any:
    """Strings must be encodable as UTF-8 (JSON allows lone surrogates such as "\\ud800")."""
    for s in [value] if isinstance(value, str) else value or ():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError("text must be valid Unicode (found a lone surrogate)") from e
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = None


class CompletionRequest(BaseModel):
    """OpenAI ``/v1/completions`` body (the subset this server implements)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, max_length=256)
    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    # Extensions (vLLM spells them the same way).
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, le=10, allow_inf_nan=False)
    # OpenAI fields accepted only at their neutral values.
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    frequency_penalty: float | None = Field(None, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, allow_inf_nan=False)
    logit_bias: dict[str, int] | None = None
    suffix: str | None = None
    user: str | None = Field(None, max_length=256)

    _text = field_validator("prompt", "stop", "model")(_check_text)

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop sequence must be 1 to {MAX_STOP_CHARS} characters long")
        return value


class ClassifyRequest(BaseModel):
    """``/v1/classify`` body: ``input`` (or its alias ``text``) is one text or a list of texts."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, max_length=256)
    input: str | list[str] | None = None
    text: str | list[str] | None = None

    _text = field_validator("input", "text", "model")(_check_text)


# --------------------------------------------------------------------------------------------
# The app


class _Models:
    """The served models: at most one language model and any number of classifiers, by id."""

    def __init__(self, lm: Any, lm_name: str, classifiers: dict[str, Any]):
        self.lm, self.lm_name, self.classifiers = lm, lm_name, dict(classifiers)
        if lm is None and not self.classifiers:
            raise ValueError("nothing to serve: give a language-model bundle and/or classifier bundles")
        if lm is not None and lm_name in self.classifiers:
            raise ValueError(f"model id {lm_name!r} is used twice; give the models distinct names")
        self.created = int(time.time())

    def ids(self) -> list[str]:
        return ([self.lm_name] if self.lm is not None else []) + list(self.classifiers)

    def language_model(self, name: str | None) -> Any:
        if name is not None and name in self.classifiers:
            raise APIError(
                400,
                f"model {name!r} is a classifier; send it to /v1/classify",
                param="model",
                code="wrong_endpoint",
            )
        if self.lm is None:
            raise APIError(
                404,
                "this server hosts no language model; see GET /v1/models",
                param="model",
                code="model_not_found",
                type="not_found_error",
            )
        if name is not None and name != self.lm_name:
            raise APIError(
                404,
                f"model {name!r} not found; this server hosts {', '.join(self.ids())}",
                param="model",
                code="model_not_found",
                type="not_found_error",
            )
        return self.lm

    def classifier(self, name: str | None) -> tuple[str, Any]:
        if name is None:
            if len(self.classifiers) == 1:
                return next(iter(self.classifiers.items()))
            if not self.classifiers:
                raise APIError(
                    404,
                    "this server hosts no classifier; start it with --classifier DIR",
                    param="model",
                    code="model_not_found",
                    type="not_found_error",
                )
            raise APIError(
                400,
                f"several classifiers are served ({', '.join(self.classifiers)}); name one in 'model'",
                param="model",
                code="missing_model",
            )
        if name not in self.classifiers:
            raise APIError(
                404,
                f"classifier {name!r} not found; classifiers served: {', '.join(self.classifiers) or 'none'}",
                param="model",
                code="model_not_found",
                type="not_found_error",
            )
        return name, self.classifiers[name]


def create_app(
    lm: Any = None,
    classifiers: dict[str, Any] | None = None,
    config: ServerConfig | None = None,
    lm_name: str = "gptflow-lm",
) -> FastAPI:
    """The ASGI app over already loaded models (``deploy.runtime.OnnxLM`` / ``OnnxClassifier``)."""
    config = config or ServerConfig()
    models = _Models(lm, config.model_name or lm_name, classifiers or {})
    pool = WorkerPool(config.workers, config.queue_size)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        pool.shutdown()

    app = FastAPI(
        title="gptflow",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible completions and classification over ONNX bundles.",
    )
    app.state.pool, app.state.models, app.state.config = pool, models, config
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)

    bearer = HTTPBearer(auto_error=False)

    async def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if config.api_key is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), config.api_key.encode()):
            raise APIError(
                401,
                "missing or wrong API key; send 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def submit(fn: Callable[[], Any]) -> concurrent.futures.Future:
        try:
            return pool.submit(fn)
        except Overloaded:
            raise APIError(
                503,
                f"server busy: {pool.capacity} requests already admitted; retry shortly",
                type="server_busy",
                code="overloaded",
                headers={"Retry-After": str(config.retry_after_s)},
            ) from None

    async def wait(future: concurrent.futures.Future, deadline: float) -> Any:
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), max(0.0, deadline - time.monotonic()))
        except (asyncio.TimeoutError, TimeoutError):
            raise APIError(
                504,
                f"request exceeded the server's time limit of {config.timeout_s:g} s",
                type="timeout",
                code="timeout",
            ) from None
        except ValueError as e:  # the runtime's bad-input errors
            raise APIError(400, str(e), code="invalid_value") from None

    def guarded(fn: Callable[[], Any], deadline: float) -> Callable[[], Any]:
        def run() -> Any:
            if time.monotonic() > deadline:  # waited in the queue past its time limit: skip the work
                raise TimeoutError
            return fn()

        return run

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": models.ids(), "pool": pool.stats()}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models() -> dict[str, Any]:
        data = [
            {"id": i, "object": "model", "created": models.created, "owned_by": "gptflow"}
            for i in models.ids()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        deadline = time.monotonic() + config.timeout_s
        model = models.language_model(body.model)
        prompts, cfg, n, prompt_tokens = _completion_plan(body, model, config)
        meta = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": models.lm_name,
        }
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _stream(
                model, prompts, n, cfg, prompt_tokens, meta, include_usage, submit, deadline, config.timeout_s
            )
        expanded = [p for p in prompts for _ in range(n)]
        generations = await wait(submit(guarded(lambda: model.generate(expanded, cfg), deadline)), deadline)
        choices = [
            {"index": i, "text": g.text, "finish_reason": g.finish_reason, "logprobs": None}
            for i, g in enumerate(generations)
        ]
        completion_tokens = sum(g.completion_tokens for g in generations)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return JSONResponse({**meta, "choices": choices, "usage": usage})

    @app.post("/v1/classify", dependencies=[Depends(authorize)])
    async def classify(body: ClassifyRequest) -> Any:
        deadline = time.monotonic() + config.timeout_s
        name, clf = models.classifier(body.model)
        if (body.input is None) == (body.text is None):
            raise APIError(
                400,
                "give exactly one of 'input' or 'text' (a string or a list of strings)",
                param="input",
                code="missing_input",
            )
        texts = body.input if body.input is not None else body.text
        texts = [texts] if isinstance(texts, str) else texts
        if not 1 <= len(texts) <= config.max_choices:
            raise APIError(400, f"give 1 to {config.max_choices} texts, got {len(texts)}", param="input")
        # The runtime reads a text in the windows finetuning used (config classifier_input); the rest is cut.
        limit = config.max_prompt_tokens
        counts = [_token_count(clf, t) for t in texts]
        for i, c in enumerate(counts):
            if c > limit:
                raise APIError(
                    400,
                    f"input[{i}] has {c} tokens; the limit is {limit}",
                    param="input",
                    code="context_length_exceeded",
                )
        results = await wait(submit(guarded(lambda: clf.classify(texts), deadline)), deadline)
        data = [{"index": i, "label": r["label"], "probs": r["probs"]} for i, r in enumerate(results)]
        return {"object": "list", "model": name, "data": data, "usage": {"prompt_tokens": sum(counts)}}

    return app


def _token_count(model: Any, text: str) -> int:
    """Tokens the runtime feeds for ``text``: it prepends BOS when the bundle says so or the text is empty."""
    ids = model.encode(text)
    return len(ids) + (1 if getattr(model, "add_bos", False) or not ids else 0)


def _completion_plan(
    body: CompletionRequest, model: Any, config: ServerConfig
) -> tuple[list[str], GenerationConfig, int, int]:
    """Check the request against the server's limits; return prompts, generation config, n, prompt tokens."""
    neutral = {
        "echo": (None, False),
        "logprobs": (None, 0),
        "best_of": (None, 1),
        "frequency_penalty": (None, 0),
        "presence_penalty": (None, 0),
        "suffix": (None,),
    }
    for name, allowed in neutral.items():
        if getattr(body, name) not in allowed:
            raise APIError(
                400,
                f"'{name}' is not supported by this server; leave it out",
                param=name,
                code="unsupported_parameter",
            )
    if body.logit_bias:
        raise APIError(
            400,
            "'logit_bias' is not supported by this server; leave it out",
            param="logit_bias",
            code="unsupported_parameter",
        )
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    n = body.n or 1
    if not prompts:
        raise APIError(400, "prompt is an empty list; give a string or a list of strings", param="prompt")
    if len(prompts) * n > config.max_choices:
        raise APIError(
            400,
            f"{len(prompts)} prompt(s) x n={n} exceeds this server's limit of "
            f"{config.max_choices} choices per request",
            param="n",
        )
    max_tokens = body.max_tokens or config.default_max_tokens
    if max_tokens > config.max_tokens_cap:
        raise APIError(
            400,
            f"max_tokens={max_tokens} exceeds this server's cap of {config.max_tokens_cap}",
            param="max_tokens",
            code="max_tokens_exceeded",
        )
    limit = config.max_prompt_tokens  # under the sliding policy the runtime keeps the prompt's last tokens
    context = getattr(model, "max_context", None)
    counts = [_token_count(model, p) for p in prompts]
    for i, count in enumerate(counts):
        where = "prompt" if isinstance(body.prompt, str) else f"prompt[{i}]"
        if count > limit:
            raise APIError(
                400,
                f"{where} has {count} tokens; the limit is {limit}",
                param="prompt",
                code="context_length_exceeded",
            )
        if config.context_policy == "error" and context and count + max_tokens > context:
            raise APIError(
                400,
                f"this model's context is {context} tokens; {where} has {count} and max_tokens "
                f"is {max_tokens}; lower max_tokens or shorten the prompt",
                param="prompt" if count >= context else "max_tokens",
                code="context_length_exceeded",
            )
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    cfg = GenerationConfig(
        max_new_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=body.top_k or 0,
        top_p=1.0 if body.top_p is None else body.top_p,
        repetition_penalty=body.repetition_penalty or 1.0,
        stop=stop,
        seed=body.seed,
        context_policy=config.context_policy,
    )
    return prompts, cfg, n, sum(counts)


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def _stream(
    model: Any,
    prompts: list[str],
    n: int,
    cfg: GenerationConfig,
    prompt_tokens: int,
    meta: dict[str, Any],
    include_usage: bool,
    submit: Callable[[Callable[[], Any]], concurrent.futures.Future],
    deadline: float,
    timeout_s: float,
) -> StreamingResponse:
    """Stream each choice in turn as server-sent events; one worker runs the whole request."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()

    def push(item: tuple) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone (server shutting down)
            loop.call_soon_threadsafe(events.put_nowait, item)

    def produce() -> None:
        try:
            completion_tokens = 0
            for index in range(len(prompts) * n):
                prompt = prompts[index // n]
                pieces: list[str] = []
                stream = model.stream(prompt, cfg)
                try:
                    for piece in _pieces(stream, cancelled, deadline):
                        pieces.append(piece)
                        push(("piece", index, piece))
                finally:
                    stream.close()  # stops the runtime's generation loop
                if cancelled.is_set():
                    return
                if time.monotonic() > deadline:
                    push(("timeout",))
                    return
                used, reason = _stream_outcome(model, "".join(pieces), cfg)
                completion_tokens += used
                push(("end", index, reason))
            push(("done", completion_tokens))
        except ValueError as e:
            push(("error", 400, str(e)))
        except Exception:
            log.exception("streaming generation failed")
            push(("error", 500, "internal server error; see the server log"))

    future = submit(produce)  # admission (503) happens before the 200 headers go out

    async def events_out() -> AsyncIterator[bytes]:
        try:
            while True:
                kind, *rest = await events.get()
                if kind == "piece":
                    index, text = rest
                    yield _sse(
                        {
                            **meta,
                            "choices": [
                                {"index": index, "text": text, "finish_reason": None, "logprobs": None}
                            ],
                        }
                    )
                elif kind == "end":
                    index, reason = rest
                    yield _sse(
                        {
                            **meta,
                            "choices": [
                                {"index": index, "text": "", "finish_reason": reason, "logprobs": None}
                            ],
                        }
                    )
                elif kind == "done":
                    if include_usage:
                        used = rest[0]
                        usage = {
                            "prompt_tokens": prompt_tokens,
                            "completion_tokens": used,
                            "total_tokens": prompt_tokens + used,
                        }
                        yield _sse({**meta, "choices": [], "usage": usage})
                    yield b"data: [DONE]\n\n"
                    return
                else:
                    if kind == "timeout":
                        err = APIError(
                            504,
                            f"request exceeded the server's time limit of {timeout_s:g} s",
                            type="timeout",
                            code="timeout",
                        )
                    else:
                        status, message = rest
                        err = APIError(
                            status, message, type="invalid_request_error" if status < 500 else "server_error"
                        )
                    yield _sse(err.body())
                    return
        finally:
            cancelled.set()  # client gone or stream over: the worker stops at its next token
            future.cancel()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events_out(), media_type="text/event-stream", headers=headers)


def _pieces(stream: Iterator[str], cancelled: threading.Event, deadline: float) -> Iterator[str]:
    for piece in stream:
        if cancelled.is_set() or time.monotonic() > deadline:
            return
        if piece:
            yield piece


def _stream_outcome(model: Any, text: str, cfg: GenerationConfig) -> tuple[int, str]:
    """(completion tokens, finish_reason) of a finished stream, which reports neither: the streamed text is
    re-encoded, so the count can differ from the tokens sampled when the tokenizer would merge them."""
    used = len(model.encode(text)) if text else 0
    return used, "length" if used >= cfg.max_new_tokens else "stop"


# --------------------------------------------------------------------------------------------
# Loading and running


def load_models(
    bundle: str | Path | None, classifier_bundles: list[str | Path] = (), providers: list[str] | None = None
):
    """Load bundles: returns (language model or None, its default name, {classifier name: classifier})."""
    lm, lm_name, classifiers = None, "gptflow-lm", {}
    for path in ([bundle] if bundle else []) + list(classifier_bundles):
        path = Path(path)
        model = load_bundle(path, providers=providers)
        name = _bundle_name(path)
        if hasattr(model, "generate"):
            if lm is not None:
                raise ValueError(f"{path} is a second language model; a server hosts one (plus classifiers)")
            lm, lm_name = model, name
        else:
            if name in classifiers:
                raise ValueError(
                    f"two classifier bundles are named {name!r}; give them distinct directory names"
                )
            classifiers[name] = model
    return lm, lm_name, classifiers


def _bundle_name(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        name = json.loads((path / "config.json").read_text(encoding="utf-8")).get("name")
        if isinstance(name, str) and name:
            return name
    return path.resolve().name


def build_server(
    app: FastAPI, config: ServerConfig, log_level: str = "info", access_log: bool = True
) -> uvicorn.Server:
    return uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=log_level,
            access_log=access_log,
            timeout_graceful_shutdown=5,
        )
    )


def serve(app: FastAPI, config: ServerConfig, log_level: str = "info", access_log: bool = True) -> None:
    """Run until interrupted (Ctrl-C / SIGTERM)."""
    # uvicorn shuts down gracefully, then re-raises the SIGINT it caught: that is a normal exit here.
    with contextlib.suppress(KeyboardInterrupt):
        build_server(app, config, log_level, access_log).run()


@contextlib.contextmanager
def run_in_thread(
    app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
) -> Iterator[str]:
    """Serve ``app`` from a background thread (tests, benchmarks); yields the base URL, stops on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(
        uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=2)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        t0 = time.monotonic()
        while not server.started:
            if not thread.is_alive() or time.monotonic() - t0 > 30:
                raise RuntimeError("the server thread did not start; see the log above")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
