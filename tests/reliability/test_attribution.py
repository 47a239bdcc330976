"""Version attribution under change (issue 7, point 5).

Many clients send predict requests (single-task and mixed) over many tasks to a live server while
every task is replaced again and again and some are deleted and re-added. A checker verifies every
response against outputs precomputed per version on a separate engine (``engine.predict``): the
stated version belongs to the requested task and was current at some moment during the request,
and the scores are that version's. 404s are allowed only while the task may have been deleted.
32 concurrent PUTs to one task leave exactly one current version, the same on disk and in memory.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass

import httpx
import pytest

from bitfit_serve import delta as delta_io
from bitfit_serve.engine import Engine
from tests.factories import SENTENCES
from tests.reliability.conftest import FULL
from tests.reliability.live import LiveServer
from tests.server.conftest import serving, write_delta

OCTET = {"Content-Type": "application/octet-stream"}
VERSIONS = 3
TEXTS = SENTENCES[:4]
ATOL = 1e-4  # batch composition changes padding; outputs agree far closer than any two versions


@dataclass(frozen=True)
class Event:
    task: str
    sent: float
    acked: float
    version: str | None  # None: deleted


@dataclass(frozen=True)
class Answer:
    task: str
    text: str
    start: float
    end: float
    status: int
    version: str | None = None
    scores: dict | None = None
    others: tuple[str, ...] = ()  # the other tasks of a mixed request (any of them may cause its 404)


def expected_outputs(tiny_bert_dir, pool) -> dict[tuple[str, str, str], dict[str, float]]:
    """(task, version, text) -> scores, computed on a separate engine, one version at a time."""
    ref = Engine.from_pretrained(tiny_bert_dir)
    out = {}
    for task, versions in pool.items():
        for version, data in versions.items():
            ref.add_task(data)
            for text, p in zip(TEXTS, ref.predict([(task, t) for t in TEXTS])):
                out[task, version, text] = p.scores
    return out


def current_during(events: list[Event], start: float, end: float) -> set[str | None]:
    """States (version, or None = absent) a task may have had at some moment in [start, end].
    A change counts from when it was sent (it may apply at once) until its successor was acked."""
    states = set()
    for i, e in enumerate(events):
        following = events[i + 1] if i + 1 < len(events) else None
        if e.sent <= end and (following is None or following.acked >= start):
            states.add(e.version)
    return states


def check(answers: list[Answer], events: dict[str, list[Event]], expected, pool) -> dict[str, int]:
    owner = {v: t for t, versions in pool.items() for v in versions}
    counts = {"ok": 0, "deleted_404": 0, "wrong_task": 0, "not_current": 0, "wrong_scores": 0, "bad_status": 0}
    for a in answers:
        possible = current_during(events[a.task], a.start, a.end)
        if a.status == 404 and any(None in current_during(events[t], a.start, a.end) for t in (a.task, *a.others)):
            counts["deleted_404"] += 1
        elif a.status != 200:
            counts["bad_status"] += 1
        elif owner.get(a.version) != a.task:
            counts["wrong_task"] += 1  # computed with another task's delta (or an unknown one)
        elif a.version not in possible:
            counts["not_current"] += 1
        elif any(not math.isclose(a.scores[k], v, abs_tol=ATOL) for k, v in expected[a.task, a.version, a.text].items()):
            counts["wrong_scores"] += 1
        else:
            counts["ok"] += 1
    return counts


async def load(url: str, tasks: list[str], stop: asyncio.Event, answers: list[Answer], calls: list[float],
               concurrency: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                if rng.random() < 0.8:
                    task, text = rng.choice(tasks), rng.choice(TEXTS)
                    start = time.monotonic()
                    r = await client.post(f"/v1/tasks/{task}/predict", json={"inputs": [text]})
                    end = time.monotonic()
                    calls.append(end)
                    body = r.json()
                    answers.append(Answer(task, text, start, end, r.status_code, body.get("version"),
                                          body["predictions"][0].get("scores") if r.status_code == 200 else None))
                else:  # mixed: several tasks in one call, each item checked on its own
                    items = [(rng.choice(tasks), rng.choice(TEXTS)) for _ in range(rng.randrange(2, 5))]
                    start = time.monotonic()
                    r = await client.post("/v1/predict", json={"items": [{"task": t, "inputs": [x]} for t, x in items]})
                    end = time.monotonic()
                    calls.append(end)
                    if r.status_code == 200:
                        for (task, text), res in zip(items, r.json()["results"]):
                            answers.append(Answer(task, text, start, end, 200, res["version"],
                                                  res["predictions"][0]["scores"]))
                    else:  # a whole mixed request fails if any task is missing: one answer per item
                        for task, text in items:
                            answers.append(Answer(task, text, start, end, r.status_code,
                                                  others=tuple(t for t, _ in items)))

        await asyncio.gather(*(worker(i) for i in range(concurrency)))


async def change(url: str, pool, events: dict[str, list[Event]], replaces: int, rng: random.Random) -> dict:
    """Replace every task at least ``replaces`` times (round robin) and delete + re-add some on the
    way (a re-add does not count as a replace)."""
    stats = {"replaces": 0, "deletes": 0}
    done = {task: 0 for task in pool}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        while min(done.values()) < replaces:
            for task in [t for t in pool if done[t] < replaces]:
                versions = list(pool[task])
                current = events[task][-1].version
                if current is not None and rng.random() < 0.05:
                    sent = time.monotonic()
                    r = await client.delete(f"/v1/tasks/{task}")
                    assert r.status_code == 200, r.text
                    events[task].append(Event(task, sent, time.monotonic(), None))
                    stats["deletes"] += 1
                    continue
                version = versions[(versions.index(current) + 1) % len(versions)] if current else versions[0]
                sent = time.monotonic()
                r = await client.put(f"/v1/tasks/{task}", content=pool[task][version], headers=OCTET)
                assert r.status_code in (200, 201), r.text
                assert r.json()["version"] == version
                events[task].append(Event(task, sent, time.monotonic(), version))
                if current is not None:
                    done[task] += 1
                    stats["replaces"] += 1
                else:
                    stats["re_adds"] = stats.get("re_adds", 0) + 1
            await asyncio.sleep(0)
    return stats


@pytest.mark.anyio
async def test_attribution_under_replace_and_delete(tiny_bert_dir, tmp_path, delta_bytes, zygote, scale,
                                                    record_property):
    n_tasks, replaces = scale(ci=10, full=50), scale(ci=4, full=50)
    tasks = [f"task{i:02d}" for i in range(n_tasks)]
    pool = {t: {delta_io.sha256_bytes(b)[:16]: b for b in (delta_bytes(t, seed=s) for s in range(VERSIONS))}
            for t in tasks}
    expected = expected_outputs(tiny_bert_dir, pool)
    deltas = tmp_path / "deltas"
    events: dict[str, list[Event]] = {}
    for t in tasks:
        version, data = next(iter(pool[t].items()))
        write_delta(deltas, t, data)
        events[t] = [Event(t, -math.inf, -math.inf, version)]
    answers: list[Answer] = []
    server = LiveServer(tiny_bert_dir, deltas, tmp_path / "server.log", zygote=zygote, args=("--no-watch",))
    with server:
        stop = asyncio.Event()
        calls: list[float] = []
        loader = asyncio.create_task(load(server.url, tasks, stop, answers, calls, concurrency=16))
        await asyncio.sleep(0.5)
        start, before = time.monotonic(), len(calls)
        changes = await change(server.url, pool, events, replaces, random.Random(0))
        elapsed, during = time.monotonic() - start, len(calls) - before
        stop.set()
        await loader
        assert server.alive
    counts = check(answers, events, expected, pool)
    summary = {"tasks": n_tasks, "replaces_per_task": replaces, **changes, "requests": len(calls),
               "answers": len(answers), "requests_per_s_during_changes": round(during / elapsed, 1), "seconds": round(elapsed, 1), **counts}
    record_property("attribution", summary)
    print(f"\nattribution: {summary}")
    violations = counts["wrong_task"] + counts["not_current"] + counts["wrong_scores"] + counts["bad_status"]
    assert violations == 0, summary
    assert counts["ok"] > len(answers) / 2
    if FULL:
        assert summary["requests_per_s_during_changes"] >= 200, summary


def _concurrent_puts_summary(served: dict, files: list, sent_versions: set[str], data_on_disk: bytes) -> None:
    assert served["version"] in sent_versions
    assert delta_io.sha256_bytes(data_on_disk) == served["sha256"]
    assert files == ["race.safetensors"]


def test_32_concurrent_puts_live(tiny_bert_dir, tmp_path, delta_bytes, zygote):
    deltas = tmp_path / "deltas"
    bodies = [delta_bytes("race", seed=100 + i) for i in range(32)]
    sent = {delta_io.sha256_bytes(b)[:16] for b in bodies}
    # all 32 at once: past the default --max-concurrent-uploads (4) they would be 503 busy
    with LiveServer(tiny_bert_dir, deltas, tmp_path / "server.log", args=("--max-concurrent-uploads", "32"),
                    zygote=zygote) as server:
        async def race():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                return await asyncio.gather(*(client.put("/v1/tasks/race", content=b, headers=OCTET) for b in bodies))

        responses = asyncio.run(race())
        assert sorted(r.status_code for r in responses) == [200] * 31 + [201]  # one add, 31 replaces
        tasks = httpx.get(f"{server.url}/v1/tasks").json()["tasks"]
        assert [t["task"] for t in tasks] == ["race"]
        _concurrent_puts_summary(tasks[0], sorted(p.name for p in deltas.iterdir()), sent,
                                 (deltas / "race.safetensors").read_bytes())
        # Each PUT replaced exactly the version current before it: the chain covers all 32.
        replaced = {r.json()["replaced"] for r in responses} - {None}
        assert len(replaced) == 31 and tasks[0]["version"] not in replaced


@pytest.mark.anyio
async def test_32_concurrent_puts_in_memory(engine, deltas_dir, delta_bytes):
    bodies = [delta_bytes("race", seed=100 + i) for i in range(32)]
    write_delta(deltas_dir, "other", delta_bytes("other"))
    async with serving(engine, deltas_dir, max_concurrent_uploads=32) as client:
        responses = await asyncio.gather(*(client.put("/v1/tasks/race", content=b, headers=OCTET) for b in bodies))
        assert all(r.status_code in (200, 201) for r in responses)
        served = (await client.get("/v1/tasks/race")).json()
        _concurrent_puts_summary(served, sorted(p.name for p in deltas_dir.iterdir() if p.stem == "race"),
                                 {delta_io.sha256_bytes(b)[:16] for b in bodies},
                                 (deltas_dir / "race.safetensors").read_bytes())
    assert sorted(engine.tasks._registry._current) == ["other", "race"]
    assert engine.tasks.rows_in_use == 2  # 30 replaced rows freed, none leaked


def test_checker_catches_wrong_version_task_and_scores():
    """The checker itself: each kind of violation is counted, a correct answer is not."""
    pool = {"a": {"va1": b"", "va2": b""}, "b": {"vb1": b""}}
    expected = {("a", "va1", "x"): {"l": 0.25}, ("a", "va2", "x"): {"l": 0.75}, ("b", "vb1", "x"): {"l": 0.5}}
    events = {"a": [Event("a", -math.inf, -math.inf, "va1"), Event("a", 10.0, 11.0, "va2"),
                    Event("a", 20.0, 21.0, None)], "b": [Event("b", -math.inf, -math.inf, "vb1")]}
    answers = [Answer("a", "x", 1, 2, 200, "va1", {"l": 0.25}),  # ok
               Answer("a", "x", 10.5, 10.6, 200, "va1", {"l": 0.25}),  # ok: the swap may not have applied yet
               Answer("a", "x", 12, 13, 200, "va1", {"l": 0.25}),  # not current: va2 was acked at 11
               Answer("a", "x", 1, 2, 200, "vb1", {"l": 0.5}),  # another task's delta
               Answer("a", "x", 12, 13, 200, "va2", {"l": 0.25}),  # va2's version with va1's scores
               Answer("a", "x", 22, 23, 404),  # deleted: fine
               Answer("b", "x", 22, 23, 404),  # b was never deleted
               Answer("b", "x", 22, 23, 404, others=("a",))]  # mixed request with a deleted task: fine
    assert check(answers, events, expected, pool) == {"ok": 2, "deleted_404": 2, "wrong_task": 1, "not_current": 1,
                                                      "wrong_scores": 1, "bad_status": 1}
