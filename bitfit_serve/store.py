"""The deltas folder: the durable set of tasks a server serves.

One file per task, ``<task>.safetensors`` with ``<task>`` matching ``delta.TASK_NAME_RE`` and equal
to the delta's ``task`` metadata. Anything else in the folder is ignored, in particular the
``.tmp-*`` files that :func:`delta.atomic_write` renames into place, so a half-written file is
never loaded. Uploads are written the same way (temp, fsync, rename, fsync dir), so a restart
serves the same set and a crash leaves the old or the new version, never a mix.

Every change of a task (upload, delete, folder sync) runs under one lock, so the file on disk
and the version being served cannot disagree after concurrent uploads to the same name.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bitfit_serve import delta as delta_io
from bitfit_serve.engine import Engine
from bitfit_serve.errors import InvalidDelta, InvalidInput
from bitfit_serve.registry import TaskVersion

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"

SyncOutcome = Literal["added", "replaced", "unchanged", "removed", "absent"]


@dataclass(frozen=True)
class Installed:
    version: TaskVersion
    previous: TaskVersion | None


def check_task_name(task: str) -> str:
    """Raise InvalidInput unless ``task`` may be a task name (and so a file name and URL segment)."""
    if not delta_io.is_task_name(task):
        raise InvalidInput(f"task name {task!r} is not allowed: use 1-64 characters from "
                           f"[A-Za-z0-9_.-], starting with a letter or digit")
    return task


class DeltaStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ naming
    def path_for(self, task: str) -> Path:
        return self.root / f"{check_task_name(task)}{SUFFIX}"

    def task_for_path(self, path: str | Path) -> str | None:
        """The task a path in the folder stands for, or None for anything that is not a delta
        (temp files, other suffixes, sub-folders' files, names outside the pattern)."""
        path = Path(path)
        if path.parent.resolve() != self.root.resolve() or path.suffix != SUFFIX:
            return None
        return path.stem if delta_io.is_task_name(path.stem) else None

    def scan(self) -> list[str]:
        """Task names of the delta files now in the folder, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(t for p in self.root.iterdir() if p.is_file() and (t := self.task_for_path(p)))

    # ------------------------------------------------------------------ changes (engine + disk)
    def install(self, engine: Engine, task: str, data: bytes) -> Installed:
        """Validate an uploaded delta fully, persist it atomically as ``<task>.safetensors``, then
        swap it in. The URL name wins: a delta whose metadata names another task is stored (and
        served) with ``task`` rewritten, so the file name and its metadata always agree."""
        path = self.path_for(task)
        delta = delta_io.from_bytes(data, source="upload")
        engine.check(delta)
        if delta.task != task:
            # Re-serialized bytes differ from the upload; the version is the sha256 of what is stored.
            delta = dataclasses.replace(delta, task=task)
            data = delta_io.to_bytes(delta)
        with self._lock:
            previous = engine.registry.get(task) if task in engine.registry else None
            old_bytes = _read(path)
            delta_io.atomic_write(path, data)
            try:
                version = engine.add_task(delta, file_bytes=data)  # parsed and checked once, above
            except BaseException:
                # Keep disk and memory in agreement: put back what was there.
                if old_bytes is None:
                    path.unlink(missing_ok=True)
                else:
                    delta_io.atomic_write(path, old_bytes)
                raise
        return Installed(version, previous)

    def remove(self, engine: Engine, task: str) -> TaskVersion:
        """Stop serving ``task`` (404 from now on), free its row once idle, delete its file."""
        path = self.path_for(task)
        with self._lock:
            removed = engine.remove_task(task)
            path.unlink(missing_ok=True)
        return removed

    def sync(self, engine: Engine, task: str) -> SyncOutcome:
        """Make the served version of ``task`` match the folder: load a new or changed file,
        remove a task whose file is gone. Raises InvalidDelta for a bad file (the version being
        served, if any, stays)."""
        path = self.path_for(task)
        with self._lock:
            data = _read(path)
            current = engine.registry.get(task) if task in engine.registry else None
            if data is None:
                if current is None:
                    return "absent"
                engine.remove_task(task)
                return "removed"
            if current is not None and current.sha256 == delta_io.sha256_bytes(data):
                return "unchanged"
            check_file_task(data, task, source=str(path))
            engine.add_task(data)
            return "added" if current is None else "replaced"

    def load_all(self, engine: Engine) -> dict[str, str]:
        """Start-up: load every delta file; a bad one is logged and skipped. Returns task -> outcome
        or error message."""
        report = {}
        for task in self.scan():
            try:
                report[task] = self.sync(engine, task)
            except InvalidDelta as e:
                log.error("skipping %s: %s", self.path_for(task), e.message)
                report[task] = f"error: {e.message}"
            except Exception as e:  # a bug, not the file's fault: still, one file must not stop start-up
                log.exception("skipping %s: unexpected error", self.path_for(task))
                report[task] = f"error: {type(e).__name__}: {e}"
        return report


def check_file_task(data: bytes, task: str, source: str) -> None:
    """A file in the folder must be named after the task its metadata names (header only: the
    full validation is ``engine.add_task``'s)."""
    _, meta = delta_io.read_header(data, source)
    named = meta.get("task")
    if named != task:
        raise InvalidDelta(f"{source}: the file is named {task!r} but its metadata says task {named!r}; "
                           f"rename the file to {named}{SUFFIX} (or upload it over HTTP, which renames it)")


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InvalidDelta(f"cannot read {path}: {e.strerror}") from e
