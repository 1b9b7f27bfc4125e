"""OpenAI-compatible HTTP server over exported ONNX bundles (``gptflow serve``); torch-free.

Endpoints: ``POST /v1/completions`` (plain and server-sent-event streaming), ``GET /v1/models``,
``POST /v1/classify`` (classifier bundles), ``GET /health``.

Behaviour under load and bad input:
- The language model runs under a continuous-batching scheduler (``deploy/scheduler.py``): one
  thread owns its ONNX Runtime session and advances every active sequence (up to ``max_active``)
  by one token per round (in groups of ``batch_rows`` rows, one session call each); a new request's
  prompt joins after the current call, finished ones leave at once.
  Up to ``queue_size`` requests wait for a slot; the next one gets 503 with ``Retry-After``.
  Classifier calls run on a small worker pool with the same kind of bound.
- Each request has ``timeout_s`` from arrival (queueing included). A plain request that runs out of
  time gets 504 and its rows leave the batch at the next step; a stream that runs out of time ends
  with an error event, which the openai SDK raises as ``APIError``. A client that disconnects
  (streamed or not) frees its rows at the next step.
- ``usage`` and ``finish_reason`` come from the tokens the scheduler sampled, streamed or not.
  Choice i of a seeded request samples from the stream (seed, i): the same text streamed or not.
- Prompts are checked for size in bytes before they are tokenized, and tokenized off the event loop.
- Every field is validated; bad requests get 4xx with an OpenAI-style body
  ``{"error": {"message", "type", "param", "code"}}``, never 5xx. Bodies above ``max_body_bytes`` get
  413, bodies that do not arrive within ``body_timeout_s`` 408. A loopback bind accepts only loopback
  Host headers (DNS rebinding); ``/docs`` and ``/openapi.json`` exist only with ``docs``.
- Sampling defaults follow OpenAI (temperature 1, top_p 1, max_tokens 16); temperature 0 is greedy.
  ``top_k``, ``repetition_penalty`` and ``ignore_eos`` are accepted as extensions (vLLM's names), and
  ``no_repeat_ngram_size`` (HF's name). ``stop`` and ``no_repeat_ngram_size`` left out take the
  bundle's decoding defaults (``config.json`` ``generation``: what its task was evaluated with).
  OpenAI fields this server does not implement (``echo``, ``logprobs``, ``best_of``, penalties,
  ``logit_bias``, ``suffix``) are accepted only at their neutral values; unknown fields are rejected.
- ``/health`` answers ``{"status": "ok"}`` to anyone; the served version and scheduler figures
  only with the API key (or when none is configured). ``/v1/models`` and each completion's
  ``system_fingerprint`` name the model version served (it changes when a followed registry alias
  moves: ``swap_language_model``).
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
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from deploy.runtime import GenerationConfig, load_bundle
from deploy.scheduler import Closed, Job, Overloaded, Scheduler
from deploy.server_config import ServerConfig

log = logging.getLogger(__name__)

MAX_STOP = 4  # stop sequences per request, as OpenAI allows
MAX_STOP_CHARS = 256
SEED_MAX = 2**63 - 1
CPU_BATCH_ROWS = 8  # default rows per decode call on CPU (ServerConfig.batch_rows)
STALL_GRACE_S = 5.0  # past its deadline, a request stops waiting for a scheduler that stopped answering

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
    408: "invalid_request_error",
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
    """ASGI middleware: buffer the request body up to ``max_bytes`` (413 beyond) within ``timeout_s``
    (408 after), then replay it.

    After the body is replayed, ``receive`` passes through so handlers still see disconnects.
    """

    def __init__(self, app: Callable, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

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
        give_up = time.monotonic() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, give_up - time.monotonic()))
            except (asyncio.TimeoutError, TimeoutError):
                slow = APIError(
                    408, f"request body not received within {self.timeout_s:g} s", code="body_timeout"
                )
                await slow.response()(scope, receive, send)
                return
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
# Classifier worker pool


class WorkerPool:
    """A thread pool that admits at most ``workers + queue_size`` jobs; the next ``submit`` raises Overloaded."""

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
    no_repeat_ngram_size: int | None = Field(None, ge=0, le=32)
    ignore_eos: bool | None = None
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
# The served models


class ServedLM:
    """A language model, the scheduler that owns its session, and the version it came from."""

    def __init__(self, lm: Any, name: str, config: ServerConfig, version: str | None):
        self.lm, self.version = lm, version
        self.fingerprint = f"{name}:{version}" if version is not None else None
        rows = config.batch_rows
        if rows is None:  # CPU: groups of 8 keep most of the batching gain (the weights are read once per
            # call) while a new prompt waits for a short call; a GPU wants every row in one call
            rows = 0 if getattr(lm, "device", "cpu") == "cuda" else CPU_BATCH_ROWS
        self.scheduler = Scheduler(
            lm, config.max_active, config.queue_size, name=version or name, batch_rows=rows
        )


class _Models:
    """The served models: at most one language model and any number of classifiers, by id."""

    def __init__(
        self, lm: Any, lm_name: str, classifiers: dict[str, Any], config: ServerConfig, version: str | None
    ):
        self.lm_name, self.classifiers, self.config = lm_name, dict(classifiers), config
        if lm is None and not self.classifiers:
            raise ValueError("nothing to serve: give a language-model bundle and/or classifier bundles")
        if lm is not None and lm_name in self.classifiers:
            raise ValueError(f"model id {lm_name!r} is used twice; give the models distinct names")
        self.served = ServedLM(lm, lm_name, config, version) if lm is not None else None
        self.created = int(time.time())

    def ids(self) -> list[str]:
        return ([self.lm_name] if self.served is not None else []) + list(self.classifiers)

    def swap(self, lm: Any, version: str | None) -> None:
        """Serve ``lm`` from the next request on; requests already admitted finish on the old one."""
        new = ServedLM(lm, self.lm_name, self.config, version)
        old, self.served = self.served, new  # one reference assignment: requests see old or new, whole
        if old is not None:
            old.scheduler.close()  # its thread ends once its running and queued requests are done
        log.info("now serving %s version %s", self.lm_name, version)

    def close(self) -> None:
        if self.served is not None:
            self.served.scheduler.shutdown()

    def language_model(self, name: str | None) -> ServedLM:
        if name is not None and name in self.classifiers:
            raise APIError(
                400,
                f"model {name!r} is a classifier; send it to /v1/classify",
                param="model",
                code="wrong_endpoint",
            )
        served = self.served
        if served is None:
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
        return served

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


# --------------------------------------------------------------------------------------------
# The app


def create_app(
    lm: Any = None,
    classifiers: dict[str, Any] | None = None,
    config: ServerConfig | None = None,
    lm_name: str = "gptflow-lm",
    version: str | None = None,
) -> FastAPI:
    """The ASGI app over already loaded models (``deploy.runtime.OnnxLM`` / ``OnnxClassifier``).

    ``version`` names the language model's version (a registry version) in /v1/models, /health and
    each completion's ``system_fingerprint``; ``app.state.models.swap(lm, version)`` replaces it.
    """
    config = config or ServerConfig()
    models = _Models(lm, config.model_name or lm_name, classifiers or {}, config, version)
    pool = WorkerPool(config.workers, config.queue_size)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        pool.shutdown()
        models.close()

    app = FastAPI(
        title="gptflow",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible completions and classification over ONNX bundles.",
        docs_url="/docs" if config.docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if config.docs else None,
    )
    app.state.pool, app.state.models, app.state.config = pool, models, config
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes, timeout_s=config.body_timeout_s)
    hosts = config.trusted_hosts()
    if hosts is not None:  # outermost: a foreign Host header is refused before the body is read
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)

    bearer = HTTPBearer(auto_error=False)

    def key_ok(credentials: HTTPAuthorizationCredentials | None) -> bool:
        if config.api_key is None:
            return True
        given = credentials.credentials if credentials is not None else ""
        return hmac.compare_digest(given.encode(), config.api_key.encode())

    async def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not key_ok(credentials):
            raise APIError(
                401,
                "missing or wrong API key; send 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def busy(capacity: str) -> APIError:
        return APIError(
            503,
            f"server busy: {capacity}; retry shortly",
            type="server_busy",
            code="overloaded",
            headers={"Retry-After": str(config.retry_after_s)},
        )

    def submit(fn: Callable[[], Any]) -> concurrent.futures.Future:
        try:
            return pool.submit(fn)
        except Overloaded:
            raise busy(f"{pool.capacity} requests already admitted") from None

    def timeout_error() -> APIError:
        return APIError(
            504,
            f"request exceeded the server's time limit of {config.timeout_s:g} s",
            type="timeout",
            code="timeout",
        )

    async def wait(future: concurrent.futures.Future, deadline: float) -> Any:
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), max(0.0, deadline - time.monotonic()))
        except (asyncio.TimeoutError, TimeoutError):
            raise timeout_error() from None
        except ValueError as e:  # the runtime's bad-input errors
            raise APIError(400, str(e), code="invalid_value") from None

    def guarded(fn: Callable[[], Any], deadline: float) -> Callable[[], Any]:
        def run() -> Any:
            if time.monotonic() > deadline:  # waited in the queue past its time limit: skip the work
                raise TimeoutError
            return fn()

        return run

    @app.get("/health")
    async def health(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict[str, Any]:
        out: dict[str, Any] = {"status": "ok"}
        if key_ok(credentials):  # load figures and versions only for those who may use the models
            served = models.served
            out["models"] = models.ids()
            if served is not None:
                out["version"] = served.version
                out["scheduler"] = served.scheduler.stats()
            out["pool"] = pool.stats()
        return out

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models() -> dict[str, Any]:
        served = models.served
        data = []
        for i in models.ids():
            entry = {"id": i, "object": "model", "created": models.created, "owned_by": "gptflow"}
            if served is not None and i == models.lm_name:
                entry["version"] = served.version
            data.append(entry)
        return {"object": "list", "data": data}

    async def admit(body: CompletionRequest, emit: Callable[[list[tuple]], None], deadline: float):
        """Tokenize (off the event loop) and queue the request on the current model's scheduler."""
        for _ in range(3):  # the model may be swapped between reading it and queueing on it
            served = models.language_model(body.model)
            try:
                rows, prompt_tokens = await run_in_threadpool(_completion_rows, body, served.lm, config)
            except ValueError as e:  # the runtime's own checks
                raise APIError(400, str(e), code="invalid_value") from None
            try:
                return served, served.scheduler.submit(rows, deadline, emit), len(rows), prompt_tokens
            except Overloaded:
                s = served.scheduler
                raise busy(f"{s.max_active} sequences decoding and {s.max_queued} requests queued") from None
            except Closed:
                continue
        raise busy("the model is being replaced")

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        deadline = time.monotonic() + config.timeout_s
        models.language_model(body.model)  # 404/400 before any other check
        _check_completion(body, config)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(batch: list[tuple]) -> None:  # called from the scheduler thread
            with contextlib.suppress(RuntimeError):  # the loop is gone (server shutting down)
                loop.call_soon_threadsafe(events.put_nowait, batch)

        served, job, n_choices, prompt_tokens = await admit(body, emit, deadline)
        meta = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": models.lm_name,
            "system_fingerprint": served.fingerprint,
        }
        scheduler = served.scheduler
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _stream(
                events, job, scheduler, meta, n_choices, prompt_tokens, include_usage, deadline, timeout_error
            )

        def on_disconnect(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is None and task.result():
                scheduler.cancel(job)
                events.put_nowait([("disconnected",)])

        watcher = asyncio.ensure_future(_disconnected(request))
        watcher.add_done_callback(on_disconnect)
        texts, reasons, completion_tokens = [""] * n_choices, ["length"] * n_choices, 0
        try:
            async for event in _job_events(events, deadline):
                kind = event[0]
                if kind == "piece":
                    texts[event[1]] += event[2]
                elif kind == "end":
                    reasons[event[1]] = event[2]
                    completion_tokens += event[3]
                elif kind == "timeout":
                    raise timeout_error()
                elif kind == "error":
                    raise APIError(500, event[1], type="server_error")
                elif kind == "disconnected":
                    return JSONResponse({}, status_code=499)  # nobody is listening
        finally:
            watcher.cancel()
            scheduler.cancel(job)  # a no-op when it has ended
        choices = [
            {"index": i, "text": t, "finish_reason": r, "logprobs": None}
            for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
        ]
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
        _check_bytes(texts, config, "input", single=False)
        # The runtime reads a text in the windows finetuning used (config classifier_input); the rest is cut.
        limit = config.max_prompt_tokens
        counts = await run_in_threadpool(lambda: [_token_count(clf, t) for t in texts])
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


async def _disconnected(request: Request) -> bool:
    """Wait for the client to go away (True); the body has been read, so the next message is the disconnect."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return True


async def _job_events(events: asyncio.Queue, deadline: float) -> AsyncIterator[tuple]:
    """One job's events in order, up to its last; a scheduler silent past the deadline counts as a timeout."""
    while True:
        try:
            batch = await asyncio.wait_for(
                events.get(), max(0.0, deadline - time.monotonic()) + STALL_GRACE_S
            )
        except (asyncio.TimeoutError, TimeoutError):
            yield ("timeout",)
            return
        for event in batch:
            yield event
            if event[0] in ("done", "timeout", "error", "disconnected"):
                return


def _token_count(model: Any, text: str) -> int:
    """Tokens ``text`` counts for: its own and the start token (EOS, or BOS where the bundle asks)."""
    return len(model._prompt_ids(text))


def _check_bytes(texts: list[str], config: ServerConfig, param: str, single: bool) -> None:
    limit = config.max_prompt_bytes
    for i, text in enumerate(texts):
        size = len(text.encode("utf-8"))
        if size > limit:
            where = param if single else f"{param}[{i}]"
            raise APIError(
                400,
                f"{where} is {size} bytes of UTF-8; the limit is {limit}",
                param=param,
                code="context_length_exceeded",
            )


def _check_completion(body: CompletionRequest, config: ServerConfig) -> None:
    """The request's limits that need no tokenizer (checked on the event loop, before any work)."""
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
    _check_bytes(prompts, config, "prompt", single=isinstance(body.prompt, str))


def _completion_rows(body: CompletionRequest, model: Any, config: ServerConfig) -> tuple[list[Any], int]:
    """Tokenize and check the prompts against the context; one runtime row per choice (prompt-major),
    choice i sampling from the stream (seed, i). Runs off the event loop."""
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    n = body.n or 1
    max_tokens = body.max_tokens or config.default_max_tokens
    limit = config.max_prompt_tokens  # under the sliding policy the runtime keeps the prompt's last tokens
    context = getattr(model, "max_context", None)
    ids = [model._prompt_ids(p) for p in prompts]
    for i, count in enumerate(len(x) for x in ids):
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
    # A field the request leaves out takes the bundle's decoding default (its task's), then OpenAI's.
    defaults = getattr(getattr(model, "config", None), "generation", None) or {}
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or defaults.get("stop", []))
    no_repeat = body.no_repeat_ngram_size
    cfg = GenerationConfig(
        max_new_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=body.top_k or 0,
        top_p=1.0 if body.top_p is None else body.top_p,
        repetition_penalty=body.repetition_penalty or 1.0,
        no_repeat_ngram_size=defaults.get("no_repeat_ngram_size", 0) if no_repeat is None else no_repeat,
        stop=stop,
        seed=body.seed,
        context_policy=config.context_policy,
        ignore_eos=bool(body.ignore_eos),
    )
    expanded = [x for x in ids for _ in range(n)]
    rows = [model.new_row(x, cfg, choice=i) for i, x in enumerate(expanded)]
    return rows, sum(len(x) for x in ids)


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def _stream(
    events: asyncio.Queue,
    job: Job,
    scheduler: Scheduler,
    meta: dict[str, Any],
    n_choices: int,
    prompt_tokens: int,
    include_usage: bool,
    deadline: float,
    timeout_error: Callable[[], APIError],
) -> StreamingResponse:
    """Server-sent events from the job's rows as the scheduler produces them (choices interleave)."""

    def chunk(index: int, text: str, reason: str | None) -> bytes:
        return _sse(
            {**meta, "choices": [{"index": index, "text": text, "finish_reason": reason, "logprobs": None}]}
        )

    async def events_out() -> AsyncIterator[bytes]:
        completion_tokens = 0
        try:
            async for event in _job_events(events, deadline):
                kind = event[0]
                if kind == "piece":
                    yield chunk(event[1], event[2], None)
                elif kind == "end":
                    completion_tokens += event[3]
                    yield chunk(event[1], "", event[2])
                elif kind == "done":
                    if include_usage:
                        usage = {
                            "prompt_tokens": prompt_tokens,
                            "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens,
                        }
                        yield _sse({**meta, "choices": [], "usage": usage})
                    yield b"data: [DONE]\n\n"
                elif kind == "timeout":
                    yield _sse(timeout_error().body())
                elif kind == "error":
                    yield _sse(APIError(500, event[1], type="server_error").body())
        finally:
            scheduler.cancel(job)  # client gone or stream over: its rows leave at the next step

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events_out(), media_type="text/event-stream", headers=headers)


# --------------------------------------------------------------------------------------------
# Loading and running


def load_models(
    bundle: str | Path | None,
    classifier_bundles: list[str | Path] = (),
    providers: list[str] | None = None,
    threads: int = 0,
):
    """Load bundles: returns (language model or None, its default name, {classifier name: classifier})."""
    lm, lm_name, classifiers = None, "gptflow-lm", {}
    for path in ([bundle] if bundle else []) + list(classifier_bundles):
        path = Path(path)
        model = load_bundle(path, providers=providers, threads=threads)
        name = model.config.name or path.resolve().name  # config.json's name, else the directory's
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
            limit_concurrency=config.limit_concurrency,
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
    config = getattr(app.state, "config", None) or ServerConfig()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level=log_level,
            access_log=False,
            timeout_graceful_shutdown=2,
            limit_concurrency=config.limit_concurrency,
        )
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
