"""Every bad input gets its specific 4xx in the JSON error shape, and the server keeps serving."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as st_save

from bitfit_serve import delta as delta_io
from tests.server.conftest import PAIR_TASK_KW, assert_error, serving, write_delta

pytestmark = pytest.mark.anyio

LIMITS = dict(max_texts_per_request=4, max_chars_per_text=50, max_items_per_predict=3,
              max_request_bytes=2000, max_upload_bytes=400_000)

# (route, JSON body, status, code, words the message must contain)
PREDICT_CASES = {
    "unknown task": ("/v1/tasks/nope/predict", {"inputs": ["x"]}, 404, "unknown_task", ["nope"]),
    "unknown task in a mixed item": ("/v1/predict", {"items": [{"task": "txt", "inputs": ["x"]},
                                                               {"task": "nope", "inputs": ["x"]}]},
                                     404, "unknown_task", ["nope"]),
    "inputs not a list": ("/v1/tasks/txt/predict", {"inputs": "a text"}, 400, "invalid_input", ["inputs"]),
    "number as text": ("/v1/tasks/txt/predict", {"inputs": [3]}, 400, "invalid_input", ["inputs.0"]),
    "pair of three": ("/v1/tasks/nli/predict", {"inputs": [["a", "b", "c"]]}, 400, "invalid_input", ["inputs.0"]),
    "nested too deep": ("/v1/tasks/nli/predict", {"inputs": [[["a"], "b"]]}, 400, "invalid_input", ["inputs.0"]),
    "pair sent to a text task": ("/v1/tasks/txt/predict", {"inputs": ["ok", ["a", "b"]]}, 400, "invalid_input",
                                 ["inputs[1]", "not a pair"]),
    "text sent to a pair task": ("/v1/tasks/nli/predict", {"inputs": ["a"]}, 400, "invalid_input",
                                 ["inputs[0]", "pairs"]),
    "pair mismatch in a mixed item": ("/v1/predict", {"items": [{"task": "txt", "inputs": ["x"]},
                                                                {"task": "nli", "inputs": ["x"]}]},
                                      400, "invalid_input", ["items[1].inputs[0]"]),
    "empty inputs": ("/v1/tasks/txt/predict", {"inputs": []}, 400, "invalid_input", ["inputs", "at least 1"]),
    "empty items": ("/v1/predict", {"items": []}, 400, "invalid_input", ["items"]),
    "missing inputs": ("/v1/tasks/txt/predict", {"texts": ["x"]}, 400, "invalid_input", ["inputs"]),
    "unknown field": ("/v1/tasks/txt/predict", {"inputs": ["x"], "extra": 1}, 400, "invalid_input", ["extra"]),
    "too many inputs": ("/v1/tasks/txt/predict", {"inputs": ["x"] * 5}, 413, "payload_too_large",
                        ["max_texts_per_request=4"]),
    "too many inputs over items": ("/v1/predict", {"items": [{"task": "txt", "inputs": ["x"] * 3}] * 2}, 413,
                                   "payload_too_large", ["max_texts_per_request=4"]),
    "too many items": ("/v1/predict", {"items": [{"task": "txt", "inputs": ["x"]}] * 4}, 413,
                       "payload_too_large", ["max_items_per_predict=3"]),
    "text too long": ("/v1/tasks/txt/predict", {"inputs": ["ok", "y" * 51]}, 413, "payload_too_large",
                      ["inputs[1]", "max_chars_per_text=50"]),
    "second text of a pair too long": ("/v1/tasks/nli/predict", {"inputs": [["a", "y" * 51]]}, 413,
                                       "payload_too_large", ["max_chars_per_text=50"]),
    "lone surrogate": ("/v1/tasks/txt/predict", {"inputs": ["\ud800"]}, 400, "invalid_input", ["Unicode"]),
    "JSON body too large": ("/v1/tasks/txt/predict", {"inputs": ["x" * 40] * 60}, 413, "payload_too_large",
                            ["max_request_bytes=2000"]),
}


@pytest.fixture
def tasks_dir(deltas_dir, delta_bytes):
    write_delta(deltas_dir, "txt", delta_bytes("txt"))
    write_delta(deltas_dir, "nli", delta_bytes("nli", **PAIR_TASK_KW))
    return deltas_dir


async def assert_still_serving(client, before: dict | None = None) -> dict:
    r = await client.post("/v1/predict", json={"items": [{"task": "txt", "inputs": ["a good film"]},
                                                         {"task": "nli", "inputs": [["a", "b"]]}]})
    assert r.status_code == 200, r.text
    if before is not None:
        assert r.json() == before  # same versions, same outputs: nothing else changed
    return r.json()


async def test_bad_predict_requests(engine, tasks_dir):
    async with serving(engine, tasks_dir, **LIMITS) as client:
        baseline = await assert_still_serving(client)
        for name, (route, body, status, code, needles) in PREDICT_CASES.items():
            r = await client.post(route, content=json.dumps(body), headers={"Content-Type": "application/json"})
            assert_error(r, status, code, *needles)
        for raw in (b"{not json", b"", b"[]", b"null"):
            r = await client.post("/v1/tasks/txt/predict", content=raw, headers={"Content-Type": "application/json"})
            assert_error(r, 400, "invalid_input")
        assert_error(await client.get("/v1/tasks/txt/predict"), 405, "method_not_allowed")
        assert_error(await client.get("/nowhere"), 404, "not_found")
        await assert_still_serving(client, baseline)
        metrics = (await client.get("/metrics")).text
    assert 'bitfit_errors_total{code="payload_too_large"}' in metrics


def _nan_delta(delta) -> bytes:
    tensors = {name: t.clone() for name, t in delta.sites.items()}
    first = sorted(tensors)[0]
    tensors[first][0] = float("nan")
    return st_save({**tensors, "head.weight": delta.head_weight, "head.bias": delta.head_bias},
                   metadata=delta.metadata())


async def test_bad_uploads(engine, tasks_dir, make_delta, delta_bytes):
    good = delta_bytes("up")
    cases = {
        "not safetensors": (b"hello, this is not a delta" * 10, 422, "invalid_delta"),
        "truncated": (good[: len(good) // 2], 422, "invalid_delta"),
        "NaN values": (_nan_delta(make_delta("up")), 422, "invalid_delta", "NaN"),
        "wrong base fingerprint": (delta_io.to_bytes(make_delta("up").replace(base_fingerprint="0" * 64)),
                                   422, "base_model_mismatch", "base_fingerprint"),
        "unknown site": (delta_io.to_bytes(make_delta("up").replace(sites={
            "encoder.layer.0.attention.self.query.weight": torch.zeros(32)})), 422, "invalid_delta", "query.weight"),
        "empty body": (b"", 400, "invalid_input", "empty"),
    }
    async with serving(engine, tasks_dir, **LIMITS) as client:
        baseline = await assert_still_serving(client)
        for name, (data, status, code, *needles) in cases.items():
            assert_error(await client.put("/v1/tasks/up", content=data), status, code, *needles)
        for bad_name in (".hidden", "a b", "x" * 65, "semi;colon", "%2e%2e", "..%5Cx", "nul%00"):
            assert_error(await client.put(f"/v1/tasks/{bad_name}", content=good), 400, "invalid_input", "task name")
            assert_error(await client.delete(f"/v1/tasks/{bad_name}"), 400, "invalid_input", "task name")
        # An encoded slash makes the path another route: not found, nothing written.
        assert_error(await client.put("/v1/tasks/..%2Fescape", content=good), 404, "not_found")
        r = await client.put("/v1/tasks/up", files={"file": ("up.safetensors", good)})
        assert_error(r, 415, "unsupported_media_type", "--data-binary")

        # Size cap: by Content-Length before reading, and while streaming when there is none.
        big = good + b"\0" * (LIMITS["max_upload_bytes"] + 1 - len(good))
        assert_error(await client.put("/v1/tasks/up", content=big), 413, "payload_too_large", "max_upload_bytes")
        chunks_read = []

        huge = big * 10

        async def stream():  # 10x the cap, no Content-Length
            for i in range(0, len(huge), 65536):
                chunks_read.append(i)
                yield huge[i:i + 65536]

        assert_error(await client.put("/v1/tasks/up", content=stream()), 413, "payload_too_large")
        assert len(chunks_read) <= LIMITS["max_upload_bytes"] // 65536 + 2  # stopped at the cap

        # Nothing was written, nothing changed.
        assert sorted(p.name for p in tasks_dir.iterdir()) == ["nli.safetensors", "txt.safetensors"]
        assert_error(await client.get("/v1/tasks/up"), 404, "unknown_task")
        await assert_still_serving(client, baseline)
        # A good upload still works afterwards.
        assert (await client.put("/v1/tasks/up", content=good)).status_code == 201


async def test_failed_replace_keeps_the_old_version(engine, tasks_dir, delta_bytes):
    async with serving(engine, tasks_dir) as client:
        baseline = await assert_still_serving(client)
        before = (tasks_dir / "txt.safetensors").read_bytes()
        assert_error(await client.put("/v1/tasks/txt", content=b"garbage"), 422, "invalid_delta")
        await assert_still_serving(client, baseline)
        assert (tasks_dir / "txt.safetensors").read_bytes() == before
