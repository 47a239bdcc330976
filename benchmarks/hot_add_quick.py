"""Hot add over HTTP: time from the start of ``PUT /v1/tasks/{task}`` to the first successful predict
on that task, against the real ``bitfit-serve serve`` process on the default MiniLM, while a
background client keeps predicting another task (every one of its requests must succeed).

    python -m benchmarks.hot_add_quick            # from the repository root; --adds 30 by default

Prints p50 / p90 / max and writes benchmarks/results/hot_add_quick.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from bitfit_serve import __version__
from bitfit_serve import delta as delta_io
from bitfit_serve.model.base import load_hf_base
from tests.factories import random_delta

RESULTS = Path(__file__).resolve().parent / "results" / "hot_add_quick.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not become ready")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adds", type=int, default=30)
    args = parser.parse_args()

    _, _, hf_base = load_hf_base(None)
    payloads = [delta_io.to_bytes(random_delta(None, f"hot{i}", seed=i, hf_base=hf_base))
                for i in range(args.adds)]
    folder = Path(tempfile.mkdtemp(prefix="hot-add-"))
    delta_io.save(random_delta(None, "steady", seed=999, hf_base=hf_base), folder / "deltas" / "steady.safetensors")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    exe = shutil.which("bitfit-serve") or sys.exit("bitfit-serve is not installed (pip install -e .)")
    proc = subprocess.Popen([exe, "serve", "--model", "default", "--deltas", str(folder / "deltas"),
                             "--port", str(port), "--log-level", "warning"])
    try:
        wait_ready(base, proc)
        stop = threading.Event()
        background = {"ok": 0, "failed": 0}

        def traffic() -> None:
            with httpx.Client(base_url=base, timeout=30) as c:
                while not stop.is_set():
                    r = c.post("/v1/tasks/steady/predict", json={"inputs": ["a steady stream of requests"]})
                    background["ok" if r.status_code == 200 else "failed"] += 1

        thread = threading.Thread(target=traffic)
        thread.start()
        upload_s, servable_s, first_tries = [], [], []
        with httpx.Client(base_url=base, timeout=30) as client:
            client.post("/v1/tasks/steady/predict", json={"inputs": ["warm-up"]})
            for i, data in enumerate(payloads):
                start = time.perf_counter()
                r = client.put(f"/v1/tasks/hot{i}", content=data,
                               headers={"Content-Type": "application/octet-stream"})
                assert r.status_code == 201, r.text
                upload_s.append(time.perf_counter() - start)
                tries = 0
                while True:
                    tries += 1
                    r = client.post(f"/v1/tasks/hot{i}/predict", json={"inputs": ["is it servable yet?"]})
                    if r.status_code == 200:
                        break
                servable_s.append(time.perf_counter() - start)
                first_tries.append(tries)
        stop.set()
        thread.join()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(folder, ignore_errors=True)

    def summary(xs: list[float]) -> dict[str, float]:
        xs = sorted(xs)
        return {"p50_ms": 1e3 * statistics.median(xs), "p90_ms": 1e3 * xs[int(0.9 * (len(xs) - 1))],
                "max_ms": 1e3 * xs[-1]}

    result = {
        "command": " ".join(["python -m benchmarks.hot_add_quick", *sys.argv[1:]]),
        "what": "PUT /v1/tasks/{task} start -> first 200 from POST /v1/tasks/{task}/predict, real server "
                "process on the default MiniLM (all-MiniLM-L6-v2, fp32, CPU), one background client "
                "predicting another task throughout",
        "adds": args.adds,
        "delta_bytes": len(payloads[0]),
        "upload": summary(upload_s),
        "upload_to_servable": summary(servable_s),
        "predict_tries_until_servable": max(first_tries),
        "background_requests": background,
        "hardware": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "load_average_1m_at_end": os.getloadavg()[0]},
        "versions": {"bitfit_serve": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    s = result["upload_to_servable"]
    print(f"hot add over HTTP ({args.adds} adds, {len(payloads[0])} B deltas, {os.cpu_count()} cores): "
          f"upload -> servable p50 {s['p50_ms']:.1f} ms, p90 {s['p90_ms']:.1f} ms, max {s['max_ms']:.1f} ms; "
          f"first predict succeeded on try {max(first_tries)} at most; background requests {background}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
