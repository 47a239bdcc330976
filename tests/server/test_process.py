"""The real ``bitfit-serve serve`` process on a free port, over HTTP, settings from flags and env."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import httpx

from benchmarks.live import free_port, listens
from tests.server.conftest import write_delta


def test_serve_process(tiny_bert_dir, tmp_path, delta_bytes):
    deltas = tmp_path / "deltas"
    write_delta(deltas, "sst2", delta_bytes("sst2"))
    port = free_port()
    exe = shutil.which("bitfit-serve")
    cmd = [exe] if exe else [sys.executable, "-c", "from bitfit_serve.cli import app; app()"]
    env = {**os.environ, "BITFIT_SERVE_ADMIN_TOKEN": "tok", "BITFIT_SERVE_MAX_TEXTS_PER_REQUEST": "3"}
    proc = subprocess.Popen([*cmd, "serve", "--model", str(tiny_bert_dir), "--deltas", str(deltas),
                             "--port", str(port), "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{base}/ready", timeout=1).status_code == 200 and listens(proc.pid, port):
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        with httpx.Client(base_url=base, timeout=10) as client:
            r = client.post("/v1/tasks/sst2/predict", json={"inputs": ["a gripping film", "dull"]})
            assert r.status_code == 200 and len(r.json()["predictions"]) == 2
            r = client.post("/v1/tasks/sst2/predict", json={"inputs": ["x"] * 4})  # limit from the env
            assert r.status_code == 413 and "max_texts_per_request=3" in r.json()["error"]["message"]
            assert client.put("/v1/tasks/new", content=delta_bytes("new")).status_code == 401  # token from the env
            auth = {"Authorization": "Bearer tok"}
            assert client.put("/v1/tasks/new", content=delta_bytes("new"), headers=auth).status_code == 201
            assert client.post("/v1/predict", json={"items": [{"task": "new", "inputs": ["x"]},
                                                              {"task": "sst2", "inputs": ["y"]}]}).status_code == 200
            assert client.delete("/v1/tasks/new", headers=auth).status_code == 200
            assert client.get("/v1/tasks/new").status_code == 404
            assert "bitfit_resident_tasks 1.0" in client.get("/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status tells how it ended.
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert sorted(p.name for p in deltas.iterdir()) == ["sst2.safetensors"]
