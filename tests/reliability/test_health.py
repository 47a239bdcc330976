"""Honest health (issue 7, point 8): liveness vs readiness; readiness turns 503 within 2 s when the
inference worker dies or hangs; SIGTERM under load drains (no new work, 0 in-flight dropped)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
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


def test_sigterm_under_load_drains(tiny_bert_dir, tmp_path, delta_bytes, record_property):
    """The real console script under load gets SIGTERM: every request it had received is answered
    200, nothing new is admitted (connections refused, or 503), and it exits 0."""
    deltas = tmp_path / "deltas"
    write_delta(deltas, "drain", delta_bytes("drain"))
    body = json.dumps({"inputs": [(s + " ") * 6 for s in SENTENCES] * 32}).encode()  # ~0.1-0.5 s each
    server = LiveServer(tiny_bert_dir, deltas, tmp_path / "server.log", args=("--log-level", "info")).start()
    results: list[tuple[float, float, float, int | str]] = []  # (start, sent, end, status or error)

    async def client(stop_at: float):
        while time.monotonic() < stop_at:
            start, sent = time.monotonic(), math.inf
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(b"POST /v1/tasks/drain/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                sent = time.monotonic()
                answer = await asyncio.wait_for(reader.read(), 60)
                writer.close()
                status = int(answer[9:12]) if answer.startswith(b"HTTP/1.1 ") else "no answer"
            except (OSError, asyncio.TimeoutError) as e:
                status = type(e).__name__
            results.append((start, sent, time.monotonic(), status))
            if isinstance(status, str):
                await asyncio.sleep(0.01)

    async def scenario() -> float:
        loop_end = time.monotonic() + 3.0
        clients = [asyncio.create_task(client(loop_end)) for _ in range(8)]
        await asyncio.sleep(1.5)
        t_signal = time.monotonic()
        os.kill(server.pid, signal.SIGTERM)
        await asyncio.gather(*clients)
        return t_signal

    try:
        t_signal = asyncio.run(scenario())
        deadline = time.monotonic() + 60
        while server.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        exit_code = server.proc.poll()
    finally:
        server.kill()
    # Sent before the signal and not answered by then: in flight.
    in_flight = [r for r in results if r[1] < t_signal < r[2]]
    after = [r for r in results if r[0] > t_signal]
    summary = {"requests": len(results), "in_flight_at_sigterm": len(in_flight),
               "in_flight_dropped": sum(1 for r in in_flight if r[3] != 200),
               "after_sigterm": len(after),
               "after_sigterm_outcomes": sorted({str(r[3]) for r in after}), "exit_code": exit_code}
    record_property("sigterm_drain", summary)
    print(f"\nSIGTERM drain: {summary}")
    assert in_flight and summary["in_flight_dropped"] == 0, summary
    assert all(r[3] in (503, "ConnectionRefusedError") for r in after if r[0] > t_signal + 0.5), summary
    assert all(r[3] == 200 for r in results if r[2] < t_signal)
    # uvicorn re-raises the signal after a graceful shutdown: -15, with the lifespan finished.
    assert exit_code in (0, -signal.SIGTERM) and "Finished server process" in server.log_tail(), server.log_tail()
