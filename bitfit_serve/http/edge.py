"""The server's edge: body limits, load shedding, request metrics, and the JSON error bodies.

Errors are JSON ``{"error": {"code", "message"}}``: the core's errors (``bitfit_serve.errors``) map
one-to-one by their ``status_code``/``code``; request-schema errors become 400 ``invalid_input``;
routing errors keep their status (404 ``not_found``, 405, 413, 415). A 500 means a bug.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from typing import Sequence

from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from starlette.routing import Match
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bitfit_serve.batcher import Batcher
from bitfit_serve.errors import (BitfitError, InvalidInput, NotReady, Overloaded, PayloadTooLarge, RequestTimeout,
                                 Unauthorized)
from bitfit_serve.metrics import Metrics

log = logging.getLogger(__name__)

# Codes for errors raised by routing / the HTTP layer itself rather than by the core.
HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 408: RequestTimeout.code, 413: "payload_too_large",
              415: "unsupported_media_type"}


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


# A face that mimics another server answers errors in that server's shape: route tag -> a function
# (status, code, message, headers) -> response. Routes without such a tag get the native body.
ErrorFormat = Callable[[int, str, str, "dict[str, str] | None"], JSONResponse]
ERROR_FORMATS: dict[str, ErrorFormat] = {}


def error_format(scope: Scope) -> ErrorFormat:
    """The error shape of the route a request matched (the native one if none claims it)."""
    for tag in getattr(scope.get("route"), "tags", None) or ():
        if tag in ERROR_FORMATS:
            return ERROR_FORMATS[tag]
    return _error


def _core_error_response(e: BitfitError, metrics: Metrics, fmt: ErrorFormat = _error) -> JSONResponse:
    """The JSON error for one of our exceptions, with the headers its status calls for; counted."""
    headers = None
    if isinstance(e, Overloaded):
        headers = {"Retry-After": str(max(1, round(e.retry_after)))}
    elif isinstance(e, NotReady):  # e.g. a hung worker: a client should come back, not give up
        headers = {"Retry-After": "1"}
    elif isinstance(e, Unauthorized):
        headers = {"WWW-Authenticate": "Bearer"}
    metrics.errors.labels(e.code).inc()
    return fmt(e.status_code, e.code, e.message, headers)


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    def respond(request: Request, status: int, code: str, message: str,
                headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.errors.labels(code).inc()
        return error_format(request.scope)(status, code, message, headers)

    @app.exception_handler(BitfitError)
    async def core_error(request: Request, e: BitfitError) -> JSONResponse:
        return _core_error_response(e, metrics, error_format(request.scope))

    @app.exception_handler(RequestValidationError)
    async def schema_error(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}"
                    + (f" ({err['ctx']['error']})" if err.get("type") == "json_invalid" and err.get("ctx") else "")
                    for err in e.errors()[:5]]
        return respond(request, 400, InvalidInput.code, "invalid request: " + "; ".join(problems))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return respond(request, e.status_code, HTTP_CODES.get(e.status_code, "http_error"), str(e.detail), e.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return respond(request, 500, "internal_error", "internal server error")


class BodyLimit:
    """Cap request bodies while they stream in, whatever Content-Length claims: a declared length
    over the cap is refused before reading; otherwise reading stops with 413 once past the cap."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], tuple[str, int]],
                 routes: Callable[[], Sequence[APIRoute]] = lambda: ()):
        self.app = app
        self.limit_for = limit_for
        self.routes = routes  # to answer a refusal before routing in the matched face's error shape

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        name, limit = self.limit_for(scope)
        too_large = f"the request body exceeds {name}={limit} bytes"
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            fmt = error_format({"route": matching_route(self.routes(), scope)})
            await fmt(413, PayloadTooLarge.code, too_large, None)(scope, receive, send)
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


class BodyTimeout:
    """A request body must arrive whole within ``timeout`` seconds of its headers: one deadline for
    the whole body, not a gap between chunks, so a body trickled at 1 byte/s fails it too. Past it
    the read raises 408 ``request_timeout`` naming the setting (with ``Connection: close``): the
    route never runs on a partial body. Waits after the body's end (for a disconnect) are not bounded.
    The header deadline is the protocol's (``http.connections``)."""

    def __init__(self, app: ASGIApp, timeout: float, name: str = "body_timeout_s"):
        self.app = app
        self.timeout = timeout
        self.name = name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        complete = False

        async def timed() -> Message:
            nonlocal complete
            if complete:
                return await receive()
            try:  # asyncio.timeout_at: no task per receive, as wait_for would create
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.name}={self.timeout:g} s",
                                    headers={"Connection": "close"}) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed, send)


class ShedLoad:
    """While the queue is full, refuse inference requests (503 + Retry-After) before their body is
    read or parsed. Under overload most requests are refused, and parsing each one first would
    take the event loop from the requests it does admit: their latency would grow with the
    offered load instead of staying bounded by the queue."""

    def __init__(self, app: ASGIApp, batcher: Callable[[], Batcher | None], metrics: Metrics,
                 routes: Callable[[], Sequence[APIRoute]]):
        self.app = app
        self.batcher = batcher
        self.metrics = metrics
        self.routes = routes  # the inference routes of every face (tag "inference")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self._inference_route(scope) if scope["type"] == "http" else None
        batcher = self.batcher() if route else None
        if batcher is not None:
            try:
                batcher.check_room()
            except Overloaded as e:
                scope["bitfit.route"] = route.path  # for Observe: routing has not run yet
                fmt = error_format({"route": route})
                await _core_error_response(e, self.metrics, fmt)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _inference_route(self, scope: Scope) -> APIRoute | None:
        return matching_route(self.routes(), scope)


def matching_route(routes: Sequence[APIRoute], scope: Scope) -> APIRoute | None:
    """The route a request will reach, found before routing runs (for the middlewares)."""
    return next((r for r in routes if r.matches(scope)[0] == Match.FULL), None)


class Observe:
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
