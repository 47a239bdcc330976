"""The watched deltas folder: adds, replaces and deletes picked up while serving; bad files skipped."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from bitfit_serve import delta as delta_io
from bitfit_serve.tasks import Tasks
from tests.server.conftest import serving, write_delta

pytestmark = pytest.mark.anyio


async def served(client) -> dict[str, str]:
    return {t["task"]: t["version"] for t in (await client.get("/v1/tasks")).json()["tasks"]}


async def eventually(client, want: dict[str, str], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := await served(client)) != want:
        assert time.monotonic() < deadline, f"served {got}, want {want}"
        await asyncio.sleep(0.05)


def v(data: bytes) -> str:
    return delta_io.sha256_bytes(data)[:16]


async def test_folder_add_replace_delete_while_serving(engine, deltas_dir, delta_bytes, caplog):
    a1, a2, b = delta_bytes("a", seed=1), delta_bytes("a", seed=2), delta_bytes("b")
    async with serving(engine, deltas_dir, watch=True) as client:
        assert await served(client) == {}
        write_delta(deltas_dir, "a", a1)
        await eventually(client, {"a": v(a1)})
        r = await client.post("/v1/tasks/a/predict", json={"inputs": ["x"]})
        assert r.status_code == 200 and r.json()["version"] == v(a1)

        write_delta(deltas_dir, "a", a2)
        await eventually(client, {"a": v(a2)})

        # A bad file is logged and skipped; the good file written after it still loads, and a bad
        # replacement keeps the good version serving.
        with caplog.at_level(logging.ERROR, logger="bitfit_serve.watcher"):
            (deltas_dir / "broken.safetensors").write_bytes(b"not a delta")
            write_delta(deltas_dir, "wrongname", b)  # metadata says task "b"
            (deltas_dir / "a.safetensors.bak").write_bytes(a1)  # not a delta file name: ignored
            (deltas_dir / ".tmp-c.safetensors").write_bytes(b)  # temp files are never loaded
            write_delta(deltas_dir, "b", b)
            await eventually(client, {"a": v(a2), "b": v(b)})
            write_delta(deltas_dir, "a", a1[:100])
            await asyncio.sleep(1.0)
        assert await served(client) == {"a": v(a2), "b": v(b)}
        logged = caplog.text
        assert "broken.safetensors" in logged and "wrongname" in logged and "a.safetensors" in logged

        (deltas_dir / "b.safetensors").unlink()
        await eventually(client, {"a": v(a2)})
        assert (await client.post("/v1/tasks/b/predict", json={"inputs": ["x"]})).status_code == 404
        metrics = (await client.get("/metrics")).text
    assert 'bitfit_task_changes_total{action="rejected",source="watch"}' in metrics


async def test_startup_skips_bad_files_and_loads_the_rest(engine, deltas_dir, delta_bytes, caplog):
    write_delta(deltas_dir, "good", delta_bytes("good"))
    (deltas_dir / "bad.safetensors").write_bytes(delta_bytes("good")[:50])
    (deltas_dir / ".tmp-abc.part").write_bytes(delta_bytes("good"))
    with caplog.at_level(logging.ERROR, logger="bitfit_serve.store"):
        async with serving(engine, deltas_dir) as client:
            assert await served(client) == {"good": v(delta_bytes("good"))}
    assert "bad.safetensors" in caplog.text


async def test_startup_survives_files_that_break_the_parser_or_the_loader(engine, deltas_dir, delta_bytes,
                                                                          monkeypatch, caplog):
    """Metadata JSON nested too deep for the parser is refused like any bad file, and an unexpected
    error while loading one file (a bug, not the file's fault) skips that file, not the server."""
    good = delta_bytes("good")
    write_delta(deltas_dir, "good", good)
    n = int.from_bytes(good[:8], "little")
    header = json.loads(good[8:8 + n])
    header["__metadata__"].update(task="deep", metrics="[" * 50_000)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (deltas_dir / "deep.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + good[8 + n:])
    write_delta(deltas_dir, "buggy", delta_bytes("buggy"))
    sync = Tasks.sync

    def sync_failing_on_buggy(self, task):
        if task == "buggy":
            raise RuntimeError("simulated bug")
        return sync(self, task)

    monkeypatch.setattr(Tasks, "sync", sync_failing_on_buggy)
    with caplog.at_level(logging.ERROR, logger="bitfit_serve.tasks"):
        async with serving(engine, deltas_dir) as client:
            assert await served(client) == {"good": v(good)}
    assert "deep.safetensors" in caplog.text and "metrics: not valid JSON" in caplog.text
    assert "buggy.safetensors" in caplog.text and "simulated bug" in caplog.text
