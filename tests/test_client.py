"""bitfit_serve.client: the async client on the in-process app, retries and error mapping on fake
transports, and the sync client end to end against a real ``bitfit-serve serve`` on 127.0.0.1."""

from __future__ import annotations

import email.utils
import json
import time

import httpx
import pytest

from bitfit_serve import client as client_mod
from bitfit_serve import delta as delta_io
from bitfit_serve.client import AsyncClient, Client, ServerError
from bitfit_serve.errors import BaseModelMismatch, BitfitError, Forbidden, InputTooLong, InvalidDelta, \
    InvalidInput, NotReady, Overloaded, PayloadTooLarge, Unauthorized, UnknownTask
from bitfit_serve.http.schemas import RemoveResponse, TaskInfo, TaskPredictions, UploadResponse
from tests.factories import SENTENCES
from tests.reliability.live import LiveServer
from tests.server.conftest import PAIR_TASK_KW, serving, write_delta


def version_of(data: bytes) -> str:
    return delta_io.sha256_bytes(data)[:16]


def assert_equals_engine(out: TaskPredictions, engine, task: str, inputs: list, abs: float = 1e-6) -> None:
    expected = engine.predict([(task, x) for x in inputs])
    assert isinstance(out, TaskPredictions)
    assert out.task == task and out.version == engine.tasks.get(task).version == expected[0].version
    assert len(out.predictions) == len(expected)
    for got, exp in zip(out.predictions, expected):
        assert got.label == exp.label and (got.tokens, got.truncated) == (exp.tokens, exp.truncated)
        assert got.scores == pytest.approx(exp.scores, abs=abs)
        assert got.score == pytest.approx(exp.score, abs=abs)


# --------------------------------------------------------------------------- in-process app (async)

@pytest.mark.anyio
async def test_async_client_on_the_app(engine, deltas_dir, delta_bytes, tmp_path):
    write_delta(deltas_dir, "sst", delta_bytes("sst"))
    write_delta(deltas_dir, "nli", delta_bytes("nli", **PAIR_TASK_KW))
    pairs = [SENTENCES[:2], SENTENCES[2:4]]
    async with serving(engine, deltas_dir) as http:
        # transport= : the client builds its own httpx client on the app (its lifespan runs in serving)
        async with AsyncClient("http://test", transport=httpx.ASGITransport(app=http.app)) as c:
            assert await c.ready() is True
            assert_equals_engine(await c.predict("sst", SENTENCES), engine, "sst", SENTENCES)
            assert_equals_engine(await c.predict("nli", pairs), engine, "nli", pairs)
            one = await c.predict("sst", SENTENCES[0])  # a single str is one text
            assert len(one.predictions) == 1

            mixed = await c.predict_many([("sst", SENTENCES[:3]), {"task": "nli", "inputs": [tuple(pairs[0])]},
                                          ("sst", SENTENCES[3:5])])
            assert [r.task for r in mixed] == ["sst", "nli", "sst"]
            assert_equals_engine(mixed[0], engine, "sst", SENTENCES[:3])
            assert_equals_engine(mixed[1], engine, "nli", pairs[:1])
            assert_equals_engine(mixed[2], engine, "sst", SENTENCES[3:5])

            listed = await c.tasks()
            assert all(isinstance(t, TaskInfo) for t in listed)
            assert sorted(t.task for t in listed) == ["nli", "sst"]
            info = await c.task("nli")
            assert (info.task, info.version, info.inputs) == ("nli", version_of(delta_bytes("nli", **PAIR_TASK_KW)),
                                                              ["premise", "hypothesis"])
            assert info.sha256 == delta_io.sha256_bytes(delta_bytes("nli", **PAIR_TASK_KW))

        # http_client= : wrap the caller's httpx client (not closed by ours)
        c = AsyncClient(http_client=http)
        old, new = delta_bytes("fresh", seed=1), delta_bytes("fresh", seed=2)
        added = await c.put_task("fresh", old)  # bytes
        assert isinstance(added, UploadResponse)
        assert (added.task, added.version, added.replaced) == ("fresh", version_of(old), None)
        path = tmp_path / "upload.safetensors"
        path.write_bytes(new)
        replaced = await c.put_task("fresh", path)  # a path (str works too)
        assert (replaced.version, replaced.replaced) == (version_of(new), version_of(old))
        assert (await c.put_task("fresh", str(path))).replaced == version_of(new)
        assert_equals_engine(await c.predict("fresh", SENTENCES[:2]), engine, "fresh", SENTENCES[:2])
        assert (deltas_dir / "fresh.safetensors").read_bytes() == new

        removed = await c.delete_task("fresh")
        assert isinstance(removed, RemoveResponse)
        assert (removed.task, removed.version, removed.removed) == ("fresh", version_of(new), True)
        with pytest.raises(UnknownTask):
            await c.task("fresh")
        await c.close()
        assert (await http.get("/health")).status_code == 200  # still open: it was not ours


@pytest.mark.anyio
async def test_async_errors_raise_the_core_classes(engine, deltas_dir, delta_bytes, make_delta):
    write_delta(deltas_dir, "sst", delta_bytes("sst"))
    async with serving(engine, deltas_dir, max_texts_per_request=4) as http:
        c = AsyncClient(http_client=http)
        with pytest.raises(UnknownTask) as e:
            await c.predict("nope", ["x"])
        assert e.value.status_code == 404 and "nope" in e.value.message and '"unknown_task"' in e.value.body
        with pytest.raises(UnknownTask):
            await c.predict_many([("sst", ["x"]), ("nope", ["y"])])
        with pytest.raises(UnknownTask):
            await c.delete_task("nope")
        with pytest.raises(InvalidInput):
            await c.predict("sst", [])
        with pytest.raises(InvalidInput):  # a pair for a single-text task
            await c.predict("sst", [["a", "b"]])
        with pytest.raises(PayloadTooLarge):
            await c.predict("sst", SENTENCES[:5])
        with pytest.raises(InputTooLong):
            await c.predict("sst", [" ".join(["word"] * 200)], truncate=False)
        assert (await c.predict("sst", [" ".join(["word"] * 200)], truncate=True)).predictions[0].truncated

        with pytest.raises(InvalidDelta) as e:
            await c.put_task("up", b"hello, this is not a delta" * 10)
        assert type(e.value) is InvalidDelta and e.value.status_code == 422
        mismatch = delta_io.to_bytes(make_delta("up").replace(base_fingerprint="0" * 64))
        with pytest.raises(BaseModelMismatch) as e:
            await c.put_task("up", mismatch)
        assert "base_fingerprint" in e.value.message
        with pytest.raises(InvalidInput):
            await c.put_task("up", b"")
        with pytest.raises(InvalidInput, match="task name"):
            await c.put_task("a b", delta_bytes("sst"))
        with pytest.raises(ServerError) as e:  # an encoded slash is another route: the HTTP layer's code
            await c.task("a/b")
        assert (e.value.status_code, e.value.code) == (404, "not_found") and not isinstance(e.value, UnknownTask)
        with pytest.raises(TypeError):
            await c.predict_many([{"task": "sst", "texts": ["x"]}])
    assert sorted(p.name for p in deltas_dir.iterdir()) == ["sst.safetensors"]


@pytest.mark.anyio
async def test_async_auth(engine, deltas_dir, delta_bytes):
    write_delta(deltas_dir, "sst", delta_bytes("sst"))
    data = delta_bytes("b")
    async with serving(engine, deltas_dir, admin_token="admin-secret", api_key="api-secret") as http:
        with pytest.raises(Unauthorized) as e:
            await AsyncClient(http_client=http).predict("sst", ["x"])
        assert e.value.status_code == 401
        with pytest.raises(Forbidden):
            await AsyncClient(http_client=http, api_key="wrong").predict("sst", ["x"])
        with pytest.raises(Forbidden):
            await AsyncClient(http_client=http, api_key="wrong").tasks()
        with pytest.raises(Forbidden):  # a non-ASCII key goes out (as UTF-8) and is refused
            await AsyncClient(http_client=http, api_key="ápi").task("sst")

        reader = AsyncClient(http_client=http, api_key="api-secret")
        assert (await reader.predict("sst", ["x"])).task == "sst"
        assert [t.task for t in await reader.tasks()] == ["sst"]
        with pytest.raises(Unauthorized):  # no admin token: nothing is sent on admin routes
            await reader.put_task("b", data)
        with pytest.raises(Forbidden):
            await AsyncClient(http_client=http, api_key="api-secret", admin_token="wrong").delete_task("sst")

        both = AsyncClient(http_client=http, api_key="api-secret", admin_token="admin-secret")
        assert (await both.put_task("b", data)).replaced is None
        admin_only = AsyncClient(http_client=http, admin_token="admin-secret")  # used for everything
        assert (await admin_only.predict("b", ["x"])).version == version_of(data)
        assert (await admin_only.delete_task("b")).removed
        assert await AsyncClient(http_client=http).ready()  # open


# --------------------------------------------------------------------------- fake transports

PREDICTION = {"task": "t", "version": "v1", "predictions": [{"label": "a", "score": 0.75,
                                                             "scores": {"a": 0.75, "b": 0.25}}]}
UPLOAD = {"task": "t", "version": "v1", "sha256": "0" * 64, "problem_type": "single_label_classification",
          "labels": ["a", "b"], "inputs": ["text"], "pooling": "mean", "max_length": 64, "scheme": "bitfit",
          "metrics": {}, "train_args": {}, "bytes": 1, "bank_bytes": 1, "sites": 1, "base_model": "m",
          "base_fingerprint": "f", "created_at": "now", "trainer_version": "0", "loaded_at": 0.0, "replaced": None}


def overloaded(retry_after: str | None = "0", status: int = 503, code: str = "overloaded") -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return httpx.Response(status, json={"error": {"code": code, "message": "the queue is full"}}, headers=headers)


class Script:
    """A fake server: answers from a list (the last one repeats), records every request."""

    def __init__(self, *answers: httpx.Response):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    @property
    def calls(self) -> int:
        return len(self.requests)


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """The retry waits, recorded instead of slept."""
    recorded: list[float] = []

    async def async_sleep(s: float) -> None:
        recorded.append(s)

    monkeypatch.setattr(client_mod, "_sleep", recorded.append)
    monkeypatch.setattr(client_mod, "_async_sleep", async_sleep)
    return recorded


def sync_client(script: Script, **kw) -> Client:
    return Client("http://fake", transport=httpx.MockTransport(script), **kw)


@pytest.mark.anyio
async def test_503_then_success_is_retried_after_retry_after(waits):
    script = Script(overloaded("0"), overloaded("1", code="not_ready"), overloaded("7", status=429, code="x"),
                    httpx.Response(200, json=PREDICTION))
    async with AsyncClient("http://fake", transport=httpx.MockTransport(script), max_retry_wait=5.0) as c:
        out = await c.predict("t", ["x"])
    assert out == TaskPredictions.model_validate(PREDICTION)
    assert script.calls == 4 and waits == [0.0, 1.0, 5.0]  # 7 s capped at max_retry_wait
    assert {json.loads(r.content)["inputs"][0] for r in script.requests} == {"x"}  # the same body each time

    waits.clear()
    date = email.utils.formatdate(time.time() + 3, usegmt=True)  # an HTTP date; absent; unreadable
    script = Script(overloaded(date), overloaded(None), overloaded("soon"), httpx.Response(200, json=PREDICTION))
    with sync_client(script, max_retries=5) as c:
        assert c.predict("t", ["x"]).version == "v1"
    assert script.calls == 4 and 1.0 < waits[0] <= 3.0 and waits[1:] == [1.0, 1.0]


@pytest.mark.anyio
async def test_gives_up_after_max_retries(waits):
    script = Script(overloaded("2"))
    async with AsyncClient("http://fake", transport=httpx.MockTransport(script), max_retries=2) as c:
        with pytest.raises(Overloaded) as e:
            await c.tasks()
    assert script.calls == 3 and waits == [2.0, 2.0]
    assert (e.value.status_code, e.value.retry_after, e.value.message) == (503, 2.0, "the queue is full")

    script = Script(overloaded("0", code="not_ready"))
    with sync_client(script, max_retries=0) as c, pytest.raises(NotReady):
        c.task("t")
    assert script.calls == 1


@pytest.mark.anyio
async def test_put_delete_and_ready_are_not_retried(waits):
    for make in (lambda c: c.put_task("t", b"delta"), lambda c: c.delete_task("t")):
        script = Script(overloaded("0"), httpx.Response(200, json=UPLOAD))
        async with AsyncClient("http://fake", transport=httpx.MockTransport(script)) as c:
            with pytest.raises(Overloaded):
                await make(c)
        assert script.calls == 1
        script = Script(overloaded("0"), httpx.Response(200, json=UPLOAD))
        with sync_client(script) as c, pytest.raises(Overloaded):
            make(c)
        assert script.calls == 1
    script = Script(overloaded("0", code="not_ready"), httpx.Response(200, json={"status": "ready"}))
    with sync_client(script) as c:
        assert c.ready() is False and c.ready() is True
    assert script.calls == 2 and waits == []


def test_headers_and_bodies_sent():
    script = Script(httpx.Response(200, json=PREDICTION))
    with sync_client(script, api_key="key", admin_token="adm") as c:
        c.predict("t", [("a", "b")], truncate=False)
        script.answers = [httpx.Response(200, json={"results": [PREDICTION, PREDICTION]})]
        assert [r.version for r in c.predict_many([("t", ["x"]), {"task": "u", "inputs": "y"}], truncate=True)] == ["v1", "v1"]
        script.answers = [httpx.Response(201, json=UPLOAD)]
        assert c.put_task("my.task", b"\x00bytes").task == "t"
        script.answers = [httpx.Response(200, json={"task": "t", "version": "v1", "removed": True})]
        assert c.delete_task("my.task").removed
    predict, mixed, put, delete = script.requests
    assert (predict.method, predict.url.path, predict.headers["authorization"]) == \
        ("POST", "/v1/tasks/t/predict", "Bearer key")
    assert json.loads(predict.content) == {"inputs": [["a", "b"]], "truncate": False}
    assert mixed.url.path == "/v1/predict" and json.loads(mixed.content) == {
        "items": [{"task": "t", "inputs": ["x"]}, {"task": "u", "inputs": ["y"]}], "truncate": True}
    assert (put.method, put.url.path, put.content, put.headers["authorization"], put.headers["content-type"]) == \
        ("PUT", "/v1/tasks/my.task", b"\x00bytes", "Bearer adm", "application/octet-stream")
    assert (delete.method, delete.headers["authorization"]) == ("DELETE", "Bearer adm")

    script = Script(httpx.Response(200, json=PREDICTION), httpx.Response(201, json=UPLOAD))
    with sync_client(script) as c:  # no key: no header
        c.predict("t", ["x"])
        c.put_task("t", b"x")
    assert all("authorization" not in r.headers for r in script.requests)


def test_unknown_codes_and_bodies_raise_server_error():
    cases = [(httpx.Response(502, text="<html>bad gateway</html>"), 502, "server_error"),
             (httpx.Response(500, json={"error": {"code": "internal_error", "message": "boom"}}), 500, "internal_error"),
             (httpx.Response(418, json={"detail": "teapot"}), 418, "server_error"),
             (httpx.Response(400, json={"error": {"code": "bad_request", "message": "m"}}), 400, "bad_request")]
    for response, status, code in cases:
        with sync_client(Script(response), max_retries=0) as c, pytest.raises(ServerError) as e:
            c.predict("t", ["x"])
        assert isinstance(e.value, BitfitError)
        assert (e.value.status_code, e.value.code, e.value.body) == (status, code, response.text)
    assert client_mod.ERROR_CLASSES["base_model_mismatch"] is BaseModelMismatch
    assert client_mod.ERROR_CLASSES["input_too_long"] is InputTooLong
    assert "bad_request" not in client_mod.ERROR_CLASSES
    with pytest.raises(ValueError):
        Client(max_retries=-1)


# --------------------------------------------------------------------------- a real server (sync)

def test_sync_client_against_a_live_server(tmp_path, tiny_bert_dir, engine, delta_bytes):
    deltas = tmp_path / "deltas"
    deltas.mkdir()
    write_delta(deltas, "sst", delta_bytes("sst"))
    engine.add_task(delta_bytes("sst"))
    new = delta_bytes("hot", seed=3)
    upload = tmp_path / "hot.safetensors"
    upload.write_bytes(new)
    server = LiveServer(tiny_bert_dir, deltas, tmp_path / "server.log", args=("--admin-token", "adm"))
    with server, Client(server.url, admin_token="adm", timeout=60.0) as c:
        assert c.ready()
        # another process, one thread there: equal to within float noise
        assert_equals_engine(c.predict("sst", SENTENCES), engine, "sst", SENTENCES, abs=1e-5)
        added = c.put_task("hot", upload)
        assert (added.version, added.replaced) == (version_of(new), None)
        engine.add_task(new)
        assert_equals_engine(c.predict("hot", SENTENCES[:3]), engine, "hot", SENTENCES[:3], abs=1e-5)
        assert sorted(t.task for t in c.tasks()) == ["hot", "sst"]
        assert c.put_task("hot", new).replaced == version_of(new)
        assert c.delete_task("hot").version == version_of(new)
        with pytest.raises(UnknownTask):
            c.predict("hot", ["x"])
        with Client(server.url) as anonymous, pytest.raises(Unauthorized):
            anonymous.delete_task("sst")
        with Client(server.url, admin_token="wrong") as wrong, pytest.raises(Forbidden):
            wrong.put_task("x", new)
    assert sorted(p.name for p in deltas.iterdir()) == ["sst.safetensors"]


def test_connection_errors_are_not_retried(waits):
    calls = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("connection refused", request=request)

    with Client("http://fake", transport=httpx.MockTransport(refuse)) as c, pytest.raises(httpx.ConnectError):
        c.predict("t", ["x"])
    assert len(calls) == 1 and waits == []
