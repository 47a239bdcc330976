"""The deltas folder on disk: paths, scan, read, atomic write, delete. Nothing else.

One file per task, ``<task>.safetensors`` with ``<task>`` a valid task name (``delta.TASK_NAME_RE``)
equal to the delta's ``task`` metadata. Anything else in the folder is ignored, in particular the
``.tmp-*`` files that :func:`delta.atomic_write` renames into place, so a half-written file is
never read. Writes are atomic (temp, fsync, rename, fsync dir), so a restart finds the old or the
new version of a file, never a mix. What is *served* is the ``tasks`` room's business, which
calls this store under its lock.
"""

from __future__ import annotations

from pathlib import Path

from bitfit_serve import delta as delta_io
from bitfit_serve.errors import Conflict, InvalidDelta

SUFFIX = ".safetensors"


class DeltaStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path_for(self, task: str) -> Path:
        return self.root / f"{delta_io.check_task_name(task)}{SUFFIX}"

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

    def require_file_slot(self, task: str) -> None:
        """Raise Conflict unless the task's path holds a regular file or nothing (a directory or a
        FIFO there would make a write or delete fail halfway)."""
        path = self.path_for(task)
        if (path.exists() or path.is_symlink()) and not (path.is_file() and not path.is_symlink()):
            raise Conflict(f"{path} is not a regular file (a directory, link or device?): remove it from the "
                           f"deltas folder first; nothing was changed")

    def read(self, task: str) -> bytes | None:
        """The file's bytes, or None if there is no file for ``task``."""
        path = self.path_for(task)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise InvalidDelta(f"cannot read {path}: {e.strerror}") from e

    def write(self, task: str, data: bytes) -> None:
        delta_io.atomic_write(self.path_for(task), data)

    def delete(self, task: str) -> None:
        self.path_for(task).unlink(missing_ok=True)

    def restore(self, task: str, data: bytes | None) -> None:
        """Put back what ``read`` returned earlier (None: no file)."""
        if data is None:
            self.delete(task)
        else:
            self.write(task, data)
