"""Python clients for a ``bitfit-serve serve`` server, sync and async, on httpx.

    from bitfit_serve.client import Client

    with Client("http://127.0.0.1:8000", api_key="key", admin_token="admin") as c:
        c.put_task("sst2-copy", "deltas/sst2.safetensors")        # add (or replace) a task
        out = c.predict("sst2-copy", ["a gripping film", "the plot is thin"])
        print(out.version, [(p.label, p.score) for p in out.predictions])
        both = c.predict_many([("sst2", ["dull"]), {"task": "rte", "inputs": [["A man sleeps.", "He is awake."]]}])
        print([t.task for t in c.tasks()], c.ready())
        c.delete_task("sst2-copy")

    async with AsyncClient("http://127.0.0.1:8000") as c:     # the same methods, awaited
        out = await c.predict("sst2", ["a gripping film"])

Results are the server's own response models (``bitfit_serve.http.schemas``): ``TaskPredictions``
(``.task``, ``.version``, ``.predictions``: ``PredictionOut`` with ``label``/``score``/``scores`` or
``value``), ``TaskInfo``, ``UploadResponse`` (a ``TaskInfo`` plus ``replaced``: the version it
replaced, None if the task is new) and ``RemoveResponse``.

**Auth**: ``Authorization: Bearer <token>``. Inference and task-listing calls send ``api_key``
(or ``admin_token`` if no ``api_key`` is given: the server accepts it there too); ``put_task`` and
``delete_task`` send ``admin_token`` (nothing if it is not given).

**Errors**: an error answer ``{"error": {"code", "message"}}`` raises the class of
``bitfit_serve.errors`` whose ``code`` it names (``UnknownTask``, ``InvalidDelta``,
``BaseModelMismatch``, ``Unauthorized``, ``Forbidden``, ``Overloaded`` with ``retry_after`` ...),
with the server's message; the exception also carries ``status_code`` and ``body`` (the response
text). Any other code (e.g. ``not_found`` for a wrong route, ``internal_error``) or a body that is not
such JSON raises :class:`ServerError`, a ``BitfitError`` with ``status_code``, ``code`` and ``body``.
A response that is not an error but does not match the schema raises ``pydantic.ValidationError``.

**Retries**: only the calls that are safe to repeat (``predict``, ``predict_many``, ``tasks``,
``task``) are retried, on 429 and 503 (``overloaded``, ``not_ready``), at most ``max_retries`` times,
each after the ``Retry-After`` the server sent (seconds or an HTTP date; 1 s if absent), but never
waiting more than ``max_retry_wait`` seconds; after the last try the error is raised.
``put_task`` and ``delete_task`` are never retried. ``ready()`` is not retried either: its 503 is
its answer (False). Connection errors and timeouts are not retried: they raise httpx's own
exceptions (``httpx.ConnectError``, ``httpx.TimeoutException``, both ``httpx.TransportError``).

Importing the client does not import torch (the package's names load lazily), but it needs the
package installed (``pip install bitfit-serve``). About 390 lines: the sync and async clients
mirror each other method by method, on one shared request and error layer.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar, Union
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from bitfit_serve import errors as _errors
from bitfit_serve.errors import BitfitError, Overloaded
from bitfit_serve.http.schemas import (MixedPredictResponse, PredictionOut, RemoveResponse, TaskInfo, TaskList,
                                       TaskPredictions, UploadResponse)

__all__ = ["Client", "AsyncClient", "ServerError", "TaskPredictions", "PredictionOut", "TaskInfo",
           "UploadResponse", "RemoveResponse", "ERROR_CLASSES", "DEFAULT_URL"]

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 503})
DEFAULT_RETRY_AFTER = 1.0

Input = Union[str, Sequence[str]]  # a text, or a [first, second] pair
Item = Union[tuple[str, Sequence[Input]], Mapping[str, Any]]
M = TypeVar("M", bound=BaseModel)


class ServerError(BitfitError):
    """An error answer whose code is not one of ``bitfit_serve.errors`` (or whose body is not the
    server's error JSON): a wrong route, a proxy in between, a 500."""

    code = "server_error"

    def __init__(self, message: str, status_code: int, body: str = "", code: str | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.body = body
        if code is not None:
            self.code = code


def _error_classes() -> dict[str, type[BitfitError]]:
    """code -> class, for every error class of ``bitfit_serve.errors`` (the base's generic code excluded)."""
    out: dict[str, type[BitfitError]] = {}
    for obj in vars(_errors).values():
        if isinstance(obj, type) and issubclass(obj, BitfitError) and obj is not BitfitError:
            assert obj.code not in out, f"two error classes share the code {obj.code!r}"
            out[obj.code] = obj
    return out


ERROR_CLASSES: dict[str, type[BitfitError]] = _error_classes()


def retry_after_seconds(response: httpx.Response) -> float:
    """``Retry-After`` in seconds (a number or an HTTP date); DEFAULT_RETRY_AFTER if absent or unreadable."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return DEFAULT_RETRY_AFTER
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return DEFAULT_RETRY_AFTER
    if when is None:
        return DEFAULT_RETRY_AFTER
    return max(0.0, when.timestamp() - time.time())


def error_from_response(response: httpx.Response) -> BitfitError:
    """The exception an error answer stands for (see the module docstring)."""
    status, text = response.status_code, response.text
    try:
        body = response.json()
        error = body["error"]
        code, message = error["code"], error["message"]
        if not isinstance(code, str) or not isinstance(message, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return ServerError(f"HTTP {status} from {response.request.method} {response.request.url.path}: "
                           f"{text[:500]}", status, text)
    cls = ERROR_CLASSES.get(code)
    if cls is None:
        return ServerError(message, status, text, code)
    try:
        exc = cls(message, retry_after=retry_after_seconds(response)) if issubclass(cls, Overloaded) \
            else cls(message)
    except TypeError:  # a class with another constructor: keep the information anyway
        return ServerError(message, status, text, code)
    exc.status_code = status
    exc.body = text  # type: ignore[attr-defined]
    return exc


# ---------------------------------------------------------------------------------------------------
# What both clients share: one call = a method, a path, a body, whose token, retryable or not, and how
# the answer becomes a result. The sync and async clients differ only in how they send and sleep.


@dataclass
class _Call:
    method: str
    path: str
    parse: Callable[[httpx.Response], Any]
    json: Any = None
    content: bytes | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    admin: bool = False
    retry: bool = True
    ok: Callable[[httpx.Response], bool] = lambda r: r.is_success


def _model(cls: type[M]) -> Callable[[httpx.Response], M]:
    return lambda r: cls.model_validate(r.json())


def _task_path(name: str, suffix: str = "") -> str:
    return f"/v1/tasks/{quote(name, safe='')}{suffix}"


def _inputs(inputs: Input | Sequence[Input]) -> list[Any]:
    if isinstance(inputs, str):
        return [inputs]  # one text
    return [x if isinstance(x, str) else list(x) for x in inputs]


def _item(item: Item) -> dict[str, Any]:
    if isinstance(item, Mapping):
        if set(item) - {"task", "inputs"} or "task" not in item or "inputs" not in item:
            raise TypeError(f"an item is (task, inputs) or {{'task': ..., 'inputs': ...}}, got {item!r}")
        task, inputs = item["task"], item["inputs"]
    else:
        task, inputs = item
    return {"task": task, "inputs": _inputs(inputs)}


def _read_delta(path_or_bytes: str | os.PathLike[str] | bytes | bytearray | memoryview) -> bytes:
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return bytes(path_or_bytes)
    with open(path_or_bytes, "rb") as f:
        return f.read()


class _Base:
    def __init__(self, base_url: str | None, api_key: str | None, admin_token: str | None, timeout: float,
                 max_retries: int, max_retry_wait: float, http_client: Any) -> None:
        if max_retries < 0 or max_retry_wait < 0:
            raise ValueError("max_retries and max_retry_wait must be >= 0")
        self.api_key = api_key
        self.admin_token = admin_token
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait
        self._owns_http = http_client is None
        # With the caller's client and no base_url, paths are relative to that client's base_url.
        self._prefix = "" if base_url is None or self._owns_http else base_url.rstrip("/")
        self.base_url = base_url if base_url is not None or not self._owns_http else DEFAULT_URL

    def _auth(self, admin: bool) -> dict[str, bytes]:
        token = self.admin_token if admin else (self.api_key or self.admin_token)
        # bytes: a non-ASCII token goes out as UTF-8 (httpx would refuse it as a str)
        return {"Authorization": b"Bearer " + token.encode()} if token else {}

    def _request_args(self, call: _Call) -> dict[str, Any]:
        args: dict[str, Any] = {"headers": {**call.headers, **self._auth(call.admin)}}
        if call.json is not None:
            args["json"] = call.json
        if call.content is not None:
            args["content"] = call.content
        return args

    def _outcome(self, call: _Call, response: httpx.Response, attempt: int) -> tuple[bool, Any, float]:
        """(done, result, wait): done with the parsed result; or not done, to retry after ``wait``.
        Raises the error once no retry is left."""
        if call.ok(response):
            return True, call.parse(response), 0.0
        if call.retry and response.status_code in RETRY_STATUSES and attempt < self.max_retries:
            return False, None, min(retry_after_seconds(response), self.max_retry_wait)
        raise error_from_response(response)

    # The calls: each method builds one _Call, the subclasses send it.
    def _predict(self, task: str, inputs: Input | Sequence[Input], truncate: bool | None) -> _Call:
        body: dict[str, Any] = {"inputs": _inputs(inputs)}
        if truncate is not None:
            body["truncate"] = truncate
        return _Call("POST", _task_path(task, "/predict"), _model(TaskPredictions), json=body)

    def _predict_many(self, items: Iterable[Item], truncate: bool | None) -> _Call:
        body: dict[str, Any] = {"items": [_item(item) for item in items]}
        if truncate is not None:
            body["truncate"] = truncate
        return _Call("POST", "/v1/predict", lambda r: MixedPredictResponse.model_validate(r.json()).results,
                     json=body)

    def _tasks(self, after: str | None = None) -> _Call:
        """One page of the listing (the server pages it: follow ``next``)."""
        path = "/v1/tasks" if after is None else f"/v1/tasks?after={quote(after, safe='')}"
        return _Call("GET", path, _model(TaskList))

    def _task(self, name: str) -> _Call:
        return _Call("GET", _task_path(name), _model(TaskInfo))

    def _put_task(self, name: str, path_or_bytes: Any) -> _Call:
        return _Call("PUT", _task_path(name), _model(UploadResponse), content=_read_delta(path_or_bytes),
                     headers={"Content-Type": "application/octet-stream"}, admin=True, retry=False)

    def _delete_task(self, name: str) -> _Call:
        return _Call("DELETE", _task_path(name), _model(RemoveResponse), admin=True, retry=False)

    def _ready(self) -> _Call:
        return _Call("GET", "/ready", lambda r: r.status_code == 200, retry=False,
                     ok=lambda r: r.status_code in (200, 503))


class Client(_Base):
    """Blocking client. ``transport`` (e.g. ``httpx.MockTransport``) goes to the httpx client it
    creates; or pass ``http_client``, an ``httpx.Client`` of yours (not closed by :meth:`close`;
    ``base_url`` then defaults to its own). See the module docstring for auth, errors and retries."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, admin_token: str | None = None,
                 timeout: float = 30.0, max_retries: int = 3, max_retry_wait: float = 10.0,
                 transport: httpx.BaseTransport | None = None, http_client: httpx.Client | None = None) -> None:
        super().__init__(base_url, api_key, admin_token, timeout, max_retries, max_retry_wait, http_client)
        self._http = http_client if http_client is not None else httpx.Client(
            base_url=self.base_url, timeout=timeout, transport=transport)

    def _send(self, call: _Call) -> Any:
        attempt = 0
        while True:
            response = self._http.request(call.method, self._prefix + call.path, **self._request_args(call))
            done, result, wait = self._outcome(call, response, attempt)
            if done:
                return result
            attempt += 1
            _sleep(wait)

    def predict(self, task: str, inputs: Input | Sequence[Input], truncate: bool | None = None) -> TaskPredictions:
        """POST /v1/tasks/{task}/predict: texts, or [first, second] pairs (a single str is one text).
        ``truncate`` None: the server's default."""
        return self._send(self._predict(task, inputs, truncate))

    def predict_many(self, items: Iterable[Item], truncate: bool | None = None) -> list[TaskPredictions]:
        """POST /v1/predict: ``(task, inputs)`` pairs or ``{"task", "inputs"}`` dicts; one result each, in order."""
        return self._send(self._predict_many(items, truncate))

    def tasks(self) -> list[TaskInfo]:
        """GET /v1/tasks, every page."""
        page = self._send(self._tasks())
        tasks = list(page.tasks)
        while page.next is not None:
            page = self._send(self._tasks(page.next))
            tasks += page.tasks
        return tasks

    def task(self, name: str) -> TaskInfo:
        """GET /v1/tasks/{name}."""
        return self._send(self._task(name))

    def put_task(self, name: str, path_or_bytes: str | os.PathLike[str] | bytes) -> UploadResponse:
        """PUT /v1/tasks/{name} (admin): add or replace; ``.replaced`` is the old version, None if new."""
        return self._send(self._put_task(name, path_or_bytes))

    def delete_task(self, name: str) -> RemoveResponse:
        """DELETE /v1/tasks/{name} (admin)."""
        return self._send(self._delete_task(name))

    def ready(self) -> bool:
        """GET /ready: True on 200, False on 503 (not retried)."""
        return self._send(self._ready())

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncClient(_Base):
    """The same API as :class:`Client`, awaited. ``transport``: an ``httpx.AsyncBaseTransport``
    (``httpx.ASGITransport(app=...)``, ``httpx.MockTransport``); or ``http_client``, an
    ``httpx.AsyncClient`` of yours (not closed by :meth:`close`)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, admin_token: str | None = None,
                 timeout: float = 30.0, max_retries: int = 3, max_retry_wait: float = 10.0,
                 transport: httpx.AsyncBaseTransport | None = None,
                 http_client: httpx.AsyncClient | None = None) -> None:
        super().__init__(base_url, api_key, admin_token, timeout, max_retries, max_retry_wait, http_client)
        self._http = http_client if http_client is not None else httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, transport=transport)

    async def _send(self, call: _Call) -> Any:
        attempt = 0
        while True:
            response = await self._http.request(call.method, self._prefix + call.path, **self._request_args(call))
            done, result, wait = self._outcome(call, response, attempt)
            if done:
                return result
            attempt += 1
            await _async_sleep(wait)

    async def predict(self, task: str, inputs: Input | Sequence[Input],
                      truncate: bool | None = None) -> TaskPredictions:
        """POST /v1/tasks/{task}/predict (see :meth:`Client.predict`)."""
        return await self._send(self._predict(task, inputs, truncate))

    async def predict_many(self, items: Iterable[Item], truncate: bool | None = None) -> list[TaskPredictions]:
        """POST /v1/predict (see :meth:`Client.predict_many`)."""
        return await self._send(self._predict_many(items, truncate))

    async def tasks(self) -> list[TaskInfo]:
        """GET /v1/tasks, every page."""
        page = await self._send(self._tasks())
        tasks = list(page.tasks)
        while page.next is not None:
            page = await self._send(self._tasks(page.next))
            tasks += page.tasks
        return tasks

    async def task(self, name: str) -> TaskInfo:
        return await self._send(self._task(name))

    async def put_task(self, name: str, path_or_bytes: str | os.PathLike[str] | bytes) -> UploadResponse:
        """PUT /v1/tasks/{name} (admin; never retried). The file is read before sending."""
        return await self._send(self._put_task(name, path_or_bytes))

    async def delete_task(self, name: str) -> RemoveResponse:
        return await self._send(self._delete_task(name))

    async def ready(self) -> bool:
        return await self._send(self._ready())

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


# Module-level so that tests can record the waits instead of sleeping.
_sleep = time.sleep
_async_sleep = asyncio.sleep
