"""The KServe v2 / Open Inference Protocol face: health, metadata, infer (equal to the native route),
the protocol's error shape, and the repository extension over the deltas folder."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from benchmarks.live import free_port
from bitfit_serve import __version__
from bitfit_serve import delta as delta_io
from bitfit_serve.engine import Engine
from bitfit_serve.server import create_app
from bitfit_serve.settings import Settings
from tests.factories import SENTENCES
from tests.server.conftest import KINDS, serving, write_delta

pytestmark = pytest.mark.anyio

PAIRS = [[SENTENCES[i], SENTENCES[i + 1]] for i in range(0, len(SENTENCES) - 1, 2)]
LONG = " ".join(["word"] * 40)


def _inputs(task: str) -> list:
    return PAIRS if task == "nli" else SENTENCES


def tensors(task: str, inputs: list) -> list[dict]:
    if task != "nli":
        return [{"name": "text", "shape": [len(inputs)], "datatype": "BYTES", "data": inputs}]
    return [{"name": "text", "shape": [len(inputs)], "datatype": "BYTES", "data": [a for a, _ in inputs]},
            {"name": "text_pair", "shape": [len(inputs)], "datatype": "BYTES", "data": [b for _, b in inputs]}]


def assert_kserve_error(r: httpx.Response, status: int, *needles: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    for needle in needles:
        assert needle in body["error"], body


@pytest.fixture
def four_tasks(deltas_dir, delta_bytes):
    for task, kw in KINDS.items():
        write_delta(deltas_dir, task, delta_bytes(task, **kw))
    return deltas_dir


async def native(client, task: str, inputs: list, **kw) -> dict:
    r = await client.post(f"/v1/tasks/{task}/predict", json={"inputs": inputs, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def assert_same(body: dict, expected: dict, labels: list[str]) -> None:
    """An infer response against the native answer for the same inputs."""
    assert body["model_version"] == expected["version"]
    n = len(expected["predictions"])
    label, scores = body["outputs"]
    assert (label["name"], label["datatype"], label["shape"]) == ("label", "BYTES", [n])
    if "value" in expected["predictions"][0]:  # regression
        assert label["data"] == [labels[0]] * n
        assert (scores["name"], scores["datatype"], scores["shape"]) == ("scores", "FP32", [n, 1])
        assert scores["data"] == pytest.approx([p["value"] for p in expected["predictions"]], abs=1e-6)
        return
    assert label["data"] == [p["label"] for p in expected["predictions"]]
    assert (scores["name"], scores["datatype"], scores["shape"]) == ("scores", "FP32", [n, len(labels)])
    assert scores["data"] == pytest.approx([p["scores"][x] for p in expected["predictions"] for x in labels], abs=1e-6)


async def test_health_and_server_metadata(engine, four_tasks):
    async with serving(engine, four_tasks, api_key="k3y") as client:  # open routes, like /health
        r = await client.get("/v2/health/live")
        assert r.status_code == 200 and r.json() == {"live": True}
        r = await client.get("/v2/health/ready")
        assert r.status_code == 200 and r.json() == {"ready": True}
        r = await client.get("/v2")
        assert r.json() == {"name": "bitfit-serve", "version": __version__, "extensions": ["model_repository"]}
        client.app.state.services.batcher.stop()
        r = await client.get("/v2/health/ready")
        assert r.status_code == 503 and r.json() == {"ready": False}
        r = await client.get("/v2/models/sst/ready", headers={"Authorization": "Bearer k3y"})
        assert r.status_code == 503 and r.json() == {"name": "sst", "ready": False}


async def test_model_metadata_and_ready(engine, four_tasks):
    async with serving(engine, four_tasks) as client:
        for task, inputs, classes in (("sst", ["text"], 2), ("nli", ["text", "text_pair"], 3), ("sts", ["text"], 1),
                                      ("tags", ["text"], 3)):
            version = engine.tasks.get(task).version
            r = await client.get(f"/v2/models/{task}")
            assert r.status_code == 200, r.text
            assert r.json() == {"name": task, "versions": [version], "platform": "bitfit-serve",
                                "inputs": [{"name": n, "datatype": "BYTES", "shape": [-1]} for n in inputs],
                                "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                                            {"name": "scores", "datatype": "FP32", "shape": [-1, classes]}]}
            assert (await client.get(f"/v2/models/{task}/versions/{version}")).json() == r.json()
            r = await client.get(f"/v2/models/{task}/ready")
            assert r.status_code == 200 and r.json() == {"name": task, "ready": True}
            r = await client.get(f"/v2/models/{task}/versions/{version}/ready")
            assert r.status_code == 200 and r.json() == {"name": task, "ready": True}
        for route in ("/v2/models/nope", "/v2/models/nope/ready"):
            assert_kserve_error(await client.get(route), 404, "nope")
        for route in ("/v2/models/sst/versions/0123", "/v2/models/sst/versions/0123/ready"):
            assert_kserve_error(await client.get(route), 404, "'0123'")


async def test_infer_equals_native(engine, four_tasks):
    async with serving(engine, four_tasks) as client:
        for task in KINDS:
            labels = (await client.get(f"/v1/tasks/{task}")).json()["labels"]
            expected = await native(client, task, _inputs(task))
            r = await client.post(f"/v2/models/{task}/infer", json={"id": "req-1", "inputs": tensors(task, _inputs(task))})
            assert r.status_code == 200, r.text
            body = r.json()
            assert (body["model_name"], body["id"]) == (task, "req-1")
            assert_same(body, expected, labels)
            r = await client.post(f"/v2/models/{task}/versions/{expected['version']}/infer",
                                  json={"inputs": tensors(task, _inputs(task))})
            assert r.status_code == 200, r.text
            assert r.json()["id"]  # generated when the request has none
            assert_same(r.json(), expected, labels)


async def test_infer_shapes_outputs_and_parameters(engine, four_tasks, deltas_dir, delta_bytes):
    write_delta(deltas_dir, "short", delta_bytes("short", max_length=8))
    async with serving(engine, four_tasks) as client:
        expected = await native(client, "sst", SENTENCES[:3])
        # [N, 1], flat or nested data; a selected output, with Triton's parameters (ignored).
        for data in (SENTENCES[:3], [[x] for x in SENTENCES[:3]]):
            r = await client.post("/v2/models/sst/infer", json={
                "inputs": [{"name": "text", "shape": [3, 1], "datatype": "BYTES", "data": data}],
                "parameters": {"binary_data_output": True, "priority": 1}})
            assert r.status_code == 200, r.text
            assert_same(r.json(), expected, ["label_0", "label_1"])
        r = await client.post("/v2/models/sst/infer", json={"inputs": tensors("sst", SENTENCES[:3]), "outputs": [
            {"name": "scores", "parameters": {"binary_data": True}}]})
        assert [o["name"] for o in r.json()["outputs"]] == ["scores"]
        assert r.json()["outputs"][0]["data"] == pytest.approx(
            [p["scores"][x] for p in expected["predictions"] for x in ("label_0", "label_1")], abs=1e-6)
        # truncate: the native route's rule.
        long = tensors("short", [LONG])
        r = await client.post("/v2/models/short/infer", json={"inputs": long, "parameters": {"truncate": False}})
        assert_kserve_error(r, 422, "42 tokens exceed")
        r = await client.post("/v2/models/short/infer", json={"inputs": long, "parameters": {"truncate": True}})
        assert r.status_code == 200, r.text
        assert_same(r.json(), await native(client, "short", [LONG]), ["label_0", "label_1"])


BAD_INFER = {
    "shape and data disagree": ("sst", [{"name": "text", "shape": [3], "datatype": "BYTES", "data": ["a", "b"]}],
                                ["shape [3] holds 3 elements but data has 2"]),
    "a 2-D shape": ("sst", [{"name": "text", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "b"]}],
                    ["shape [1, 2]", "[N]"]),
    "an empty tensor": ("sst", [{"name": "text", "shape": [0], "datatype": "BYTES", "data": []}], ["N >= 1"]),
    "not BYTES": ("sst", [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}], ["'FP32'", "BYTES"]),
    "numbers as BYTES": ("sst", [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [1]}],
                         ["int values"]),
    "unknown input name": ("sst", [{"name": "sentence", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
                           ["'sentence'", "unknown input", "'text'"]),
    "an input twice": ("sst", [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}] * 2, ["twice"]),
    "text_pair to a text task": ("sst", tensors("nli", PAIRS[:1]), ["'text_pair'", "unknown input"]),
    "text_pair missing": ("nli", tensors("sst", ["a"]), ["'text_pair' is missing"]),
    "pair counts differ": ("nli", [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]},
                                   {"name": "text_pair", "shape": [1], "datatype": "BYTES", "data": ["c"]}],
                           ["2 texts", "has 1"]),
}


@pytest.mark.parametrize("case", BAD_INFER)
async def test_bad_infer_requests(engine, four_tasks, case):
    task, inputs, needles = BAD_INFER[case]
    async with serving(engine, four_tasks) as client:
        assert_kserve_error(await client.post(f"/v2/models/{task}/infer", json={"inputs": inputs}), 400, *needles)


async def test_other_infer_errors(engine, four_tasks):
    ok = tensors("sst", ["a"])
    async with serving(engine, four_tasks, max_texts_per_request=4, max_request_bytes=2000) as client:
        async def post(route: str = "/v2/models/sst/infer", **body) -> httpx.Response:
            return await client.post(route, json=body)

        assert_kserve_error(await post(inputs=ok, outputs=[{"name": "probs"}]), 400, "unknown output 'probs'")
        assert_kserve_error(await post(inputs=ok, parameters={"truncate": "yes"}), 400, "parameters.truncate")
        assert_kserve_error(await post(), 400, "invalid request", "inputs")
        assert_kserve_error(await post(inputs=[]), 400, "invalid request")
        assert_kserve_error(await post(inputs=ok, extra=1), 400, "extra")
        assert_kserve_error(await post(inputs=tensors("sst", ["x"] * 5)), 413, "max_texts_per_request=4")
        assert_kserve_error(await post(inputs=tensors("sst", ["x" * 3000])), 413, "max_request_bytes=2000")
        assert_kserve_error(await post("/v2/models/nope/infer", inputs=ok), 404, "unknown task 'nope'")
        assert_kserve_error(await post("/v2/models/sst/versions/0123/infer", inputs=ok), 404, "not '0123'")
        r = await client.post("/v2/models/sst/infer", content=b'{"inputs": []}\x00\x00',
                              headers={"Inference-Header-Content-Length": "14"})
        assert_kserve_error(r, 400, "binary tensor data extension")
        r = await client.post("/v2/models/sst/infer", content=json.dumps({"inputs": ok}).encode())
        assert r.status_code == 200, r.text  # JSON without a Content-Type, as Triton's client sends it
        assert (await client.post("/v1/tasks/nope/predict", json={"inputs": ["x"]})).json()["error"]["code"] \
            == "unknown_task"  # the native routes keep their shape


async def test_api_key_required(engine, four_tasks):
    async with serving(engine, four_tasks, api_key="k3y", admin_token="adm1n") as client:
        for route in ("/v2/models/sst", "/v2/models/sst/ready"):
            assert_kserve_error(await client.get(route), 401, "Bearer")
        r = await client.post("/v2/models/sst/infer", json={"inputs": tensors("sst", ["a"])})
        assert_kserve_error(r, 401)
        assert r.headers["www-authenticate"] == "Bearer"
        r = await client.post("/v2/models/sst/infer", json={"inputs": tensors("sst", ["a"])},
                              headers={"Authorization": "Bearer wrong"})
        assert_kserve_error(r, 403, "not valid")
        for key in ("k3y", "adm1n"):
            r = await client.post("/v2/models/sst/infer", json={"inputs": tensors("sst", ["a"])},
                                  headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------------ repository
def version_of(data: bytes) -> str:
    return delta_io.sha256_bytes(data)[:16]


async def test_repository_index_load_unload(engine, deltas_dir, delta_bytes):
    good, renamed = delta_bytes("good"), delta_bytes("other")
    write_delta(deltas_dir, "good", good)
    write_delta(deltas_dir, "misnamed", renamed)  # its metadata says task "other": not served
    async with serving(engine, deltas_dir) as client:
        index = await client.post("/v2/repository/index")
        assert index.status_code == 200, index.text
        (g, m) = index.json()
        assert g == {"name": "good", "version": version_of(good), "state": "READY", "reason": ""}
        assert (m["name"], m["state"]) == ("misnamed", "UNAVAILABLE") and "version" not in m
        assert "misnamed.safetensors" in m["reason"] and "rename the file" in m["reason"]
        ready_only = await client.post("/v2/repository/index", json={"ready": True})
        assert [e["name"] for e in ready_only.json()] == ["good"]

        # A file added while the server runs (no watcher here): listed, then served by load.
        late = delta_bytes("late", seed=3)
        write_delta(deltas_dir, "late", late)
        entry = (await client.post("/v2/repository/index")).json()[1]
        assert (entry["name"], entry["state"]) == ("late", "UNAVAILABLE") and "not loaded yet" in entry["reason"]
        assert_kserve_error(await client.post("/v2/models/late/infer", json={"inputs": tensors("late", ["a"])}), 404)
        r = await client.post("/v2/repository/models/late/load")
        assert r.status_code == 200, r.text
        assert r.json() == {"name": "late", "version": version_of(late), "outcome": "added"}
        r = await client.post("/v2/models/late/infer", json={"inputs": tensors("late", SENTENCES)})
        assert r.status_code == 200, r.text
        assert_same(r.json(), await native(client, "late", SENTENCES), ["label_0", "label_1"])
        r = await client.post("/v2/repository/models/late/load", json={})
        assert r.json()["outcome"] == "unchanged"

        # A replaced file: load reloads it.
        newer = delta_bytes("late", seed=4)
        write_delta(deltas_dir, "late", newer)
        r = await client.post("/v2/repository/models/late/load")
        assert r.json() == {"name": "late", "version": version_of(newer), "outcome": "replaced"}

        # A bad file: 422 with the reason; a version already served stays, and the index says so.
        write_delta(deltas_dir, "late", b"not a delta")
        r = await client.post("/v2/repository/models/late/load")
        assert_kserve_error(r, 422, "late.safetensors")
        assert (await client.get("/v2/models/late")).json()["versions"] == [version_of(newer)]
        entry = (await client.post("/v2/repository/index")).json()[1]
        assert (entry["name"], entry["state"], entry["version"]) == ("late", "READY", version_of(newer))
        assert "not served" in entry["reason"]
        write_delta(deltas_dir, "late", newer)

        # No file: 404 naming the path.
        r = await client.post("/v2/repository/models/ghost/load")
        assert_kserve_error(r, 404, str(deltas_dir / "ghost.safetensors"))

        # Unload: not served any more, and the file is gone (a restart would not bring it back).
        r = await client.post("/v2/repository/models/late/unload",
                              json={"parameters": {"unload_dependents": False}})
        assert r.status_code == 200, r.text
        assert r.json() == {"name": "late", "version": version_of(newer), "unloaded": True}
        assert_kserve_error(await client.post("/v2/models/late/infer", json={"inputs": tensors("late", ["a"])}),
                            404, "unknown task 'late'")
        assert_kserve_error(await client.get("/v2/models/late/ready"), 404)
        assert not (deltas_dir / "late.safetensors").exists()
        assert_kserve_error(await client.post("/v2/repository/models/late/unload"), 404)
        assert_kserve_error(await client.post("/v2/repository/models/late/load"), 404, "late.safetensors")
        assert [e["name"] for e in (await client.post("/v2/repository/index")).json()] == ["good", "misnamed"]

        # A served task whose file was deleted behind the server's back: load says so, and stops it.
        (deltas_dir / "good.safetensors").unlink()
        assert_kserve_error(await client.post("/v2/repository/models/good/load"), 404, "not served any more")
        assert_kserve_error(await client.get("/v2/models/good"), 404)

        # Triton's load overrides (a config, files) are refused: a task loads from the folder only.
        r = await client.post("/v2/repository/models/good/load", json={"parameters": {"config": "{}"}})
        assert_kserve_error(r, 400, "PUT /v1/tasks/good")
        metrics = (await client.get("/metrics")).text
    for action, n in (("added", 1), ("replaced", 1), ("rejected", 1), ("removed", 2)):
        assert f'bitfit_task_changes_total{{action="{action}",source="kserve"}} {n}.0' in metrics


async def test_repository_routes_need_the_admin_token(engine, deltas_dir, delta_bytes):
    write_delta(deltas_dir, "t", delta_bytes("t"))
    async with serving(engine, deltas_dir, admin_token="adm1n", api_key="k3y") as client:
        routes = ("/v2/repository/index", "/v2/repository/models/t/load", "/v2/repository/models/t/unload")
        for route in routes:
            r = await client.post(route)
            assert_kserve_error(r, 401, "admin")
            assert r.headers["www-authenticate"] == "Bearer"
            for token in ("k3y", "wrong"):  # the API key is not enough
                assert_kserve_error(await client.post(route, headers={"Authorization": f"Bearer {token}"}), 403)
        assert_kserve_error(await client.post("/v2/repository/models/.t/load"), 400, "task name")
        admin = {"Authorization": "Bearer adm1n"}
        for route in routes:
            r = await client.post(route, headers=admin)
            assert r.status_code == 200, r.text
        assert (deltas_dir / "t.safetensors").exists() is False


# ------------------------------------------------------------------------------------ Triton's client
@contextmanager
def uvicorn_server(engine: Engine, deltas: Path, **settings) -> Iterator[str]:
    """The app under uvicorn in a thread, on 127.0.0.1 (for clients that need a real socket)."""
    import uvicorn

    port = free_port()
    app = create_app(engine, Settings(deltas=deltas, watch=False, port=port, **settings))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


async def test_tritonclient_talks_to_the_face(engine, four_tasks, deltas_dir):
    httpclient = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException
    import numpy as np

    write_delta(deltas_dir, "bad", b"not a delta")
    async with serving(engine, four_tasks) as client:  # the native answers, for comparison
        expected = {t: await native(client, t, _inputs(t)) for t in KINDS}
    auth = {"Authorization": "Bearer adm1n"}

    def talk(url: str) -> None:
        triton = httpclient.InferenceServerClient(url)
        try:
            assert triton.is_server_live() and triton.is_server_ready()
            assert triton.get_server_metadata()["extensions"] == ["model_repository"]
            assert triton.is_model_ready("sst", headers=auth) and not triton.is_model_ready("nope", headers=auth)
            assert triton.get_model_metadata("nli", headers=auth)["inputs"][1]["name"] == "text_pair"
            for task in KINDS:
                inputs = []
                columns = [_inputs(task)] if task != "nli" else [[a for a, _ in PAIRS], [b for _, b in PAIRS]]
                for name, column in zip(("text", "text_pair"), columns):
                    tensor = httpclient.InferInput(name, [len(column)], "BYTES")
                    tensor.set_data_from_numpy(np.array(column, dtype=object), binary_data=False)
                    inputs.append(tensor)
                result = triton.infer(task, inputs, headers=auth, request_id="r1")
                want = expected[task]
                body = result.get_response()
                assert (body["model_version"], body["id"]) == (want["version"], "r1")
                scores = result.as_numpy("scores")
                assert scores.dtype == np.float32 and scores.shape[0] == len(want["predictions"])
                if task == "sts":
                    assert scores[:, 0] == pytest.approx([p["value"] for p in want["predictions"]], abs=1e-6)
                else:
                    labels = list(want["predictions"][0]["scores"])
                    assert scores.ravel() == pytest.approx(
                        [p["scores"][x] for p in want["predictions"] for x in labels], abs=1e-6)
                    assert [str(x) for x in result.as_numpy("label")] == [p["label"] for p in want["predictions"]]
            index = {e["name"]: e for e in triton.get_model_repository_index(headers=auth)}
            assert index["sst"]["state"] == "READY" and index["bad"]["state"] == "UNAVAILABLE"
            triton.unload_model("sst", headers=auth)
            assert not triton.is_model_ready("sst", headers=auth)
            with pytest.raises(InferenceServerException, match="sst.safetensors"):
                triton.load_model("sst", headers=auth)  # unload deleted the file
            with pytest.raises(InferenceServerException, match="bad.safetensors"):
                triton.load_model("bad", headers=auth)
            with pytest.raises(InferenceServerException, match="admin"):
                triton.get_model_repository_index()
        finally:
            triton.close()

    with uvicorn_server(Engine.from_pretrained(engine.base.path), four_tasks, admin_token="adm1n") as url:
        await asyncio.to_thread(talk, url)


async def test_load_shedding_covers_the_faces(engine, four_tasks):
    """Both faces' inference routes are shed while the queue is full, each in its error shape."""
    from bitfit_serve.errors import Overloaded

    async with serving(engine, four_tasks) as client:
        batcher = client.app.state.services.batcher

        def full() -> None:
            raise Overloaded("the queue is full", retry_after=2)

        batcher.check_room = full
        r = await client.post("/v2/models/sst/infer", json={"inputs": tensors("sst", ["a"])})
        assert_kserve_error(r, 503, "queue is full")
        assert r.headers["retry-after"] == "2"
        r = await client.post("/v1/classify", json={"model": "sst", "input": "a"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        assert (await client.get("/v2/models/sst")).status_code == 200  # not an inference route
