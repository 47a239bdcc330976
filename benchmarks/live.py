"""The real ``bitfit-serve serve`` process for the HTTP benchmarks (``hot_add``, ``http_e2e``):
a free loopback port, a :class:`Server` that is ready only once its own process listens there, and
the server's ``/metrics`` forward counters, read before and after a load to tell how busy its model
was. Tests' live servers use :func:`free_port` and :func:`listens` from here too.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` listens on ``port``. A port picked free may be taken by another
    process before the server binds it: that process's /ready must not pass for the server's
    (whose bind then fails and it exits)."""
    import psutil

    try:
        process = psutil.Process(pid)
        connections = getattr(process, "net_connections", None) or process.connections  # psutil < 6
        sockets = connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in sockets)


# The server's /metrics counters of its forward passes: seconds, passes, sequences.
FORWARD_COUNTERS = ("bitfit_forward_duration_seconds_sum", "bitfit_forward_duration_seconds_count",
                    "bitfit_batch_size_sum")


def forward_activity(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict:
    """What the server's model did between two scrapes of FORWARD_COUNTERS: how many forwards, their
    mean time and size, and the share of the wall time it was busy (how loaded the server was)."""
    seconds, passes, sequences = (after[n] - before[n] for n in FORWARD_COUNTERS)
    return {"forward_passes": passes, "forward_ms_mean": seconds / passes * 1e3 if passes else None,
            "sequences_per_forward": sequences / passes if passes else None,
            "forward_busy_share": seconds / wall_s}


class Server:
    """The real ``bitfit-serve serve`` process on 127.0.0.1 and a free port, stopped on exit."""

    def __init__(self, model: Path, deltas: Path, *flags: str, log_path: Path | None = None,
                 timeout_s: float = 300.0):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = ["bitfit-serve", "serve", "--model", str(model), "--deltas", str(deltas),
                        "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning", *flags]
        self._log = open(log_path or os.devnull, "w")
        import subprocess

        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}: {' '.join(self.command)}")
            try:
                if httpx.get(self.url + "/ready", timeout=2.0).status_code == 200 and listens(self.proc.pid, self.port):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"server not ready after {timeout_s:.0f} s: {' '.join(self.command)}")
            time.sleep(0.2)

    def metrics(self, *names: str) -> dict[str, float]:
        """Several unlabelled samples from one scrape, so that they describe the same moment."""
        import httpx

        found = {}
        for line in httpx.get(self.url + "/metrics", timeout=10.0).text.splitlines():
            name, _, value = line.partition(" ")
            if name in names:
                found[name] = float(value)
        missing = set(names) - set(found)
        if missing:
            raise KeyError(f"not in /metrics: {sorted(missing)}")
        return found

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
