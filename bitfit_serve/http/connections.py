"""Connection limits under uvicorn: a deadline for request headers, a cap on open connections.

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive``, but any byte cancels
that timer, and nothing bounds how long a new connection may take to send its headers: one that
never sends a byte, or trickles a header line now and then, stays open for good. Here:

* :class:`GuardedH11Protocol`, a subclass of uvicorn's h11 protocol (``H11Protocol``; uvicorn's
  ``http="auto"`` would pick httptools when installed, so :func:`uvicorn_options` passes this class
  explicitly and the server always runs on h11), arms one timer, ``header_timeout_s``, whenever no
  request is in the app's hands: at ``connection_made`` and at each response's end. It is disarmed
  when a request's headers are complete (the app has it; its body's deadline is
  ``http.edge.BodyTimeout``'s) and, when it fires, closes the connection: silently if it sent
  nothing since (an idle or a silent connection; an idle keep-alive one is normally closed earlier,
  after ``keep_alive_s``), with a 408 ``request_timeout`` if it sent part of a request. The rest of
  a body that no one reads after its response was sent (a 401 or 413 before the upload ended) falls
  under the same timer.
* A connection that makes more than ``max_connections`` open is answered a 503 ``busy`` (with
  ``Retry-After``) and closed at once, before anything of it is read; the open ones are untouched.
  (A client whose request was already on the wire may see a reset instead of the 503.)

Both count in ``bitfit_connections_closed_total{reason}``. WebSocket upgrades are off (``ws="none"``:
the app has no WebSocket route, and an upgraded connection would leave this protocol's timer).
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any, Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from bitfit_serve.errors import Busy, RequestTimeout
from bitfit_serve.settings import Settings


def raw_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A whole ``Connection: close`` HTTP/1.1 response with the JSON error body, for a connection
    that has no request h11 could answer."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
             f"content-length: {len(body)}", "connection: close",
             *(f"{name}: {value}" for name, value in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a connection cap (see the module docstring).
    :func:`protocol_class` makes a subclass with the values set."""

    header_timeout_s: float = 10.0
    max_connections: int | None = None
    retry_after_s: int = 1
    # reason -> None, called once per connection this class closes early
    on_close: Callable[[str], None] = staticmethod(lambda reason: None)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # counted in server_state.connections from here
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            transport.write(raw_error(Busy.status_code, Busy.code,
                                      f"the server has max_connections={self.max_connections} connections "
                                      f"open; retry later", {"retry-after": str(self.retry_after_s)}))
            transport.close()
            self.on_close("max_connections")
            return
        self._sync_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._sync_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request
        self._sync_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _app_has_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _sync_header_timer(self) -> None:
        """Armed (never re-armed: the deadline stands) while no request is in the app's hands."""
        if self.transport.is_closing() or self._app_has_request():
            self._disarm()
        elif self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self._app_has_request():
            return
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:  # part of a request came
            self.transport.write(raw_error(RequestTimeout.status_code, RequestTimeout.code,
                                           f"the request headers did not arrive within "
                                           f"header_timeout_s={self.header_timeout_s:g} s"))
        self.transport.close()
        self.on_close("header_timeout")


def protocol_class(settings: Settings, on_close: Callable[[str], None] | None = None) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` subclass for uvicorn's ``http=`` option, with these settings."""
    attrs: dict[str, Any] = dict(header_timeout_s=settings.header_timeout_s, max_connections=settings.max_connections,
                                 retry_after_s=settings.retry_after_s)
    if on_close is not None:
        attrs["on_close"] = staticmethod(on_close)
    return type("GuardedH11Protocol", (GuardedH11Protocol,), attrs)


def uvicorn_options(settings: Settings, app: Any = None) -> dict[str, Any]:
    """The keyword arguments of ``uvicorn.run(app, ...)`` / ``uvicorn.Config(app, ...)`` that the
    settings decide: address, keep-alive, and the guarded protocol. ``app`` (from ``create_app``)
    gives the metrics that count the connections closed early; logging options are the caller's."""
    services = getattr(getattr(app, "state", None), "services", None)
    on_close = services.metrics.connections_closed.labels if services is not None else None
    return dict(host=settings.host, port=settings.port, timeout_keep_alive=settings.keep_alive_s, ws="none",
                http=protocol_class(settings, on_close and (lambda reason: on_close(reason).inc())))
