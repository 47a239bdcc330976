"""A real ``bitfit-serve serve`` process on 127.0.0.1 for tests that need one (kill -9, SIGTERM,
live fuzzing, load). Loads only ever target loopback; every process is signalled by its own pid.

``LiveServer`` runs the ``bitfit-serve`` console script; with a :class:`Zygote` it forks the same
entry point from a process that has already imported it (see ``zygote.py``), so that crash tests
can restart the server hundreds of times.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.live import free_port, listens

REPO = Path(__file__).resolve().parents[2]
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


class Zygote:
    """One pre-imported process that forks ``bitfit-serve <argv>`` children on request."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.reliability.zygote"], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, **ENV})

    def spawn(self, argv: list[str], log: Path) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps([str(log), *argv]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote exited with {self.proc.poll()}")
        return int(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not yet reaped) counts as dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class LiveServer:
    """``bitfit-serve serve``; ``start()`` returns once /ready answers 200."""

    model: Path
    deltas: Path
    log: Path
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    zygote: Zygote | None = None
    port: int = 0
    pid: int | None = None
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.pid is not None and _alive(self.pid)

    def start(self, timeout: float = 180.0, wait_ready: bool = True) -> "LiveServer":
        self.port = free_port()
        argv = ["serve", "--model", str(self.model), "--deltas", str(self.deltas), "--host", "127.0.0.1",
                "--port", str(self.port), "--log-level", "warning", *self.args]
        if self.zygote is not None:
            self.proc = None
            self.pid = self.zygote.spawn(argv, self.log)
        else:
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen([shutil.which("bitfit-serve") or "bitfit-serve", *argv],
                                             stdout=log, stderr=subprocess.STDOUT,
                                             env={**os.environ, **ENV, **self.env})
            self.pid = self.proc.pid
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"server exited:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2.0).status_code == 200 and listens(self.pid, self.port):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """kill -9, and wait until the process is gone."""
        if self.pid is None or not self.alive:
            return
        os.kill(self.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)
        deadline = time.monotonic() + 10
        while self.alive and time.monotonic() < deadline:
            time.sleep(0.005)

    def terminate(self, timeout: float = 60.0) -> None:
        """SIGTERM, then wait for the process to exit (kill -9 if it does not)."""
        assert self.pid is not None
        if self.alive:
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.alive:
            self.kill()
            raise TimeoutError(f"no exit {timeout} s after SIGTERM")

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __enter__(self) -> "LiveServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


async def raw_post(port: int, path: str, body: bytes, timeout: float = 120.0) -> tuple[int, bool, str]:
    """One JSON POST on its own connection with prebuilt bytes: a load client this cheap can offer
    several times the capacity of a server on the same two cores (httpx cannot). Returns (status,
    whether a Retry-After header came, error code or ""); raises OSError / TimeoutError if no answer."""
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body))
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    head = head.lower()
    if not head.startswith(b"http/1.1 "):
        raise ConnectionError(f"no answer ({len(answer)} bytes)")
    status = int(head[9:12])
    code = json.loads(payload).get("error", {}).get("code", "") if status >= 400 and payload else ""
    return status, b"\r\nretry-after:" in head, code
