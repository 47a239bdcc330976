"""The accuracy grid behind ``benchmarks/results/accuracy.md``: every run, in priority order,
resumable (a run whose record exists is skipped), tables rewritten after every run. The run
records (small JSON) are committed in ``benchmarks/results/accuracy_runs/`` so that a later
session or machine resumes the grid where it stopped; the deltas the runs write go to a
git-ignored folder. Several workers may share one runs folder (each run is claimed with a
``.lock`` file; a worker killed mid-run leaves its lock behind: delete it to re-run that run).

    bitfit-train grid --glue-dir ../shared/data/glue --threads 2

Protocol (the same for every scheme): whole train sets minus a stratified validation split
(10%, at most 2,000), the trainer's step budget (6,000 optimizer steps at batch 16, at most 20
epochs), warmup + linear decay, the epoch picked on the validation split, the dev metric of that
epoch reported. Each Table 1 scheme gets its own rate from a sweep of four (seed 0, chosen on
validation); its extra seeds run at the winner. Tables 2 and 3 use the task's BitFit rate.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import Counter
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from bitfit_serve.delta import atomic_write
from trainer.train import LR_CANDIDATES, TrainArgs, hardware, lr_kind

TASKS = ("rte", "mrpc", "cola", "stsb", "sst2")  # table column order
RUN_ORDER = ("cola", "stsb", "mrpc", "rte", "sst2")  # cheapest (per informative point) first
TABLE1 = ("bitfit", "full", "frozen", "bq_bm2")
TABLE2 = ("ln_gamma1", "ln_gamma2", "ln_gamma12", "gamma_bitfit", "ln_bias", "no_bq_bm2", "rand_bias",
          "rand_uniform", "rand_row_col")
TABLE2_TASKS = ("cola", "mrpc", "rte")
TABLE3 = ("bq", "bk", "bv")
TABLE3_SIZES = (1000, 4000)
MULTI_SEED_TASKS = ("rte", "mrpc", "cola", "stsb")
MULTI_SEED_SCHEMES = ("bitfit", "full")
HEADLINE = {"rte": ("accuracy",), "mrpc": ("f1", "accuracy"), "cola": ("mcc",), "stsb": ("spearman", "pearson"),
            "sst2": ("accuracy",)}
FULL_TRAIN = {"rte": 2490, "mrpc": 3668, "cola": 8551, "stsb": 5749, "sst2": 67349}
# Dev-set score of always predicting the majority class (constant prediction for STS-B), from
# the label counts in the GLUE folder's README: RTE 146/277 entailment; MRPC 279/408 paraphrases
# (F1 = 2*279 / (2*279 + 129)); CoLA and STS-B score 0 by definition; SST-2 444/872 positive.
MAJORITY = {"rte": {"accuracy": 100 * 146 / 277}, "mrpc": {"f1": 100 * 558 / 687, "accuracy": 100 * 279 / 408},
            "cola": {"mcc": 0.0}, "stsb": {"spearman": 0.0, "pearson": 0.0}, "sst2": {"accuracy": 100 * 444 / 872}}
# The papers' BERT-base dev numbers (../shared/docs/paper-results.md): BitFit Tables 2/3 (5-seed
# means), the BitFit+ report (one run each), BEFT (SST-2, 1,000 examples).
PAPER_TABLE1 = {"full": {"sst2": 92.0, "cola": 56.4, "mrpc": 89.0, "stsb": 88.9, "rte": 70.5},
                "bitfit": {"sst2": 92.1, "cola": 58.8, "mrpc": 90.4, "stsb": 89.2, "rte": 72.3},
                "bq_bm2": {"sst2": 91.2, "cola": 57.4, "mrpc": 89.0, "stsb": 88.4, "rte": 68.6},
                "frozen": {"sst2": 81.7, "cola": 31.9, "mrpc": 81.1, "stsb": 71.4, "rte": 56.9}}
PAPER_TABLE2 = {"ln_gamma1": (49.4, 86.9, 65.0), "ln_gamma2": (51.1, 88.3, 68.2), "ln_gamma12": (51.1, 89.0, 66.1),
                "gamma_bitfit": (55.0, 90.3, 71.8), "ln_bias": (55.8, 89.1, 70.8), "no_bq_bm2": (54.0, 90.6, 70.4),
                "rand_bias": (56.8, 89.0, 69.7), "rand_uniform": (55.7, 86.0, 63.5), "rand_row_col": (52.3, 88.6, 67.2)}
PAPER_TABLE3 = {"bv": 85.8, "bq": 80.0, "bk": 77.2}  # BEFT, SST-2, 1,000 examples
HAND_WRITTEN = "## Discussion (written by hand"  # accuracy.md from this heading on survives rewrites
DISPLAY = {"rte": "RTE", "mrpc": "MRPC", "cola": "CoLA", "stsb": "STS-B", "sst2": "SST-2"}
METRIC_NAMES = {"accuracy": "acc", "f1": "F1", "mcc": "MCC", "spearman": "Spearman", "pearson": "Pearson"}


@dataclass(frozen=True)
class Budget:
    """What the grid changes from the trainer's defaults, in one place, so the tables can state it."""

    seeds: int = 3  # for MULTI_SEED_SCHEMES on MULTI_SEED_TASKS and Table 3; 1 elsewhere
    dtype: str = "bfloat16"  # training autocast (evaluation is fp32); see the dtype check runs
    steps: int = TrainArgs.steps  # the trainer's step budget and its floor for tiny data
    min_steps: int = TrainArgs.min_steps
    # seeded train subsamples (None = the whole train set); dev sets are never cut
    rte_examples: int | None = None
    mrpc_examples: int | None = None
    cola_examples: int | None = None
    stsb_examples: int | None = None
    sst2_examples: int | None = None

    def examples(self, task: str) -> int | None:
        return getattr(self, f"{task}_examples")


@dataclass(frozen=True)
class Run:
    table: str  # "1", "2", "3", or "dtype" (the same run in fp32, to check that bf16 keeps the metric)
    task: str
    scheme: str
    seed: int
    lr: float
    max_train_examples: int | None
    dtype: str = "bfloat16"

    @property
    def key(self) -> str:
        n = self.max_train_examples or "all"
        return f"{self.task}-{self.scheme}-n{n}-lr{self.lr:g}-s{self.seed}-{self.dtype.replace('float', 'f')}"


def winner(records: dict[str, dict[str, Any]], sweep: list[Run]) -> Run | None:
    """The sweep run with the best validation score, once every run of the sweep has a record."""
    if not sweep or any(r.key not in records for r in sweep):
        return None
    return max(sweep, key=lambda r: records[r.key]["val"][records[r.key]["metric"]])


def plan(budget: Budget, tables: Iterable[str] = ("1", "3", "2"),
         records: dict[str, dict[str, Any]] | None = None) -> list[Run]:
    """Every run that can be planned now, highest priority first. Runs at a sweep's winning rate
    appear once the sweep's records exist (``records``), so ``run_grid`` plans again after each run."""
    records = records or {}
    runs: list[Run] = []

    def sweep_of(task: str, scheme: str, n: int | None = None) -> list[Run]:
        n = budget.examples(task) if n is None else n
        return [Run("1", task, scheme, 0, lr, n, budget.dtype) for lr in LR_CANDIDATES[lr_kind(scheme)]]

    def rate(task: str, scheme: str = "bitfit") -> float | None:
        best = winner(records, sweep_of(task, scheme))
        return best.lr if best else None

    for table in tables:
        if table == "1":
            for scheme in TABLE1:
                for task in RUN_ORDER:
                    runs += sweep_of(task, scheme)
                if scheme in MULTI_SEED_SCHEMES:
                    for task in RUN_ORDER:
                        lr = rate(task, scheme)
                        if task in MULTI_SEED_TASKS and lr is not None:
                            runs += [Run("1", task, scheme, seed, lr, budget.examples(task), budget.dtype)
                                     for seed in range(1, budget.seeds)]
                if scheme == "bitfit" and budget.dtype != "float32":
                    for task in ("cola", "mrpc"):  # does bf16 training keep the metric? same run in fp32
                        lr = rate(task)
                        if lr is not None:
                            runs.append(Run("dtype", task, "bitfit", 0, lr, budget.examples(task), "float32"))
        elif table == "3":
            lr = rate("sst2")
            if lr is not None:
                runs += [Run("3", "sst2", scheme, seed, lr, size, budget.dtype)
                         for size in TABLE3_SIZES for seed in range(budget.seeds) for scheme in TABLE3]
        elif table == "2":
            for task in TABLE2_TASKS:
                lr = rate(task)
                if lr is not None:
                    runs += [Run("2", task, scheme, 0, lr, budget.examples(task), budget.dtype) for scheme in TABLE2]
        else:
            raise ValueError(f"unknown table {table!r}; choose from 1, 2, 3")
    return runs


def run_grid(budget: Budget, glue_dir: Path, runs_dir: Path, results_dir: Path, model: str = "default",
             tables: Iterable[str] = ("1", "3", "2"), deadline: float | None = None,
             progress: bool = True, log: Callable[[str], None] = print,
             deltas_dir: Path = Path("runs/accuracy"), only: Callable[[Run], bool] | None = None) -> dict[str, Any]:
    """Run every planned run that has no record in ``runs_dir`` yet (stopping before
    ``deadline``, a Unix time), rewriting the tables after each run. Deltas go to ``deltas_dir``.
    ``only`` restricts which planned runs this worker takes (e.g. one scheme)."""
    from trainer.data import load_glue, subsample
    from trainer.export import write_outputs
    from trainer.train import train

    runs_dir.mkdir(parents=True, exist_ok=True)
    deltas_dir.mkdir(parents=True, exist_ok=True)
    session = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "runs": 0}
    t0 = time.perf_counter()
    tables = tuple(tables)
    claimed: set[str] = set()
    while True:
        records = _records(runs_dir, budget.dtype)
        pending = [r for r in plan(budget, tables, records)
                   if r.key not in claimed and r.key not in records and (only is None or only(r))]
        if not pending:
            break
        run = pending[0]
        claimed.add(run.key)
        if deadline is not None and time.time() > deadline:
            log(f"deadline reached: stopping before {run.key}")
            break
        lock = runs_dir / f"{run.key}.lock"
        try:  # several grid workers may share runs_dir; each run is claimed by exactly one
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        data = subsample(load_glue(run.task, glue_dir), run.max_train_examples, run.seed)
        args = TrainArgs(scheme=run.scheme, lr=run.lr, seed=run.seed, max_train_examples=run.max_train_examples,
                         dtype=run.dtype, steps=budget.steps, min_steps=budget.min_steps)
        result = train(data, args, None if model == "default" else model, progress=progress)
        # Checkpoints of `full` runs are ~90 MB each: the grid keeps their records only.
        rec = write_outputs(result, data, args, model, deltas_dir / f"{run.key}.safetensors",
                            write_model=run.scheme != "full")
        rec["grid"] = {**asdict(run), "key": run.key}  # tagged with its grid coordinates
        atomic_write(runs_dir / f"{run.key}.run.json", (json.dumps(rec, indent=2) + "\n").encode())
        lock.unlink()
        session["runs"] += 1
        log(f"{run.key}: val {rec['metric']} {rec['val'][rec['metric']]:.2f}, dev {rec['final'][rec['metric']]:.2f} "
            f"(epoch {rec['selected_epoch']} of {len(rec['history'])}, {rec['wall_s']:.0f} s)")
        write_tables(budget, runs_dir, results_dir, tables)
    session["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    session["wall_s"] = round(time.perf_counter() - t0, 1)
    with open(runs_dir / "sessions.jsonl", "a") as f:
        f.write(json.dumps(session) + "\n")
    return write_tables(budget, runs_dir, results_dir, tables)


# ----------------------------------------------------------------------------- tables

DTYPE_TAGS = {"bfloat16": "bf16", "float32": "f32"}


def _records(runs_dir: Path, dtype: str | None = None) -> dict[str, dict[str, Any]]:
    """The grid's run records by key. With ``dtype``, a run trained in the other precision stands
    in for the same run (task, scheme, seed, rate, data) in ``dtype`` when that one has no record
    of its own: a grid resumed on a machine without bf16 instructions (where bf16 autocast is
    ~20x slower than fp32) keeps the runs done in bf16 elsewhere, and the other way round. Each
    record keeps its own ``dtype``, which the tables count."""
    out = {}
    for path in sorted(Path(runs_dir).glob("*.run.json")):
        rec = json.loads(path.read_text())
        if "grid" in rec:
            out[rec["grid"]["key"]] = rec
    if dtype is None:
        return out
    wanted = DTYPE_TAGS[dtype]
    stand_ins = {}
    for key, rec in out.items():
        stem, tag = key.rsplit("-", 1)
        if tag != wanted and f"{stem}-{wanted}" not in out:
            stand_ins[f"{stem}-{wanted}"] = rec
    return {**out, **stand_ins}


def _cell(recs: list[dict[str, Any]], metrics: tuple[str, ...]) -> dict[str, Any] | None:
    """Mean ± sample std over seeds of the dev metrics at each run's selected epoch."""
    if not recs:
        return None
    cell: dict[str, Any] = {"n_seeds": len(recs), "seeds": [r["seed"] for r in recs],
                            "lr": recs[0]["train_args"]["lr"]}
    for m in metrics:
        values = [r["final"][m] for r in recs]
        cell[m] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                   "values": values}
    cell["selected_epochs"] = [r["selected_epoch"] for r in recs]
    cell["epochs_run"] = [len(r["history"]) for r in recs]
    cell["wall_s"] = sum(r["wall_s"] for r in recs)
    cell["trainable_base_values"] = recs[0]["trainable_base_values"]
    cell["warnings"] = sum(1 for r in recs if r.get("warnings"))
    return cell


def _fmt(cell: dict[str, Any] | None, metrics: tuple[str, ...]) -> str:
    if cell is None:
        return "not run"
    parts = []
    for m in metrics:
        v = cell[m]
        parts.append(f"{v['mean']:.1f} ± {v['std']:.1f}" if cell["n_seeds"] > 1 else f"{v['mean']:.1f}")
    seeds = f" (n={cell['n_seeds']})" if cell["n_seeds"] > 1 else ""
    return " / ".join(parts) + seeds


def write_tables(budget: Budget, runs_dir: Path, results_dir: Path,
                 tables: Iterable[str] = ("1", "3", "2")) -> dict[str, Any]:
    """accuracy.json (every cell with all seed values, every sweep) and accuracy.md from the records."""
    own_records = _records(runs_dir)  # the dtype check compares two real runs, never a stand-in
    records = _records(runs_dir, budget.dtype)
    planned = plan(budget, tables, records)

    def table1_cell(task: str, scheme: str) -> dict[str, Any] | None:
        sweep = [r for r in planned if r.table == "1" and r.task == task and r.scheme == scheme and r.seed == 0]
        best = winner(records, sweep)
        if best is None:
            return None
        recs = [records[r.key] for r in planned if r.table == "1" and r.task == task and r.scheme == scheme
                and r.lr == best.lr and r.key in records]
        return _cell(recs, HEADLINE[task])

    def cell(table: str, task: str, scheme: str, n: int | None = None) -> dict[str, Any] | None:
        recs = [records[r.key] for r in planned if r.table == table and r.task == task and r.scheme == scheme
                and (n is None or r.max_train_examples == n) and r.key in records]
        return _cell(recs, HEADLINE[task])

    sweeps = {f"{r.task}-{r.scheme}": {} for r in planned if r.table == "1" and r.seed == 0}
    for r in planned:
        if r.table == "1" and r.seed == 0 and r.key in records:
            rec = records[r.key]
            sweeps[f"{r.task}-{r.scheme}"][f"{r.lr:g}"] = {
                "val": rec["val"][rec["metric"]], "dev": rec["final"][rec["metric"]],
                "selected_epoch": rec["selected_epoch"], "epochs_run": len(rec["history"]),
                "warnings": rec.get("warnings", [])}
    t1 = {s: {t: table1_cell(t, s) for t in TASKS} for s in TABLE1}
    t2 = {s: {t: cell("2", t, s) for t in TABLE2_TASKS} for s in TABLE2}
    t3 = {s: {str(n): cell("3", "sst2", s, n) for n in TABLE3_SIZES} for s in TABLE3}
    dtype_check = {}
    for r in planned:
        if r.table == "dtype" and r.key in own_records:
            twin = Run("1", r.task, r.scheme, r.seed, r.lr, r.max_train_examples, budget.dtype).key
            if twin in own_records:
                metric = own_records[twin]["metric"]
                dtype_check[r.task] = {"float32": own_records[r.key]["final"][metric],
                                       budget.dtype: own_records[twin]["final"][metric], "metric": metric,
                                       "wall_s_float32": own_records[r.key]["wall_s"],
                                       f"wall_s_{budget.dtype}": own_records[twin]["wall_s"]}
    done = [r for r in planned if r.key in records]
    first = records[done[0].key] if done else {}
    result = {
        "model": "all-MiniLM-L6-v2 (bundled), mean pooling, max_length 128, batch 16, AdamW wd 0, clip 1.0, "
                 "warmup 6% + linear decay, 6,000-step budget (at most 20 epochs), epoch chosen on a "
                 "validation split of train, dev metric of that epoch",
        "hardware": first.get("hardware", hardware()),
        "budget": asdict(budget),
        "planned_runs_so_far": len(planned),
        "completed_runs": len(done),
        "sum_of_run_wall_s": round(sum(records[r.key]["wall_s"] for r in done), 1),
        "sessions": _sessions(runs_dir),
        "table1": t1, "table2": t2, "table3": t3, "sweeps": sweeps, "dtype_check": dtype_check,
        "table1_average": {s: _average(t1[s]) for s in TABLE1},
        "runs": {r.key: {"table": r.table, "final": records[r.key]["final"], "val": records[r.key]["val"],
                         "selected_epoch": records[r.key]["selected_epoch"],
                         "curve": [h["dev"][records[r.key]["metric"]] for h in records[r.key]["history"]],
                         "wall_s": records[r.key]["wall_s"], "n_train": records[r.key]["n_train"],
                         "lr": r.lr, "dtype": records[r.key]["hardware"]["dtype"]}
                 for r in done},
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(results_dir / "accuracy.json", (json.dumps(result, indent=2) + "\n").encode())
    markdown = render_markdown(result)
    previous = results_dir / "accuracy.md"
    if previous.exists() and HAND_WRITTEN in previous.read_text():  # keep the hand-written analysis
        markdown += "\n" + previous.read_text()[previous.read_text().index(HAND_WRITTEN):]
    atomic_write(previous, markdown.encode())
    plot_curves(records, planned, results_dir / "accuracy_curves.png")
    return result


def plot_curves(records: dict[str, dict[str, Any]], planned: list[Run], out: Path) -> Path | None:
    """Dev metric per epoch of every Table 1 seed-0 run, bitfit vs full (one panel per task, one
    line per rate; the epoch the validation split chose is marked): where each converged."""
    runs = [r for r in planned if r.table == "1" and r.seed == 0 and r.scheme in ("bitfit", "full")
            and r.key in records]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(r.task == t for r in runs)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in runs if r.task == task):
            rec = records[r.key]
            metric = rec["metric"]
            curve = [h["dev"][metric] for h in rec["history"]]
            style = "-" if r.scheme == "bitfit" else "--"
            line, = ax.plot(range(1, len(curve) + 1), curve, style, label=f"{r.scheme} {r.lr:g}")
            chosen = rec["selected_epoch"]
            ax.plot([chosen], [curve[chosen - 1]], "o", color=line.get_color())
        ax.set_title(f"{DISPLAY[task]} (dev {METRIC_NAMES[HEADLINE[task][0]]})")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.suptitle("Learning curves, seed 0 (dot: the epoch chosen on the validation split)", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _sessions(runs_dir: Path) -> list[dict[str, Any]]:
    path = runs_dir / "sessions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def _span(sessions: list[dict[str, Any]]) -> str:
    """First start to last finish of the grid workers, per day, e.g.
    '4133 s (2026-11-24 03:49:01-04:57:54 UTC) + 1911 s (2026-11-30 10:37:56-11:09:49 UTC)'."""
    by_day: dict[str, list[dict[str, Any]]] = {}
    for s in sessions:
        if "finished" in s:
            by_day.setdefault(s["started"][:10], []).append(s)
    if not by_day:
        return "not recorded"
    spans = []
    for day, done in sorted(by_day.items()):
        start = min(datetime.fromisoformat(s["started"]) for s in done)
        end = max(datetime.fromisoformat(s["finished"]) for s in done)
        spans.append(f"{(end - start).total_seconds():.0f} s ({day} {start:%H:%M:%S}-{end:%H:%M:%S} UTC)")
    return " + ".join(spans)


def _average(row: dict[str, dict[str, Any] | None]) -> float | None:
    """Mean of the headline metric (first of HEADLINE) over the five tasks; None if any is missing."""
    values = [row[t][HEADLINE[t][0]]["mean"] for t in TASKS if row.get(t)]
    return statistics.fmean(values) if len(values) == len(TASKS) else None


def _row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def render_markdown(result: dict[str, Any]) -> str:
    b = result["budget"]
    header = [f"{DISPLAY[t]} ({' / '.join(METRIC_NAMES[m] for m in HEADLINE[t])})" for t in TASKS]
    lines = ["# Accuracy: BitFit and variants on all-MiniLM-L6-v2 (GLUE dev)", "",
             "Generated by `bitfit-train grid` from the run records in `accuracy_runs/`; the command, "
             "protocol and wall time are at the end. Dev metrics at the epoch chosen on a validation "
             "split carved from train (no choice was made on dev).", "",
             f"Completed {result['completed_runs']} runs ({result['planned_runs_so_far']} planned so far: "
             "runs at a sweep's winning rate are planned once the sweep is done).", "",
             "## Table 1: BitFit vs full fine-tuning vs frozen (BitFit paper, Tables 2/3 setting)", "",
             _row(["scheme", "trained values", *header, "avg", "lr (swept)"]),
             "|---|---|" + "---|" * (len(TASKS) + 2)]
    for scheme, row in result["table1"].items():
        count = next((c["trainable_base_values"] for c in row.values() if c), None)
        avg = result["table1_average"][scheme]
        rates = ", ".join(f"{DISPLAY[t]} {row[t]['lr']:g}" for t in TASKS if row[t])
        lines.append(_row([scheme, f"{count:,}" if count is not None else "-",
                           *(_fmt(row[t], HEADLINE[t]) for t in TASKS),
                           f"{avg:.1f}" if avg is not None else "-", rates or "-"]))
    majority = [" / ".join(f"{MAJORITY[t][m]:.1f}" for m in HEADLINE[t]) for t in TASKS]
    majority_avg = statistics.fmean(MAJORITY[t][HEADLINE[t][0]] for t in TASKS)
    lines.append(_row(["*majority class (no training)*", "0", *majority, f"{majority_avg:.1f}", ""]))
    for scheme, paper in PAPER_TABLE1.items():
        lines.append(_row([f"*paper: {scheme}, BERT-base*", "", *(f"{paper[t]:.1f}" for t in TASKS),
                           f"{statistics.fmean(paper.values()):.1f}", ""]))
    lines += ["", "`trained values` counts base-model values (the head is trained in every scheme; "
              "`frozen` trains the head only). `n=3`: mean ± sample std over seeds 0-2 at the rate seed 0's "
              "sweep chose. avg = mean of the first metric of each task. *paper* rows: Ben Zaken et al. "
              "(2022), BERT-base, 5-seed means (`../shared/docs/paper-results.md`); a 110M MLM-pretrained "
              "BERT, so compare orderings, not values.", ""]
    avg = result["table1_average"]
    if all(avg.get(s) is not None for s in ("bitfit", "full", "frozen")):
        gap = avg["bitfit"] - avg["full"]
        lines += ["**Acceptance check** (five-task average): "
                  f"bitfit {avg['bitfit']:.1f}, full {avg['full']:.1f}, frozen {avg['frozen']:.1f}. "
                  f"BitFit - full = {gap:+.1f} points ({'within' if abs(gap) <= 1.0 or gap > 0 else 'NOT within'} "
                  f"1.0); BitFit - frozen = {avg['bitfit'] - avg['frozen']:+.1f} points (target >= 8).", ""]
    lines += ["### Learning-rate sweeps (seed 0; val = the validation split the choice was made on)", "",
              "| task-scheme | " + " | ".join("lr: val / dev (epoch chosen of run)" for _ in range(1)) + " |",
              "|---|---|"]
    for name, rates in result["sweeps"].items():
        if rates:
            shown = "; ".join(f"{lr}: {v['val']:.1f} / {v['dev']:.1f} ({v['selected_epoch']} of {v['epochs_run']})"
                              + (" one-class" if v["warnings"] else "") for lr, v in rates.items())
            lines.append(f"| {name} | {shown} |")
    if result["dtype_check"]:
        lines += ["", "### Does bf16 training keep the metric? (same run, seed and rate, fp32 vs bf16 autocast)", "",
                  "| task | metric | fp32 | bf16 | wall s fp32 / bf16 |", "|---|---|---|---|---|"]
        for task, c in result["dtype_check"].items():
            lines.append(f"| {DISPLAY[task]} | {c['metric']} | {c['float32']:.1f} | {c[b['dtype']]:.1f} | "
                         f"{c['wall_s_float32']:.0f} / {c['wall_s_' + b['dtype']]:.0f} |")
    lines += ["", "Learning curves (dev metric per epoch, bitfit vs full, every swept rate): "
              "![learning curves](accuracy_curves.png)"]
    lines += ["", "## Table 2: ablations (CoLA, MRPC, RTE), beside the BitFit+ report", "",
              _row(["scheme", "trained values", *(f"{DISPLAY[t]} ({' / '.join(METRIC_NAMES[m] for m in HEADLINE[t])})"
                                                  for t in TABLE2_TASKS), "BitFit+ (BERT-base) CoLA / MRPC / RTE"]),
              "|---|---|" + "---|" * (len(TABLE2_TASKS) + 1)]
    for scheme, row in result["table2"].items():
        count = next((c["trainable_base_values"] for c in row.values() if c), None)
        lines.append(_row([scheme, f"{count:,}" if count is not None else "-",
                           *(_fmt(row[t], HEADLINE[t]) for t in TABLE2_TASKS),
                           " / ".join(f"{v:.1f}" for v in PAPER_TABLE2[scheme])]))
    lines += ["", "## Table 3: which attention bias? bq vs bk vs bv on SST-2 (1,000 and 4,000 examples)", "",
              _row(["scheme", "trained values", *(f"SST-2, {n:,} ex. (acc)" for n in TABLE3_SIZES),
                    "BEFT (BERT-base, 1,000 ex.)"]),
              "|---|---|" + "---|" * (len(TABLE3_SIZES) + 1)]
    for scheme, row in result["table3"].items():
        count = next((c["trainable_base_values"] for c in row.values() if c), None)
        lines.append(_row([scheme, f"{count:,}" if count is not None else "-",
                           *(_fmt(row[str(n)], ("accuracy",)) for n in TABLE3_SIZES), f"{PAPER_TABLE3[scheme]:.1f}"]))
    sessions = result["sessions"]
    hw = result["hardware"]
    lines += ["", "## How these numbers were made", "",
              "```", "bitfit-train grid --glue-dir ../shared/data/glue --threads 2", "```", "",
              "(resumable: the run records in `accuracy_runs/` are committed; a run whose record exists "
              "is skipped, so the grid runs in pieces across sessions).", "",
              f"- Hardware: {hw['processor']} ({hw.get('device', 'cpu')}), {hw['torch_threads']} torch threads, "
              f"torch {hw['torch']}. Every run so far on CPU (no GPU was lent to this task).",
              f"- Wall time: {_span(sessions)}; sum of per-run wall times {result['sum_of_run_wall_s']:.0f} s.",
              f"- Training: {result['model']}; training forward in autocast: "
              + ", ".join(f"{n} runs in {d}" for d, n in sorted(Counter(
                  run["dtype"] for run in result["runs"].values()).items()))
              + " (bf16 where the CPU has bf16 instructions, fp32 where it has not; evaluation fp32, as "
              "served; the dtype check above compares).",
              "- Train sets: " + ", ".join(
                  f"{DISPLAY[t]} {b[t + '_examples']:,} of {FULL_TRAIN[t]:,}" if b[t + "_examples"]
                  else f"{DISPLAY[t]} all {FULL_TRAIN[t]:,}" for t in TASKS)
              + " (minus the validation split). Table 3: 1,000 / 4,000 SST-2 examples. Dev sets complete.",
              f"- Seeds: {b['seeds']} for bitfit/full on {', '.join(DISPLAY[t] for t in MULTI_SEED_TASKS)} "
              "and for Table 3; 1 elsewhere.",
              "- Rates: Table 1 sweeps " + "; ".join(f"{k} {', '.join(f'{x:g}' for x in v)}"
                                                   for k, v in LR_CANDIDATES.items())
              + " per task and scheme; Tables 2 and 3 use the task's BitFit rate.",
              "- Cuts from the paper's protocol: a 6,000-step budget (the paper: up to 20 epochs, "
              "all tasks), one seed outside Table 1's multi-seed cells, MiniLM instead of BERT-base.",
              ""]
    return "\n".join(lines)
