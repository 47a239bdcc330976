"""Slow and idle clients are timed out, connections and uploads are capped (issue 19, findings 8 and 10).

Each test runs the app under uvicorn in a thread, configured the way ``bitfit-serve serve`` does it
(``uvicorn_options``), on 127.0.0.1, and talks to it over raw sockets with small timeouts:

* a connection that sends nothing, or trickles header lines, is closed within ``header_timeout_s``;
  so is a kept-alive one that starts a request and stalls, and one that trickles a body after its
  answer (uvicorn re-arms nothing once a byte comes);
* an idle keep-alive connection is closed after ``keep_alive_s``;
* a body trickled past ``body_timeout_s`` is a 408 ``request_timeout`` and is not served;
* a connection past ``max_connections`` is answered 503 ``busy`` and closed at once, while the open
  ones keep working;
* an upload past ``max_concurrent_uploads`` is a 503 ``busy`` + Retry-After before its body is sent.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import uvicorn

from bitfit_serve.engine import Engine
from bitfit_serve.http.connections import uvicorn_options
from bitfit_serve.server import create_app
from bitfit_serve.settings import Settings

SLACK = 2.0  # seconds a close may come after its deadline on a busy 2-core machine
SERVED: dict[int, Any] = {}  # port -> the app ``live`` serves there, for a test that waits on its state


@contextmanager
def live(engine: Engine, deltas: Path, **settings) -> Iterator[int]:
    """The app under uvicorn in a thread with the CLI's options for these settings; yields the port."""
    settings.setdefault("watch", False)
    s = Settings(deltas=deltas, **settings)
    app = create_app(engine, s)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, **uvicorn_options(s, app), log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-test", daemon=True)
    thread.start()
    SERVED[port] = app
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield port
    finally:
        SERVED.pop(port, None)
        server.should_exit = True
        thread.join(15)
        sock.close()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and when it closed (seconds from now); raises
    AssertionError if it is still open after ``timeout``. A reset counts as a close."""
    start = time.monotonic()
    data = b""
    while True:
        left = start + timeout - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the connection is still open after {timeout} s (got {data[:200]!r})")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return data, time.monotonic() - start
        data += chunk


def read_response(sock: socket.socket, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One response (Content-Length framed) from a kept-alive connection."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "closed in the middle of a body"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def parse(raw: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


def get_health(sock: socket.socket) -> int:
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    return read_response(sock)[0]


def answered(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def trickle(sock: socket.socket, data: bytes, every: float, step: int = 1, limit: float = 15.0) -> None:
    """Send ``data`` ``step`` bytes at a time, one send per ``every`` seconds, until all is sent or
    the server answers or closes (no more bytes then: a reset could eat its answer)."""
    end = time.monotonic() + limit
    for i in range(0, len(data), step):
        if answered(sock) or time.monotonic() > end:
            return
        try:
            sock.sendall(data[i:i + step])
        except OSError:
            return
        time.sleep(every)


def upload_head(task: str, length: int) -> bytes:
    return (f"PUT /v1/tasks/{task} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def error_counts(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def test_a_connection_that_sends_nothing_is_closed_after_header_timeout(engine, deltas_dir):
    with live(engine, deltas_dir, header_timeout_s=0.5) as port:
        with closing(connect(port)) as sock:
            data, when = read_until_closed(sock, 0.5 + SLACK)
        assert data == b"" and when >= 0.4  # nothing to answer: closed silently
        assert 'bitfit_connections_closed_total{reason="header_timeout"} 1.0' in error_counts(port)


def test_partial_headers_trickled_are_closed_with_408(engine, deltas_dir):
    with live(engine, deltas_dir, header_timeout_s=1.0) as port:
        with closing(connect(port)) as sock:
            start = time.monotonic()
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            trickle(sock, b"".join(b"X-Slow-%d: y\r\n" % i for i in range(200)), every=0.05, step=13)
            data, _ = read_until_closed(sock, 1.0 + SLACK)
            elapsed = time.monotonic() - start
        status, headers, body = parse(data)
        assert status == 408 and headers["connection"] == "close"
        assert body["error"]["code"] == "request_timeout" and "header_timeout_s=1" in body["error"]["message"]
        assert 0.9 <= elapsed <= 1.0 + SLACK


def test_a_kept_alive_connection_that_stalls_mid_request_is_closed(engine, deltas_dir):
    """uvicorn cancels its keep-alive timer at the first byte: one byte, then nothing, kept it open."""
    with live(engine, deltas_dir, header_timeout_s=1.0, keep_alive_s=30) as port:
        with closing(connect(port)) as sock:
            assert get_health(sock) == 200
            sock.sendall(b"G")
            data, when = read_until_closed(sock, 1.0 + SLACK)
        assert parse(data)[0] == 408


def test_an_idle_keep_alive_connection_is_closed_after_keep_alive_s(engine, deltas_dir):
    with live(engine, deltas_dir, keep_alive_s=0.5, header_timeout_s=30) as port:
        with closing(connect(port)) as sock:
            assert get_health(sock) == 200
            data, when = read_until_closed(sock, 0.5 + SLACK)
        assert data == b"" and when >= 0.4


def test_a_body_trickled_after_its_answer_is_cut_off(engine, deltas_dir):
    """A 401 answers an upload before its body is read; the client trickling the rest is then outside
    any request, and its bytes cancelled uvicorn's keep-alive timer one by one."""
    with live(engine, deltas_dir, header_timeout_s=1.0, admin_token="adm1n") as port:
        with closing(connect(port)) as sock:
            sock.sendall(upload_head("late", 10_000))
            status, _, body = read_response(sock)
            assert status == 401
            start = time.monotonic()
            end = start + 1.0 + SLACK
            while not answered(sock) and time.monotonic() < end:  # 1 byte every 50 ms, until closed
                try:
                    sock.sendall(b"x")
                except OSError:
                    break
                time.sleep(0.05)
            read_until_closed(sock, 0.5)
            assert time.monotonic() - start <= 1.0 + SLACK


@pytest.mark.parametrize("route", ["upload", "predict"])
def test_a_body_trickled_past_body_timeout_is_408_and_not_served(engine, deltas_dir, delta_bytes, route):
    data = delta_bytes("served")
    with live(engine, deltas_dir, body_timeout_s=1.0, header_timeout_s=30) as port:
        if route == "upload":
            head, body = upload_head("slow", len(data)), data
        else:  # a valid request for a task that is loaded
            httpx.put(f"http://127.0.0.1:{port}/v1/tasks/served", content=data, timeout=10).raise_for_status()
            body = json.dumps({"inputs": ["a gripping film"] * 8}).encode()
            head = (b"POST /v1/tasks/served/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body))
        with closing(connect(port)) as sock:
            start = time.monotonic()
            sock.sendall(head)
            # Fast enough that a chunk-gap timeout would never fire, slow enough to miss the deadline.
            trickle(sock, body, every=0.05, step=max(1, len(body) // 60))
            raw, _ = read_until_closed(sock, 1.0 + SLACK)
            elapsed = time.monotonic() - start
        status, headers, error = parse(raw)
        assert status == 408 and headers["connection"] == "close", raw
        assert error["error"]["code"] == "request_timeout" and "body_timeout_s=1" in error["error"]["message"]
        assert 0.9 <= elapsed <= 1.0 + SLACK
        assert httpx.get(f"http://127.0.0.1:{port}/v1/tasks/slow", timeout=10).status_code == 404
        assert not (deltas_dir / "slow.safetensors").exists()
        assert 'bitfit_errors_total{code="request_timeout"} 1.0' in error_counts(port)
        if route == "predict":  # not served
            counts = error_counts(port)
            assert 'route="/v1/tasks/{task}/predict",status="408"} 1.0' in counts
            assert 'route="/v1/tasks/{task}/predict",status="200"}' not in counts


def test_connections_past_max_connections_are_refused_while_open_ones_work(engine, deltas_dir):
    with live(engine, deltas_dir, max_connections=3, header_timeout_s=30) as port:
        socks = [connect(port) for _ in range(3)]
        try:
            for sock in socks:  # each one accepted, answered and kept alive
                assert get_health(sock) == 200
            start = time.monotonic()
            with closing(connect(port)) as extra:
                try:
                    raw, _ = read_until_closed(extra, SLACK)
                except ConnectionResetError:
                    raw = b""
            assert time.monotonic() - start < SLACK  # at once, not after a timeout
            status, headers, body = parse(raw)
            assert status == 503 and body["error"]["code"] == "busy" and headers["retry-after"] == "1"
            assert "max_connections=3" in body["error"]["message"]
            for sock in socks:  # the open ones are untouched
                assert get_health(sock) == 200
            socks.pop().close()  # a slot frees up
            deadline = time.monotonic() + SLACK
            while True:
                with closing(connect(port)) as again:
                    try:
                        if get_health(again) == 200:
                            break
                    except (AssertionError, OSError):
                        pass
                assert time.monotonic() < deadline, "a freed slot was not reused"
                time.sleep(0.05)
        finally:
            for sock in socks:
                sock.close()
        assert 'bitfit_connections_closed_total{reason="max_connections"}' in error_counts(port)


def test_uploads_past_max_concurrent_uploads_get_503_busy_before_their_body(engine, deltas_dir, delta_bytes):
    data = delta_bytes("held")
    with live(engine, deltas_dir, max_concurrent_uploads=1, body_timeout_s=30, header_timeout_s=30) as port:
        with closing(connect(port)) as holder:
            holder.sendall(upload_head("held", len(data)) + data[:len(data) // 2])  # takes the one slot
            # Wait until the server counts the holder's upload: sent first is not slotted first (its sync
            # dependencies run in the thread pool, and a later upload can overtake it and take the slot).
            services = SERVED[port].state.services
            deadline = time.monotonic() + 10 * SLACK
            while services.uploads == 0:
                assert not answered(holder), f"the holder was answered: {read_response(holder)}"
                assert time.monotonic() < deadline, "the holder's upload never took the slot"
                time.sleep(0.01)
            with closing(connect(port)) as other:
                other.sendall(upload_head("other", len(data)))  # headers only: no body sent
                refused = select.select([other], [], [], 10 * SLACK)[0]
                assert refused, "an upload was not refused while one held the only slot"
                busy = read_response(other)
            assert not answered(holder)  # still holding the slot, its body half sent
            status, headers, body = busy
            error = json.loads(body)["error"]
            assert status == 503 and error["code"] == "busy" and headers["retry-after"] == "1"
            assert "max_concurrent_uploads=1" in error["message"]
            holder.sendall(data[len(data) // 2:])  # the holder finishes and succeeds
            assert read_response(holder)[0] == 201
        again = httpx.put(f"http://127.0.0.1:{port}/v1/tasks/other", content=data, timeout=10)
        assert again.status_code == 201, again.text  # the slot is free again
        assert 'bitfit_errors_total{code="busy"}' in error_counts(port)
