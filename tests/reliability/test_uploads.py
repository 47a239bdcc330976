"""Uploads are parsed safely (issue 7, point 2).

* The body cap holds while streaming: 413 after reading at most cap + 64 KiB (one chunk), whether
  Content-Length is missing, lies low, or is honest and too large (then 0 bytes are read). Checked
  at the ASGI level (bytes the app pulled are counted exactly) and on a live server over a raw
  socket (chunked and lying Content-Length; the server answers 413 while the client still sends).
* The safetensors header length is capped before the header is parsed.
* The malformed-delta corpus through ``PUT``: every file gets a specific 4xx, nothing crashes,
  nothing is written to the store, other tasks' outputs are unchanged.
(No pickle / torch.load in the package: tests/test_delta.py::test_no_pickle_in_package.)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import struct
import time
from pathlib import Path

import pytest

from bitfit_serve import delta as delta_io
from bitfit_serve.errors import InvalidDelta
from tests.factories import SENTENCES
from tests.reliability.corpus import malformed_deltas
from tests.reliability.live import LiveServer
from tests.server.conftest import serving, write_delta

CHUNK = 64 << 10
CAP = 256 << 10
OCTET = {"Content-Type": "application/octet-stream"}
# Codes that name what is wrong (a generic 400 "bad_request" or a 500 would not).
SPECIFIC = {"invalid_delta", "base_model_mismatch", "invalid_input", "payload_too_large"}


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root (directories as 'dir')."""
    return {str(p.relative_to(root)): ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*"))}


async def asgi_call(app, method: str, path: str, headers: dict[str, str], chunks, limit_chunks: int = 2000):
    """Call the app with a streamed body; returns (status, body, bytes the app pulled)."""
    pulled = 0
    sent: list[dict] = []
    source = iter(chunks)
    finished = False

    async def receive():
        nonlocal pulled, finished
        if finished:
            await asyncio.sleep(3600)
        chunk = next(source, None)
        if chunk is None:
            finished = True
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 80)}
    await asyncio.wait_for(app(scope, receive, send), 60)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body, pulled


def endless(n: int = 2000):
    return (b"\0" * CHUNK for _ in range(n))  # 125 MiB if nobody stops reading


@pytest.mark.anyio
@pytest.mark.parametrize("method,path,cap_setting", [("PUT", "/v1/tasks/big", "max_upload_bytes"),
                                                     ("POST", "/v1/tasks/big/predict", "max_request_bytes")])
async def test_streaming_body_cap(engine, deltas_dir, method, path, cap_setting):
    async with serving(engine, deltas_dir, max_upload_bytes=CAP, max_request_bytes=CAP) as client:
        app = client.app
        for declared in (None, "0", "100", str(CAP - 1), str(CAP)):  # missing or lying Content-Length
            headers = {**OCTET, **({"Content-Length": declared} if declared is not None else {})}
            status, body, pulled = await asgi_call(app, method, path, headers, endless())
            assert status == 413, (declared, status, body)
            assert json.loads(body)["error"]["code"] == "payload_too_large"
            assert cap_setting in json.loads(body)["error"]["message"]
            assert pulled <= CAP + CHUNK, (declared, pulled)
        # An honest Content-Length over the cap: refused before reading a byte.
        status, _, pulled = await asgi_call(app, method, path, {**OCTET, "Content-Length": str(CAP + 1)}, endless())
        assert (status, pulled) == (413, 0)
        assert (await client.get("/ready")).status_code == 200
    assert not deltas_dir.exists() or not any(deltas_dir.iterdir())


def _read_response(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        if not part:
            break
        data += part
    return data


def _send_until_answer(sock: socket.socket, head: bytes, chunk: bytes, max_bytes: int) -> tuple[int, bytes]:
    """Send head, then chunk after chunk until the server answers (or max_bytes). Returns bytes
    of body sent and the answer."""
    sock.sendall(head)
    sock.setblocking(False)
    sent = 0
    answer = b""
    try:
        while sent < max_bytes:
            try:
                answer += sock.recv(65536)
                if answer:
                    break
            except BlockingIOError:
                pass
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                time.sleep(0.001)
            except (BrokenPipeError, ConnectionResetError):
                break
    finally:
        sock.setblocking(True)
    if not answer:
        try:
            answer = _read_response(sock)
        except (ConnectionResetError, socket.timeout):
            pass
    return sent, answer


def test_live_server_body_cap_with_lying_or_missing_length(tiny_bert_dir, tmp_path, zygote):
    deltas = tmp_path / "deltas"
    with LiveServer(tiny_bert_dir, deltas, tmp_path / "server.log", args=("--max-upload-bytes", str(CAP)),
                    zygote=zygote) as server:
        port = server.port
        # Chunked, no Content-Length: answered 413 long before the client is done.
        chunk = b"%x\r\n" % CHUNK + b"\0" * CHUNK + b"\r\n"
        with socket.create_connection(("127.0.0.1", port)) as sock:
            head = (b"PUT /v1/tasks/big HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n")
            sent, answer = _send_until_answer(sock, head, chunk, max_bytes=256 << 20)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert sent < 64 << 20, f"the server let the client send {sent} bytes before answering"
        # Content-Length lying low: only that many bytes are the body; the rest is not a request.
        with socket.create_connection(("127.0.0.1", port)) as sock:
            head = (b"PUT /v1/tasks/big HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                    b"Content-Length: 100\r\n\r\n")
            _, answer = _send_until_answer(sock, head, b"\0" * CHUNK, max_bytes=8 << 20)
        assert answer[:12] in (b"HTTP/1.1 422", b"HTTP/1.1 400"), answer[:200]
        # Content-Length honest and too large: refused at once.
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"PUT /v1/tasks/big HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n")
            assert _read_response(sock).startswith(b"HTTP/1.1 413")
        assert server.alive
        import httpx
        assert httpx.get(f"{server.url}/ready").status_code == 200
    assert not any(p.name.endswith(".safetensors") for p in deltas.iterdir())


def test_header_length_is_capped_before_parsing(make_delta):
    good = delta_io.to_bytes(make_delta("h"))
    (n,) = struct.unpack("<Q", good[:8])
    # A real, parseable JSON header just over the cap: refused by its length alone.
    header = json.loads(good[8:8 + n])
    header["__metadata__"]["pad"] = " " * (delta_io.MAX_HEADER_BYTES - n + 8)
    text = json.dumps(header).encode()
    assert len(text) > delta_io.MAX_HEADER_BYTES
    with pytest.raises(InvalidDelta, match="exceeds the 1048576-byte limit"):
        delta_io.parse(struct.pack("<Q", len(text)) + text + good[8 + n:])
    for claimed in (delta_io.MAX_HEADER_BYTES + 1, 1 << 40, (1 << 64) - 1):
        with pytest.raises(InvalidDelta, match="exceeds"):
            delta_io.parse(struct.pack("<Q", claimed) + b"{}").delta


@pytest.mark.anyio
async def test_corpus_through_put(engine, deltas_dir, make_delta, delta_bytes, record_property):
    for i, kw in enumerate([{}, {"num_labels": 3, "sites": "gammas"}]):
        write_delta(deltas_dir, f"other{i}", delta_bytes(f"other{i}", seed=i, **kw))
    good = make_delta("victim", seed=7, num_labels=3, sites="biases", pooling="pooler")
    probe = {"inputs": SENTENCES}
    async with serving(engine, deltas_dir) as client:
        async def outputs():
            return [(await client.post(f"/v1/tasks/other{i}/predict", json=probe)).json() for i in range(2)]

        before, before_tree = await outputs(), tree(deltas_dir)
        codes, wrong = {}, []
        cases = list(malformed_deltas(good))
        for case_id, data in cases:
            r = await client.put("/v1/tasks/victim", content=data, headers=OCTET)
            code = r.json()["error"]["code"] if r.status_code >= 400 else None
            codes[code] = codes.get(code, 0) + 1
            if not (400 <= r.status_code < 500 and code in SPECIFIC and r.json()["error"]["message"]):
                wrong.append(f"{case_id}: {r.status_code} {r.text[:200]}")
        assert not wrong, "\n".join(wrong)
        assert (await client.get("/v1/tasks/victim")).status_code == 404
        assert await outputs() == before
        assert tree(deltas_dir) == before_tree  # no temp file, no partial file, nothing else
        assert (await client.get("/ready")).status_code == 200
        r = await client.put("/v1/tasks/victim", content=delta_io.to_bytes(good), headers=OCTET)
        assert r.status_code == 201  # and the good file itself is accepted
    record_property("corpus_put", {"cases": len(cases), "codes": codes})
    print(f"\ncorpus through PUT: {len(cases)} cases, codes {codes}")
    assert len(cases) >= 200
