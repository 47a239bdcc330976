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

import dataclasses
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal

from bitfit_serve import delta as delta_io
from bitfit_serve.delta import Delta, DeltaFile, DeltaMeta
from bitfit_serve.errors import InvalidDelta, LimitExceeded
from bitfit_serve.model.banks import Banks
from bitfit_serve.model.base import BaseModel
from bitfit_serve.registry import TaskRegistry, TaskVersion
from bitfit_serve.store import SUFFIX, DeltaStore

log = logging.getLogger(__name__)

SyncOutcome = Literal["added", "replaced", "unchanged", "removed", "absent"]
SYNC_ATTEMPTS = 3  # reads of a file that changes while sync reads it, before leaving it to its next event


@dataclass(frozen=True)
class TaskLimits:
    """What one tenant's delta may cost everyone: checked before anything is written, so a delta
    past a budget changes nothing (LimitExceeded, 413, naming the setting). The defaults of the
    Python API are unbounded; the server passes its settings' (``from_settings``)."""

    max_tasks: int | None = None
    max_bank_bytes: int | None = None
    max_labels_per_task: int | None = None
    max_label_chars: int | None = None
    max_metadata_bytes: int | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> "TaskLimits":
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})

    def check_delta(self, delta: Delta) -> None:
        """The budgets one delta can be held to on its own."""
        labels = delta.labels
        if self.max_labels_per_task is not None and len(labels) > self.max_labels_per_task:
            raise LimitExceeded(f"labels: {len(labels)} labels exceed max_labels_per_task={self.max_labels_per_task}")
        longest = max(labels, key=len)
        if self.max_label_chars is not None and len(longest) > self.max_label_chars:
            raise LimitExceeded(f"labels: a label of {len(longest)} characters exceeds "
                                f"max_label_chars={self.max_label_chars}")
        size = metadata_bytes(delta.meta)
        if self.max_metadata_bytes is not None and size > self.max_metadata_bytes:
            raise LimitExceeded(f"metadata: {size} bytes (besides labels) exceed "
                                f"max_metadata_bytes={self.max_metadata_bytes}")


def metadata_bytes(meta: DeltaMeta) -> int:
    """UTF-8 bytes of a delta's metadata fields other than its labels (metrics, train_args, ...)."""
    return sum(len(k.encode()) + len(v.encode("utf-8", "surrogatepass"))
               for k, v in meta.to_metadata().items() if k != "labels")


@dataclass(frozen=True)
class Installed:
    version: TaskVersion
    previous: TaskVersion | None


class Tasks:
    def __init__(self, base: BaseModel, banks: Banks, store: DeltaStore | None = None,
                 probe: Callable[[TaskVersion], bool] | None = None, limits: TaskLimits = TaskLimits()):
        self.base = base
        self.limits = limits
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

    def use_limits(self, limits: TaskLimits) -> None:
        """Hold every delta added from now on to ``limits`` (tasks already served stay)."""
        with self._lock:
            self.limits = limits

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
        """Raise InvalidDelta / BaseModelMismatch / LimitExceeded unless ``delta`` can be served on
        this base within the per-delta budgets."""
        delta_io.check_compatible(delta, fingerprint=self.base.fingerprint,
                                  architecture=self.base.architecture.name,
                                  site_shapes=self.base.site_shapes, hidden_size=self.base.hidden_size)
        # The tokenizer only truncates when max_length leaves room for one token of each text
        # besides its special tokens (below that, a pair is not cut at all: 2,003 tokens were seen).
        least = self.base.tokenizer.num_special_tokens_to_add(pair=delta.is_pair_task) + len(delta.inputs)
        if delta.max_length < least:
            raise InvalidDelta(f"max_length: {delta.max_length} is too short for this base's tokenizer: a "
                               f"{'pair' if delta.is_pair_task else 'single-text'} task needs at least {least} "
                               f"(special tokens + one token per text)")
        self.limits.check_delta(delta)

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
        served, if any, stays), e.g. one that is not a regular file or is over the size cap
        (``DeltaStore.read_file``).

        The file is read, hashed, parsed and checked *before* the lock is taken, so a slow or big
        file never holds up ``install`` / ``remove``. Under the lock the path must still be the file
        that was read (``DeltaStore.stamp``); if it changed meanwhile, nothing is applied and the
        file is read again (the watcher also gets an event for that change). A file that keeps
        changing is left alone after ``SYNC_ATTEMPTS`` reads: its last event syncs it."""
        store = self.require_store()
        for _ in range(SYNC_ATTEMPTS):
            outcome = self._sync(store, name)
            if outcome is not None:
                return outcome
        log.warning("%s kept changing while it was read; left as it is until its next change",
                    store.path_for(name))
        return "unchanged" if name in self._registry else "absent"

    def _sync(self, store: DeltaStore, name: str) -> SyncOutcome | None:
        """One attempt of ``sync``: read and parse without the lock, apply under it. None: the file
        changed after it was read, nothing was applied."""
        seen = store.stamp(name)  # what a refused path looked like (a read error has no stamp of its own)
        read = file = error = None
        try:
            read = store.read_file(name)
            if read is not None:
                seen = read.stamp
                current = self._registry.get(name) if name in self._registry else None
                if current is None or current.sha256 != delta_io.sha256_bytes(read.data):
                    file = self._parse_synced(store, name, read.data)
        except InvalidDelta as e:
            error = e
        with self._lock:
            if store.stamp(name) != seen or (read is not None and not read.complete):
                return None  # changed since it was read: these bytes may not be what the folder holds
            try:
                if error is not None:
                    raise error
                current = self._registry.get(name) if name in self._registry else None
                if read is None:
                    outcome: SyncOutcome = "absent" if current is None else "removed"
                    if current is not None:
                        self._registry.unpublish(name)
                elif current is not None and current.sha256 == delta_io.sha256_bytes(read.data):
                    outcome = "unchanged"
                elif file is None:
                    return None  # the served version changed after the hash check: start again
                else:
                    self._publish(file)
                    outcome = "added" if current is None else "replaced"
            except InvalidDelta as e:
                self.rejected[name] = e.message
                raise
            self.rejected.pop(name, None)
            return outcome

    def _parse_synced(self, store: DeltaStore, name: str, data: bytes) -> DeltaFile:
        """Parse and check a file of the folder (no lock needed: nothing shared is touched)."""
        source = str(store.path_for(name))
        file = delta_io.parse(data, source=source)
        if file.delta.task != name:
            raise InvalidDelta(f"{source}: the file is named {name!r} but its metadata says task "
                               f"{file.delta.task!r}; rename the file to {file.delta.task}{SUFFIX} "
                               f"(or upload it over HTTP, which renames it)")
        self.check(file.delta)
        return file

    def load_all(self) -> dict[str, str]:
        """Start-up: load every delta file; a bad one is logged and skipped. Returns task -> outcome
        or error message. A link, FIFO or directory under a delta's name is not read: it is
        reported (and listed in ``rejected``) with its reason, like any bad file."""
        store = self.require_store()
        report = {}
        for name in store.scan(regular_only=False):
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
        """Write the delta into a fresh bank row, then make it the task's current version. The
        budgets that depend on what is already served are checked here, under the lock."""
        delta = file.delta
        limits = self.limits
        if limits.max_tasks is not None and delta.task not in self._registry and len(self._registry) >= limits.max_tasks:
            raise LimitExceeded(f"{len(self._registry)} tasks are served, max_tasks={limits.max_tasks}: remove "
                                f"one before adding {delta.task!r}")
        if limits.max_bank_bytes is not None:
            after = self._banks.bytes_after(delta)
            if after > limits.max_bank_bytes:
                raise LimitExceeded(f"adding {delta.task!r} would grow the banks to {after} bytes, over "
                                    f"max_bank_bytes={limits.max_bank_bytes}")
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

    def bank_bytes_of(self, version: TaskVersion) -> int:
        """Bank bytes one task costs at the serving dtype: its row of every banked site, its label
        count and pooling code, and its head's slot in its width class."""
        return self._banks.bytes_per_row + self._banks.head_bytes(len(version.labels))
