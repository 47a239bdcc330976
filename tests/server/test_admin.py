"""Admin routes: hot add, replace (also under traffic), delete, the URL-name rule, auth."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from bitfit_serve import delta as delta_io
from bitfit_serve.engine import Engine
from bitfit_serve.settings import Settings
from tests.factories import SENTENCES
from tests.server.conftest import assert_error, serving, write_delta

pytestmark = pytest.mark.anyio


def version_of(data: bytes) -> str:
    return delta_io.sha256_bytes(data)[:16]


async def test_hot_add_then_predict_and_persist(engine, deltas_dir, delta_bytes):
    data = delta_bytes("fresh", seed=1)
    async with serving(engine, deltas_dir) as client:
        assert_error(await client.post("/v1/tasks/fresh/predict", json={"inputs": ["x"]}), 404, "unknown_task")
        r = await client.put("/v1/tasks/fresh", content=data, headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        assert r.json()["version"] == version_of(data) and r.json()["replaced"] is None
        r = await client.post("/v1/tasks/fresh/predict", json={"inputs": SENTENCES[:2]})
        assert r.status_code == 200 and r.json()["version"] == version_of(data)
        info = (await client.get("/v1/tasks/fresh")).json()
        assert info["labels"] == ["label_0", "label_1"] and info["sha256"] == delta_io.sha256_bytes(data)
        assert [t["task"] for t in (await client.get("/v1/tasks")).json()["tasks"]] == ["fresh"]
    # Persisted byte for byte, nothing else left in the folder (no temp files).
    assert sorted(p.name for p in deltas_dir.iterdir()) == ["fresh.safetensors"]
    assert (deltas_dir / "fresh.safetensors").read_bytes() == data


async def test_restart_serves_the_same_set(tiny_bert_dir, deltas_dir, delta_bytes):
    async with serving(Engine.from_pretrained(tiny_bert_dir), deltas_dir) as client:
        await client.put("/v1/tasks/kept", content=delta_bytes("kept"))
        await client.put("/v1/tasks/gone", content=delta_bytes("gone"))
        await client.delete("/v1/tasks/gone")
    restarted = Engine.from_pretrained(tiny_bert_dir)
    async with serving(restarted, deltas_dir) as client:
        tasks = (await client.get("/v1/tasks")).json()["tasks"]
    assert [(t["task"], t["version"]) for t in tasks] == [("kept", version_of(delta_bytes("kept")))]


async def test_url_name_wins_and_the_stored_copy_is_renamed(engine, deltas_dir, delta_bytes):
    async with serving(engine, deltas_dir) as client:
        r = await client.put("/v1/tasks/sst2-copy", content=delta_bytes("sst2"))
        assert r.status_code == 201, r.text
        assert r.json()["task"] == "sst2-copy"
        r = await client.post("/v1/tasks/sst2-copy/predict", json={"inputs": ["x"]})
        assert r.status_code == 200
        assert_error(await client.get("/v1/tasks/sst2"), 404, "unknown_task")
    stored = (deltas_dir / "sst2-copy.safetensors").read_bytes()
    assert delta_io.parse(stored).delta.task == "sst2-copy"
    assert r.json()["version"] == version_of(stored)
    # The same upload again is the same version: the renamed copy is serialized the same each time.
    async with serving(engine, deltas_dir) as client:
        r = await client.put("/v1/tasks/sst2-copy", content=delta_bytes("sst2"))
        assert r.status_code == 200 and r.json()["version"] == r.json()["replaced"] == version_of(stored)


async def test_replace_then_delete(engine, deltas_dir, delta_bytes):
    old, new = delta_bytes("t", seed=1), delta_bytes("t", seed=2)
    async with serving(engine, deltas_dir) as client:
        await client.put("/v1/tasks/t", content=old)
        before = (await client.post("/v1/tasks/t/predict", json={"inputs": ["hello world"]})).json()
        r = await client.put("/v1/tasks/t", content=new)
        assert r.status_code == 200 and r.json()["replaced"] == version_of(old)
        after = (await client.post("/v1/tasks/t/predict", json={"inputs": ["hello world"]})).json()
        assert (before["version"], after["version"]) == (version_of(old), version_of(new))
        assert before["predictions"] != after["predictions"]
        assert (deltas_dir / "t.safetensors").read_bytes() == new

        r = await client.delete("/v1/tasks/t")
        assert r.status_code == 200 and r.json() == {"task": "t", "version": version_of(new), "removed": True}
        assert_error(await client.post("/v1/tasks/t/predict", json={"inputs": ["x"]}), 404, "unknown_task")
        assert_error(await client.get("/v1/tasks/t"), 404, "unknown_task")
        assert_error(await client.delete("/v1/tasks/t"), 404, "unknown_task")
        assert not (deltas_dir / "t.safetensors").exists()
    assert engine.tasks.rows_in_use == 0  # both rows freed


async def test_replace_under_concurrent_traffic(tiny_bert_dir, deltas_dir, delta_bytes):
    """No request fails, and every response's scores are those of the version it names."""
    versions = {version_of(delta_bytes("hot", seed=s)): delta_bytes("hot", seed=s) for s in (11, 12)}
    reference = Engine.from_pretrained(tiny_bert_dir)
    expected = {}
    for version, data in versions.items():
        reference.add_task(data)
        expected[version] = [p.scores for p in reference.predict([("hot", s) for s in SENTENCES])]
    engine = Engine.from_pretrained(tiny_bert_dir)
    write_delta(deltas_dir, "other", delta_bytes("other"))
    cycle = itertools.cycle(versions.values())
    write_delta(deltas_dir, "hot", next(cycle))

    async with serving(engine, deltas_dir, max_batch_requests=8) as client:
        done = asyncio.Event()

        async def traffic() -> list:
            seen = []
            while not done.is_set():
                k = len(seen) % len(SENTENCES)
                inputs = SENTENCES[k:] + SENTENCES[:k]
                items = [{"task": "other", "inputs": inputs[:2]}, {"task": "hot", "inputs": inputs}]
                r = await client.post("/v1/predict", json={"items": items})
                assert r.status_code == 200, r.text
                seen.append((k, r.json()["results"][1]))
            return seen

        async def replace() -> int:
            for _ in range(12):
                r = await client.put("/v1/tasks/hot", content=next(cycle))
                assert r.status_code == 200, r.text
                await asyncio.sleep(0.01)
            done.set()
            return 12

        *seen_lists, _ = await asyncio.gather(*(traffic() for _ in range(4)), replace())
    seen = [x for s in seen_lists for x in s]
    assert len(seen) >= 12
    assert {result["version"] for _, result in seen} == set(versions)  # both versions served
    for k, result in seen:
        want = expected[result["version"]][k:] + expected[result["version"]][:k]
        for got, exp in zip(result["predictions"], want):
            assert got["scores"] == pytest.approx(exp, abs=1e-5)
    assert engine.tasks.rows_in_use == 2  # the replaced rows were freed once idle


@pytest.mark.parametrize("method", ["put", "delete"])
async def test_admin_routes_need_the_token(engine, deltas_dir, delta_bytes, method):
    data = delta_bytes("secret")
    async with serving(engine, deltas_dir, admin_token="s3cret") as client:
        call = getattr(client, method)
        kw = {"content": data} if method == "put" else {}
        r = await call("/v1/tasks/secret", **kw)
        assert_error(r, 401, "unauthorized", "Bearer")
        assert r.headers["www-authenticate"] == "Bearer"
        assert_error(await call("/v1/tasks/secret", headers={"Authorization": "Basic s3cret"}, **kw), 401,
                     "unauthorized")
        assert_error(await call("/v1/tasks/secret", headers={"Authorization": "Bearer wrong"}, **kw), 403,
                     "forbidden")
        # The name is checked first of all, even before the token.
        assert_error(await call("/v1/tasks/.secret", **kw), 400, "invalid_input", "task name")
        if method == "delete":
            await client.put("/v1/tasks/secret", content=data, headers={"Authorization": "Bearer s3cret"})
        r = await call("/v1/tasks/secret", headers={"Authorization": "Bearer s3cret"}, **kw)
        assert r.status_code in (200, 201), r.text
        # Inference stays open.
        assert (await client.get("/v1/tasks")).status_code == 200


async def test_a_name_with_a_trailing_newline_is_refused(engine, deltas_dir, delta_bytes):
    """``$`` also matches before a final newline: the name is matched whole, so 'nl\\n' is not a task."""
    async with serving(engine, deltas_dir) as client:
        r = await client.put("/v1/tasks/nl%0A", content=delta_bytes("nl"))
        assert_error(r, 400, "invalid_input", "task name")
    assert not deltas_dir.exists() or list(deltas_dir.iterdir()) == []


def test_open_admin_routes_only_on_loopback_unless_told(tmp_path):
    with pytest.raises(ValueError, match="admin token"):
        Settings(host="0.0.0.0")
    Settings(host="0.0.0.0", admin_token="t")
    Settings(host="0.0.0.0", allow_insecure_admin=True)
    Settings(host="::1")
    Settings(host="localhost")
    with pytest.raises(ValueError, match="empty"):
        Settings(admin_token=" ")
    with pytest.raises(ValueError, match="max_queue"):
        Settings(max_queue=0)
