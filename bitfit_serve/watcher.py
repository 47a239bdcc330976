"""Watch the deltas folder (watchfiles) and apply adds, replaces and deletes while serving.

Events only say *which* task to look at; :meth:`Tasks.sync` then compares the folder's
current file with the served version (sha256), so a late or duplicated event is harmless and an
upload written by this server is not loaded twice. A bad file is logged and skipped (a task
already being served keeps its version); later good files still load.
"""

from __future__ import annotations

import asyncio
import logging

from watchfiles import Change, awatch

from bitfit_serve.errors import InvalidDelta
from bitfit_serve.metrics import Metrics
from bitfit_serve.store import DeltaStore
from bitfit_serve.tasks import Tasks

log = logging.getLogger(__name__)

# watchfiles' rust side returns after this many ms without events; the first return proves the
# watch is installed, so the start-up scan that follows cannot miss a file.
RUST_TIMEOUT_MS = 200


class DeltaWatcher:
    def __init__(self, tasks: Tasks, metrics: Metrics | None = None):
        self.tasks = tasks
        self.store: DeltaStore = tasks.require_store()
        self.metrics = metrics
        self._stop = asyncio.Event()
        self._active = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self, timeout: float = 10.0) -> None:
        """Start watching; returns once the watch is installed."""
        self._task = asyncio.create_task(self._run(), name="bitfit-watch")
        active = asyncio.create_task(self._active.wait())
        await asyncio.wait([self._task, active], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        active.cancel()
        if self._task.done():
            # e.g. the OS limit on watches: serving goes on, the folder is read only at start-up
            log.error("cannot watch %s (%s); folder changes will not be picked up until a restart",
                      self.store.root, self._task.exception())
        elif not self._active.is_set():
            log.warning("the folder watch did not confirm within %.0f s; continuing", timeout)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=5)
            except Exception:  # a timeout, or the error that ended the watch: neither may block shutdown
                self._task.cancel()

    async def _run(self) -> None:
        try:
            async for changes in awatch(self.store.root, watch_filter=self._wanted, stop_event=self._stop,
                                        debounce=500, step=50, rust_timeout=RUST_TIMEOUT_MS,
                                        yield_on_timeout=True, recursive=False):
                self._active.set()
                for task in sorted({self.store.task_for_path(path) for _, path in changes}):
                    await asyncio.to_thread(self.sync, task)
        except Exception:
            log.exception("watching %s failed; the folder is no longer watched", self.store.root)
            raise

    def _wanted(self, change: Change, path: str) -> bool:
        return self.store.task_for_path(path) is not None

    def sync(self, task: str) -> None:
        try:
            outcome = self.tasks.sync(task)
        except InvalidDelta as e:
            log.error("not loading %s: %s", self.store.path_for(task), e.message)
            outcome = "rejected"
        except Exception:
            log.exception("syncing task %r from %s failed", task, self.store.root)
            outcome = "failed"
        else:
            if outcome in ("unchanged", "absent"):  # e.g. the echo of an HTTP upload or delete
                return
            log.info("task %r %s from %s", task, outcome, self.store.root)
        if self.metrics is not None:
            self.metrics.task_changes.labels("watch", outcome).inc()
