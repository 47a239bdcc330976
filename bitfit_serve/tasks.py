"""The task lifecycle: one room, one lock, four entry points.

    install(name, DeltaFile)   check against the base, persist, write a bank row, publish
    remove(name)               unpublish (404 from now on), delete the file; the row is freed once idle
    sync(name)                 make the served version match the folder (watcher, start-up)
    load_all()                 start-up: every file in the folder; a bad one is skipped

A delta arrives here already parsed and checked on its own (``delta.parse``); this room adds the
checks that need the served base, then touches the store, the banks and the registry in that
order, each once. Every change runs under one lock, so the file on disk and the version being
served cannot disagree after concurrent uploads to the same name; the hot path (``acquire`` /
``release``) never takes it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

from bitfit_serve import delta as delta_io
from bitfit_serve.delta import Delta, DeltaFile
from bitfit_serve.errors import InvalidDelta
from bitfit_serve.model.banks import Banks
from bitfit_serve.model.base import BaseModel
from bitfit_serve.registry import TaskRegistry, TaskVersion
from bitfit_serve.store import SUFFIX, DeltaStore

log = logging.getLogger(__name__)

SyncOutcome = Literal["added", "replaced", "unchanged", "removed", "absent"]


@dataclass(frozen=True)
class Installed:
    version: TaskVersion
    previous: TaskVersion | None


class Tasks:
    def __init__(self, base: BaseModel, banks: Banks, store: DeltaStore | None = None,
                 probe: Callable[[TaskVersion], bool] | None = None):
        self.base = base
        self._probe = probe  # a forward on a probe input: False when the row's outputs are not finite
        self.store = store  # None: tasks live in memory only (the Python API)
        self._banks = banks
        self._registry = TaskRegistry(free_row=banks.free)
        self._lock = threading.Lock()
        self.rejected: dict[str, str] = {}  # files in the folder that are not served -> why (sync)

    def use_store(self, store: DeltaStore | None) -> None:
        """Persist every change to ``store`` from now on (the server's deltas folder; None: memory only)."""
        with self._lock:
            self.store = store

    # ------------------------------------------------------------------ reading (the hot path)
    def acquire(self, tasks: Iterable[str]) -> list[TaskVersion]:
        """Pin the current version of each task for one request (see ``TaskRegistry.acquire``)."""
        return self._registry.acquire(tasks)

    def release(self, versions: Iterable[TaskVersion]) -> None:
        self._registry.release(versions)

    def get(self, task: str) -> TaskVersion:
        return self._registry.get(task)

    def list(self) -> list[TaskVersion]:
        return self._registry.list()

    def __contains__(self, task: str) -> bool:
        return task in self._registry

    def __len__(self) -> int:
        return len(self._registry)

    # ------------------------------------------------------------------ changes
    def check(self, delta: Delta) -> None:
        """Raise InvalidDelta / BaseModelMismatch unless ``delta`` can be served on this base."""
        delta_io.check_compatible(delta, fingerprint=self.base.fingerprint,
                                  architecture=self.base.architecture.name,
                                  site_shapes=self.base.site_shapes, hidden_size=self.base.hidden_size)

    def install(self, name: str, file: DeltaFile) -> Installed:
        """Serve ``file`` as task ``name``, replacing any version of it. The name wins over the
        delta's ``task`` metadata: the delta is renamed (re-serialized), so that the stored file,
        its metadata and the served version always agree."""
        delta_io.check_task_name(name)
        file = file.renamed(name)
        self.check(file.delta)
        with self._lock:
            if self.store:
                self.store.require_file_slot(name)
            previous = self._registry.get(name) if name in self._registry else None
            old_bytes = self.store.read(name) if self.store else None
            if self.store:
                self.store.write(name, file.data)
            try:
                version = self._publish(file)
                self.rejected.pop(name, None)
            except BaseException:
                if self.store:  # keep disk and memory in agreement: put back what was there
                    self.store.restore(name, old_bytes)
                raise
        return Installed(version, previous)

    def remove(self, name: str) -> TaskVersion:
        """Stop serving ``name`` (404 from now on), free its row once idle, delete its file."""
        delta_io.check_task_name(name)
        with self._lock:
            if self.store:
                self.store.require_file_slot(name)  # before unpublishing: a refusal changes nothing
            removed = self._registry.unpublish(name)
            if self.store:
                self.store.delete(name)
            self.rejected.pop(name, None)
        return removed

    def sync(self, name: str) -> SyncOutcome:
        """Make the served version of ``name`` match the folder: load a new or changed file,
        remove a task whose file is gone. Raises InvalidDelta for a bad file (the version being
        served, if any, stays)."""
        store = self.require_store()
        with self._lock:
            try:
                outcome = self._sync(store, name)
            except InvalidDelta as e:
                self.rejected[name] = e.message
                raise
            self.rejected.pop(name, None)
            return outcome

    def _sync(self, store: DeltaStore, name: str) -> SyncOutcome:
        """``sync`` under the lock."""
        data = store.read(name)
        current = self._registry.get(name) if name in self._registry else None
        if data is None:
            if current is None:
                return "absent"
            self._registry.unpublish(name)
            return "removed"
        if current is not None and current.sha256 == delta_io.sha256_bytes(data):
            return "unchanged"
        source = str(store.path_for(name))
        file = delta_io.parse(data, source=source)
        if file.delta.task != name:
            raise InvalidDelta(f"{source}: the file is named {name!r} but its metadata says task "
                               f"{file.delta.task!r}; rename the file to {file.delta.task}{SUFFIX} "
                               f"(or upload it over HTTP, which renames it)")
        self.check(file.delta)
        self._publish(file)
        return "added" if current is None else "replaced"

    def load_all(self) -> dict[str, str]:
        """Start-up: load every delta file; a bad one is logged and skipped. Returns task -> outcome
        or error message."""
        store = self.require_store()
        report = {}
        for name in store.scan():
            try:
                report[name] = self.sync(name)
            except InvalidDelta as e:
                log.error("skipping %s: %s", store.path_for(name), e.message)
                report[name] = f"error: {e.message}"
            except Exception as e:  # a bug, not the file's fault: still, one file must not stop start-up
                log.exception("skipping %s: unexpected error", store.path_for(name))
                report[name] = f"error: {type(e).__name__}: {e}"
        return report

    def require_store(self) -> DeltaStore:
        if self.store is None:
            raise RuntimeError("this Tasks has no store (deltas folder): call use_store first")
        return self.store

    def _publish(self, file: DeltaFile) -> TaskVersion:
        """Write the delta into a fresh bank row, then make it the task's current version."""
        delta = file.delta
        row = self._banks.allocate()
        try:
            self._banks.write(row, delta)
        except BaseException:
            self._banks.free(row)
            raise
        version = TaskVersion(meta=delta.meta, sha256=file.sha256, row=row,
                              max_length=min(delta.max_length, self.base.max_positions),
                              sites=tuple(sorted(delta.sites)), nbytes=delta.nbytes)
        if self._probe is not None and not self._probe(version):
            self._banks.free(row)
            raise InvalidDelta(f"task {delta.task!r}: its values give non-finite outputs (NaN or Inf) on a probe "
                               f"input; refusing to serve it")
        self._registry.publish(version)
        return version

    # ------------------------------------------------------------------ memory
    @property
    def rows_in_use(self) -> int:
        return self._banks.rows_in_use

    @property
    def capacity(self) -> int:
        """Rows the banks hold now (they grow by doubling, never shrink)."""
        return self._banks.capacity

    @property
    def bank_bytes(self) -> int:
        return self._banks.nbytes

    @property
    def bytes_per_task(self) -> int:
        """Bank bytes one row costs at the serving dtype (every banked site + the padded head)."""
        return self._banks.bytes_per_row
