"""Watched folder (issue 7, point 9): only ``<task>.safetensors`` files (renamed into place) are
loaded, temp and look-alike names never are; a file written slowly in place is never served
half-written (a replaced task keeps its old version meanwhile, never 404); a bad file is reported
and later good files still load."""

from __future__ import annotations

import asyncio
import os
import re
import time

import pytest

from bitfit_serve import delta as delta_io
from tests.server.conftest import serving, write_delta

pytestmark = pytest.mark.anyio
REJECTED = r'bitfit_task_changes_total\{(?=[^}]*"rejected")(?=[^}]*source="watch")[^}]*\} (\S+)'


async def wait_for(client, task: str, version: str | None, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = await client.get(f"/v1/tasks/{task}")
        if (r.json().get("version") if r.status_code == 200 else None) == version:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_only_files_renamed_into_place_load(engine, deltas_dir, delta_bytes):
    deltas_dir.mkdir(parents=True)
    data = delta_bytes("x")
    decoys = [".tmp-abc.part", "x.safetensors.tmp", "x.safetensors.part", "x.safetensors~", ".x.safetensors",
              "x.SAFETENSORS", "x.safetensors.swp", "#x.safetensors#", "x", "x.json"]
    async with serving(engine, deltas_dir, watch=True) as client:
        for name in decoys:
            (deltas_dir / name).write_bytes(data)  # complete, valid bytes under a name that is not a delta's
        (deltas_dir / "sub").mkdir()
        (deltas_dir / "sub" / "x.safetensors").write_bytes(data)
        (deltas_dir / "sentinel.safetensors").write_bytes(delta_bytes("sentinel"))
        assert await wait_for(client, "sentinel", delta_io.sha256_bytes(delta_bytes("sentinel"))[:16])
        assert [t["task"] for t in (await client.get("/v1/tasks")).json()["tasks"]] == ["sentinel"]
        os.replace(deltas_dir / ".tmp-abc.part", deltas_dir / "x.safetensors")  # renamed into place: loads
        assert await wait_for(client, "x", delta_io.sha256_bytes(data)[:16])


async def _slow_write(path, data: bytes, seconds: float, pieces: int = 12) -> None:
    step = -(-len(data) // pieces)
    with open(path, "wb") as f:  # truncates in place, then grows piece by piece
        for k in range(0, len(data), step):
            f.write(data[k:k + step])
            f.flush()
            await asyncio.sleep(seconds / pieces)


async def _observe(client, task: str, stop: asyncio.Event, seen: list) -> None:
    while not stop.is_set():
        r = await client.get(f"/v1/tasks/{task}")
        seen.append(r.json()["version"] if r.status_code == 200 else r.status_code)
        await asyncio.sleep(0.02)


async def test_slow_writes_are_never_served_half_written(engine, deltas_dir, delta_bytes, scale, record_property):
    old, new = delta_bytes("slow", seed=1), delta_bytes("slow", seed=2)
    v_old, v_new = (delta_io.sha256_bytes(d)[:16] for d in (old, new))
    write_delta(deltas_dir, "fresh-neighbour", delta_bytes("fresh-neighbour"))
    rounds = scale(ci=1, full=10)
    seen_all = []
    async with serving(engine, deltas_dir, watch=True) as client:
        for _ in range(rounds):
            # A new task written slowly in place: 404 until complete, then exactly the full version.
            (deltas_dir / "slow.safetensors").unlink(missing_ok=True)
            assert await wait_for(client, "slow", None)
            stop, seen = asyncio.Event(), []
            observer = asyncio.create_task(_observe(client, "slow", stop, seen))
            await _slow_write(deltas_dir / "slow.safetensors", old, seconds=2.5)
            assert await wait_for(client, "slow", v_old)
            # Replaced slowly in place: the old version serves until the new file is complete.
            mark = len(seen)
            await _slow_write(deltas_dir / "slow.safetensors", new, seconds=2.5)
            assert await wait_for(client, "slow", v_new)
            stop.set()
            await observer
            assert set(seen[:mark]) <= {404, v_old}, set(seen[:mark])
            assert set(seen[mark:]) <= {v_old, v_new}, set(seen[mark:])  # never missing, never partial
            seen_all += seen
        metrics = (await client.get("/metrics")).text
    rejected = re.search(REJECTED, metrics)
    record_property("watch_slow", {"rounds": rounds, "observations": len(seen_all),
                                   "partial_reads_rejected": float(rejected.group(1)) if rejected else 0})


async def test_bad_file_is_reported_and_later_good_files_load(engine, deltas_dir, delta_bytes, caplog):
    deltas_dir.mkdir(parents=True)
    good = [delta_bytes(f"good{i}") for i in range(3)]
    async with serving(engine, deltas_dir, watch=True) as client:
        delta_io.atomic_write(deltas_dir / "bad.safetensors", b"\0" * 100)
        delta_io.atomic_write(deltas_dir / "bad2.safetensors", delta_bytes("other-name"))  # names another task
        await asyncio.sleep(0.8)
        for i, data in enumerate(good):
            delta_io.atomic_write(deltas_dir / f"good{i}.safetensors", data)
        for i, data in enumerate(good):
            assert await wait_for(client, f"good{i}", delta_io.sha256_bytes(data)[:16])
        assert (await client.get("/v1/tasks/bad")).status_code == 404
        assert (await client.get("/v1/tasks/bad2")).status_code == 404
        metrics = (await client.get("/metrics")).text
        assert (await client.get("/ready")).status_code == 200
    assert float(re.search(REJECTED, metrics).group(1)) >= 2, metrics
    assert "bad.safetensors" in caplog.text and "bad2.safetensors" in caplog.text
