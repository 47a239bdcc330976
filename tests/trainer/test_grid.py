"""The accuracy grid: sweeps first, seeds at the winning rate, resumability, tables from (fake) records."""

import json


from trainer.grid import Budget, Run, plan, write_tables
from trainer.train import LR_CANDIDATES, hardware


def _fake_record(runs_dir, run, value, val=None):
    metrics = {"accuracy": value, "f1": value + 1, "mcc": value - 1, "spearman": value, "pearson": value + 0.5}
    val_metrics = {k: (val if val is not None else v) for k, v in metrics.items()}
    rec = {"seed": run.seed, "metric": {"rte": "accuracy", "mrpc": "f1", "cola": "mcc", "stsb": "spearman",
                                        "sst2": "accuracy"}[run.task],
           "final": metrics, "val": val_metrics, "selected_epoch": 2, "history": [{"dev": metrics}] * 3,
           "wall_s": 10.0, "n_train": 100, "trainable_base_values": 25_728, "train_args": {"lr": run.lr},
           "warnings": [], "grid": {"key": run.key}, "hardware": {**hardware(), "dtype": run.dtype}}
    (runs_dir / f"{run.key}.run.json").write_text(json.dumps(rec))


def _records(runs_dir, dtype=None):
    from trainer.grid import _records

    return _records(runs_dir, dtype)


def test_plan_starts_with_bitfit_sweeps_and_adds_seeds_once_a_sweep_is_done(tmp_path):
    budget = Budget()
    runs = plan(budget)
    assert runs[0].table == "1" and runs[0].scheme == "bitfit" and runs[0].seed == 0
    sweeps = [r for r in runs if r.table == "1"]
    assert len(sweeps) == 5 * (4 * len(LR_CANDIDATES["bias"])) and all(r.seed == 0 for r in sweeps)
    assert {r.lr for r in sweeps if r.scheme == "full"} == set(LR_CANDIDATES["full"])
    assert not [r for r in runs if r.table in ("2", "3", "dtype")]  # they wait for BitFit's rates
    assert len({r.key for r in runs}) == len(runs)
    assert all(r.max_train_examples is None and r.dtype == "bfloat16" for r in runs)

    rte = [r for r in sweeps if r.task == "rte" and r.scheme == "bitfit"]
    for r, val in zip(rte, (50.0, 60.0, 55.0, 52.0)):
        _fake_record(tmp_path, r, val, val)
    after = plan(budget, records=_records(tmp_path))
    seeds = [r for r in after if r.task == "rte" and r.scheme == "bitfit" and r.seed > 0]
    assert [(r.seed, r.lr) for r in seeds] == [(1, rte[1].lr), (2, rte[1].lr)]  # the best val rate
    assert [r for r in after if r.table == "2" and r.task == "rte"]  # Table 2 runs at RTE's BitFit rate
    assert all(r.lr == rte[1].lr for r in after if r.table == "2")


def test_tables_report_the_winner_with_its_seeds(tmp_path):
    budget = Budget()
    for task in ("rte", "mrpc", "cola", "stsb", "sst2"):
        sweep = [r for r in plan(budget) if r.task == task and r.scheme == "bitfit"]
        for i, r in enumerate(sweep):
            _fake_record(tmp_path, r, 70.0 + i, val=float(i == 1))  # the second rate wins on val
    for r in plan(budget, records=_records(tmp_path)):
        if r.task == "rte" and r.scheme == "bitfit" and r.seed > 0:
            _fake_record(tmp_path, r, 71.0 + 2 * r.seed)  # 71 (seed 0), 73, 75
    result = write_tables(budget, tmp_path, tmp_path / "results")
    cell = result["table1"]["bitfit"]["rte"]
    assert cell["n_seeds"] == 3 and cell["accuracy"]["mean"] == 73.0 and cell["accuracy"]["std"] == 2.0
    assert cell["lr"] == LR_CANDIDATES["bias"][1]
    assert result["table1"]["bitfit"]["cola"]["mcc"]["mean"] == 70.0  # 71 - 1: the winner, not the best dev
    assert result["table1_average"]["full"] is None
    assert set(result["sweeps"]["rte-bitfit"]) == {f"{lr:g}" for lr in LR_CANDIDATES["bias"]}
    md = (tmp_path / "results" / "accuracy.md").read_text()
    assert "73.0 ± 2.0 (n=3)" in md and "not run" in md and "paper: bitfit, BERT-base" in md and "72.3" in md


def test_dtype_check_pairs_fp32_with_the_bf16_run(tmp_path):
    budget = Budget()
    for r in plan(budget):
        if r.task == "cola" and r.scheme == "bitfit":
            _fake_record(tmp_path, r, 30.0, val=30.0)
    check = [r for r in plan(budget, records=_records(tmp_path)) if r.table == "dtype"]
    assert [(r.task, r.dtype) for r in check] == [("cola", "float32")]
    _fake_record(tmp_path, check[0], 29.0)
    result = write_tables(budget, tmp_path, tmp_path / "results")
    assert result["dtype_check"]["cola"]["float32"] == 28.0 and result["dtype_check"]["cola"]["bfloat16"] == 29.0


def test_a_run_in_the_other_precision_stands_in_but_never_for_the_dtype_check(tmp_path):
    """A grid resumed on a CPU without bf16 (budget float32) keeps the bf16 sweeps done elsewhere,
    and the tables say how many runs used each precision; the fp32-vs-bf16 check needs two real runs."""
    bf16, fp32 = Budget(), Budget(dtype="float32")
    cola = [r for r in plan(bf16) if r.task == "cola" and r.scheme == "bitfit"]
    for i, r in enumerate(cola):
        _fake_record(tmp_path, r, 30.0 + i, val=30.0 + i)
    pending = [r for r in plan(fp32, records=_records(tmp_path, "float32")) if r.task == "cola"]
    assert all(r.dtype == "float32" for r in pending)
    sweep = [r for r in pending if r.scheme == "bitfit" and r.seed == 0]
    assert all(r.key in _records(tmp_path, "float32") for r in sweep)  # done, in bf16
    assert all(r.key not in _records(tmp_path) for r in sweep)
    seeds = [r for r in pending if r.scheme == "bitfit" and r.seed > 0]
    assert [r.lr for r in seeds] == [cola[-1].lr] * 2  # the winner is read through the stand-ins
    for r in seeds:
        _fake_record(tmp_path, r, 40.0)
    result = write_tables(fp32, tmp_path, tmp_path / "results")
    assert result["table1"]["bitfit"]["cola"]["n_seeds"] == 3
    assert "4 runs in bfloat16" in (tmp_path / "results" / "accuracy.md").read_text()
    # Back on a bf16 machine: the fp32 seed runs stand in, and the dtype check (fp32 twin of the
    # bf16 winner) is still planned: a bf16 record cannot pose as its own fp32 check.
    check = [r for r in plan(bf16, records=_records(tmp_path, "bfloat16")) if r.table == "dtype"]
    assert [(r.task, r.lr) for r in check] == [("cola", cola[-1].lr)]
    assert check[0].key not in _records(tmp_path, "bfloat16")
    assert write_tables(bf16, tmp_path, tmp_path / "results")["dtype_check"] == {}


def test_hand_written_discussion_survives_rewrites(tmp_path):
    results = tmp_path / "results"
    write_tables(Budget(), tmp_path, results)
    md = results / "accuracy.md"
    md.write_text(md.read_text() + "\n## Discussion (written by hand after the grid)\n\nkeep me\n")
    write_tables(Budget(), tmp_path, results)
    assert md.read_text().count("keep me") == 1


def test_run_grid_commits_records_apart_from_deltas_and_resumes(tiny_bert_dir, tmp_path, monkeypatch):
    """The SST-2 BitFit sweep on a tiny model and a six-sentence SST-2: records land in runs_dir
    (committed in the repo), deltas in deltas_dir (git-ignored); a second call runs nothing."""
    import trainer.grid as grid
    from trainer.grid import run_grid

    monkeypatch.setattr(grid, "LR_CANDIDATES", {"bias": (1e-3, 1e-2), "full": (1e-4,), "frozen": (1e-3,)})
    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    rows = "".join(f"{s}\t{i % 2}\n" for i, s in enumerate(["good film", "bad film", "great", "awful",
                                                              "fine acting", "dull plot", "superb", "boring"]))
    (folder / "train.tsv").write_text("sentence\tlabel\n" + rows)
    (folder / "dev.tsv").write_text("sentence\tlabel\n" + rows)
    runs, deltas, results = tmp_path / "records", tmp_path / "deltas", tmp_path / "results"
    budget = Budget(dtype="float32", steps=2, min_steps=2)
    kwargs = dict(model=str(tiny_bert_dir), tables=("1",), progress=False, log=lambda _: None, deltas_dir=deltas,
                  only=lambda r: r.task == "sst2" and r.scheme == "bitfit")
    first = run_grid(budget, tmp_path / "glue", runs, results, **kwargs)
    keys = {p.name.removesuffix(".run.json") for p in runs.glob("*.run.json")}
    assert keys == {"sst2-bitfit-nall-lr0.001-s0-f32", "sst2-bitfit-nall-lr0.01-s0-f32"}
    assert first["completed_runs"] == 2
    assert {p.name.removesuffix(".safetensors") for p in deltas.glob("*.safetensors")} == keys
    assert not list(runs.glob("*.lock")) and not list(runs.glob("*.safetensors"))
    stamps = {p: p.stat().st_mtime_ns for p in runs.glob("*.run.json")}
    second = run_grid(budget, tmp_path / "glue", runs, results, **kwargs)
    assert second["completed_runs"] == 2 and {p: p.stat().st_mtime_ns for p in runs.glob("*.run.json")} == stamps


def test_run_keys_name_every_coordinate():
    run = Run("1", "rte", "bitfit", 2, 3e-3, None, "bfloat16")
    assert run.key == "rte-bitfit-nall-lr0.003-s2-bf16"
    assert Run("3", "sst2", "bq", 0, 1e-3, 1000, "float32").key == "sst2-bq-n1000-lr0.001-s0-f32"


def test_wall_time_is_reported_per_day_when_the_grid_resumes_later():
    from trainer.grid import _span

    sessions = [{"started": "2026-11-24T03:49:01+00:00", "finished": "2026-11-24T04:57:54+00:00"},
                {"started": "2026-11-24T04:12:48+00:00", "finished": "2026-11-24T04:50:00+00:00"},
                {"started": "2026-11-30T10:37:56+00:00", "finished": "2026-11-30T11:09:49+00:00"},
                {"started": "2026-11-30T10:40:00+00:00"}]  # killed: no finish recorded
    assert _span(sessions) == ("4133 s (2026-11-24 03:49:01-04:57:54 UTC) + "
                               "1913 s (2026-11-30 10:37:56-11:09:49 UTC)")
    assert _span([]) == "not recorded"
