"""Versions are pinned while in flight: a replaced or removed task's row is freed only when idle."""

from __future__ import annotations

import threading

import pytest

from bitfit_serve.delta import DeltaMeta
from bitfit_serve.errors import UnknownTask
from bitfit_serve.registry import TaskRegistry, TaskVersion


def _version(task: str, row: int) -> TaskVersion:
    meta = DeltaMeta(task=task, labels=("a", "b"), problem_type="single_label_classification", pooling="mean",
                     base_fingerprint="0" * 64, architecture="bert", max_length=8)
    return TaskVersion(meta=meta, sha256=f"{row:064x}", row=row, max_length=8, sites=(), nbytes=0)


def test_replace_frees_old_row_only_after_release():
    freed = []
    reg = TaskRegistry(free_row=freed.append)
    reg.publish(_version("t", 1))
    pinned = reg.acquire(["t", "t"])
    reg.publish(_version("t", 2))
    assert reg.get("t").row == 2 and freed == []
    reg.release(pinned[:1])
    assert freed == []
    reg.release(pinned[1:])
    assert freed == [1]


def test_remove_idle_task_frees_at_once_and_unknown_raises():
    freed = []
    reg = TaskRegistry(free_row=freed.append)
    reg.publish(_version("t", 1))
    reg.unpublish("t")
    assert freed == [1] and "t" not in reg
    with pytest.raises(UnknownTask):
        reg.unpublish("t")
    with pytest.raises(UnknownTask):
        reg.acquire(["t"])


def test_acquire_is_all_or_nothing():
    freed = []
    reg = TaskRegistry(free_row=freed.append)
    reg.publish(_version("a", 1))
    with pytest.raises(UnknownTask, match="'b'"):
        reg.acquire(["a", "b"])
    reg.unpublish("a")
    assert freed == [1], "a failed acquire must not leave a pin behind"


def test_a_slow_free_never_blocks_acquire():
    """Freeing a row waits for the banks' lock, which a bank rebuild holds for a whole copy; the
    registry lock must not be held meanwhile, or every request (acquire, on the event loop) waits."""
    freeing, finish = threading.Event(), threading.Event()

    def slow_free(row: int) -> None:
        freeing.set()
        finish.wait(10)

    reg = TaskRegistry(free_row=slow_free)
    reg.publish(_version("t", 1))
    pinned = reg.acquire(["t"])
    reg.publish(_version("t", 2))  # row 1 retired, still in flight
    releaser = threading.Thread(target=reg.release, args=(pinned,))
    releaser.start()
    try:
        assert freeing.wait(10)  # the release is now inside free_row, which does not return yet
        got = []
        acquirer = threading.Thread(target=lambda: got.extend(reg.acquire(["t"])))
        acquirer.start()
        acquirer.join(10)
        assert not finish.is_set() and [v.row for v in got] == [2]  # served while the free still waits
    finally:
        finish.set()
        releaser.join()
