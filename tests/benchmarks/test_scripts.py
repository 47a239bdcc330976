"""Every benchmark script runs end to end in ``--quick`` mode on a tiny random BERT and a tiny
GLUE-shaped folder, and writes its JSON and plot. Nothing here checks a timing."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from benchmarks import glue, live, models, timing

SCRIPTS = ["vs_hf", "mixed_tasks", "vs_swap", "vs_lora", "memory", "hot_add", "http_e2e"]

SENTENCES = ["a gripping , beautifully made film .", "the plot is thin", "Nobody expected the results at all.",
             "A man is playing a guitar on the street while people walk by and listen."]


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    """The dev files ``benchmarks.glue.GLUE_DEV`` reads, a few rows each, in GLUE's layouts."""
    root = tmp_path_factory.mktemp("glue")
    for task, (file, columns, header) in glue.GLUE_DEV.items():
        path = root / file
        path.parent.mkdir(parents=True, exist_ok=True)
        width = max(columns) + 1
        rows = []
        for i, s in enumerate(SENTENCES * 3):
            row = [str(i)] * width
            for j, c in enumerate(columns):
                row[c] = SENTENCES[(i + j) % len(SENTENCES)] if j else s
            rows.append("\t".join(row))
        lines = (["\t".join(f"col{c}" for c in range(width))] if header else []) + rows
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_glue_reader_keeps_singles_and_pairs(glue_dir):
    texts = glue.glue_dev_texts(glue_dir)
    assert all(isinstance(t, str) for t in texts["SST-2"] + texts["CoLA"])
    assert all(isinstance(t, tuple) and len(t) == 2 for t in texts["RTE"] + texts["MRPC"])


def test_glue_folder_is_the_option_else_env_glue_dir_else_relative_to_the_working_directory(monkeypatch, tmp_path):
    """The rule of ``bitfit-train``: no machine's path is built in."""
    from benchmarks import cli

    monkeypatch.delenv("GLUE_DIR", raising=False)
    assert cli.parser("").parse_args([]).glue_dir == Path("../shared/data/glue")
    monkeypatch.setenv("GLUE_DIR", str(tmp_path))
    assert cli.parser("").parse_args([]).glue_dir == tmp_path
    assert cli.parser("").parse_args(["--glue-dir", "elsewhere"]).glue_dir == Path("elsewhere")


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_runs_quick(name, tiny_bert_dir, glue_dir, tmp_path, monkeypatch):
    module = importlib.import_module(f"benchmarks.{name}")
    monkeypatch.setattr(sys, "argv", [f"benchmarks/{name}.py", "--quick", "--model", str(tiny_bert_dir),
                                      "--glue-dir", str(glue_dir), "--out", str(tmp_path)])
    module.main()
    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert record["benchmark"] == name
    assert record["environment"]["torch"]
    assert f"python -m benchmarks.{name} --quick" in record["command"]
    assert set(record["load_average_1min"]) == {"before", "after"}
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    # Where a script compares the engine with a model doing the same work, the logits must agree.
    diffs = [record.get("max_abs_logit_diff")] + [c.get("max_abs_logit_diff_engine_vs_swap")
                                                 for c in record.get("cases", {}).values() if isinstance(c, dict)]
    assert all(diff <= 1e-5 for diff in diffs if diff is not None)
    assert name not in ("vs_hf", "vs_swap") or any(diff is not None for diff in diffs)


def test_hot_add_open_loop_load_records_how_busy_the_server_was(tiny_bert_dir, glue_dir, tmp_path, monkeypatch):
    from benchmarks import hot_add

    monkeypatch.setattr(sys, "argv", ["benchmarks/hot_add.py", "--quick", "--model", str(tiny_bert_dir),
                                      "--glue-dir", str(glue_dir), "--out", str(tmp_path), "--load-rate", "50"])
    hot_add.main()
    summary = json.loads((tmp_path / "hot_add.json").read_text())["summary"]
    assert summary["load"] == "open loop 50 req/s"
    assert summary["failed_requests"]["total"] == 0
    assert summary["load_generator_requests"] > 0
    server = summary["server_during_adds"]
    # every add's first prediction is at least one forward; the load generator adds more
    assert server["forward_passes"] >= summary["adds"] and 0 < server["forward_busy_share"] < 1
    assert set(summary["batch1_forward_ms_in_process"]) == {"back_to_back", "after_100ms_asleep",
                                                            "after_100ms_busy_wait"}


def test_http_e2e_compares_the_tei_face_with_the_native_route(tiny_bert_dir, glue_dir, tmp_path, monkeypatch):
    from benchmarks import http_e2e

    monkeypatch.setattr(sys, "argv", ["benchmarks/http_e2e.py", "--quick", "--model", str(tiny_bert_dir),
                                      "--glue-dir", str(glue_dir), "--out", str(tmp_path), "--faces", "native,tei",
                                      "--slices", "2"])
    http_e2e.main()
    levels = json.loads((tmp_path / "http_e2e.json").read_text())["levels"]
    for level in levels.values():
        assert set(level["faces"]) == {"native", "tei"} and level["ratio"] > 0
        assert all(face["failed"] == 0 and face["ok"] > 0 for face in level["faces"].values())


def test_server_is_not_fooled_by_another_process_on_its_port(tiny_bert_dir, tmp_path, monkeypatch):
    """The port is picked free, then bound later; if another process takes it in between, its
    /ready must not pass for the benchmark's server (whose bind then fails)."""
    import http.server
    import threading

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    monkeypatch.setattr(live, "free_port", lambda: other.server_address[1])
    try:
        with pytest.raises(SystemExit, match="server exited"):
            live.Server(tiny_bert_dir, tmp_path / "deltas", timeout_s=120)
    finally:
        other.shutdown()


def test_percentile_is_nearest_rank():
    values = list(range(100, 0, -1))  # 1..100, unsorted
    assert [timing.percentile(values, q) for q in (0, 1, 50, 99, 100)] == [1, 1, 50, 99, 100]
    assert timing.percentile(list(range(1, 51)), 50) == 25 and timing.percentile([7.0], 99) == 7.0
    assert timing.percentile([1, 2, 3], 50) == 2


def test_forward_activity_is_the_difference_of_two_scrapes():
    names = live.FORWARD_COUNTERS  # seconds, passes, sequences
    before = dict(zip(names, (1.0, 10, 30)))
    after = dict(zip(names, (1.5, 20, 50)))
    assert live.forward_activity(before, after, wall_s=2.0) == {
        "forward_passes": 10, "forward_ms_mean": 50.0, "sequences_per_forward": 2.0, "forward_busy_share": 0.25}
    assert live.forward_activity(before, before, wall_s=2.0)["forward_ms_mean"] is None


def test_summary_lists_every_target_even_without_results(tmp_path):
    from benchmarks import summary

    rows = summary.rows(tmp_path, "")
    assert rows and all(measured == "not run" for _, measured, _, _ in rows)


def test_paired_ratio_is_the_median_of_per_repetition_speed_ratios():
    # The variant is 10% slower in every repetition; repetitions 3-5 ran while the machine was
    # twice as slow, one pair of them a further 50% (both sides of a pair are hit alike).
    reference = [1.0, 1.0, 2.0, 2.0, 3.0]
    variant = [1.1, 1.1, 2.2, 2.2, 3.3]
    assert timing.paired_ratio(reference, variant) == pytest.approx(1 / 1.1)
    assert timing.paired_ratio(variant, reference) == pytest.approx(1.1)
    with pytest.raises(AssertionError):
        timing.paired_ratio(reference, variant[:-1])


def test_gpu_kit_writes_an_fp16_model_the_engine_serves_and_the_glue_files_read(tiny_bert_dir, glue_dir, tmp_path,
                                                                                monkeypatch):
    import torch
    from safetensors.torch import load_file

    from benchmarks import gpu_kit
    from bitfit_serve.engine import Engine

    gpu_kit.write_fp16_model(tiny_bert_dir, tmp_path / "model")
    gpu_kit.copy_glue_dev(glue_dir, tmp_path / "glue")
    weights = load_file(tmp_path / "model" / gpu_kit.WEIGHTS)
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float16}
    assert glue.glue_dev_texts(tmp_path / "glue") == glue.glue_dev_texts(glue_dir)
    monkeypatch.setenv(models.MINILM_ENV, str(tmp_path / "model"))
    assert models.model_path("minilm") == tmp_path / "model"  # what gpu_run.sh points the scripts at

    texts = SENTENCES[:3]
    kit, original = Engine.from_pretrained(tmp_path / "model"), Engine.from_pretrained(tiny_bert_dir)
    for engine, folder in ((kit, tmp_path / "model"), (original, tiny_bert_dir)):
        engine.add_task(models.DeltaFactory(folder)("t", seed=0))  # a delta names its base's fingerprint
    for a, b in zip(kit.predict([("t", x) for x in texts]), original.predict([("t", x) for x in texts])):
        assert abs(a.score - b.score) < 1e-2  # fp16 weights, fp32 compute: close, not equal
