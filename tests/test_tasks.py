"""The task lifecycle room: install / remove / sync / load_all, one lock, the file parsed once."""

from __future__ import annotations

import pytest

from bitfit_serve import delta as delta_io
from bitfit_serve.errors import BaseModelMismatch, InvalidDelta, UnknownTask
from bitfit_serve.store import DeltaStore


@pytest.fixture
def tasks(engine, tmp_path):
    engine.tasks.use_store(DeltaStore(tmp_path / "deltas"))
    return engine.tasks


def test_a_hot_add_parses_and_checks_the_file_once(tasks, delta_bytes, monkeypatch):
    """Upload path: parse at the edge, then install: the bytes are parsed and checked once, and
    the stored file is the uploaded bytes (no re-serialization when the names agree)."""
    calls = {"parse": 0, "check_compatible": 0}
    for name in calls:
        original = getattr(delta_io, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(delta_io, name, counted)
    data = delta_bytes("a")
    installed = tasks.install("a", delta_io.parse(data, source="upload"))
    assert calls == {"parse": 1, "check_compatible": 1}
    assert installed.previous is None and installed.version.sha256 == delta_io.sha256_bytes(data)
    assert tasks.store.read("a") == data
    assert tasks.sync("a") == "unchanged" and calls["parse"] == 1  # the watcher's echo: hash only


def test_install_renames_replaces_and_remove_deletes(tasks, delta_bytes):
    first = tasks.install("b", delta_io.parse(delta_bytes("a")))  # metadata says "a", the name wins
    assert first.version.task == "b" and delta_io.parse(tasks.store.read("b")).delta.task == "b"
    again = tasks.install("b", delta_io.parse(delta_bytes("a", seed=1)))
    assert again.previous == first.version and tasks.get("b") == again.version
    assert tasks.rows_in_use == 1  # the replaced row was idle: freed at once
    assert tasks.remove("b") == again.version
    assert "b" not in tasks and tasks.store.read("b") is None and tasks.rows_in_use == 0
    with pytest.raises(UnknownTask):
        tasks.remove("b")


def test_a_failed_install_leaves_disk_and_memory_as_they_were(tasks, delta_bytes, monkeypatch):
    old = tasks.install("a", delta_io.parse(delta_bytes("a"))).version
    monkeypatch.setattr(tasks._banks, "write", lambda row, delta: (_ for _ in ()).throw(MemoryError("no room")))
    with pytest.raises(MemoryError):
        tasks.install("a", delta_io.parse(delta_bytes("a", seed=2)))
    assert tasks.get("a") == old and tasks.store.read("a") == delta_bytes("a")
    bad = delta_io.parse(delta_bytes("a")).delta.replace(base_fingerprint="0" * 64)
    with pytest.raises(BaseModelMismatch):
        tasks.install("a", delta_io.DeltaFile.of(bad))
    assert tasks.get("a") == old and tasks.store.read("a") == delta_bytes("a")


def test_sync_follows_the_folder_and_load_all_skips_bad_files(tasks, delta_bytes):
    store = tasks.store
    store.write("a", delta_bytes("a"))
    store.write("c", delta_bytes("b"))  # named c, metadata says b: refused with a hint
    store.write("d", b"not a delta")
    report = tasks.load_all()
    assert report["a"] == "added" and "rename the file to b.safetensors" in report["c"]
    assert report["d"].startswith("error:") and "c" not in tasks and "d" not in tasks
    assert set(tasks.rejected) == {"c", "d"} and "rename the file" in tasks.rejected["c"]  # kept for listing
    store.write("a", delta_bytes("a", seed=3))
    assert tasks.sync("a") == "replaced"
    store.delete("a")
    assert tasks.sync("a") == "removed" and tasks.sync("a") == "absent"
    with pytest.raises(InvalidDelta):
        tasks.sync("d")
    store.delete("d")
    assert tasks.sync("d") == "absent" and set(tasks.rejected) == {"c"}


def test_a_tasks_room_without_a_store_serves_from_memory(engine, delta_bytes):
    assert engine.add_task(delta_bytes("m")).task == "m" and engine.tasks.store is None
    with pytest.raises(RuntimeError, match="no store"):
        engine.tasks.load_all()
