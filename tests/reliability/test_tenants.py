"""Issue 19 (one tenant's delta, file or request must not hurt the others): the findings fixed so
far, each reproduced as a hostile tenant would send it. Finding numbers refer to the issue."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import save as st_save

from tests.server.conftest import assert_error, hold_forwards, serving, write_delta

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


# Finding 1: one valid upload with 10,000 labels made every task's head row 10,000 wide, and
# stayed after its delete. Budgets refuse what is past them; a wide head pays for itself.
def _wide(make_delta, task: str, labels: int, label_chars: int = 8):
    d = make_delta(task, num_labels=labels)
    return d.replace(labels=tuple(f"{i:0{label_chars}d}" for i in range(labels)))


@pytest.mark.parametrize("setting, build, needle", [
    ("max_labels_per_task", lambda md: _wide(md, "over", 40), "40 labels exceed max_labels_per_task=32"),
    ("max_label_chars", lambda md: _wide(md, "over", 2, label_chars=200), "max_label_chars=128"),
    ("max_metadata_bytes", lambda md: md("over").replace(train_args={"notes": "x" * 20_000}),
     "max_metadata_bytes=16384"),
])
async def test_a_delta_past_a_budget_is_refused_and_nothing_changes(setting, build, needle, engine, deltas_dir,
                                                                   make_delta, delta_bytes):
    from bitfit_serve import delta as delta_io

    write_delta(deltas_dir, "good", delta_bytes("good"))
    async with serving(engine, deltas_dir, max_labels_per_task=32) as client:
        before = engine.tasks.bank_bytes
        r = await client.put("/v1/tasks/over", content=delta_io.to_bytes(build(make_delta)), headers=OCTET)
        assert_error(r, 413, "limit_exceeded", needle, setting)
        assert not (deltas_dir / "over.safetensors").exists() and "over" not in engine.tasks
        assert engine.tasks.bank_bytes == before and engine.tasks.rows_in_use == 1


async def test_resident_tasks_and_bank_bytes_have_budgets(engine, deltas_dir, delta_bytes):
    async with serving(engine, deltas_dir, max_tasks=2) as client:
        for task in ("a", "b"):
            assert (await client.put(f"/v1/tasks/{task}", content=delta_bytes(task), headers=OCTET)).status_code == 201
        assert_error(await client.put("/v1/tasks/c", content=delta_bytes("c"), headers=OCTET),
                     413, "limit_exceeded", "max_tasks=2")
        # a replace is not one more task
        assert (await client.put("/v1/tasks/a", content=delta_bytes("a", seed=1), headers=OCTET)).status_code == 200
    (deltas_dir / "c.safetensors").write_bytes(delta_bytes("c"))  # the folder is held to it too
    async with serving(engine, deltas_dir, max_tasks=2) as client:
        assert "c" not in engine.tasks and "max_tasks" in engine.tasks.rejected["c"]
    budget = engine.tasks.bank_bytes  # no room for the banks to grow past what they hold now
    async with serving(engine, deltas_dir, max_bank_bytes=budget, max_tasks=100) as client:
        for i in range(8):  # fills the free rows, then the banks would have to grow
            r = await client.put(f"/v1/tasks/t{i}", content=delta_bytes(f"t{i}"), headers=OCTET)
            if r.status_code != 201:
                assert_error(r, 413, "limit_exceeded", f"max_bank_bytes={budget}")
                break
        else:
            raise AssertionError("the bank budget never refused an upload")
        assert engine.tasks.bank_bytes <= budget


async def test_a_wide_head_costs_the_others_nothing_and_leaves_no_trace(engine, deltas_dir, make_delta,
                                                                       delta_bytes):
    from bitfit_serve import delta as delta_io

    write_delta(deltas_dir, "sst", delta_bytes("sst"))
    write_delta(deltas_dir, "cola", delta_bytes("cola", seed=3))
    mixed = {"items": [{"task": "sst", "inputs": ["a good film", "bad"]}, {"task": "cola", "inputs": ["x y z"]}]}
    async with serving(engine, deltas_dir) as client:
        before_bytes, per_task = engine.tasks.bank_bytes, engine.tasks.bank_bytes_of(engine.tasks.get("sst"))
        before = (await client.post("/v1/predict", json=mixed)).json()
        wide = _wide(make_delta, "wide", 1000)
        assert (await client.put("/v1/tasks/wide", content=delta_io.to_bytes(wide), headers=OCTET)).status_code == 201
        assert engine.tasks.bank_bytes_of(engine.tasks.get("sst")) == per_task  # nothing per row for others
        assert engine.tasks.bank_bytes - before_bytes <= 2 * engine.tasks.bank_bytes_of(engine.tasks.get("wide"))
        assert (await client.post("/v1/predict", json=mixed)).json() == before  # same answers, same width
        one = (await client.post("/v1/predict", json={"items": [*mixed["items"], {"task": "wide", "inputs": ["q"]}]}))
        assert one.status_code == 200 and one.json()["results"][:2] == before["results"]
        assert (await client.delete("/v1/tasks/wide")).status_code == 200
        assert engine.tasks.bank_bytes == before_bytes


# Finding 2: a pair task with max_length=2 was accepted and then not truncated at all; a
# sequence past the positions failed every request in its forward.
async def test_a_max_length_that_cannot_truncate_is_refused(engine, deltas_dir, make_delta):
    from bitfit_serve import delta as delta_io

    async with serving(engine, deltas_dir) as client:
        for max_length, inputs in ((2, ("premise", "hypothesis")), (4, ("premise", "hypothesis")), (2, ("text",))):
            d = make_delta("short", max_length=max_length, inputs=inputs)
            r = await client.put("/v1/tasks/short", content=delta_io.to_bytes(d), headers=OCTET)
            assert_error(r, 422, "invalid_delta", "max_length", "too short")
        d = make_delta("pair5", max_length=5, inputs=("premise", "hypothesis"))  # [CLS] a [SEP] b [SEP]
        assert (await client.put("/v1/tasks/pair5", content=delta_io.to_bytes(d), headers=OCTET)).status_code == 201
        r = await client.post("/v1/tasks/pair5/predict", json={"inputs": [["word " * 1500, "word " * 1500]]})
        assert r.status_code == 200 and r.json()["predictions"][0]["truncated"] is True


async def test_a_sequence_that_fails_the_forward_fails_its_own_request_only(engine, deltas_dir, delta_bytes,
                                                                          monkeypatch):
    """A forward that raises is retried in halves: the request of the sequence that breaks it
    fails, the others sent into the same forward are answered."""
    import asyncio

    write_delta(deltas_dir, "good", delta_bytes("good"))
    write_delta(deltas_dir, "evil", delta_bytes("evil"))
    forward, sizes = engine.forward, []

    def fails_with_evil(batch):
        sizes.append(len(batch.row_list))
        if engine.tasks.get("evil").row in batch.row_list:
            raise IndexError("index out of range in self")  # what a position past the table raised
        return forward(batch)

    async with serving(engine, deltas_dir) as client:
        entered, release = hold_forwards(engine, monkeypatch)
        first = asyncio.create_task(client.post("/v1/tasks/good/predict", json={"inputs": ["warm"]}))
        await asyncio.to_thread(entered.wait, 5)  # the worker is busy: the next requests share a forward
        monkeypatch.setattr(engine, "forward", fails_with_evil)
        good = asyncio.create_task(client.post("/v1/tasks/good/predict", json={"inputs": ["a", "b", "c"]}))
        evil = asyncio.create_task(client.post("/v1/tasks/evil/predict", json={"inputs": ["a"]}))
        await asyncio.sleep(0.3)
        release.set()
        assert (await first).status_code == 200
        good, evil = await good, await evil
        assert good.status_code == 200 and len(good.json()["predictions"]) == 3
        assert evil.status_code == 500
        assert sizes[0] == 4  # the four sequences were one forward first


# Finding 4: a tiny request could ask for a 369 MB answer.
async def test_the_answer_size_is_bounded_and_wide_scores_are_asked_for(engine, deltas_dir, make_delta):
    from bitfit_serve import delta as delta_io

    wide = _wide(make_delta, "wide", 1000, label_chars=100)
    async with serving(engine, deltas_dir) as client:
        assert (await client.put("/v1/tasks/wide", content=delta_io.to_bytes(wide), headers=OCTET)).status_code == 201
        r = await client.post("/v1/tasks/wide/predict", json={"inputs": ["x"] * 256, "scores": True})
        assert_error(r, 413, "payload_too_large", "max_response_bytes", "scores=false")
        r = await client.post("/v1/tasks/wide/predict", json={"inputs": ["x"] * 256})  # no scores by default
        assert r.status_code == 200 and "scores" not in r.json()["predictions"][0] and len(r.content) < 200_000
        r = await client.post("/v1/tasks/wide/predict", json={"inputs": ["x"], "scores": True})
        assert r.status_code == 200 and len(r.json()["predictions"][0]["scores"]) == 1000
        r = await client.post("/embed_all", json={"inputs": "x"})  # a face: always every score, so bounded too
        r = await client.post("/v1/classify", json={"model": "wide", "input": ["x"] * 256})
        assert_error(r, 413, "payload_too_large", "max_response_bytes")


# Finding 10: listing answered 18 MB at once; metadata had no bound.
async def test_the_task_listing_is_paged(engine, deltas_dir, delta_bytes):
    for i in range(5):
        write_delta(deltas_dir, f"t{i}", delta_bytes(f"t{i}"))
    async with serving(engine, deltas_dir) as client:
        names, after = [], None
        while True:
            r = await client.get("/v1/tasks", params={"limit": 2, **({"after": after} if after else {})})
            assert r.status_code == 200 and len(r.json()["tasks"]) <= 2
            names += [t["task"] for t in r.json()["tasks"]]
            after = r.json()["next"]
            if after is None:
                break
        assert names == [f"t{i}" for i in range(5)]
        assert_error(await client.get("/v1/tasks", params={"limit": 0}), 400, "invalid_input", "limit")
        assert (await client.get("/v1/tasks")).json()["next"] is None


# Finding 9: one request of 256 long texts held the worker 23.5 s; a one-text request behind it waited.
async def test_a_long_request_is_bounded_and_does_not_hold_up_a_short_one(engine, deltas_dir, delta_bytes,
                                                                        monkeypatch):
    import asyncio
    import time

    write_delta(deltas_dir, "t", delta_bytes("t"))
    forward = engine.forward

    def slow_forward(batch):  # every forward costs 50 ms, as if the model were big
        time.sleep(0.05)
        return forward(batch)

    async with serving(engine, deltas_dir, max_batch_tokens=256, max_tokens_per_request=10_000) as client:
        r = await client.post("/v1/tasks/t/predict", json={"inputs": ["word " * 60] * 256})
        assert_error(r, 413, "payload_too_large", "max_tokens_per_request=10000")
        monkeypatch.setattr(engine, "forward", slow_forward)
        long = asyncio.create_task(client.post("/v1/tasks/t/predict", json={"inputs": ["word " * 60] * 150}))
        await asyncio.sleep(0.3)  # the long request is being served: ~38 forwards of 4 sequences
        start = time.perf_counter()
        short = await client.post("/v1/tasks/t/predict", json={"inputs": ["hi"]})
        waited = time.perf_counter() - start
        assert short.status_code == 200 and not long.done()
        assert waited < 0.5, waited  # about one forward, not the rest of the long request (~2 s)
        assert (await long).status_code == 200
