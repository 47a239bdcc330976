"""Issue 19 (one tenant's delta, file or request must not hurt the others): the findings fixed so
far, each reproduced as a hostile tenant would send it. Finding numbers refer to the issue."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import save as st_save

from tests.server.conftest import assert_error, serving, write_delta

pytestmark = pytest.mark.anyio
OCTET = {"Content-Type": "application/octet-stream"}


def _with_metadata(delta, **overrides: str) -> bytes:
    """A delta file whose metadata strings are replaced as given, past Delta's own checks."""
    tensors = {**delta.sites, "head.weight": delta.head_weight, "head.bias": delta.head_bias}
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata={**delta.metadata(), **overrides})


def _nested(levels: int) -> str:
    return json.dumps({"a": json.loads("[" * levels + "1" + "]" * levels)})


# Finding 3: metadata that parses but cannot be answered as JSON broke listing for everyone.
UNEMITTABLE = {
    "lone surrogate in a label": dict(labels='["ok", "\\ud800"]'),
    "lone surrogate in train_args": dict(train_args='{"a": "\\ud83d"}'),
    "nesting 256 levels deep": dict(train_args=_nested(256)),
    "NaN in metrics": dict(metrics='{"dev": NaN}'),
}


@pytest.mark.parametrize("case", UNEMITTABLE)
async def test_metadata_the_api_cannot_emit_is_refused_before_anything_is_written(case, engine, deltas_dir,
                                                                                 make_delta, delta_bytes):
    write_delta(deltas_dir, "good", delta_bytes("good"))
    bad = _with_metadata(make_delta("bad"), **UNEMITTABLE[case])
    async with serving(engine, deltas_dir) as client:
        r = await client.put("/v1/tasks/bad", content=bad, headers=OCTET)
        assert_error(r, 422, "invalid_delta")
        assert not (deltas_dir / "bad.safetensors").exists()
        listing = await client.get("/v1/tasks")
        assert listing.status_code == 200 and [t["task"] for t in listing.json()["tasks"]] == ["good"]
    (deltas_dir / "bad.safetensors").write_bytes(bad)  # the same file dropped into the folder
    async with serving(engine, deltas_dir) as client:  # a restart skips it; listing still works
        listing = await client.get("/v1/tasks")
        assert listing.status_code == 200 and [t["task"] for t in listing.json()["tasks"]] == ["good"]


# Finding 11: duplicate JSON keys were silently last-wins; NFC and NFD labels were two labels.
@pytest.mark.parametrize("path, body", [
    ("/v1/tasks/good/predict", '{"inputs": ["a"], "inputs": ["b"]}'),
    ("/v1/predict", '{"items": [{"task": "good", "task": "other", "inputs": ["a"]}]}'),
    ("/tasks/good/predict", '{"inputs": "a", "inputs": "b"}'),
])
async def test_duplicate_keys_in_a_request_body_are_refused(path, body, engine, deltas_dir, delta_bytes):
    write_delta(deltas_dir, "good", delta_bytes("good"))
    async with serving(engine, deltas_dir) as client:
        r = await client.post(path, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code in (400, 422) and "duplicate key" in r.text, r.text


async def test_labels_equal_after_nfc_are_one_label(engine, deltas_dir, make_delta):
    bad = _with_metadata(make_delta("nfc"), labels=json.dumps(["caf\u00e9", "cafe\u0301"]))
    async with serving(engine, deltas_dir) as client:
        assert_error(await client.put("/v1/tasks/nfc", content=bad, headers=OCTET), 422, "invalid_delta", "NFC")
