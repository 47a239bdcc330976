"""Issue 19, finding 5: the watched folder trusts what it finds. Only regular files are read (no
FIFOs, devices, directories), symbolic links are never followed, a file over ``max_upload_bytes``
is refused from its size without being read, and the read happens before the lock that admin
routes need, so nothing in the folder can hold up PUT / DELETE. Each test is bounded: a FIFO
reader that does block is released after a few seconds (so a regression fails, never hangs)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import threading
import time

import pytest

from bitfit_serve import delta as delta_io
from bitfit_serve.errors import InvalidDelta
from bitfit_serve.store import DeltaStore
from tests.server.conftest import serving, write_delta

pytestmark = pytest.mark.anyio
OCTET = {"Content-Type": "application/octet-stream"}
PROMPT = 5.0  # seconds an admin route or a folder change may take here (each takes well under 1 s)


def v(data: bytes) -> str:
    return delta_io.sha256_bytes(data)[:16]


async def until(condition, timeout: float = PROMPT, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.05)


async def served(client) -> dict[str, str]:
    r = await asyncio.wait_for(client.get("/v1/tasks"), PROMPT)
    return {t["task"]: t["version"] for t in r.json()["tasks"]}


@contextlib.contextmanager
def fifo(path: pathlib.Path, release_after: float = 8.0):
    """A FIFO at ``path``. Should anything block opening it for reading (a regression), a daemon
    thread releases it after ``release_after`` s and on exit: the test then fails, not hangs."""
    os.mkfifo(path)
    done = threading.Event()

    def release() -> None:
        done.wait(release_after)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:  # a writer that opens and closes at once: a blocked reader sees end of file
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # ENXIO: nobody reading; FileNotFoundError: the folder is gone
                if not path.exists():
                    return
            time.sleep(0.05)

    threading.Thread(target=release, daemon=True, name="fifo-release").start()
    try:
        yield path
    finally:
        done.set()


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Every path ``os.open`` / ``Path.read_bytes`` is asked for from now on; reading a device is
    refused outright (so that a regression fails instead of filling memory from /dev/zero)."""
    seen: list[str] = []
    real_open, real_read_bytes = os.open, pathlib.Path.read_bytes

    def spy_open(path, *args, **kwargs):
        seen.append(os.fspath(path))
        return real_open(path, *args, **kwargs)

    def guarded_read_bytes(self):
        seen.append(os.fspath(self))
        if self.exists() and not self.is_file():
            raise AssertionError(f"{self} (a device or FIFO) was read")
        return real_read_bytes(self)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(pathlib.Path, "read_bytes", guarded_read_bytes)
    return seen


def sparse(path: pathlib.Path, size: int) -> pathlib.Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# ------------------------------------------------------------------------------------------- FIFOs
async def test_a_fifo_in_the_folder_at_start_up_is_reported_and_the_rest_loads(engine, deltas_dir, delta_bytes):
    deltas_dir.mkdir(parents=True)
    write_delta(deltas_dir, "a", delta_bytes("a"))
    with fifo(deltas_dir / "x.safetensors"):
        start = time.monotonic()
        async with serving(engine, deltas_dir, watch=True) as client:
            assert time.monotonic() - start < PROMPT
            assert await served(client) == {"a": v(delta_bytes("a"))}
            rejected = client.app.state.services.tasks.rejected
            assert "FIFO" in rejected.get("x", ""), rejected  # reported, not silently skipped
            index = {e["name"]: e for e in (await client.post("/v2/repository/index")).json()}
            assert index["x"]["state"] == "UNAVAILABLE" and "regular files" in index["x"]["reason"]


async def test_a_fifo_dropped_in_while_serving_blocks_nothing(engine, deltas_dir, delta_bytes):
    write_delta(deltas_dir, "a", delta_bytes("a"))
    async with serving(engine, deltas_dir, watch=True) as client:
        tasks = client.app.state.services.tasks
        with fifo(deltas_dir / "x.safetensors"):
            await asyncio.sleep(1.0)  # the watcher's debounce (0.5 s): it has looked at the FIFO by now
            r = await asyncio.wait_for(client.put("/v1/tasks/b", content=delta_bytes("b"), headers=OCTET), PROMPT)
            assert r.status_code == 201, r.text
            r = await asyncio.wait_for(client.delete("/v1/tasks/a"), PROMPT)
            assert r.status_code == 200, r.text
            assert not (deltas_dir / "a.safetensors").exists()
            write_delta(deltas_dir, "c", delta_bytes("c"))  # the watcher still picks up new files
            await until(lambda: "c" in tasks, what="a file added after the FIFO was loaded")
            assert await served(client) == {"b": v(delta_bytes("b")), "c": v(delta_bytes("c"))}
            await until(lambda: "x" in tasks.rejected, what="the FIFO reported as rejected")
            assert "FIFO" in tasks.rejected["x"] and "x" not in tasks


# ------------------------------------------------------------------------------------------- size cap
def test_a_file_over_the_cap_is_refused_from_its_size(tmp_path, opened):
    store = DeltaStore(tmp_path, max_file_bytes=1 << 20)
    sparse(tmp_path / "big.safetensors", 3 << 30)  # 3 GiB, no disk blocks
    start = time.monotonic()
    with pytest.raises(InvalidDelta, match=r"more than max_upload_bytes \(1048576 bytes"):
        store.read("big")
    assert time.monotonic() - start < 0.5
    assert not any(p.endswith("big.safetensors") for p in opened)  # refused from stat, never opened
    assert store.read("missing") is None


async def test_an_oversized_file_in_the_folder_is_refused_unread(engine, deltas_dir, delta_bytes, opened):
    deltas_dir.mkdir(parents=True)
    cap = 1 << 20
    sparse(deltas_dir / "big.safetensors", 64 << 20)
    write_delta(deltas_dir, "a", delta_bytes("a"))
    async with serving(engine, deltas_dir, watch=True, max_upload_bytes=cap) as client:
        tasks = client.app.state.services.tasks
        sparse(deltas_dir / "late.safetensors", cap + 1)  # one byte over, dropped in while serving
        await until(lambda: "late" in tasks.rejected, what="the oversized file reported")
        for name in ("big", "late"):
            assert f"more than max_upload_bytes ({cap} bytes" in tasks.rejected[name], tasks.rejected
        assert await served(client) == {"a": v(delta_bytes("a"))}
    assert not any(p.endswith(("big.safetensors", "late.safetensors")) for p in opened)


# ------------------------------------------------------------------------------------------- symlinks
async def test_a_symlink_to_a_delta_outside_the_folder_is_not_served(engine, tmp_path, deltas_dir, delta_bytes):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    deltas_dir.mkdir(parents=True)
    for name in ("early", "late"):
        write_delta(outside, name, delta_bytes(name))
    (deltas_dir / "early.safetensors").symlink_to(outside / "early.safetensors")
    write_delta(deltas_dir, "a", delta_bytes("a"))
    async with serving(engine, deltas_dir, watch=True) as client:
        tasks = client.app.state.services.tasks
        (deltas_dir / "late.safetensors").symlink_to(outside / "late.safetensors")
        await until(lambda: "late" in tasks.rejected, what="the link dropped in reported")
        for name in ("early", "late"):
            assert "symbolic link" in tasks.rejected[name] and "not followed" in tasks.rejected[name]
            assert (await client.get(f"/v1/tasks/{name}")).status_code == 404
        assert await served(client) == {"a": v(delta_bytes("a"))}
        r = await client.post("/v2/repository/models/early/load")  # an explicit load refuses it too
        assert r.status_code == 422 and "symbolic link" in r.text


@pytest.fixture
def tasks(engine, tmp_path):
    engine.tasks.use_store(DeltaStore(tmp_path / "deltas"))
    (tmp_path / "deltas").mkdir()
    return engine.tasks


def test_a_symlink_to_dev_zero_is_never_opened(tasks, opened):
    link = tasks.store.path_for("zero")
    link.symlink_to("/dev/zero")
    assert "zero" in tasks.load_all() and "zero" not in tasks
    with pytest.raises(InvalidDelta, match="symbolic link"):
        tasks.sync("zero")
    assert "symbolic link" in tasks.rejected["zero"] and "zero" not in tasks
    assert not any(p.endswith("zero.safetensors") or p == "/dev/zero" for p in opened)


# ------------------------------------------------------------------------------------------- the lock
def test_a_slow_read_does_not_hold_the_lock_and_a_file_changed_meanwhile_is_read_again(tasks, delta_bytes,
                                                                                          monkeypatch):
    """While the watcher's read of one file is stuck, an admin install of another task completes;
    the file replaced during that read is not published from the stale bytes: it is read again."""
    store = tasks.store
    old, new = delta_bytes("slow", seed=1), delta_bytes("slow", seed=2)
    write_delta(store.root, "slow", old)
    entered, release = threading.Event(), threading.Event()
    real_read, real_read_file = store.read, getattr(store, "read_file", None)

    def stuck(real):
        def read(task):
            got = real(task)  # the bytes as they are now; the caller gets them only after `release`
            if task == "slow" and not release.is_set():
                entered.set()
                release.wait(10)
            return got
        return read

    monkeypatch.setattr(store, "read", stuck(real_read))
    if real_read_file is not None:
        monkeypatch.setattr(store, "read_file", stuck(real_read_file))
    outcome = []
    syncing = threading.Thread(target=lambda: outcome.append(tasks.sync("slow")), daemon=True)
    syncing.start()
    try:
        assert entered.wait(PROMPT)
        installing = threading.Thread(target=tasks.install, args=("b", delta_io.parse(delta_bytes("b"))), daemon=True)
        installing.start()
        installing.join(PROMPT)
        assert not installing.is_alive(), "install waited for another file's read"
        assert "b" in tasks
        write_delta(store.root, "slow", new)  # replaced while the stale bytes are still in hand
    finally:
        release.set()
    syncing.join(PROMPT)
    assert outcome == ["added"]
    assert tasks.get("slow").sha256 == delta_io.sha256_bytes(new)  # the folder's file, not the stale read
