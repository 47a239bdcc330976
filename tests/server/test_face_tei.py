"""The TEI face (``bitfit_serve/http/tei.py``): TEI's /predict and /info shapes, answering what the
native route answers for the same inputs, and TEI's error bodies and codes."""

from __future__ import annotations

import asyncio
import math

import httpx
import pytest

from bitfit_serve import __version__
from tests.factories import SENTENCES
from tests.server.conftest import KINDS, hold_forwards, serving, write_delta

pytestmark = pytest.mark.anyio

PAIRS = [[SENTENCES[i], SENTENCES[i + 1]] for i in range(0, 6, 2)]
LONG = " ".join(["word"] * 40)  # 42 tokens


@pytest.fixture
def tasks(deltas_dir, delta_bytes):
    for task, kw in KINDS.items():
        write_delta(deltas_dir, task, delta_bytes(task, **kw))
    write_delta(deltas_dir, "short", delta_bytes("short", max_length=8))
    return deltas_dir


def assert_tei_error(r: httpx.Response, status: int, error_type: str, *needles: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "error_type"} and isinstance(body["error"], str), body
    assert body["error_type"] == error_type, body
    for needle in needles:
        assert needle in body["error"], body
    return body


async def native(client: httpx.AsyncClient, task: str, inputs: list) -> dict:
    r = await client.post(f"/v1/tasks/{task}/predict", json={"inputs": inputs})
    assert r.status_code == 200, r.text
    return r.json()


def assert_same(tei: list[dict], prediction: dict) -> None:
    """One TEI answer (every label, by score descending) against one native prediction."""
    assert [x["score"] for x in tei] == sorted((x["score"] for x in tei), reverse=True)
    assert {x["label"] for x in tei} == set(prediction["scores"])
    assert len(tei) == len(prediction["scores"])
    for x in tei:
        assert x["score"] == pytest.approx(prediction["scores"][x["label"]], abs=1e-6)
    assert tei[0]["label"] == prediction["label"]


async def test_single_pair_and_batch_answer_the_native_probabilities(engine, tasks):
    async with serving(engine, tasks) as client:
        for text in SENTENCES[:3]:
            r = await client.post("/tasks/sst/predict", json={"inputs": text})
            assert r.status_code == 200, r.text
            expected = await native(client, "sst", [text])
            assert r.headers["x-task-version"] == expected["version"] == engine.tasks.get("sst").version
            assert_same(r.json(), expected["predictions"][0])
            # ["text"] is one input too
            assert_same((await client.post("/tasks/sst/predict", json={"inputs": [text]})).json(),
                        expected["predictions"][0])
        # ["a", "b"] is ONE pair
        r = await client.post("/tasks/nli/predict", json={"inputs": PAIRS[0]})
        assert r.status_code == 200 and isinstance(r.json()[0], dict), r.text
        assert len(r.json()) == 3
        assert_same(r.json(), (await native(client, "nli", [PAIRS[0]]))["predictions"][0])
        # a batch: a list of lists, one answer list per input, in order
        for task, batch, inputs in (("sst", [[t] for t in SENTENCES[:4]], SENTENCES[:4]),
                                    ("nli", PAIRS, PAIRS), ("tags", [[t] for t in SENTENCES[:3]], SENTENCES[:3])):
            r = await client.post(f"/tasks/{task}/predict", json={"inputs": batch})
            assert r.status_code == 200, r.text
            expected = await native(client, task, inputs)
            assert r.headers["x-task-version"] == expected["version"]
            assert len(r.json()) == len(inputs)
            for got, prediction in zip(r.json(), expected["predictions"]):
                assert_same(got, prediction)
        r = await client.post("/tasks/sst/predict", json={"inputs": [[SENTENCES[0]]]})
        assert isinstance(r.json(), list) and len(r.json()) == 1 and isinstance(r.json()[0], list)


async def test_default_task_predict_and_info(engine, tasks):
    async with serving(engine, tasks, default_task="nli") as client:
        r = await client.post("/predict", json={"inputs": PAIRS[1]})
        assert r.status_code == 200, r.text
        assert_same(r.json(), (await native(client, "nli", [PAIRS[1]]))["predictions"][0])
        info = (await client.get("/info")).json()
        version = engine.tasks.get("nli")
        assert info["model_id"] == engine.base.path and info["served_model_name"] == "nli"
        assert info["default_task_version"] == version.version and info["model_sha"] is None  # not a hub model
        assert info["model_dtype"] == "float32"
        assert info["model_type"] == {"classifier": {"id2label": {"0": "label_0", "1": "label_1", "2": "label_2"},
                                                     "label2id": {"label_0": 0, "label_1": 1, "label_2": 2}}}
        assert info["max_input_length"] == version.max_length == 64
        settings = client.app.state.services.settings
        assert info["max_batch_tokens"] == settings.max_batch_tokens
        assert info["max_client_batch_size"] == settings.max_texts_per_request
        assert info["auto_truncate"] is True and info["version"] == __version__
        assert info["tasks"] == len(KINDS) + 1 and info["default_task"] == "nli"


async def test_no_default_task(engine, tasks):
    async with serving(engine, tasks) as client:
        assert_tei_error(await client.post("/predict", json={"inputs": "a"}), 404, "NotFound",
                         "--default-task", "/tasks/{task}/predict")
        info = (await client.get("/info")).json()
        assert info["model_sha"] is None and info["served_model_name"] == info["model_id"] == engine.base.path
        assert info["model_type"] == {"classifier": {"id2label": {}, "label2id": {}}}
        assert info["max_input_length"] == engine.base.max_positions
    async with serving(engine, tasks, default_task="absent") as client:  # configured but not served
        assert_tei_error(await client.post("/predict", json={"inputs": "a"}), 404, "NotFound", "'absent'")
        assert (await client.get("/info")).json()["default_task_version"] is None


async def test_regression_and_raw_scores(engine, tasks):
    async with serving(engine, tasks) as client:
        r = await client.post("/tasks/sts/predict", json={"inputs": [[t] for t in SENTENCES[:3]]})
        expected = (await native(client, "sts", SENTENCES[:3]))["predictions"]
        assert [[set(x) for x in answer] for answer in r.json()] == [[{"score", "label"}]] * 3
        for answer, prediction in zip(r.json(), expected):
            assert answer[0]["label"] == "score"
            assert answer[0]["score"] == pytest.approx(prediction["value"], abs=1e-6)
        raw = await client.post("/tasks/sts/predict", json={"inputs": [[t] for t in SENTENCES[:3]],
                                                             "raw_scores": True})
        assert raw.json() == r.json()  # a regression's score is its raw output already
        for task in ("sst", "tags"):
            r = await client.post(f"/tasks/{task}/predict", json={"inputs": SENTENCES[4], "raw_scores": True})
            assert r.status_code == 200, r.text
            logits = dict(zip(engine.tasks.get(task).labels, engine.predict([(task, SENTENCES[4])])[0].logits))
            assert [x["score"] for x in r.json()] == sorted((x["score"] for x in r.json()), reverse=True)
            assert {x["label"]: x["score"] for x in r.json()} == pytest.approx(logits, abs=1e-5)
            probs = (await native(client, task, [SENTENCES[4]]))["predictions"][0]["scores"]
            got = {x["label"]: x["score"] for x in r.json()}
            if task == "sst":  # softmax of the raw scores: the probabilities
                total = sum(math.exp(v) for v in got.values())
                assert {k: math.exp(v) / total for k, v in got.items()} == pytest.approx(probs, abs=1e-6)
            else:
                assert {k: 1 / (1 + math.exp(-v)) for k, v in got.items()} == pytest.approx(probs, abs=1e-6)


async def test_truncation(engine, tasks):
    async with serving(engine, tasks) as client:
        r = await client.post("/tasks/short/predict", json={"inputs": LONG, "truncate": False})
        assert_tei_error(r, 422, "Validation", "42 tokens exceed", "max_length 8")
        r = await client.post("/tasks/short/predict", json={"inputs": [["a b"], [LONG]], "truncate": False})
        assert_tei_error(r, 422, "Validation", "inputs[1]")
        r = await client.post("/tasks/short/predict", json={"inputs": LONG})  # the server's default: cut
        assert r.status_code == 200
        assert_same(r.json(), (await native(client, "short", [LONG]))["predictions"][0])
        for direction in ("Right", "right"):
            r = await client.post("/tasks/short/predict", json={"inputs": LONG, "truncation_direction": direction})
            assert r.status_code == 200, r.text
        # Left: served while nothing needs cutting, a 422 naming it otherwise
        r = await client.post("/tasks/short/predict", json={"inputs": "a b", "truncation_direction": "Left"})
        assert r.status_code == 200, r.text
        r = await client.post("/tasks/short/predict",
                              json={"inputs": [["a b"], [LONG]], "truncation_direction": "left"})
        assert_tei_error(r, 422, "Validation", "inputs[1]", "truncation_direction 'Left'")
    async with serving(engine, tasks, auto_truncate=False) as client:
        assert_tei_error(await client.post("/tasks/short/predict", json={"inputs": LONG}), 422, "Validation")
        r = await client.post("/tasks/short/predict", json={"inputs": LONG, "truncate": True})
        assert r.status_code == 200, r.text


async def test_errors_in_tei_shape(engine, tasks):
    async with serving(engine, tasks) as client:
        assert_tei_error(await client.post("/tasks/nope/predict", json={"inputs": "a"}), 404, "NotFound", "'nope'")
        for bad in ({"inputs": 5}, {"inputs": []}, {"inputs": ["a", "b", "c"]}, {"inputs": [["a", "b", "c"]]},
                    {"inputs": [[]]}, {"inputs": ["a", ["b"]]}, {}, {"inputs": "a", "truncation_direction": "up"},
                    {"inputs": "a", "raw_scores": "maybe"}):
            assert_tei_error(await client.post("/tasks/sst/predict", json=bad), 422, "Validation", "invalid request")
        r = await client.post("/tasks/sst/predict", content=b"{not json", headers={"content-type": "application/json"})
        assert_tei_error(r, 422, "Validation")
        # the task decides what an input is: a pair for a single-text task, a text for a pair task
        assert_tei_error(await client.post("/tasks/sst/predict", json={"inputs": ["a", "b"]}), 422, "Validation",
                         "one text per input")
        assert_tei_error(await client.post("/tasks/nli/predict", json={"inputs": "a"}), 422, "Validation",
                         "takes text pairs ['premise', 'hypothesis']")
        assert_tei_error(await client.post("/tasks/nli/predict", json={"inputs": [PAIRS[0], ["x"]]}), 422,
                         "Validation", "inputs[1]")
        r = await client.post("/tasks/sst/predict", json={"inputs": [["a"]] * 257})
        assert_tei_error(r, 413, "Validation", "max_texts_per_request=256")
        r = await client.get("/tasks/sst/predict")
        assert_tei_error(r, 405, "MethodNotAllowed")
        assert "POST" in r.headers["allow"]
        # unknown fields are ignored, as TEI ignores them
        assert (await client.post("/tasks/sst/predict", json={"inputs": "a", "parameters": {}})).status_code == 200
        # the native routes keep their own shape
        r = await client.post("/v1/tasks/nope/predict", json={"inputs": ["a"]})
        assert r.status_code == 404 and set(r.json()) == {"error"}


async def test_not_ready_is_503_unhealthy(engine, tasks):
    from bitfit_serve.server import create_app
    from bitfit_serve.settings import Settings

    app = create_app(engine, Settings(deltas=tasks))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        assert_tei_error(await client.post("/tasks/sst/predict", json={"inputs": "a"}), 503, "Unhealthy")


async def test_internal_error_is_424_backend(engine, tasks, monkeypatch):
    def broken(batch):
        raise RuntimeError("simulated bug")

    async with serving(engine, tasks) as client:
        monkeypatch.setattr(engine, "forward", broken)
        assert_tei_error(await client.post("/tasks/sst/predict", json={"inputs": "a"}), 424, "Backend")


async def test_full_queue_is_429_overloaded(engine, tasks, monkeypatch):
    entered, release = hold_forwards(engine, monkeypatch)
    async with serving(engine, tasks, max_queue=4, retry_after_s=2) as client:
        first = asyncio.create_task(client.post("/tasks/sst/predict", json={"inputs": "a"}))
        await asyncio.to_thread(entered.wait, 10)  # the worker holds the first request
        second = asyncio.create_task(client.post("/tasks/sst/predict", json={"inputs": [["b"]] * 4}))
        while "bitfit_queue_depth 4.0" not in (await client.get("/metrics")).text:
            await asyncio.sleep(0.01)
        for path in ("/tasks/sst/predict", "/predict"):
            r = await client.post(path, json={"inputs": "c"})
            assert_tei_error(r, 429, "Overloaded", "max_queue=4")
            assert r.headers["retry-after"] == "2"
        # refused before the body is read: a broken body is still a 429
        r = await client.post("/tasks/sst/predict", content=b"{not", headers={"content-type": "application/json"})
        assert_tei_error(r, 429, "Overloaded")
        assert (await client.get("/info")).status_code == 200  # not an inference route
        release.set()
        assert (await first).status_code == 200 and (await second).status_code == 200
        assert (await client.post("/tasks/sst/predict", json={"inputs": "d"})).status_code == 200


async def test_api_key_is_required_when_set(engine, tasks):
    async with serving(engine, tasks, api_key="k3y", admin_token="adm1n", default_task="sst") as client:
        for method, path, body in (("POST", "/predict", {"inputs": "a"}),
                                   ("POST", "/tasks/sst/predict", {"inputs": "a"}), ("GET", "/info", None)):
            r = await client.request(method, path, json=body)
            assert_tei_error(r, 401, "Unauthorized")
            assert r.headers["www-authenticate"] == "Bearer"
            r = await client.request(method, path, json=body, headers={"Authorization": "Bearer wrong"})
            assert_tei_error(r, 403, "Forbidden")
            for key in ("k3y", "adm1n"):
                r = await client.request(method, path, json=body, headers={"Authorization": f"Bearer {key}"})
                assert r.status_code == 200, r.text


async def test_openapi_documents_the_routes(engine, tasks):
    async with serving(engine, tasks) as client:
        spec = (await client.get("/openapi.json")).json()
    for path in ("/predict", "/tasks/{task}/predict"):
        op = spec["paths"][path]["post"]
        assert set(op["tags"]) == {"tei", "inference"}
        assert {"200", "401", "403", "404", "413", "422", "424", "429", "503"} <= set(op["responses"])
        assert op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/TeiError")
    assert spec["paths"]["/info"]["get"]["responses"]["200"]["content"]["application/json"]["schema"][
        "$ref"].endswith("/TeiInfo")
