"""``bitfit-serve inspect`` / ``tasks`` / ``serve`` argument checks (the server itself: tests/server)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from bitfit_serve import delta as delta_io
from bitfit_serve.cli import app
from tests.factories import random_delta

runner = CliRunner()


def test_inspect(tiny_bert_dir, tiny_roberta_dir, tmp_path):
    path = delta_io.save(random_delta(tiny_bert_dir, "demo", sites="biases"), tmp_path / "demo.safetensors")
    r = runner.invoke(app, ["inspect", str(path)])
    assert r.exit_code == 0, r.output
    assert "task: demo" in r.output and "sites:" in r.output and "check: skipped" in r.output

    r = runner.invoke(app, ["inspect", str(path), "--model", str(tiny_bert_dir), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["check"] == "ok" and info["task"] == "demo" and info["file_bytes"] == path.stat().st_size
    assert all(name.endswith(".bias") for name in info["sites"])

    r = runner.invoke(app, ["inspect", str(path), "--model", str(tiny_roberta_dir)])
    assert r.exit_code == 1 and "architecture" in r.output

    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    r = runner.invoke(app, ["inspect", str(tmp_path / "junk.safetensors")])
    assert r.exit_code == 1 and "invalid delta" in r.output


def test_tasks(tiny_bert_dir, tmp_path):
    assert "no deltas" in runner.invoke(app, ["tasks", str(tmp_path)]).output
    delta_io.save(random_delta(tiny_bert_dir, "alpha"), tmp_path / "alpha.safetensors")
    delta_io.save(random_delta(tiny_bert_dir, "alpha"), tmp_path / "beta.safetensors")
    (tmp_path / "gamma.safetensors").write_bytes(b"junk")
    r = runner.invoke(app, ["tasks", str(tmp_path)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[1].startswith("alpha") and lines[1].endswith("ok")
    assert "metadata names task 'alpha'" in lines[2]
    assert lines[3].startswith("gamma") and "invalid" in lines[3]


def test_serve_refuses_open_admin_on_a_public_host():
    r = runner.invoke(app, ["serve", "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "admin token" in r.output


def test_serve_threads_sets_the_forward_threads_the_inference_thread_uses(tiny_bert_dir, tmp_path, monkeypatch):
    import threading

    import torch
    import uvicorn

    seen = {}

    def fake_run(app, **kwargs):  # instead of serving: what a thread started now would compute with
        worker = threading.Thread(target=lambda: seen.update(threads=torch.get_num_threads()))
        worker.start()
        worker.join()

    monkeypatch.setattr(uvicorn, "run", fake_run)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # so that the flag has something to change, on any machine
    try:
        r = runner.invoke(app, ["serve", "--model", str(tiny_bert_dir), "--deltas", str(tmp_path), "--threads", "1"])
        assert r.exit_code == 0, r.output
        assert seen == {"threads": 1}
    finally:
        torch.set_num_threads(before)
    r = runner.invoke(app, ["serve", "--threads", "0"])
    assert r.exit_code == 2 and "threads must be a positive integer" in r.output
