"""The vLLM / OpenAI face: /v1/models and vLLM's classify API answer what the native route answers."""

from __future__ import annotations

import pytest

from tests.factories import SENTENCES
from tests.server.conftest import KINDS, assert_error, serving, write_delta

pytestmark = pytest.mark.anyio

PAIRS = [[SENTENCES[i], SENTENCES[i + 1]] for i in range(0, len(SENTENCES) - 1, 2)]
LONG = " ".join(["word"] * 40)  # 42 tokens with [CLS] and [SEP]


def _inputs(task: str) -> list:
    return PAIRS if task == "nli" else SENTENCES


@pytest.fixture
def four_tasks(deltas_dir, delta_bytes):
    for task, kw in KINDS.items():
        write_delta(deltas_dir, task, delta_bytes(task, **kw))
    write_delta(deltas_dir, "short", delta_bytes("short", max_length=8))
    return deltas_dir


async def native(client, task: str, inputs: list, **kw) -> dict:
    r = await client.post(f"/v1/tasks/{task}/predict", json={"inputs": inputs, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def assert_same(data: list[dict], predictions: list[dict], labels: list[str]) -> None:
    """vLLM's data items against the native predictions for the same inputs."""
    assert [d["index"] for d in data] == list(range(len(predictions)))
    for d, p in zip(data, predictions):
        if "value" in p:  # regression
            assert (d["label"], d["num_classes"]) == (labels[0], 1)
            assert d["probs"] == pytest.approx([p["value"]], abs=1e-6)
        else:
            assert d["label"] == p["label"] and d["num_classes"] == len(labels)
            assert d["probs"] == pytest.approx([p["scores"][label] for label in labels], abs=1e-6)


async def test_models_list(engine, four_tasks):
    async with serving(engine, four_tasks) as client:
        r = await client.get("/v1/models")
        assert r.status_code == 200, r.text
        body = r.json()
        tasks = (await client.get("/v1/tasks")).json()["tasks"]
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == sorted([*KINDS, "short"]) == [t["task"] for t in tasks]
    for card, info in zip(body["data"], tasks):
        assert card == {"id": info["task"], "object": "model", "created": int(info["loaded_at"]),
                        "owned_by": "bitfit-serve", "root": info["task"], "parent": info["base_model"],
                        "max_model_len": info["max_length"]}
    assert {m["id"]: m["max_model_len"] for m in body["data"]}["short"] == 8


@pytest.mark.parametrize("route", ["/v1/classify", "/classify"])
async def test_classify_equals_native_for_every_kind(engine, four_tasks, route):
    async with serving(engine, four_tasks) as client:
        for task in KINDS:
            labels = (await client.get(f"/v1/tasks/{task}")).json()["labels"]
            expected = await native(client, task, _inputs(task))
            r = await client.post(route, json={"model": task, "input": _inputs(task)})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["object"] == "list" and body["model"] == task and body["id"].startswith("classify-")
            assert isinstance(body["created"], int)
            assert_same(body["data"], expected["predictions"], labels)
            tokens = sum(p["tokens"] for p in expected["predictions"])
            assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}


async def test_classify_one_string(engine, four_tasks):
    async with serving(engine, four_tasks) as client:
        expected = await native(client, "sst", [SENTENCES[0]])
        r = await client.post("/v1/classify", json={"model": "sst", "input": SENTENCES[0]})
        assert r.status_code == 200, r.text
        assert len(r.json()["data"]) == 1
        assert_same(r.json()["data"], expected["predictions"], ["label_0", "label_1"])
        assert r.json()["usage"]["prompt_tokens"] == expected["predictions"][0]["tokens"]


async def test_pair_task_takes_pairs_only(engine, four_tasks):
    async with serving(engine, four_tasks) as client:
        assert_error(await client.post("/v1/classify", json={"model": "nli", "input": ["a", "b"]}),
                     400, "invalid_input", "inputs[0]", "pairs")
        assert_error(await client.post("/v1/classify", json={"model": "sst", "input": [["a", "b"]]}),
                     400, "invalid_input", "not a pair")
        assert_error(await client.post("/v1/classify", json={"model": "nli", "input": [["a", "b", "c"]]}),
                     400, "invalid_input")


async def test_truncation_and_usage(engine, four_tasks):
    async with serving(engine, four_tasks) as client:
        expected = await native(client, "short", ["a b", LONG])
        assert [p["truncated"] for p in expected["predictions"]] == [False, True]
        for k in (None, -1, 8):
            body = {"model": "short", "input": ["a b", LONG]} | ({} if k is None else {"truncate_prompt_tokens": k})
            r = await client.post("/v1/classify", json=body)
            assert r.status_code == 200, r.text
            assert_same(r.json()["data"], expected["predictions"], ["label_0", "label_1"])
            assert r.json()["usage"]["prompt_tokens"] == 4 + 8  # what the encoder saw: cut at max_length
        for k in (0, -2, 9):
            r = await client.post("/v1/classify", json={"model": "short", "input": ["a"], "truncate_prompt_tokens": k})
            assert_error(r, 400, "invalid_input", f"truncate_prompt_tokens={k}", "max_length 8")
        # Below max_length: exact when nothing is longer than k, refused otherwise.
        r = await client.post("/v1/classify", json={"model": "short", "input": ["a b"], "truncate_prompt_tokens": 4})
        assert r.status_code == 200, r.text
        r = await client.post("/v1/classify", json={"model": "short", "input": ["a b", LONG], "truncate_prompt_tokens": 4})
        assert_error(r, 400, "invalid_input", "input[1]: 42 tokens exceed truncate_prompt_tokens=4")
    async with serving(engine, four_tasks, auto_truncate=False) as client:
        r = await client.post("/v1/classify", json={"model": "short", "input": [LONG]})
        assert_error(r, 422, "input_too_long", "42 tokens")
        r = await client.post("/v1/classify", json={"model": "short", "input": [LONG], "truncate_prompt_tokens": -1})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 8


async def test_bad_requests(engine, four_tasks):
    async with serving(engine, four_tasks, max_texts_per_request=4) as client:
        assert_error(await client.post("/v1/classify", json={"model": "nope", "input": "x"}), 404, "unknown_task", "nope")
        assert_error(await client.post("/classify", json={"model": "sst", "input": []}), 400, "invalid_input")
        assert_error(await client.post("/classify", json={"input": "x"}), 400, "invalid_input", "model")
        assert_error(await client.post("/classify", json={"model": "sst", "input": "x", "extra": 1}),
                     400, "invalid_input", "extra")
        assert_error(await client.post("/classify", json={"model": "sst", "input": ["x"] * 5}),
                     413, "payload_too_large", "max_texts_per_request=4")
        r = await client.post("/classify", json={"model": "sst", "input": "x", "user": "u", "priority": 3})
        assert r.status_code == 200, r.text


async def test_api_key_required(engine, four_tasks):
    async with serving(engine, four_tasks, api_key="k3y", admin_token="adm1n") as client:
        for call in (client.get("/v1/models"), client.post("/v1/classify", json={"model": "sst", "input": "x"})):
            r = await call
            assert_error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"] == "Bearer"
        r = await client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert_error(r, 403, "forbidden")
        for key in ("k3y", "adm1n"):
            auth = {"Authorization": f"Bearer {key}"}
            assert (await client.get("/v1/models", headers=auth)).status_code == 200
            r = await client.post("/classify", json={"model": "sst", "input": "x"}, headers=auth)
            assert r.status_code == 200, r.text
