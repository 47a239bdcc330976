"""``bitfit-train``: train deltas, check them with the serving engine, run the accuracy grid.

    bitfit-train train --task RTE --scheme bitfit --model default --out deltas/rte.safetensors
    bitfit-train train --train-file my.csv --dev-file my_dev.csv --text-field review \\
        --label-field stars --name reviews --out deltas/reviews.safetensors
    bitfit-train eval deltas/rte.safetensors            # dev metric recomputed by bitfit_serve.Engine
    bitfit-train heatmap deltas/rte.safetensors --out benchmarks/results/bias_change_rte.png
    bitfit-train grid                                   # the accuracy tables (see trainer/grid.py)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer

from trainer import schemes
from trainer.data import TaskData, glue_task_name, load_files, load_glue, load_hf_folder, subsample
from trainer.grid import Budget
from trainer.train import (BIAS_LR, FROZEN_LR, FULL_LR, LR_CANDIDATES, SCHEDULES, TrainArgs, bf16_supported,
                           default_lr, resolve_device)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train BitFit deltas and their variants; evaluate them through the serving engine.")

GLUE_DIR_HELP = "GLUE folder (TASK/train.tsv, TASK/dev.tsv); env GLUE_DIR"


THREADS_HELP = "torch CPU threads (on a CPU shared with other jobs, 1 avoids OpenMP spin-waiting)"


def _set_threads(threads: Optional[int]) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


TSV_QUOTING_HELP = ("TSV files: none = quotes are text (GLUE), csv = fields quoted as pandas writes them, "
                    "auto = whichever reading is consistent; ambiguous files are refused")


def _glue_dir(value: Optional[Path]) -> Path:
    return value if value is not None else Path(os.environ.get("GLUE_DIR", "../shared/data/glue"))


def _load_data(task: Optional[str], glue_dir: Optional[Path], train_file: Optional[Path],
               dev_file: Optional[Path], hf_dataset: Optional[Path], name: Optional[str],
               text_field: List[str], label_field: str, regression: bool, labels: List[str],
               tsv_quoting: str) -> TaskData:
    if task:
        return load_glue(task, _glue_dir(glue_dir))
    if not name:
        raise typer.BadParameter("--name is required with --train-file/--hf-dataset (it names the task)")
    if not text_field:
        raise typer.BadParameter("--text-field is required (once, or twice for text pairs)")
    if hf_dataset is not None:
        return load_hf_folder(name, hf_dataset, text_field, label_field, regression)
    if train_file is None:
        raise typer.BadParameter("give --task, or --train-file (and optionally --dev-file), or --hf-dataset")
    return load_files(name, train_file, dev_file, text_field, label_field, regression, labels or None, tsv_quoting)


def _parse_lr(value: Optional[str]) -> Optional[float]:
    """None (the scheme's default), 'auto' (-> None here, see --lr auto) or a positive number."""
    if value is None or value == "auto":
        return None
    try:
        lr = float(value)
    except ValueError:
        raise typer.BadParameter(f"--lr: {value!r} is neither a number nor 'auto'") from None
    if not lr > 0:
        raise typer.BadParameter(f"--lr: {value!r} must be positive")
    return lr


@app.command()
def train(
    task: Optional[str] = typer.Option(None, help="GLUE task: SST-2, CoLA, MRPC, RTE, STS-B, WNLI"),
    scheme: str = typer.Option("bitfit", help=f"one of: {', '.join(schemes.SCHEMES)}"),
    model: str = typer.Option("default", help="base model folder, or 'default' (bundled MiniLM)"),
    out: Optional[Path] = typer.Option(None, help="delta path (default deltas/<task>.safetensors)"),
    pooling: str = typer.Option("mean", help="mean | cls | pooler"),
    lr: Optional[str] = typer.Option(None, help=f"a rate, or 'auto': try {', '.join(map(str, LR_CANDIDATES['bias']))} "
                                                f"(bias schemes; full: {', '.join(map(str, LR_CANDIDATES['full']))}) "
                                                f"on the validation split and keep the best. Default: {BIAS_LR:g} "
                                                f"for bias schemes, {FULL_LR:g} full, {FROZEN_LR:g} frozen"),
    lr_candidates: Optional[str] = typer.Option(None, help="comma-separated rates for --lr auto"),
    steps: int = typer.Option(TrainArgs.steps, help="optimizer-step budget (epochs follow from it)"),
    max_epochs: int = typer.Option(TrainArgs.max_epochs, help="cap on epochs from --steps (the BitFit paper's 20)"),
    min_steps: int = typer.Option(TrainArgs.min_steps, help="floor on steps for tiny data sets, over the cap"),
    epochs: Optional[int] = typer.Option(None, help="a fixed number of epochs instead of the step budget"),
    batch_size: int = typer.Option(TrainArgs.batch_size),
    max_length: int = typer.Option(TrainArgs.max_length),
    schedule: str = typer.Option(TrainArgs.schedule, help=f"one of {SCHEDULES}: constant, or warmup + linear decay"),
    warmup_ratio: float = typer.Option(TrainArgs.warmup_ratio),
    val_fraction: float = typer.Option(TrainArgs.val_fraction, help="share of train held out (stratified, "
                                       "at most 2,000 examples) to pick the epoch and --lr auto's rate"),
    patience: int = typer.Option(TrainArgs.patience, help="early stop after this many epochs without a better "
                                 "val score, once half the budget is spent and the model has left the "
                                 "class prior; 0 = off"),
    seed: int = typer.Option(0),
    max_train_examples: Optional[int] = typer.Option(None, help="seeded random subsample of the train set"),
    rand_count: Optional[int] = typer.Option(None, help="entries trained by rand_* schemes"),
    max_steps: Optional[int] = typer.Option(None, help="stop after this many steps (smoke runs)"),
    device: str = typer.Option("auto", help="auto (cuda if present), cpu, cuda, cuda:N"),
    dtype: str = typer.Option("float32", help="float32, or bfloat16 (autocast; CPUs with bf16 instructions, "
                              "GPUs); evaluation and the saved delta stay fp32"),
    glue_dir: Optional[Path] = typer.Option(None, help=GLUE_DIR_HELP),
    train_file: Optional[Path] = typer.Option(None, help="your CSV/TSV/JSONL training file"),
    dev_file: Optional[Path] = typer.Option(None, help="your CSV/TSV/JSONL dev file (optional: reported only)"),
    hf_dataset: Optional[Path] = typer.Option(None, help="a datasets folder saved with save_to_disk"),
    name: Optional[str] = typer.Option(None, help="task name for your own data"),
    text_field: List[str] = typer.Option([], help="text column(s): once, or twice for pairs"),
    label_field: str = typer.Option("label", help="label column"),
    regression: bool = typer.Option(False, help="the label is a number (MSE, one output)"),
    labels: List[str] = typer.Option([], "--label", help="class names in class-id order (default: sorted)"),
    tsv_quoting: str = typer.Option("auto", help=TSV_QUOTING_HELP),
    progress: bool = typer.Option(True, help="progress bars"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
) -> None:
    """Train one scheme on one task; write the delta (or record / checkpoint) and a run record.

    The epoch (and with --lr auto, the rate) is chosen on a validation split carved from the
    training data; the dev set, if any, is only reported."""
    from trainer.export import write_outputs
    from trainer.train import sweep as run_sweep
    from trainer.train import train as run_training

    _set_threads(threads)

    if scheme not in schemes.SCHEMES:
        raise typer.BadParameter(f"unknown scheme {scheme!r}; choose one of {', '.join(schemes.SCHEMES)}")
    rate = _parse_lr(lr)
    candidates = None
    if lr_candidates:
        candidates = [_parse_lr(x.strip()) for x in lr_candidates.split(",") if x.strip()]
        if lr != "auto":
            raise typer.BadParameter("--lr-candidates goes with --lr auto")
    data = _load_data(task, glue_dir, train_file, dev_file, hf_dataset, name, text_field, label_field,
                      regression, labels, tsv_quoting)
    data = subsample(data, max_train_examples, seed)
    args = TrainArgs(scheme=scheme, pooling=pooling, lr=rate if rate is not None else default_lr(data.name, scheme),
                     epochs=epochs, steps=steps, max_epochs=max_epochs, min_steps=min_steps,
                     batch_size=batch_size, max_length=max_length, schedule=schedule, warmup_ratio=warmup_ratio,
                     val_fraction=val_fraction, patience=patience or None, seed=seed,
                     max_train_examples=max_train_examples, rand_count=rand_count, max_steps=max_steps,
                     device=device, dtype=dtype)
    out = out or Path("deltas") / f"{data.name}.safetensors"
    model_path = None if model == "default" else model
    try:
        result = run_sweep(data, args, candidates, model_path, progress) if lr == "auto" \
            else run_training(data, args, model_path, progress=progress)
    except ValueError as e:  # bad device / dtype / split: one line, not a traceback
        raise typer.BadParameter(str(e)) from None
    rec = write_outputs(result, data, result.args, model, out)
    typer.echo(json.dumps({k: rec[k] for k in ("task", "scheme", "seed", "trainable_base_values", "metric",
                                                "selected_epoch", "val", "final", "last", "wall_s", "outputs",
                                                "record_path", "note", "warnings", "sweep")}, indent=2))
    for warning in rec["warnings"]:
        typer.secho(f"WARNING: this delta has not learned: {warning}", err=True, fg="red", bold=True)


@app.command("eval")
def eval_command(
    delta_path: Path = typer.Argument(..., help="a delta file"),
    model: str = typer.Option("default", help="base model folder, or 'default'"),
    glue_dir: Optional[Path] = typer.Option(None, help=GLUE_DIR_HELP),
    dev_file: Optional[Path] = typer.Option(None, help="dev file for a non-GLUE task (CSV/TSV/JSONL)"),
    label_field: str = typer.Option("label"),
    tsv_quoting: str = typer.Option("auto", help=TSV_QUOTING_HELP),
    dtype: str = typer.Option("float32", help="serving dtype: float32, bfloat16 or float16 (what "
                                              "bitfit-serve serve --dtype would serve it in)"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
) -> None:
    """Serve the delta with bitfit_serve.Engine and recompute its dev metric."""
    _set_threads(threads)
    from bitfit_serve import Engine
    from bitfit_serve import delta as delta_io
    from trainer.data import from_records, read_records
    from trainer.evaluate import evaluate

    d = delta_io.load(delta_path)
    if dev_file is not None:
        rows = read_records(dev_file, tsv_quoting)
        data = from_records(d.task, rows, rows, d.inputs, label_field, d.problem_type == "regression", d.labels,
                            sources=(str(dev_file), str(dev_file)))
    else:
        data = load_glue(glue_task_name(d.task), _glue_dir(glue_dir))
    engine = Engine.from_pretrained(None if model == "default" else model, dtype=dtype)
    report = evaluate(engine, d, data)
    typer.echo(json.dumps({**report, "dtype": str(engine.base.dtype).removeprefix("torch.")}, indent=2))


@app.command()
def heatmap(
    delta_path: Path = typer.Argument(..., help="a delta file"),
    out: Path = typer.Option(..., help="PNG to write"),
    model: str = typer.Option("default", help="base model folder, or 'default'"),
) -> None:
    """Per-layer, per-site mean |b0 - bF| of a delta (the BitFit paper's Figure 1) + q/k/v means."""
    from bitfit_serve import delta as delta_io
    from bitfit_serve.model.base import load_hf_base
    from trainer.analysis import bias_change, plot_heatmap, qkv_comparison

    d = delta_io.load(delta_path)
    _, config, base = load_hf_base(None if model == "default" else model)
    change = bias_change(d.sites, dict(base.named_parameters()), config.num_hidden_layers)
    metric = d.metrics.get("metric", "")
    value = d.metrics.get("dev", {}).get(metric)
    title = f"{d.task}: {d.scheme}, mean |b0 - bF| per layer" + (f" (dev {metric} {value:.1f})" if value else "")
    plot_heatmap(change, title, out)
    typer.echo(json.dumps({"png": str(out), "qkv_mean_change": qkv_comparison(change)}, indent=2))


@app.command()
def grid(
    glue_dir: Optional[Path] = typer.Option(None, help=GLUE_DIR_HELP),
    runs_dir: Path = typer.Option(Path("benchmarks/results/accuracy_runs"),
                                  help="run records (committed; a run whose record exists is skipped)"),
    deltas_dir: Path = typer.Option(Path("runs/accuracy"), help="the deltas the runs write (git-ignored)"),
    results_dir: Path = typer.Option(Path("benchmarks/results"), help="where accuracy.md/json go"),
    model: str = typer.Option("default"),
    tables: str = typer.Option("1,3,2", help="tables to run, in priority order"),
    schemes_filter: Optional[str] = typer.Option(None, "--schemes", help="only these schemes (comma-separated)"),
    tasks_filter: Optional[str] = typer.Option(None, "--tasks", help="only these tasks (comma-separated)"),
    rates_filter: Optional[str] = typer.Option(None, "--rates", help="only runs at these learning rates "
                                               "(comma-separated, e.g. 3e-3): the likely winner of a sweep first"),
    seeds: int = typer.Option(Budget.seeds, help="seeds for bitfit/full on RTE, MRPC, CoLA, STS-B and Table 3"),
    dtype: str = typer.Option("auto", help="training autocast: bfloat16, float32, or auto (bfloat16 where "
                                           "the hardware has bf16 instructions, else float32)"),
    rte_examples: int = typer.Option(0, help="train subsample, 0 = all"),
    mrpc_examples: int = typer.Option(0, help="train subsample, 0 = all"),
    cola_examples: int = typer.Option(0, help="train subsample, 0 = all"),
    stsb_examples: int = typer.Option(0, help="train subsample, 0 = all"),
    sst2_examples: int = typer.Option(0, help="train subsample, 0 = all"),
    stop_after: Optional[str] = typer.Option(None, help="UTC time HH:MM after which no new run starts"),
    dry_run: bool = typer.Option(False, help="print the plan and exit"),
    tables_only: bool = typer.Option(False, help="rewrite accuracy.md/json from existing records, run nothing"),
    progress: bool = typer.Option(True),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
) -> None:
    """Run the accuracy grid (Tables 1-3, learning-rate sweeps) and write accuracy.md/json; resumable."""
    _set_threads(threads)
    import time
    from datetime import datetime, timezone

    from trainer.grid import _records, plan, run_grid, write_tables

    if dtype == "auto":
        dtype = "bfloat16" if bf16_supported(resolve_device("auto")) else "float32"
    budget = Budget(seeds=seeds, dtype=dtype, rte_examples=rte_examples or None, mrpc_examples=mrpc_examples or None,
                    cola_examples=cola_examples or None, stsb_examples=stsb_examples or None,
                    sst2_examples=sst2_examples or None)
    order = tuple(t.strip() for t in tables.split(",") if t.strip())
    chosen_schemes = {x.strip() for x in schemes_filter.split(",")} if schemes_filter else None
    chosen_tasks = {glue_task_name(x.strip()) for x in tasks_filter.split(",")} if tasks_filter else None
    chosen_rates = {float(x) for x in rates_filter.split(",")} if rates_filter else None

    def only(run) -> bool:
        return (chosen_schemes is None or run.scheme in chosen_schemes) and \
            (chosen_tasks is None or run.task in chosen_tasks) and \
            (chosen_rates is None or any(abs(run.lr - r) <= 1e-9 * r for r in chosen_rates))

    if dry_run:
        records = _records(runs_dir, budget.dtype)
        for run in plan(budget, order, records):
            if only(run):
                typer.echo(f"table {run.table}  {run.key}{'  (done)' if run.key in records else ''}")
        return
    if tables_only:
        result = write_tables(budget, runs_dir, results_dir, order)
        typer.echo(json.dumps({"completed_runs": result["completed_runs"],
                               "table1_average": result["table1_average"]}, indent=2))
        return
    deadline = None
    if stop_after:
        hour, minute = (int(x) for x in stop_after.split(":"))
        now = datetime.now(timezone.utc)
        deadline = now.replace(hour=hour, minute=minute, second=0, microsecond=0).timestamp()
        if deadline < now.timestamp():
            deadline += 86400
    started = time.perf_counter()
    result = run_grid(budget, _glue_dir(glue_dir), runs_dir, results_dir, model, order, deadline, progress,
                      log=lambda msg: typer.echo(msg, err=True), deltas_dir=deltas_dir, only=only)
    typer.echo(json.dumps({"completed_runs": result["completed_runs"], "table1_average": result["table1_average"],
                           "wall_s": round(time.perf_counter() - started, 1)}, indent=2))


if __name__ == "__main__":
    app()
