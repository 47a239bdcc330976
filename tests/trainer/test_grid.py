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


def test_run_grid_commits_records_apart_from_deltas_and_resumes(tiny_bert_dir, tmp_path):
    """Table 3 on a tiny model and a six-sentence SST-2: records land in runs_dir (committed in
    the repo), deltas in deltas_dir (git-ignored); a second call finds every record and runs nothing."""
    from trainer.grid import run_grid

    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    rows = "".join(f"{s}\t{i % 2}\n" for i, s in enumerate(["good film", "bad film", "great", "awful",
                                                              "fine acting", "dull plot"]))
    (folder / "train.tsv").write_text("sentence\tlabel\n" + rows)
    (folder / "dev.tsv").write_text("sentence\tlabel\n" + rows)
    runs, deltas, results = tmp_path / "records", tmp_path / "deltas", tmp_path / "results"
    budget = Budget(table3_epochs=1)
    kwargs = dict(model=str(tiny_bert_dir), tables=("3",), progress=False, log=lambda _: None, deltas_dir=deltas)
    first = run_grid(budget, tmp_path / "glue", runs, results, **kwargs)
    assert first["completed_runs"] == 6
    keys = {r.key for r in plan(budget, ("3",))}
    assert {p.name.removesuffix(".run.json") for p in runs.glob("*.run.json")} == keys
    assert {p.name.removesuffix(".safetensors") for p in deltas.glob("*.safetensors")} == keys
    assert not list(runs.glob("*.lock")) and not list(runs.glob("*.safetensors"))
    assert all(json.loads(p.read_text())["grid"]["key"] in keys for p in runs.glob("*.run.json"))
    stamps = {p: p.stat().st_mtime_ns for p in runs.glob("*.run.json")}
    second = run_grid(budget, tmp_path / "glue", runs, results, **kwargs)
    assert second["completed_runs"] == 6 and {p: p.stat().st_mtime_ns for p in runs.glob("*.run.json")} == stamps


def test_wall_time_is_reported_per_day_when_the_grid_resumes_later():
    from trainer.grid import _span

    sessions = [{"started": "2026-11-24T03:49:01+00:00", "finished": "2026-11-24T04:57:54+00:00"},
                {"started": "2026-11-24T04:12:48+00:00", "finished": "2026-11-24T04:50:00+00:00"},
                {"started": "2026-11-30T10:37:56+00:00", "finished": "2026-11-30T11:09:49+00:00"},
                {"started": "2026-11-30T10:40:00+00:00"}]  # killed: no finish recorded
    assert _span(sessions) == ("4133 s (2026-11-24 03:49:01-04:57:54 UTC) + "
                               "1913 s (2026-11-30 10:37:56-11:09:49 UTC)")
    assert _span([]) == "not recorded"
