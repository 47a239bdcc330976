"""Inference routes: per-task and mixed results equal the engine's, under concurrency too."""

from __future__ import annotations

import asyncio

import pytest

from bitfit_serve.engine import Prediction
from tests.factories import SENTENCES
from tests.server.conftest import KINDS, assert_error, serving, write_delta

pytestmark = pytest.mark.anyio

PAIRS = [[SENTENCES[i], SENTENCES[i + 1]] for i in range(0, len(SENTENCES) - 1, 2)]


def _inputs(task: str) -> list:
    return PAIRS if task == "nli" else SENTENCES


def assert_matches(got: dict, expected: Prediction) -> None:
    """One prediction of a response against the engine's for the same input."""
    assert (got["tokens"], got["truncated"]) == (expected.tokens, expected.truncated)
    if expected.value is not None:
        assert set(got) == {"value", "tokens", "truncated"}
        assert got["value"] == pytest.approx(expected.value, abs=1e-5)
        return
    assert set(got) == {"label", "score", "scores", "tokens", "truncated"}
    assert got["label"] == expected.label
    assert got["scores"] == pytest.approx(expected.scores, abs=1e-5)
    assert got["score"] == pytest.approx(expected.score, abs=1e-5)


@pytest.fixture
def four_tasks(deltas_dir, delta_bytes):
    for task, kw in KINDS.items():
        write_delta(deltas_dir, task, delta_bytes(task, **kw))
    return deltas_dir


async def test_per_task_predict_equals_engine(engine, four_tasks):
    async with serving(engine, four_tasks) as client:
        for task in KINDS:
            r = await client.post(f"/v1/tasks/{task}/predict", json={"inputs": _inputs(task)})
            assert r.status_code == 200, r.text
            body = r.json()
            version = engine.tasks.get(task).version
            assert body["task"] == task and body["version"] == version
            expected = engine.predict([(task, x) for x in _inputs(task)])
            assert len(body["predictions"]) == len(expected)
            for got, exp in zip(body["predictions"], expected):
                assert_matches(got, exp)


async def test_mixed_predict_equals_per_task_requests(engine, four_tasks):
    items = [{"task": t, "inputs": _inputs(t)[i:i + 2]} for i in (0, 2) for t in KINDS]
    async with serving(engine, four_tasks) as client:
        r = await client.post("/v1/predict", json={"items": items})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["task"] for x in results] == [it["task"] for it in items]
        for item, result in zip(items, results):
            single = await client.post(f"/v1/tasks/{item['task']}/predict", json={"inputs": item["inputs"]})
            assert single.json()["version"] == result["version"]
            for got, alone in zip(result["predictions"], single.json()["predictions"]):
                assert set(got) == set(alone)
                for key in got:
                    assert got[key] == pytest.approx(alone[key], abs=1e-5)


async def test_concurrent_requests_to_twelve_tasks(engine, deltas_dir, delta_bytes):
    tasks = [f"task{i:02d}" for i in range(12)]
    for i, task in enumerate(tasks):
        write_delta(deltas_dir, task, delta_bytes(task, seed=i))
    async with serving(engine, deltas_dir, max_batch_requests=16, max_batch_tokens=512) as client:
        calls = [(task, SENTENCES[(i + j) % len(SENTENCES):][:3]) for j in range(4) for i, task in enumerate(tasks)]
        responses = await asyncio.gather(*(client.post(f"/v1/tasks/{t}/predict", json={"inputs": x})
                                           for t, x in calls))
        metrics = (await client.get("/metrics")).text
    for (task, inputs), r in zip(calls, responses):
        assert r.status_code == 200, r.text
        assert r.json()["task"] == task
        for got, exp in zip(r.json()["predictions"], engine.predict([(task, x) for x in inputs])):
            assert_matches(got, exp)
    def sample(prefix: str) -> float:
        return float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith(prefix)))

    # The requests really were merged (fewer forwards than sequences), within the caps.
    assert sample("bitfit_batch_size_count") < sum(len(x) for _, x in calls)
    assert sample('bitfit_batch_size_bucket{le="16.0"}') == sample("bitfit_batch_size_count")


async def test_regression_and_classification_shapes(engine, four_tasks):
    async with serving(engine, four_tasks) as client:
        sts = (await client.post("/v1/tasks/sts/predict", json={"inputs": ["a"]})).json()["predictions"][0]
        sst = (await client.post("/v1/tasks/sst/predict", json={"inputs": ["a"]})).json()["predictions"][0]
    assert set(sts) == {"value", "tokens", "truncated"}
    assert set(sst) == {"label", "score", "scores", "tokens", "truncated"} and set(sst["scores"]) == {"label_0", "label_1"}


async def test_truncation_is_reported_and_can_be_refused(engine, four_tasks, deltas_dir, delta_bytes):
    write_delta(deltas_dir, "short", delta_bytes("short", max_length=8))
    long_text = " ".join(["word"] * 40)
    async with serving(engine, four_tasks) as client:
        r = await client.post("/v1/tasks/short/predict", json={"inputs": ["a b", long_text]})
        short, cut = r.json()["predictions"]
        assert (short["truncated"], cut["truncated"]) == (False, True) and cut["tokens"] == 42 > 8
        r = await client.post("/v1/tasks/short/predict", json={"inputs": ["a b", long_text], "truncate": False})
        assert_error(r, 422, "input_too_long", "inputs[1]: 42 tokens exceed", "max_length 8")
        r = await client.post("/v1/predict", json={"truncate": False, "items": [
            {"task": "sst", "inputs": ["ok"]}, {"task": "short", "inputs": [long_text]}]})
        assert_error(r, 422, "input_too_long", "items[1].inputs[0]")
        assert "bitfit_request_input_tokens_count 2.0" in (await client.get("/metrics")).text  # refused: none
    async with serving(engine, four_tasks, auto_truncate=False) as client:
        r = await client.post("/v1/tasks/short/predict", json={"inputs": [long_text]})
        assert_error(r, 422, "input_too_long")
        r = await client.post("/v1/tasks/short/predict", json={"inputs": [long_text], "truncate": True})
        assert r.status_code == 200 and r.json()["predictions"][0]["truncated"]
