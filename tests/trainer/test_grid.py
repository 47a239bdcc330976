"""The accuracy grid: plan order, resumability, and tables from (fake) run records."""

import json

import pytest

from trainer.grid import Budget, plan, write_tables


def _fake_record(runs_dir, run, value):
    metrics = {"accuracy": value, "f1": value + 1, "mcc": value - 1, "spearman": value, "pearson": value + 0.5}
    rec = {"seed": run.seed, "final": metrics, "best": metrics, "best_epoch": 1, "wall_s": 10.0,
           "n_train": 100, "trainable_base_values": 25_728, "grid": {"key": run.key}}
    (runs_dir / f"{run.key}.run.json").write_text(json.dumps(rec))


def test_plan_priorities_and_counts():
    runs = plan(Budget())
    assert runs[0].table == "1" and runs[0].scheme == "bitfit" and runs[0].seed == 0
    assert [r.table for r in runs] == sorted([r.table for r in runs], key=["1", "3", "2"].index)
    assert len(runs) == 20 + 2 * 2 * 3 + 6 + 27
    assert len({r.key for r in runs}) == len(runs)
    assert all(r.max_train_examples == 3000 for r in runs if r.table in "12" and r.task in ("sst2", "cola"))
    assert all(r.lr == pytest.approx(2e-5 * 5) for r in runs if r.scheme == "full")
    assert {r.seed for r in runs if r.task == "rte" and r.scheme == "bitfit"} == {0, 1, 2}


def test_tables_from_partial_records(tmp_path):
    budget = Budget()
    runs = plan(budget)
    rte_bitfit = [r for r in runs if r.task == "rte" and r.scheme == "bitfit"]
    for r, v in zip(rte_bitfit, (70.0, 72.0, 74.0)):
        _fake_record(tmp_path, r, v)
    for r in runs:
        if r.table == "1" and r.scheme == "bitfit" and r.task != "rte":
            _fake_record(tmp_path, r, 80.0)
    result = write_tables(budget, tmp_path, tmp_path / "results")
    cell = result["table1"]["bitfit"]["rte"]
    assert cell["n_seeds"] == 3 and cell["accuracy"]["mean"] == 72.0 and cell["accuracy"]["std"] == 2.0
    assert result["table1_average"]["bitfit"] == (72.0 + 81.0 + 79.0 + 80.0 + 80.0) / 5
    assert result["table1_average"]["full"] is None
    md = (tmp_path / "results" / "accuracy.md").read_text()
    assert "72.0 ± 2.0 (n=3)" in md and "not run" in md and "CPU" in md
    assert json.loads((tmp_path / "results" / "accuracy.json").read_text())["completed_runs"] == 9  # 3 RTE + 3 MRPC seeds + CoLA, STS-B, SST-2


def test_hand_written_discussion_survives_rewrites(tmp_path):
    results = tmp_path / "results"
    write_tables(Budget(), tmp_path, results)
    md = results / "accuracy.md"
    md.write_text(md.read_text() + "\n## Discussion (written by hand after the grid)\n\nkeep me\n")
    write_tables(Budget(), tmp_path, results)
    assert md.read_text().count("keep me") == 1
