"""Health, readiness, metrics, OpenAPI, overload (503 + Retry-After) and a dead inference worker."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from bitfit_serve.server import create_app
from bitfit_serve.settings import Settings
from tests.server.conftest import assert_error, hold_forwards, serving, write_delta

pytestmark = pytest.mark.anyio

METRICS = ["bitfit_requests_total", "bitfit_request_duration_seconds_bucket", "bitfit_errors_total",
           "bitfit_batch_size_bucket", "bitfit_batch_tokens_bucket", "bitfit_forward_duration_seconds_bucket",
           "bitfit_queue_depth", "bitfit_resident_tasks", "bitfit_bank_bytes", "bitfit_task_changes_total"]


async def test_health_ready_metrics_docs(engine, deltas_dir, delta_bytes):
    assert not deltas_dir.exists()  # a missing folder is created, and serving starts with no task
    async with serving(engine, deltas_dir) as client:
        assert deltas_dir.is_dir()
        assert (await client.get("/health")).json() == {"status": "ok"}
        r = await client.get("/ready")
        assert r.status_code == 200 and r.json() == {"status": "ready", "tasks": 0, "queue_depth": 0}
        await client.put("/v1/tasks/m", content=delta_bytes("m"))
        await client.post("/v1/tasks/m/predict", json={"inputs": ["a", "b c d"]})
        await client.post("/v1/tasks/none/predict", json={"inputs": ["a"]})
        r = await client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.text
        assert (await client.get("/openapi.json")).json()["paths"].keys() >= {
            "/v1/tasks/{task}/predict", "/v1/predict", "/v1/tasks", "/v1/tasks/{task}", "/health", "/ready",
            "/metrics"}
        assert (await client.get("/docs")).status_code == 200
    for name in METRICS:
        assert f"\n{name}" in text, name
    assert 'bitfit_requests_total{method="POST",route="/v1/tasks/{task}/predict",status="200"} 1.0' in text
    assert 'bitfit_errors_total{code="unknown_task"} 1.0' in text
    assert "bitfit_resident_tasks 1.0" in text
    assert "bitfit_batch_size_sum 2.0" in text
    assert 'task="m"' not in text  # no per-task series unless enabled


async def test_per_task_metrics_when_enabled(engine, deltas_dir, delta_bytes):
    write_delta(deltas_dir, "m", delta_bytes("m"))
    async with serving(engine, deltas_dir, metrics_per_task=True) as client:
        await client.post("/v1/tasks/m/predict", json={"inputs": ["a", "b"]})
        text = (await client.get("/metrics")).text
    assert 'bitfit_task_sequences_total{task="m"} 2.0' in text
    assert 'bitfit_task_request_duration_seconds_count{task="m"} 1.0' in text


async def test_not_ready_before_the_lifespan(engine, deltas_dir):
    app = create_app(engine, Settings(deltas=deltas_dir))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        assert (await client.get("/health")).status_code == 200
        assert_error(await client.get("/ready"), 503, "not_ready")
        assert_error(await client.post("/v1/tasks/m/predict", json={"inputs": ["a"]}), 503, "not_ready")


async def test_full_queue_answers_503_with_retry_after(engine, deltas_dir, delta_bytes, monkeypatch):
    write_delta(deltas_dir, "q", delta_bytes("q"))
    entered, release = hold_forwards(engine, monkeypatch)
    async with serving(engine, deltas_dir, max_queue=4, retry_after_s=2) as client:
        def post(n: int):
            return client.post("/v1/tasks/q/predict", json={"inputs": ["text"] * n})

        first = asyncio.create_task(post(2))
        await asyncio.to_thread(entered.wait, 10)  # the worker holds the first request
        second = asyncio.create_task(post(3))
        while "bitfit_queue_depth 3.0" not in (await client.get("/metrics")).text:
            await asyncio.sleep(0.01)
        r = await post(2)
        assert_error(r, 503, "overloaded", "max_queue=4")
        assert r.headers["retry-after"] == "2"
        release.set()
        assert (await first).status_code == 200
        assert (await second).status_code == 200
        assert (await post(4)).status_code == 200  # recovered


async def test_full_queue_refuses_before_reading_the_body(engine, deltas_dir, delta_bytes, monkeypatch):
    """With the queue full, inference requests are refused unparsed (a broken body, an unknown
    task: still 503 overloaded), so refusing costs the event loop almost nothing; other routes and,
    once there is room, inference are served as usual."""
    write_delta(deltas_dir, "q", delta_bytes("q"))
    entered, release = hold_forwards(engine, monkeypatch)
    async with serving(engine, deltas_dir, max_queue=4) as client:
        first = asyncio.create_task(client.post("/v1/tasks/q/predict", json={"inputs": ["a"]}))
        await asyncio.to_thread(entered.wait, 10)  # the worker holds the first request
        second = asyncio.create_task(client.post("/v1/tasks/q/predict", json={"inputs": ["b"] * 4}))
        while "bitfit_queue_depth 4.0" not in (await client.get("/metrics")).text:
            await asyncio.sleep(0.01)
        for path in ("/v1/tasks/nope/predict", "/v1/predict"):
            r = await client.post(path, content=b"{not json", headers={"content-type": "application/json"})
            assert_error(r, 503, "overloaded", "max_queue=4")
            assert r.headers["retry-after"] == "1"
        assert (await client.get("/v1/tasks/q")).status_code == 200  # not an inference route
        metrics = (await client.get("/metrics")).text
        assert 'route="/v1/tasks/{task}/predict",status="503"} 1.0' in metrics
        assert 'route="/v1/predict",status="503"} 1.0' in metrics
        release.set()
        assert (await first).status_code == 200 and (await second).status_code == 200
        assert_error(await client.post("/v1/tasks/nope/predict", json={"inputs": ["a"]}), 404, "unknown_task")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_dead_worker_fails_requests_and_readiness(engine, deltas_dir, delta_bytes, monkeypatch):
    write_delta(deltas_dir, "d", delta_bytes("d"))

    def fatal(batch):
        raise SystemExit("simulated fatal error in the inference thread")

    async with serving(engine, deltas_dir) as client:
        assert (await client.get("/ready")).status_code == 200
        monkeypatch.setattr(engine, "forward", fatal)
        # The request in flight is answered (not left hanging), then the server reports not ready.
        assert_error(await client.post("/v1/tasks/d/predict", json={"inputs": ["a"]}), 503, "not_ready")
        assert_error(await client.get("/ready"), 503, "not_ready")
        assert_error(await client.post("/v1/tasks/d/predict", json={"inputs": ["a"]}), 503, "not_ready")
        assert (await client.get("/health")).status_code == 200
    engine.remove_task("d")
    assert engine.tasks.rows_in_use == 0  # freed at once: the failed request released its pin


async def test_forward_error_is_a_500_and_the_worker_survives(engine, deltas_dir, delta_bytes, monkeypatch):
    write_delta(deltas_dir, "e", delta_bytes("e"))
    real_forward = engine.forward
    calls = []

    def flaky(batch):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated device error")
        return real_forward(batch)

    monkeypatch.setattr(engine, "forward", flaky)
    async with serving(engine, deltas_dir) as client:
        assert_error(await client.post("/v1/tasks/e/predict", json={"inputs": ["a"]}), 500, "internal_error")
        assert (await client.post("/v1/tasks/e/predict", json={"inputs": ["a"]})).status_code == 200
        assert (await client.get("/ready")).status_code == 200
