"""Names (issue 7, point 3): task names match the documented allowlist ``delta.TASK_NAME_RE``
(``^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$``); traversal payloads through PUT, DELETE and the watched
folder write 0 bytes outside the store (a sandbox tree is snapshotted before and after), and the
name is validated before any disk write (``atomic_write`` is never reached for a bad name)."""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
from pathlib import Path
from urllib.parse import quote, unquote

import httpx
import pytest

from bitfit_serve import delta as delta_io
from bitfit_serve import store as store_module
from tests.reliability.corpus import _with_tensors
from tests.reliability.live import LiveServer
from tests.reliability.names import CORE, file_name_ok, traversal_payloads
from tests.reliability.test_uploads import asgi_call
from tests.server.conftest import serving, write_delta

OCTET = {"Content-Type": "application/octet-stream"}


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root -> sha256 (files), 'dir', or 'link -> target'."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        if p.is_symlink():
            out[key] = f"link -> {p.readlink()}"
        elif p.is_dir():
            out[key] = "dir"
        else:
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def sandbox(tmp_path: Path) -> tuple[Path, Path]:
    """sandbox/ holds the store and decoys a traversal would hit: siblings, parents, look-alikes."""
    root = tmp_path / "sandbox"
    store = root / "srv" / "deltas"
    for decoy in ("outside/keep.txt", "srv/keep.txt", "srv/store2/x", "etc/passwd", "pwned.safetensors"):
        path = root / decoy
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(decoy.encode())
    store.mkdir(parents=True)
    return root, store


def _sample(payloads: list[str], n: int) -> list[str]:
    """n payloads: the hand-written ones (absolute paths, odd characters, empty, slashes) always,
    the rest a fixed random sample of the generated combinations."""
    if n >= len(payloads):
        return payloads
    core = [p for p in payloads if p in CORE]
    rest = [p for p in payloads if p not in CORE]
    return core + random.Random(0).sample(rest, max(0, n - len(core)))


@pytest.mark.anyio
async def test_traversal_through_put_and_delete(engine, tmp_path, delta_bytes, scale, monkeypatch, record_property):
    root, store = sandbox(tmp_path)
    write_delta(store, "keep", delta_bytes("keep"))
    body = delta_bytes("victim", seed=3)
    writes = []
    real_write = delta_io.atomic_write
    monkeypatch.setattr(store_module.delta_io, "atomic_write", lambda p, d: (writes.append(p), real_write(p, d)))
    payloads = _sample(traversal_payloads(), scale(ci=1000, full=100_000))
    before = snapshot(root)
    statuses: dict[int, int] = {}
    bad = []
    async with serving(engine, store) as client:
        app = client.app
        for payload in payloads:
            for raw in (payload.encode("utf-8", "surrogatepass"), quote(payload, safe="").encode()):
                path = "/v1/tasks/" + unquote(raw.decode("latin-1"), encoding="latin-1")
                for method in ("PUT", "DELETE"):
                    status, text, _ = await asgi_call(app, method, path, OCTET, iter([body]))
                    statuses[status] = statuses.get(status, 0) + 1
                    if not 400 <= status < 500:
                        bad.append(f"{method} {raw[:80]!r}: {status} {text[:120]!r}")
        assert (await client.get("/v1/tasks/keep")).status_code == 200
    assert not bad, "\n".join(bad[:20])
    assert writes == []  # refused before any disk write
    assert snapshot(root) == before
    requests = 4 * len(payloads)
    record_property("traversal_http", {"payloads": len(payloads), "requests": requests, "statuses": statuses})
    print(f"\ntraversal via PUT/DELETE: {len(payloads)} payloads, {requests} requests, statuses {statuses}")
    assert len(payloads) >= 1000


def test_traversal_through_a_live_server(tiny_bert_dir, tmp_path, delta_bytes, zygote, scale):
    """A sample as raw request lines to the real server (its own URL parsing, then ours)."""
    root, store = sandbox(tmp_path)
    body = delta_bytes("victim", seed=3)
    payloads = _sample(traversal_payloads(), scale(ci=100, full=1000))
    before = snapshot(root)
    bad = []
    with LiveServer(tiny_bert_dir, store, tmp_path / "server.log", args=("--no-watch",), zygote=zygote) as server:
        for payload in payloads:
            # Unencoded, '?' and '#' would start a query / fragment: the name is then what precedes them.
            raw = [payload.encode("utf-8", "surrogatepass")] if not {"?", "#"} & set(payload) else []
            for target in (*raw, quote(payload, safe="").encode()):
                for method in (b"PUT", b"DELETE"):
                    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                        sock.sendall(method + b" /v1/tasks/" + target + b" HTTP/1.1\r\nHost: x\r\n"
                                     b"Content-Type: application/octet-stream\r\nConnection: close\r\n"
                                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                        answer = b""
                        while chunk := sock.recv(65536):
                            answer += chunk
                    status = answer[9:12]
                    if not status.startswith(b"4") and answer:  # no answer = the parser dropped the line
                        bad.append(f"{method!r} {target[:80]!r}: {answer[:100]!r}")
        assert httpx.get(f"{server.url}/ready").status_code == 200
    assert not bad, "\n".join(bad[:20])
    assert snapshot(root) == before


@pytest.mark.anyio
async def test_traversal_through_the_watched_folder(engine, tmp_path, delta_bytes, make_delta, scale, monkeypatch,
                                                    record_property):
    root, store = sandbox(tmp_path)
    names = _sample([p for p in traversal_payloads() if file_name_ok(p)], scale(ci=300, full=100_000))
    mislabeled = _sample(traversal_payloads(), scale(ci=30, full=300))
    writes = []
    real_write = delta_io.atomic_write
    monkeypatch.setattr(store_module.delta_io, "atomic_write", lambda p, d: (writes.append(p), real_write(p, d)))
    async with serving(engine, store, watch=True) as client:
        before = snapshot(root)
        body = delta_bytes("victim", seed=3)
        for name in names:  # hostile file names holding a valid delta
            (store / f"{name}.safetensors").write_bytes(body)
        # Valid file names whose metadata names a hostile task.
        good = make_delta("victim", seed=3)
        tensors = {**good.sites, "head.weight": good.head_weight, "head.bias": good.head_bias}
        for i, task in enumerate(mislabeled):
            (store / f"m{i}.safetensors").write_bytes(_with_tensors(good, tensors, task=task))
        # A good file last: once it is served, the watcher has seen everything before it.
        (store / "sentinel.safetensors").write_bytes(delta_bytes("sentinel"))
        for _ in range(300):
            if (await client.get("/v1/tasks/sentinel")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        served = [t["task"] for t in (await client.get("/v1/tasks")).json()["tasks"]]
    assert served == ["sentinel"]
    assert writes == []
    after = snapshot(root)
    added = {k for k in after if k not in before}
    expected = {f"srv/deltas/{n}.safetensors" for n in names} | {
        f"srv/deltas/m{i}.safetensors" for i in range(len(mislabeled))} | {"srv/deltas/sentinel.safetensors"}
    assert added == expected  # only what the test itself wrote, all inside the store
    assert {k: v for k, v in after.items() if k in before} == before
    record_property("traversal_watch", {"file_names": len(names), "mislabeled": len(mislabeled)})
    print(f"\ntraversal via the watched folder: {len(names)} hostile file names, {len(mislabeled)} hostile metadata")
