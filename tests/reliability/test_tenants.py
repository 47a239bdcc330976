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


# Finding 6: values that parse but overflow were served as 200 with null scores.
@pytest.mark.parametrize("change", ["head", "layernorm"])
async def test_a_delta_with_non_finite_outputs_is_refused_at_upload(change, engine, deltas_dir, make_delta):
    d = make_delta("nan")
    if change == "head":
        d = d.replace(head_weight=d.head_weight.clone().fill_(3e38))
    else:
        name = next(n for n in d.sites if n.endswith("output.LayerNorm.bias"))
        d = d.replace(sites={**d.sites, name: d.sites[name].clone().fill_(1e30)})
    from bitfit_serve import delta as delta_io

    async with serving(engine, deltas_dir) as client:
        r = await client.put("/v1/tasks/nan", content=delta_io.to_bytes(d), headers=OCTET)
        assert_error(r, 422, "invalid_delta", "non-finite outputs")
        assert not (deltas_dir / "nan.safetensors").exists() and "nan" not in engine.tasks
    assert engine.tasks.rows_in_use == 0  # the probed row was given back


async def test_a_non_finite_output_at_serving_time_fails_that_sequence_only(engine, deltas_dir, delta_bytes,
                                                                          monkeypatch):
    """Two requests sent together (usually one forward): the one whose task answers NaN gets its
    own error code, the other its predictions (the probe at upload passed; the NaN appears only
    for some inputs). The batcher accounts each sequence's output on its own."""
    import asyncio

    import torch

    write_delta(deltas_dir, "good", delta_bytes("good"))
    write_delta(deltas_dir, "bad", delta_bytes("bad"))
    forward = engine.forward

    def nan_for_bad(batch):
        logits = forward(batch).clone()
        bad_row = engine.tasks.get("bad").row
        logits[torch.as_tensor(batch.rows).reshape(-1).cpu() == bad_row] = float("nan")
        return logits

    async with serving(engine, deltas_dir) as client:
        monkeypatch.setattr(engine, "forward", nan_for_bad)
        good, bad = await asyncio.gather(
            client.post("/v1/tasks/good/predict", json={"inputs": ["a", "b"]}),
            client.post("/v1/tasks/bad/predict", json={"inputs": ["a"]}))
        assert good.status_code == 200 and all(p["score"] is not None for p in good.json()["predictions"])
        assert_error(bad, 500, "non_finite_output", "'bad'")


# Finding 7: DELETE answered 500 yet removed the task when its file had become a directory.
async def test_delete_and_put_over_a_directory_change_nothing(engine, deltas_dir, delta_bytes):
    write_delta(deltas_dir, "t", delta_bytes("t"))
    async with serving(engine, deltas_dir) as client:
        version = engine.tasks.get("t").version
        (deltas_dir / "t.safetensors").unlink()
        (deltas_dir / "t.safetensors").mkdir()
        assert_error(await client.delete("/v1/tasks/t"), 409, "conflict", "not a regular file")
        assert engine.tasks.get("t").version == version  # still served
        r = await client.put("/v1/tasks/t", content=delta_bytes("t", seed=1), headers=OCTET)
        assert_error(r, 409, "conflict")
        assert engine.tasks.get("t").version == version and (deltas_dir / "t.safetensors").is_dir()
