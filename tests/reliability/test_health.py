"""Honest health (issue 7, point 8): liveness vs readiness; readiness turns 503 within 2 s when the
inference worker dies or hangs; SIGTERM under load drains (no new work, 0 in-flight dropped)."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from tests.factories import SENTENCES
from tests.reliability.live import LiveServer
from tests.server.conftest import assert_error, serving, write_delta

DETECT_S = 2.0


async def _time_until_unready(client: httpx.AsyncClient, since: float, limit: float = 10.0) -> float:
    while time.monotonic() - since < limit:
        if (await client.get("/ready")).status_code == 503:
            return time.monotonic() - since
        await asyncio.sleep(0.02)
    return float("inf")


@pytest.mark.anyio
async def test_hung_worker_turns_readiness_503_within_2s_and_recovers(engine, deltas_dir, delta_bytes, monkeypatch):
    write_delta(deltas_dir, "h", delta_bytes("h"))
    real_forward = engine.forward
    hang, entered = threading.Event(), threading.Event()
    release = threading.Event()

    def maybe_hanging(batch):
        if hang.is_set():
            entered.set()
            release.wait(30)  # a stuck kernel / deadlock, from the server's point of view
        return real_forward(batch)

    monkeypatch.setattr(engine, "forward", maybe_hanging)
    async with serving(engine, deltas_dir) as client:
        for _ in range(3):  # a few normal forwards first: the watchdog learns their speed
            assert (await client.post("/v1/tasks/h/predict", json={"inputs": SENTENCES})).status_code == 200
        assert (await client.get("/ready")).status_code == 200
        hang.set()
        stuck = asyncio.create_task(client.post("/v1/tasks/h/predict", json={"inputs": ["a"]}))
        await asyncio.to_thread(entered.wait, 10)
        detected = await _time_until_unready(client, time.monotonic())
        assert detected < DETECT_S, f"readiness still 200 {detected:.2f} s into a hang"
        assert_error(await client.get("/ready"), 503, "not_ready")
        assert (await client.get("/health")).status_code == 200  # liveness: the process answers
        # A request already routed here waits (bounded by max_queue), it is not rejected or dropped.
        routed = asyncio.create_task(client.post("/v1/tasks/h/predict", json={"inputs": ["b"]}))
        await asyncio.sleep(0.1)
        hang.clear()
        release.set()
        assert (await stuck).status_code == 200
        assert (await routed).status_code == 200
        assert (await client.get("/ready")).status_code == 200
        assert (await client.post("/v1/tasks/h/predict", json={"inputs": ["c"]})).status_code == 200


@pytest.mark.anyio
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_dead_worker_turns_readiness_503_within_2s(engine, deltas_dir, delta_bytes, monkeypatch):
    write_delta(deltas_dir, "d", delta_bytes("d"))
    died = threading.Event()

    def fatal(batch):
        died.set()
        raise SystemExit("simulated fatal error in the inference thread")

    async with serving(engine, deltas_dir) as client:
        assert (await client.get("/ready")).status_code == 200
        monkeypatch.setattr(engine, "forward", fatal)
        pending = asyncio.create_task(client.post("/v1/tasks/d/predict", json={"inputs": ["a"]}))
        await asyncio.to_thread(died.wait, 10)
        detected = await _time_until_unready(client, time.monotonic())
        assert detected < DETECT_S
        assert_error(await pending, 503, "not_ready")  # answered, not left hanging
        assert (await client.get("/health")).status_code == 200
