"""HTTP API (FastAPI): per-task and mixed-task inference, task admin, health and metrics.

``create_app(engine, settings)`` builds the app around an engine that is already loaded; the
lifespan starts the inference worker, the folder watch and the start-up load of the deltas folder,
and stops them in reverse. No module-level app or model.

Errors are JSON ``{"error": {"code", "message"}}``: the core's errors (``bitfit_serve.errors``) map
one-to-one by their ``status_code``/``code``; request-schema errors become 400 ``invalid_input``;
routing errors keep their status (404 ``not_found``, 405, 413, 415). A 500 means a bug.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Sequence, Union

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bitfit_serve import __version__
from bitfit_serve.batcher import Batcher, Group
from bitfit_serve.engine import Engine, Prediction
from bitfit_serve.errors import BitfitError, Forbidden, InvalidInput, NotReady, Overloaded, PayloadTooLarge, \
    Unauthorized
from bitfit_serve.metrics import Metrics
from bitfit_serve.registry import TaskVersion
from bitfit_serve.settings import Settings
from bitfit_serve.store import DeltaStore, check_task_name
from bitfit_serve.watcher import DeltaWatcher

log = logging.getLogger(__name__)

# Codes for errors raised by routing / the HTTP layer itself rather than by the core.
HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


# ----------------------------------------------------------------------------- schemas (HTTP edge only)

TextPair = Annotated[list[str], Field(min_length=2, max_length=2, description="[first, second] for pair tasks")]
Inputs = Annotated[list[Union[str, TextPair]], Field(
    min_length=1, description="Texts, or [first, second] text pairs for pair tasks (e.g. NLI).",
    examples=[["a gripping, beautifully made film"]])]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: Inputs


class MixedItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str
    inputs: Inputs


class MixedPredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[MixedItem] = Field(min_length=1)


class PredictionOut(BaseModel):
    label: str | None = Field(None, description="classification: the top label")
    score: float | None = Field(None, description="classification: its probability")
    scores: dict[str, float] | None = Field(None, description="classification: every label's probability")
    value: float | None = Field(None, description="regression: the predicted value")


class TaskPredictions(BaseModel):
    task: str
    version: str = Field(description="the task version (sha256 prefix of its delta file) that served every input")
    predictions: list[PredictionOut]


class MixedPredictResponse(BaseModel):
    results: list[TaskPredictions] = Field(description="one per request item, in order")


class TaskInfo(BaseModel):
    task: str
    version: str
    sha256: str
    problem_type: str
    labels: list[str]
    inputs: list[str]
    pooling: str
    max_length: int
    scheme: str
    metrics: dict[str, Any]
    train_args: dict[str, Any]
    bytes: int = Field(description="fp32 bytes of the delta's trained values")
    bank_bytes: int = Field(description="bank bytes one task occupies at the serving dtype")
    sites: int = Field(description="number of trained sites (bias / LayerNorm vectors)")
    base_model: str
    base_fingerprint: str
    created_at: str
    trainer_version: str
    loaded_at: float


class TaskList(BaseModel):
    tasks: list[TaskInfo]


class UploadResponse(TaskInfo):
    replaced: str | None = Field(description="the version this upload replaced, if any")


class RemoveResponse(BaseModel):
    task: str
    version: str
    removed: bool = True


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 413, 422, 503)}
ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES, 401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}, 415: {"model": ErrorResponse}}


# ----------------------------------------------------------------------------- the app

@dataclass
class _Services:
    """What handlers share; ``batcher`` exists only between lifespan start and stop."""

    engine: Engine
    settings: Settings
    metrics: Metrics
    store: DeltaStore
    batcher: Batcher | None = None


def create_app(engine: Engine, settings: Settings) -> FastAPI:
    s = _Services(engine, settings, Metrics(settings.metrics_per_task), DeltaStore(settings.deltas))
    s.metrics.watch(queue_depth=lambda: s.batcher.queue_depth if s.batcher else 0,
                    resident_tasks=lambda: len(engine.registry), bank_bytes=lambda: engine.bank_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        settings.deltas.mkdir(parents=True, exist_ok=True)
        batcher = Batcher(engine, max_batch_tokens=settings.max_batch_tokens,
                          max_batch_requests=settings.max_batch_requests, max_queue=settings.max_queue,
                          retry_after_s=settings.retry_after_s, metrics=s.metrics)
        batcher.start()
        s.batcher = batcher
        watcher = DeltaWatcher(engine, s.store, s.metrics) if settings.watch else None
        try:
            if watcher is not None:
                await watcher.start()  # before the scan: a file arriving meanwhile is not missed
            report = await asyncio.to_thread(s.store.load_all, engine)
            bad = {t: r for t, r in report.items() if r.startswith("error")}
            log.info("serving %d task(s) from %s%s", len(engine.registry), settings.deltas,
                     f"; skipped {len(bad)} bad file(s): {sorted(bad)}" if bad else "")
            yield
        finally:
            if watcher is not None:
                await watcher.stop()
            await asyncio.to_thread(batcher.stop)

    # No slash redirects: a 307 would turn PUT /v1/tasks/x/ (or an empty name) into a write elsewhere.
    app = FastAPI(title="bitfit-serve", version=__version__, lifespan=lifespan, redirect_slashes=False,
                  description="One frozen encoder, thousands of BitFit tasks, mixed-task batches in one forward.")
    _install_error_handlers(app, s.metrics)
    app.add_middleware(_BodyLimit, limit_for=lambda scope: (
        ("max_upload_bytes", settings.max_upload_bytes) if scope["method"] == "PUT"
        else ("max_request_bytes", settings.max_request_bytes)))
    app.add_middleware(_ShedLoad, batcher=lambda: s.batcher, metrics=s.metrics)
    app.add_middleware(_Observe, metrics=s.metrics)  # outermost: also counts the 413s and early 503s

    def valid_task_name(task: str) -> None:
        check_task_name(task)  # first of all: before the token, the body, or any disk access

    def require_admin(request: Request) -> None:
        if settings.admin_token is None:
            return  # no token configured: settings only allow that on loopback or when told explicitly
        token = _bearer_token(request, "admin route: send 'Authorization: Bearer <admin token>'")
        if not hmac.compare_digest(token, settings.admin_token.encode()):
            raise Forbidden("admin route: the token is not valid")

    def require_api_key(request: Request) -> None:
        if settings.api_key is None:
            return
        token = _bearer_token(request, "send 'Authorization: Bearer <api key>'")
        # Both compares always run: the time taken says nothing about which key came close.
        valid = [hmac.compare_digest(token, key.encode()) for key in (settings.api_key, settings.admin_token) if key]
        if not any(valid):
            raise Forbidden("the API key is not valid")

    async def run(groups: Sequence[Group]) -> list[list[Prediction]]:
        # Admission checks only that the worker runs (submit raises NotReady otherwise); a slow
        # forward makes /ready fail for load balancers but must not reject requests already routed here.
        if s.batcher is None:
            raise NotReady("the server is not ready: the inference worker is not running")
        start = time.perf_counter()
        out = await s.batcher.submit(groups)
        sequences: Counter[str] = Counter()
        for task, inputs in groups:
            sequences[task] += len(inputs)
        s.metrics.observe_tasks(sequences, time.perf_counter() - start)
        return out

    # ------------------------------------------------------------------ inference
    @app.post("/v1/tasks/{task}/predict", response_model=TaskPredictions, response_model_exclude_none=True,
              responses=ERROR_RESPONSES, dependencies=[Depends(require_api_key)], tags=["inference"])
    async def predict(task: str, body: PredictRequest) -> TaskPredictions:
        """Run one task on a list of texts (or text pairs)."""
        _check_limits(settings, [body.inputs])
        (predictions,) = await run([(task, body.inputs)])
        return _task_predictions(task, predictions)

    @app.post("/v1/predict", response_model=MixedPredictResponse, response_model_exclude_none=True,
              responses=ERROR_RESPONSES, dependencies=[Depends(require_api_key)], tags=["inference"])
    async def predict_mixed(body: MixedPredictRequest) -> MixedPredictResponse:
        """Items of many tasks in one call, batched together; each item's answer states its version."""
        if len(body.items) > settings.max_items_per_predict:
            raise PayloadTooLarge(f"{len(body.items)} items exceed max_items_per_predict="
                                  f"{settings.max_items_per_predict}")
        _check_limits(settings, [item.inputs for item in body.items])
        results = await run([(item.task, item.inputs) for item in body.items])
        return MixedPredictResponse(results=[_task_predictions(item.task, predictions)
                                             for item, predictions in zip(body.items, results)])

    # ------------------------------------------------------------------ tasks
    @app.get("/v1/tasks", response_model=TaskList, dependencies=[Depends(require_api_key)],
             responses={s: {"model": ErrorResponse} for s in (401, 403)}, tags=["tasks"])
    async def list_tasks() -> TaskList:
        return TaskList(tasks=[_task_info(engine, v) for v in engine.tasks()])

    @app.get("/v1/tasks/{task}", response_model=TaskInfo, dependencies=[Depends(require_api_key)],
             responses={s: {"model": ErrorResponse} for s in (401, 403, 404)}, tags=["tasks"])
    async def get_task(task: str) -> TaskInfo:
        return _task_info(engine, engine.registry.get(task))

    @app.put("/v1/tasks/{task}", response_model=UploadResponse, status_code=201, responses=ADMIN_RESPONSES,
             dependencies=[Depends(valid_task_name), Depends(require_admin)], tags=["admin"],
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def upload_task(task: str, request: Request, response: Response) -> UploadResponse:
        """Add or replace a task: the body is the delta file (.safetensors bytes). Validated fully,
        persisted atomically into the deltas folder, then swapped in. 201 if new, 200 if replaced.
        The URL name wins over the delta's ``task`` metadata (the stored copy is renamed)."""
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media.startswith("multipart/"):
            raise HTTPException(415, "send the delta file's raw bytes as the body "
                                     "(curl --data-binary @file.safetensors), not a multipart form")
        data = bytearray()
        async for chunk in request.stream():  # _BodyLimit stops this at max_upload_bytes
            data += chunk
        if not data:
            raise InvalidInput("the request body is empty: send the delta file's bytes")
        installed = await asyncio.to_thread(s.store.install, engine, task, bytes(data))
        s.metrics.task_changes.labels("http", "replaced" if installed.previous else "added").inc()
        response.status_code = 200 if installed.previous else 201
        return UploadResponse(**_task_info(engine, installed.version).model_dump(),
                              replaced=installed.previous.version if installed.previous else None)

    @app.delete("/v1/tasks/{task}", response_model=RemoveResponse, responses=ADMIN_RESPONSES,
                dependencies=[Depends(valid_task_name), Depends(require_admin)], tags=["admin"])
    async def delete_task(task: str) -> RemoveResponse:
        """Stop serving a task (404 from now on) and delete its file; its row is freed once idle."""
        removed = await asyncio.to_thread(s.store.remove, engine, task)
        s.metrics.task_changes.labels("http", "removed").inc()
        return RemoveResponse(task=removed.task, version=removed.version)

    # ------------------------------------------------------------------ operations
    @app.get("/health", tags=["operations"])
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready", tags=["operations"], responses={503: {"model": ErrorResponse}})
    async def ready() -> dict[str, Any]:
        """Readiness: the model is loaded and the inference worker is alive."""
        if s.batcher is None or not s.batcher.alive:
            raise NotReady("not ready: the inference worker is not running")
        return {"status": "ready", "tasks": len(engine.registry), "queue_depth": s.batcher.queue_depth}

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics() -> Response:
        return Response(s.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


# ----------------------------------------------------------------------------- helpers

def _bearer_token(request: Request, missing: str) -> bytes:
    """The token of an ``Authorization: Bearer <token>`` header; Unauthorized(missing) without one."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(missing)
    return token.strip().encode()


def _check_limits(settings: Settings, inputs_per_item: Sequence[Sequence[str | Sequence[str]]]) -> None:
    total = sum(len(inputs) for inputs in inputs_per_item)
    if total > settings.max_texts_per_request:
        raise PayloadTooLarge(f"{total} inputs in one request exceed max_texts_per_request="
                              f"{settings.max_texts_per_request}")
    for k, inputs in enumerate(inputs_per_item):
        where = f"items[{k}]." if len(inputs_per_item) > 1 else ""
        for i, item in enumerate(inputs):
            for text in ([item] if isinstance(item, str) else item):
                if len(text) > settings.max_chars_per_text:
                    raise PayloadTooLarge(f"{where}inputs[{i}]: {len(text)} characters exceed "
                                          f"max_chars_per_text={settings.max_chars_per_text}")
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:  # lone surrogates from JSON escapes would crash the tokenizer
                    raise InvalidInput(f"{where}inputs[{i}]: not valid Unicode text") from None


def _task_predictions(task: str, predictions: list[Prediction]) -> TaskPredictions:
    return TaskPredictions(task=task, version=predictions[0].version, predictions=[
        PredictionOut(label=p.label, score=p.score, scores=p.scores, value=p.value) for p in predictions])


def _task_info(engine: Engine, v: TaskVersion) -> TaskInfo:
    return TaskInfo(task=v.task, version=v.version, sha256=v.sha256, problem_type=v.problem_type,
                    labels=list(v.labels), inputs=list(v.inputs), pooling=v.pooling, max_length=v.max_length,
                    scheme=v.scheme, metrics=dict(v.metrics), train_args=dict(v.train_args), bytes=v.nbytes,
                    bank_bytes=engine.bytes_per_task, sites=len(v.sites), base_model=v.base_model,
                    base_fingerprint=engine.base.fingerprint, created_at=v.created_at,
                    trainer_version=v.trainer_version, loaded_at=v.loaded_at)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _core_error_response(e: BitfitError, metrics: Metrics) -> JSONResponse:
    """The JSON error for one of our exceptions, with the headers its status calls for; counted."""
    headers = None
    if isinstance(e, Overloaded):
        headers = {"Retry-After": str(max(1, round(e.retry_after)))}
    elif isinstance(e, NotReady):  # e.g. a hung worker: a client should come back, not give up
        headers = {"Retry-After": "1"}
    elif isinstance(e, Unauthorized):
        headers = {"WWW-Authenticate": "Bearer"}
    metrics.errors.labels(e.code).inc()
    return _error(e.status_code, e.code, e.message, headers)


def _install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    def respond(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.errors.labels(code).inc()
        return _error(status, code, message, headers)

    @app.exception_handler(BitfitError)
    async def core_error(request: Request, e: BitfitError) -> JSONResponse:
        return _core_error_response(e, metrics)

    @app.exception_handler(RequestValidationError)
    async def schema_error(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}"
                    for err in e.errors()[:5]]
        return respond(400, InvalidInput.code, "invalid request: " + "; ".join(problems))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return respond(e.status_code, HTTP_CODES.get(e.status_code, "http_error"), str(e.detail), e.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return respond(500, "internal_error", "internal server error")


class _BodyLimit:
    """Cap request bodies while they stream in, whatever Content-Length claims: a declared length
    over the cap is refused before reading; otherwise reading stops with 413 once past the cap."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], tuple[str, int]]):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        name, limit = self.limit_for(scope)
        too_large = f"the request body exceeds {name}={limit} bytes"
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _error(413, PayloadTooLarge.code, too_large)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, too_large)
            return message

        await self.app(scope, limited, send)


class _ShedLoad:
    """While the queue is full, refuse inference requests (503 + Retry-After) before their body is
    read or parsed. Under overload most requests are refused, and parsing each one first would
    take the event loop from the requests it does admit: their latency would grow with the
    offered load instead of staying bounded by the queue."""

    def __init__(self, app: ASGIApp, batcher: Callable[[], Batcher | None], metrics: Metrics):
        self.app = app
        self.batcher = batcher
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = _predict_route(scope) if scope["type"] == "http" else None
        batcher = self.batcher() if route else None
        if batcher is not None:
            try:
                batcher.check_room()
            except Overloaded as e:
                scope["bitfit.route"] = route  # for _Observe: no route was matched
                await _core_error_response(e, self.metrics)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _predict_route(scope: Scope) -> str | None:
    """The route template of an inference request, or None."""
    if scope["method"] != "POST":
        return None
    path = scope["path"]
    if path == "/v1/predict":
        return path
    parts = path.split("/")
    return "/v1/tasks/{task}/predict" if len(parts) == 5 and parts[:3] == ["", "v1", "tasks"] \
        and parts[4] == "predict" else None


class _Observe:
    """Request count and latency by route template (never the raw path: bounded label values)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or scope.get("bitfit.route", "unmatched")
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.request_seconds.labels(scope["method"], route).observe(time.perf_counter() - start)
