"""Start ``bitfit-serve serve`` processes fast: import once, fork per start.

Crash tests restart the server hundreds of times; importing torch + transformers + fastapi takes
~8-12 s on a busy 2-core machine, which would make each kill -9 cost that much. This process
imports the CLI once (no torch op runs before a fork) and then, for each line ``<json argv>`` on
stdin, forks a child that runs the very same typer entry point as the ``bitfit-serve`` console
script with that argv, and answers the child's pid on stdout. Children are reaped here; the test
kills them by pid.

    python -m tests.reliability.zygote     # then write '["serve", "--port", "8123", ...]\\n'
"""

from __future__ import annotations

import json
import os
import signal
import sys


def main() -> None:
    from bitfit_serve.cli import app  # noqa: F401 - import the heavy modules before any fork
    import bitfit_serve.engine  # noqa: F401
    import bitfit_serve.server  # noqa: F401
    import uvicorn  # noqa: F401

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped automatically
    for line in sys.stdin:
        argv = json.loads(line)
        log = argv.pop(0)
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.setsid()
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            sys.stdin.close()
            code = 0
            try:
                app(argv, prog_name="bitfit-serve")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
        print(pid, flush=True)


if __name__ == "__main__":
    main()
