"""The HF Inference face (``bitfit_serve/http/hf_inference.py``), driven by the real
``huggingface_hub`` clients (sync and async) against a real HTTP server on 127.0.0.1, and in-process
for the request shapes and errors. Every answer equals the native route's for the same inputs.

The hub's default HTTP clients refuse every request while HF_HUB_OFFLINE is set (tests set it), an
explicit http://127.0.0.1 model URL included; here they are replaced by clients that allow loopback
only (and fail the test on any other address)."""

from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import httpx
import pytest

from benchmarks.live import free_port
from bitfit_serve.engine import Engine
from bitfit_serve.server import create_app
from bitfit_serve.settings import Settings
from tests.factories import SENTENCES
from tests.server.conftest import KINDS, assert_error, serving, write_delta

hub = pytest.importorskip("huggingface_hub")
from huggingface_hub.errors import HfHubHTTPError  # noqa: E402
from huggingface_hub.utils import _http as hub_http  # noqa: E402

PAIRS = [[SENTENCES[i], SENTENCES[i + 1]] for i in range(0, 6, 2)]
KEY = "k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _loopback_only(request) -> None:
    if request.url.host != "127.0.0.1":
        raise AssertionError(f"the test tried to reach {request.url}")


async def _async_loopback_only(request) -> None:
    _loopback_only(request)


def _sync_client():
    client = hub_http.default_client_factory()
    client.event_hooks = {"request": [_loopback_only], "response": []}
    return client


def _async_client():
    client = hub_http.default_async_client_factory()
    client.event_hooks = {"request": [_async_loopback_only], "response": client.event_hooks["response"]}
    return client


@pytest.fixture(scope="module")
def hub_loopback():
    hub.set_client_factory(_sync_client)
    hub.set_async_client_factory(_async_client)
    yield
    hub.set_client_factory(hub_http.default_client_factory)
    hub.set_async_client_factory(hub_http.default_async_client_factory)


@contextmanager
def live_server(engine: Engine, deltas, **settings) -> Iterator[str]:
    """The app under uvicorn in a thread, on 127.0.0.1 and a free port; yields its URL."""
    import uvicorn

    app = create_app(engine, Settings(deltas=deltas, watch=False, **settings))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def url(tiny_bert_dir, delta_bytes, tmp_path_factory, hub_loopback) -> Iterator[str]:
    deltas = tmp_path_factory.mktemp("hf-face") / "deltas"
    for task, kw in KINDS.items():
        write_delta(deltas, task, delta_bytes(task, **kw))
    with live_server(Engine.from_pretrained(tiny_bert_dir), deltas, api_key=KEY) as base:
        yield base


def native(url: str, task: str, inputs: list) -> dict:
    r = httpx.post(f"{url}/v1/tasks/{task}/predict", json={"inputs": inputs}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def raw_logits(url: str, task: str, text: str) -> dict[str, float]:
    """The head's raw outputs for one text (the TEI face's raw_scores: Prediction.logits too)."""
    r = httpx.post(f"{url}/tasks/{task}/predict", json={"inputs": text, "raw_scores": True}, headers=AUTH,
                   timeout=60)
    assert r.status_code == 200, r.text
    return {x["label"]: x["score"] for x in r.json()}


def as_dict(elements) -> dict[str, float]:
    return {e.label: e.score for e in elements}


def assert_ranked(elements) -> None:
    scores = [e.score for e in elements]
    assert scores == sorted(scores, reverse=True)


def softmax(values: dict[str, float]) -> dict[str, float]:
    top = max(values.values())
    total = sum(math.exp(v - top) for v in values.values())
    return {k: math.exp(v - top) / total for k, v in values.items()}


def sigmoid(values: dict[str, float]) -> dict[str, float]:
    return {k: 1 / (1 + math.exp(-v)) for k, v in values.items()}


# ------------------------------------------------------------------------ the real clients
def test_sync_client_answers_the_native_probabilities(url):
    for task in ("sst", "tags"):
        client = hub.InferenceClient(model=f"{url}/models/{task}", api_key=KEY)
        for text in SENTENCES[:4]:
            got = client.text_classification(text)
            expected = native(url, task, [text])["predictions"][0]
            assert_ranked(got)
            assert as_dict(got) == pytest.approx(expected["scores"], abs=1e-6)
            assert len(got) == len(expected["scores"]) and got[0].label == expected["label"]


def test_sync_client_top_k_and_function_to_apply(url):
    text = SENTENCES[4]
    for task in ("sst", "tags"):
        client = hub.InferenceClient(model=f"{url}/models/{task}", api_key=KEY)
        expected = native(url, task, [text])["predictions"][0]
        logits = raw_logits(url, task, text)
        top = client.text_classification(text, top_k=1)
        assert [(e.label, e.score) for e in top] == [(expected["label"], pytest.approx(expected["score"], abs=1e-6))]
        assert len(client.text_classification(text, top_k=2)) == 2
        assert len(client.text_classification(text, top_k=50)) == len(logits)  # past the labels: all of them
        none = client.text_classification(text, function_to_apply="none")
        assert_ranked(none)
        assert as_dict(none) == pytest.approx(logits, abs=1e-6)
        soft = client.text_classification(text, function_to_apply="softmax")
        sig = client.text_classification(text, function_to_apply="sigmoid")
        assert_ranked(soft)
        assert_ranked(sig)
        assert as_dict(soft) == pytest.approx(softmax(logits), abs=1e-6)
        assert as_dict(sig) == pytest.approx(sigmoid(logits), abs=1e-6)
        # the task's own function is the native answer
        own = soft if task == "sst" else sig
        assert as_dict(own) == pytest.approx(expected["scores"], abs=1e-6)
        assert sum(e.score for e in soft) == pytest.approx(1.0, abs=1e-6)
        top2 = client.text_classification(text, top_k=2, function_to_apply="none")
        assert [e.label for e in top2] == [e.label for e in none[:2]]


def test_sync_client_regression_and_errors(url):
    client = hub.InferenceClient(model=f"{url}/models/sts", api_key=KEY)
    got = client.text_classification(SENTENCES[0])
    value = native(url, "sts", [SENTENCES[0]])["predictions"][0]["value"]
    assert [(e.label, e.score) for e in got] == [("score", pytest.approx(value, abs=1e-6))]
    sig = client.text_classification(SENTENCES[0], function_to_apply="sigmoid")
    assert sig[0].score == pytest.approx(1 / (1 + math.exp(-value)), abs=1e-6)

    with pytest.raises(HfHubHTTPError) as e:
        hub.InferenceClient(model=f"{url}/models/nope", api_key=KEY).text_classification("a")
    assert e.value.response.status_code == 404 and "unknown task 'nope'" in str(e.value)
    with pytest.raises(HfHubHTTPError) as e:  # a pair task needs {"text", "text_pair"}
        hub.InferenceClient(model=f"{url}/models/nli", api_key=KEY).text_classification("a")
    assert e.value.response.status_code == 400 and "text_pair" in str(e.value)
    with pytest.raises(HfHubHTTPError) as e:
        hub.InferenceClient(model=f"{url}/models/sst", api_key="wrong").text_classification("a")
    assert e.value.response.status_code == 403
    assert httpx.post(f"{url}/models/sst", json={"inputs": "a"}).status_code == 401  # no key


@pytest.mark.anyio
async def test_async_client_answers_the_native_probabilities(url):
    for task in ("sst", "tags"):
        async with hub.AsyncInferenceClient(model=f"{url}/models/{task}", api_key=KEY) as client:
            for text in SENTENCES[2:5]:
                got = await client.text_classification(text)
                expected = native(url, task, [text])["predictions"][0]
                assert_ranked(got)
                assert as_dict(got) == pytest.approx(expected["scores"], abs=1e-6)
            logits = raw_logits(url, task, SENTENCES[5])
            none = await client.text_classification(SENTENCES[5], function_to_apply="none", top_k=1)
            best = max(logits, key=logits.get)
            assert [(e.label, e.score) for e in none] == [(best, pytest.approx(logits[best], abs=1e-6))]
    async with hub.AsyncInferenceClient(model=f"{url}/models/nope", api_key=KEY) as client:
        with pytest.raises(HfHubHTTPError) as e:
            await client.text_classification("a")
        assert e.value.response.status_code == 404


# ------------------------------------------------------------------------ shapes, in-process
@pytest.fixture
def tasks(deltas_dir, delta_bytes):
    for task, kw in KINDS.items():
        write_delta(deltas_dir, task, delta_bytes(task, **kw))
    write_delta(deltas_dir, "short", delta_bytes("short", max_length=8))
    return deltas_dir


@pytest.mark.anyio
async def test_input_shapes_answer_one_list_per_input(engine, tasks):
    async with serving(engine, tasks) as client:
        async def both(task: str, hf_inputs, native_inputs: list, **parameters):
            body = {"inputs": hf_inputs, **({"parameters": parameters} if parameters else {})}
            r = await client.post(f"/models/{task}", json=body)
            assert r.status_code == 200, r.text
            n = await client.post(f"/v1/tasks/{task}/predict", json={"inputs": native_inputs})
            assert r.headers["x-task-version"] == n.json()["version"] == engine.tasks.get(task).version
            assert len(r.json()) == len(native_inputs)
            return r.json(), n.json()["predictions"]

        cases = [("sst", SENTENCES[0], [SENTENCES[0]]), ("sst", SENTENCES[:4], SENTENCES[:4]),
                 ("sst", {"text": SENTENCES[1]}, [SENTENCES[1]]), ("tags", SENTENCES[:3], SENTENCES[:3]),
                 ("nli", {"text": PAIRS[0][0], "text_pair": PAIRS[0][1]}, [PAIRS[0]]),
                 ("nli", [{"text": a, "text_pair": b} for a, b in PAIRS], PAIRS)]
        for task, hf_inputs, native_inputs in cases:
            got, expected = await both(task, hf_inputs, native_inputs)
            for answer, prediction in zip(got, expected):
                assert [x["score"] for x in answer] == sorted((x["score"] for x in answer), reverse=True)
                assert {x["label"]: x["score"] for x in answer} == pytest.approx(prediction["scores"], abs=1e-6)
        got, expected = await both("sst", SENTENCES[:3], SENTENCES[:3], top_k=1)
        assert [[x["label"] for x in answer] for answer in got] == [[p["label"]] for p in expected]
        got, expected = await both("sts", SENTENCES[:2], SENTENCES[:2])
        assert [[(x["label"], pytest.approx(x["score"], abs=1e-6)) for x in answer] for answer in got] == [
            [("score", p["value"])] for p in expected]
        r = await client.post("/models/sst", json={"inputs": "a", "options": {"wait_for_model": True}})
        assert r.status_code == 200


@pytest.mark.anyio
async def test_errors_and_truncation(engine, tasks):
    long_text = " ".join(["word"] * 40)
    async with serving(engine, tasks) as client:
        assert_error(await client.post("/models/nope", json={"inputs": "a"}), 404, "unknown_task")
        for bad in ({"inputs": 5}, {"inputs": []}, {}, {"inputs": "a", "parameters": {"top_k": 0}},
                    {"inputs": "a", "parameters": {"function_to_apply": "relu"}},
                    {"inputs": "a", "parameters": {"return_all_scores": True}}, {"inputs": {"text_pair": "b"}},
                    {"inputs": "a", "extra": 1}):
            assert_error(await client.post("/models/sst", json=bad), 400, "invalid_input", "invalid request")
        assert_error(await client.post("/models/sst", json={"inputs": {"text": "a", "text_pair": "b"}}), 400,
                     "invalid_input", "not a text_pair")
        assert_error(await client.post("/models/nli", json={"inputs": ["a", "b"]}), 400, "invalid_input",
                     "inputs[0]", "takes text pairs")
        assert_error(await client.post("/models/sst", json={"inputs": ["a"] * 257}), 413, "payload_too_large")
        r = await client.post("/models/short", json={"inputs": long_text, "parameters": {"truncation": False}})
        assert_error(r, 422, "input_too_long", "42 tokens exceed")
        assert (await client.post("/models/short", json={"inputs": long_text})).status_code == 200
    async with serving(engine, tasks, api_key=KEY) as client:
        assert_error(await client.post("/models/sst", json={"inputs": "a"}), 401, "unauthorized")
        assert (await client.post("/models/sst", json={"inputs": "a"}, headers=AUTH)).status_code == 200


@pytest.mark.anyio
async def test_openapi_documents_the_route(engine, tasks):
    async with serving(engine, tasks) as client:
        op = (await client.get("/openapi.json")).json()["paths"]["/models/{task}"]["post"]
    assert set(op["tags"]) == {"hf-inference", "inference"}
    assert {"200", "400", "401", "403", "404", "413", "422", "503"} <= set(op["responses"])
