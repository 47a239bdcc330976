"""Task name -> current version, with in-flight reference counts so rows are freed only when idle.

Replace = the new version is written into its own row first, then the name's pointer is swapped
under the lock; the old row is retired and returned to the banks once no batch holds it. A request
acquires its version once, so it is served wholly by one version.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

from bitfit_serve.delta import DeltaMeta
from bitfit_serve.errors import UnknownTask


@dataclass(frozen=True)
class TaskVersion:
    """One loaded task version: its delta's metadata, where its tensors live (a bank row), and
    what it is (the file's sha256). Serving reads ``meta``; nothing is copied out of it."""

    meta: DeltaMeta
    sha256: str  # of the delta file
    row: int
    max_length: int  # the delta's max_length, capped at the base's positions
    sites: tuple[str, ...]
    nbytes: int  # fp32 bytes of the trained values
    loaded_at: float = field(default_factory=time.time)

    @property
    def task(self) -> str:
        return self.meta.task

    @property
    def version(self) -> str:
        """First 16 hex digits of the delta file's sha256."""
        return self.sha256[:16]

    @property
    def labels(self) -> tuple[str, ...]:
        return self.meta.labels

    @property
    def problem_type(self) -> str:
        return self.meta.problem_type

    @property
    def is_pair_task(self) -> bool:
        return self.meta.is_pair_task


class TaskRegistry:
    def __init__(self, free_row: Callable[[int], None]):
        self._free_row = free_row
        self._lock = threading.Lock()
        self._current: dict[str, TaskVersion] = {}
        self._in_flight: Counter[int] = Counter()
        self._retired: set[int] = set()

    def __contains__(self, task: str) -> bool:
        return task in self._current

    def __len__(self) -> int:
        return len(self._current)

    def get(self, task: str) -> TaskVersion:
        try:
            return self._current[task]
        except KeyError:
            raise UnknownTask(f"unknown task {task!r}") from None

    def list(self) -> list[TaskVersion]:
        return sorted(self._current.values(), key=lambda v: v.task)

    def publish(self, version: TaskVersion) -> TaskVersion | None:
        """Make ``version`` current for its task; returns the version it replaced, if any."""
        with self._lock:
            old = self._current.get(version.task)
            self._current[version.task] = version
            idle = self._retire(old.row) if old is not None else []
        self._free(idle)
        return old

    def unpublish(self, task: str) -> TaskVersion:
        with self._lock:
            old = self._current.pop(task, None)
            if old is None:
                raise UnknownTask(f"unknown task {task!r}")
            idle = self._retire(old.row)
        self._free(idle)
        return old

    def acquire(self, tasks: Iterable[str]) -> list[TaskVersion]:
        """Pin the current version of each task (duplicates allowed); all-or-nothing."""
        with self._lock:
            versions = []
            for task in tasks:
                version = self._current.get(task)
                if version is None:
                    raise UnknownTask(f"unknown task {task!r}")
                versions.append(version)
            self._in_flight.update(v.row for v in versions)
            return versions

    def release(self, versions: Iterable[TaskVersion]) -> None:
        idle = []
        with self._lock:
            for v in versions:
                self._in_flight[v.row] -= 1
                if self._in_flight[v.row] <= 0:
                    del self._in_flight[v.row]
                    if v.row in self._retired:
                        self._retired.discard(v.row)
                        idle.append(v.row)
        self._free(idle)

    def _retire(self, row: int) -> list[int]:
        """Mark a row that no name points to any more; returns it if nobody holds it (free it now)."""
        if self._in_flight[row] > 0:
            self._retired.add(row)
            return []
        self._in_flight.pop(row, None)
        return [row]

    def _free(self, rows: list[int]) -> None:
        """Return rows to the banks outside the registry lock: the banks' lock may be held for a
        whole rebuild (growing the banks copies them), and acquire() runs on the event loop."""
        for row in rows:
            self._free_row(row)
