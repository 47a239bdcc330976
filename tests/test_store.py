"""The deltas folder on disk: which paths are deltas, scan, read / write / restore."""

from __future__ import annotations

import pytest

from bitfit_serve.errors import InvalidInput
from bitfit_serve.store import DeltaStore


def test_store_names(tmp_path):
    store = DeltaStore(tmp_path)
    assert store.task_for_path(tmp_path / "sst2.safetensors") == "sst2"
    for name in (".tmp-x.part", ".tmp-sst2.safetensors", "sst2.safetensors.part", "a b.safetensors", "x.json"):
        assert store.task_for_path(tmp_path / name) is None, name
    assert store.task_for_path(tmp_path / "sub" / "sst2.safetensors") is None
    (tmp_path / "b.safetensors").write_bytes(b"")
    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / ".tmp-c.safetensors").write_bytes(b"")
    assert store.scan() == ["a", "b"]
    assert DeltaStore(tmp_path / "missing").scan() == []


def test_read_write_restore_delete(tmp_path):
    store = DeltaStore(tmp_path)
    assert store.read("a") is None
    store.write("a", b"one")
    assert store.read("a") == b"one" and (tmp_path / "a.safetensors").read_bytes() == b"one"
    store.restore("a", b"zero")
    assert store.read("a") == b"zero"
    store.restore("a", None)  # there was no file before
    assert store.read("a") is None and store.scan() == []
    store.delete("a")  # deleting what is not there is fine
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "x\n"])
def test_paths_only_for_valid_task_names(tmp_path, name):
    with pytest.raises(InvalidInput, match="not allowed"):
        DeltaStore(tmp_path).path_for(name)
