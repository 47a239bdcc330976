"""The deltas folder on disk: paths, scan, read, atomic write, delete. Nothing else.

One file per task, ``<task>.safetensors`` with ``<task>`` a valid task name (``delta.TASK_NAME_RE``)
equal to the delta's ``task`` metadata. Anything else in the folder is ignored, in particular the
``.tmp-*`` files that :func:`delta.atomic_write` renames into place, so a half-written file is
never read. Writes are atomic (temp, fsync, rename, fsync dir), so a restart finds the old or the
new version of a file, never a mix. What is *served* is the ``tasks`` room's business, which
calls this store under its lock (except :meth:`DeltaStore.read_file`, which it calls before).

The folder is not trusted. Only **regular files** are read: a FIFO, device, socket or directory
under a delta's name is refused (``InvalidDelta`` with the reason), and so is every **symbolic
link**: links are never followed, whatever they point at (another delta outside the folder,
``/dev/zero``, ...). A file larger than ``max_file_bytes`` (the server passes ``max_upload_bytes``,
the cap an HTTP ``PUT`` has) is refused from its size, without being read; at most
``max_file_bytes + 1`` bytes are ever read. The file is opened with ``O_NOFOLLOW | O_NONBLOCK``
and checked with ``fstat`` on the open descriptor, so a FIFO or link swapped in after a check
cannot block or redirect the read. :meth:`DeltaStore.scan` lists regular files only;
:meth:`DeltaStore.scan` ``(regular_only=False)`` also lists the other entries under a delta's
name, so that start-up reports them as rejected instead of skipping them silently.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import NamedTuple

from bitfit_serve import delta as delta_io
from bitfit_serve.errors import Conflict, InvalidDelta

SUFFIX = ".safetensors"
DEFAULT_MAX_FILE_BYTES = 16 << 20  # Settings.max_upload_bytes' default; the server passes its setting
_READ_CHUNK = 1 << 20


class Stamp(NamedTuple):
    """What tells one state of a path from another: a rename, a rewrite or a growth changes it."""

    dev: int
    ino: int
    kind: int  # stat.S_IFMT(st_mode)
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stamp:
        return cls(st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)


class StoredFile(NamedTuple):
    """The bytes of a delta file, and the stamp of the file they were read from (``fstat`` of the
    open descriptor before reading): compare it with :meth:`DeltaStore.stamp` later to know
    whether the path still holds those bytes."""

    data: bytes
    stamp: Stamp

    @property
    def complete(self) -> bool:
        """False when the file grew or shrank while it was read."""
        return len(self.data) == self.stamp.size


def _kind_name(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


class DeltaStore:
    def __init__(self, root: str | Path, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
        self.root = Path(root)
        self.max_file_bytes = max_file_bytes

    def path_for(self, task: str) -> Path:
        return self.root / f"{delta_io.check_task_name(task)}{SUFFIX}"

    def task_for_path(self, path: str | Path) -> str | None:
        """The task a path in the folder stands for, or None for anything that is not a delta
        (temp files, other suffixes, sub-folders' files, names outside the pattern)."""
        path = Path(path)
        if path.parent.resolve() != self.root.resolve() or path.suffix != SUFFIX:
            return None
        return path.stem if delta_io.is_task_name(path.stem) else None

    def scan(self, regular_only: bool = True) -> list[str]:
        """Task names of the delta files now in the folder, sorted: regular files only (a symbolic
        link is not followed, so a link to a file is not listed). ``regular_only=False`` also lists
        every other entry under a delta's name (link, FIFO, directory, ...), which ``read_file``
        then refuses with its reason."""
        try:
            with os.scandir(self.root) as entries:
                return sorted(t for e in entries if (t := self.task_for_path(e.path))
                              and (not regular_only or e.is_file(follow_symlinks=False)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def stamp(self, task: str) -> Stamp | None:
        """The task's path as it is now (``lstat``: a link is not followed), or None if nothing is there."""
        try:
            return Stamp.of(os.stat(self.path_for(task), follow_symlinks=False))
        except FileNotFoundError:
            return None

    def require_file_slot(self, task: str) -> None:
        """Raise Conflict unless the task's path holds a regular file or nothing (a directory or a
        FIFO there would make a write or delete fail halfway)."""
        path = self.path_for(task)
        if (path.exists() or path.is_symlink()) and not (path.is_file() and not path.is_symlink()):
            raise Conflict(f"{path} is not a regular file (a directory, link or device?): remove it from the "
                           f"deltas folder first; nothing was changed")

    def read(self, task: str) -> bytes | None:
        """The file's bytes, or None if there is no file for ``task`` (see ``read_file``)."""
        file = self.read_file(task)
        return None if file is None else file.data

    def read_file(self, task: str) -> StoredFile | None:
        """The task's file (bytes + stamp), or None if there is none. Raises InvalidDelta, without
        reading anything, for a path that is not a regular file (symbolic links included: never
        followed) or a file larger than ``max_file_bytes``; never blocks on a FIFO."""
        path = self.path_for(task)
        try:
            st = os.stat(path, follow_symlinks=False)  # refuse links, FIFOs, devices before opening them
        except FileNotFoundError:
            return None
        except OSError as e:
            raise InvalidDelta(f"cannot read {path}: {e.strerror}") from e
        self._require_regular(path, st)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EMLINK):  # O_NOFOLLOW met a link swapped in since the check
                raise InvalidDelta(f"{path} is a symbolic link: links in the deltas folder are not followed; "
                                   f"copy the delta file into the folder instead") from e
            raise InvalidDelta(f"cannot read {path}: {e.strerror}") from e
        try:
            st = os.fstat(fd)  # the file actually opened
            self._require_regular(path, st)
            chunks, left = [], self.max_file_bytes + 1
            while left > 0 and (chunk := os.read(fd, min(_READ_CHUNK, left))):
                chunks.append(chunk)
                left -= len(chunk)
        except OSError as e:
            raise InvalidDelta(f"cannot read {path}: {e.strerror}") from e
        finally:
            os.close(fd)
        data = b"".join(chunks)
        if len(data) > self.max_file_bytes:  # it grew past the cap while being read
            raise self._too_big(path, len(data))
        return StoredFile(data, Stamp.of(st))

    def _require_regular(self, path: Path, st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            why = ("links in the deltas folder are not followed; copy the delta file into the folder instead"
                   if stat.S_ISLNK(st.st_mode) else "only regular files are read from the deltas folder")
            raise InvalidDelta(f"{path} is {_kind_name(st.st_mode)}: {why}")
        if st.st_size > self.max_file_bytes:
            raise self._too_big(path, st.st_size)

    def _too_big(self, path: Path, size: int) -> InvalidDelta:
        return InvalidDelta(f"{path} is {size} bytes, more than max_upload_bytes ({self.max_file_bytes} bytes, "
                            f"the cap on a delta file): not read")

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
