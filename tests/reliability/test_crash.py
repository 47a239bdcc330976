"""Crash consistency (issue 7, point 4): kill -9 the server at random points during PUT (add),
PUT (replace), failed replace and DELETE, and during watched-folder ingest; after each restart every
task verifies: the served version is the sha256[:16] of the file on disk, the file is byte for byte
one complete version the client sent, and the task is in its last acknowledged state or the state
of the one operation in flight at the kill (old or new, never partial or missing). Temp files
left by a crash are never loaded. A failed replace keeps the old version serving.

The server is the ``bitfit-serve serve`` entry point, forked from a pre-imported zygote so that a
restart costs ~1-2 s instead of ~10 s of imports (see zygote.py).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from bitfit_serve import delta as delta_io
from tests.reliability.live import LiveServer

OCTET = {"Content-Type": "application/octet-stream"}
TASKS = [f"t{i}" for i in range(5)]
VERSIONS = 3


@pytest.fixture(scope="module")
def pool(delta_bytes) -> dict[str, dict[str, bytes]]:
    """task -> version -> file bytes."""
    return {t: {delta_io.sha256_bytes(b)[:16]: b for b in (delta_bytes(t, seed=s) for s in range(VERSIONS))}
            for t in TASKS}


@dataclass
class Ledger:
    """What the client knows: each task's acknowledged state (a version, or None = absent) and the
    one operation in flight, if any: (task, state it would leave)."""

    acked: dict[str, str | None]
    in_flight: tuple[str, str | None] | None = None
    ops: int = 0
    failed_replaces: int = 0
    violations: list[str] = field(default_factory=list)


def verify(server: LiveServer, deltas: Path, pool, ledger: Ledger, cycle: int) -> None:
    """After a restart: every task is in an allowed state and its file verifies."""
    served = {t["task"]: t for t in httpx.get(f"{server.url}/v1/tasks", timeout=30).json()["tasks"]}
    if set(served) - set(TASKS):
        ledger.violations.append(f"cycle {cycle}: unexpected tasks served {sorted(set(served) - set(TASKS))}")
    for task in TASKS:
        info = served.get(task)
        state = info["version"] if info else None
        allowed = {ledger.acked[task]}
        if ledger.in_flight and ledger.in_flight[0] == task:
            allowed.add(ledger.in_flight[1])
        if state not in allowed:
            ledger.violations.append(f"cycle {cycle}: {task} serves {state}, allowed {allowed}")
        path = deltas / f"{task}.safetensors"
        if info is None:
            if path.exists():
                ledger.violations.append(f"cycle {cycle}: {task} has a file but is not served")
        else:
            data = path.read_bytes() if path.exists() else b""
            sha = delta_io.sha256_bytes(data)
            if not (sha == info["sha256"] and sha[:16] == info["version"] and pool[task].get(state) == data):
                ledger.violations.append(f"cycle {cycle}: {task} file does not verify against {state}")
        ledger.acked[task] = state
    ledger.in_flight = None


def operate(url: str, pool, ledger: Ledger, rng: random.Random, stop: threading.Event) -> None:
    """Random add / replace / failed replace / delete, one at a time, until the server dies."""
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set():
            task = rng.choice(TASKS)
            current = ledger.acked[task]
            kind = rng.choice(["put", "put", "bad", "delete"]) if current else "put"
            try:
                if kind == "put":
                    version = rng.choice(list(pool[task]))
                    ledger.in_flight = (task, version)
                    r = client.put(f"/v1/tasks/{task}", content=pool[task][version], headers=OCTET)
                    assert r.status_code in (200, 201), r.text
                    ledger.acked[task] = version
                elif kind == "delete":
                    ledger.in_flight = (task, None)
                    r = client.delete(f"/v1/tasks/{task}")
                    assert r.status_code == 200, r.text
                    ledger.acked[task] = None
                else:  # a replace that fails validation: the old version keeps serving
                    good = pool[task][current]
                    r = client.put(f"/v1/tasks/{task}", content=good[: rng.randrange(8, len(good))], headers=OCTET)
                    assert r.status_code == 422, r.text
                    if client.get(f"/v1/tasks/{task}").json()["version"] != current:
                        ledger.violations.append(f"failed replace of {task} changed its version")
                    ledger.failed_replaces += 1
                ledger.in_flight = None
                ledger.ops += 1
            except httpx.HTTPError:
                return  # killed: the operation stays in flight


def test_kill_9_during_put_replace_delete(tiny_bert_dir, tmp_path, pool, zygote, scale, record_property):
    deltas = tmp_path / "deltas"
    kills = scale(ci=4, full=100)
    rng = random.Random(0)
    ledger = Ledger(acked={t: None for t in TASKS})
    server = LiveServer(tiny_bert_dir, deltas, tmp_path / "server.log", zygote=zygote)
    killed_in_flight = 0
    for cycle in range(kills):
        server.start()
        verify(server, deltas, pool, ledger, cycle)
        stop = threading.Event()
        worker = threading.Thread(target=operate, args=(server.url, pool, ledger, rng, stop))
        worker.start()
        time.sleep(rng.uniform(0.05, 0.8))
        server.kill()
        stop.set()
        worker.join(30)
        killed_in_flight += ledger.in_flight is not None
    server.start()
    verify(server, deltas, pool, ledger, kills)
    server.kill()
    temp_left = sorted(p.name for p in deltas.iterdir() if not p.name.endswith(".safetensors"))
    summary = {"kills": kills, "killed_mid_operation": killed_in_flight, "operations_acked": ledger.ops,
               "failed_replaces": ledger.failed_replaces, "violations": len(ledger.violations),
               "temp_files_left_never_loaded": len(temp_left)}
    record_property("crash_http", summary)
    print(f"\nkill -9 during PUT/replace/DELETE: {summary}")
    assert not ledger.violations, "\n".join(ledger.violations[:20])
    assert ledger.ops > kills  # the kills landed among real work


def test_kill_9_during_watched_folder_ingest(tiny_bert_dir, tmp_path, pool, zygote, scale, record_property):
    deltas = tmp_path / "deltas"
    deltas.mkdir()
    kills = scale(ci=3, full=20)
    rng = random.Random(1)
    server = LiveServer(tiny_bert_dir, deltas, tmp_path / "server.log", zygote=zygote)
    violations = []
    for cycle in range(kills + 1):
        server.start()
        # After the restart the folder is the truth: every file in it is served and verifies.
        served = {t["task"]: t for t in httpx.get(f"{server.url}/v1/tasks", timeout=30).json()["tasks"]}
        on_disk = {p.stem: p.read_bytes() for p in deltas.glob("*.safetensors")}
        if set(served) != set(on_disk):
            violations.append(f"cycle {cycle}: served {sorted(served)} vs files {sorted(on_disk)}")
        for task, data in on_disk.items():
            if task in served and served[task]["sha256"] != delta_io.sha256_bytes(data):
                violations.append(f"cycle {cycle}: {task} serves {served[task]['version']}, file differs")
        if cycle == kills:
            break
        # A writer renames new versions into place (and dies mid-write now and then, leaving temp
        # files that must never load), removes some; the server is killed while ingesting.
        for _ in range(rng.randrange(1, 6)):
            task = rng.choice(TASKS)
            if rng.random() < 0.2:
                (deltas / f"{task}.safetensors").unlink(missing_ok=True)
            else:
                delta_io.atomic_write(deltas / f"{task}.safetensors", rng.choice(list(pool[task].values())))
            if rng.random() < 0.3:
                half = rng.choice(list(pool[task].values()))
                (deltas / f".tmp-{cycle}-{task}.part").write_bytes(half[: len(half) // 2])
        time.sleep(rng.uniform(0.0, 1.2))  # the watcher debounces 500 ms: kills land before, during, after
        server.kill()
    server.kill()
    summary = {"kills": kills, "violations": len(violations),
               "temp_files_never_loaded": len(list(deltas.glob(".tmp-*")))}
    record_property("crash_watch", summary)
    print(f"\nkill -9 during watched-folder ingest: {summary}")
    assert not violations, "\n".join(violations)
