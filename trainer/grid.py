"""The accuracy grid behind ``benchmarks/results/accuracy.md``: every run, in priority order,
resumable (a run whose record exists is skipped), tables rewritten after every run. The run
records (small JSON) are committed in ``benchmarks/results/accuracy_runs/`` so that a later
session or machine resumes the grid where it stopped; the deltas the runs write go to a
git-ignored folder. Several workers may share one runs folder (each run is claimed with a
``.lock`` file; a worker killed mid-run leaves its lock behind: delete it to re-run that run).

    bitfit-train grid --glue-dir ../shared/data/glue --threads 1

Budget (CPU, 2 cores): the grid is cut to fit about an hour of compute; ``Budget`` holds every
reduction so that the tables can state them. Order: Table 1 seed 0 of bitfit (those runs are also
the example deltas), full and frozen; their extra seeds on RTE and MRPC; bq_bm2; Table 3; Table 2
task by task (CoLA, MRPC, RTE).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from bitfit_serve.delta import atomic_write
from trainer.train import default_lr, hardware

TASKS = ("rte", "mrpc", "cola", "stsb", "sst2")
TABLE1 = ("bitfit", "bq_bm2", "full", "frozen")
TABLE2 = ("ln_gamma1", "ln_gamma2", "ln_gamma12", "gamma_bitfit", "ln_bias", "no_bq_bm2", "rand_bias",
          "rand_uniform", "rand_row_col")
TABLE2_TASKS = ("cola", "mrpc", "rte")  # cheapest first: a partial grid still fills whole columns
TABLE3 = ("bq", "bk", "bv")
TABLE3_SIZES = (1000, 4000)
MULTI_SEED_TASKS = ("rte", "mrpc")
MULTI_SEED_SCHEMES = ("bitfit", "full", "frozen")
HEADLINE = {"rte": ("accuracy",), "mrpc": ("f1", "accuracy"), "cola": ("mcc",), "stsb": ("spearman", "pearson"),
            "sst2": ("accuracy",)}
FULL_TRAIN = {"rte": 2490, "mrpc": 3668, "cola": 8551, "stsb": 5749, "sst2": 67349}
# Dev-set score of always predicting the majority class (constant prediction for STS-B), from
# the label counts in the GLUE folder's README: RTE 146/277 entailment; MRPC 279/408 paraphrases
# (F1 = 2*279 / (2*279 + 129)); CoLA and STS-B score 0 by definition; SST-2 444/872 positive.
MAJORITY = {"rte": {"accuracy": 100 * 146 / 277}, "mrpc": {"f1": 100 * 558 / 687, "accuracy": 100 * 279 / 408},
            "cola": {"mcc": 0.0}, "stsb": {"spearman": 0.0, "pearson": 0.0}, "sst2": {"accuracy": 100 * 444 / 872}}
HAND_WRITTEN = "## Discussion (written by hand"  # accuracy.md from this heading on survives rewrites
DISPLAY = {"rte": "RTE", "mrpc": "MRPC", "cola": "CoLA", "stsb": "STS-B", "sst2": "SST-2"}
METRIC_NAMES = {"accuracy": "acc", "f1": "F1", "mcc": "MCC", "spearman": "Spearman", "pearson": "Pearson"}


# The learning-rate probe behind Budget.lr_scale (bitfit, 2 epochs, CPU, measured before the grid).
NOTES = (
    "### Learning-rate probe (why the paper's rates are scaled)", "",
    "The paper's rates are for BERT-base trained 10-20+ epochs; here every run gets about ten times "
    "fewer steps. A short probe with `bitfit` (2 epochs, constant rate, seed 0) showed that at the "
    "paper's rates MiniLM's biases barely move in that budget:", "",
    "| task, train examples | lr | dev after epoch 1 / 2 |",
    "|---|---|---|",
    "| MRPC, 600 | 7e-4 (paper) | F1 81.2 / 81.2 (majority class, acc 68.4) |",
    "| MRPC, 600 | 3e-3 | F1 81.2 / 81.2 (majority class) |",
    "| STS-B, 1,000 | 3e-4 (3x paper) | Spearman 6.7 / 13.0 |",
    "| STS-B, 1,000 | 1e-3 (10x paper) | Spearman 18.2 / 33.8 |",
    "| STS-B, 2,000 (raw targets, 3 epochs) | 1e-4 (paper) | Spearman 0.5 / 3.9 / 9.6 |",
    "| STS-B, 2,000 (raw targets) | 1e-3 | Spearman 37.9 / 78.0 |",
    "| CoLA, 3,000 | 1e-2 (14x paper), mean pooling | MCC 0.0 / 0.0 (train loss 0.619 / 0.614) |",
    "| CoLA, 3,000 | 1e-2, `cls` pooling | MCC 0.0 / 0.0 (train loss 0.626 / 0.612) |",
    "| RTE, 1,500, 3 epochs | 1e-2 (10x paper) | acc 52.7 / 47.3 / 52.7 (chance) |",
    "| RTE, 1,500, 3 epochs | 5e-3, warmup + linear decay | acc 52.7 / 52.7 / 53.1 |", "",
    "(The CoLA and RTE rows were probed in a later session, after the grid: higher rates, another "
    "pooling and a decaying schedule do not move bias-only training off the class prior there.)", "",
    "", "A second probe (batch 8 instead of 32, for 4x more optimizer steps, one epoch) did not help "
    "either: after 345 steps on 3,000 CoLA examples the training loss was still at the class-prior "
    "level (0.626 at lr 1e-3, 0.620 at 3.5e-3; the prior's entropy is 0.61), and on this CPU batch 8 "
    "halved the throughput per process, so the grid keeps batch 32. A logistic-regression probe on "
    "the frozen mean-pooled MiniLM features (1,000 CoLA examples) reaches only MCC 0.04-0.06: "
    "all-MiniLM-L6-v2 was trained contrastively for sentence similarity, and grammaticality (CoLA), "
    "entailment (RTE) and paraphrase details (MRPC) are not linearly present in its embeddings, so "
    "every scheme has to move the encoder itself, which takes more than this budget's few hundred steps.",
    "",
    "So every rate (bias schemes and full fine-tuning alike, to keep the comparison even) is "
    "multiplied by `lr_scale`. Full fine-tuning at 2e-5 x 5 = 1e-4 is within the usual range for "
    "MiniLM-size models. Regression (STS-B) trains on standardized targets; the scale is folded back "
    "into the saved head.", "",
)


@dataclass(frozen=True)
class Budget:
    """Every reduction from the paper's protocol, in one place."""

    epochs: int = 2  # Tables 1 and 2, encoder-training schemes (the paper: 10-20+ epochs for bias schemes)
    frozen_epochs: int = 20  # head only, on cached features: cheap
    table3_epochs: int = 3
    seeds: int = 3  # for MULTI_SEED_SCHEMES on MULTI_SEED_TASKS; 1 elsewhere
    # seeded train subsamples for Tables 1 and 2 (None = the whole train set); dev sets are never cut
    rte_examples: int | None = 1500  # of 2,490
    mrpc_examples: int | None = 1500  # of 3,668
    cola_examples: int | None = 3000  # of 8,551
    stsb_examples: int | None = 2000  # of 5,749
    sst2_examples: int | None = 3000  # of 67,349
    lr_scale: float = 5.0  # multiplies the paper's rates (bias schemes and full; not the frozen head)
    frozen_lr: float = 1e-3

    def examples(self, task: str) -> int | None:
        return getattr(self, f"{task}_examples")


@dataclass(frozen=True)
class Run:
    table: str
    task: str
    scheme: str
    seed: int
    epochs: int
    lr: float
    max_train_examples: int | None

    @property
    def key(self) -> str:
        n = self.max_train_examples or "all"
        return f"{self.task}-{self.scheme}-n{n}-e{self.epochs}-lr{self.lr:g}-s{self.seed}"


def _lr(task: str, scheme: str, budget: Budget) -> float:
    if scheme == "frozen":
        return budget.frozen_lr
    return default_lr(task, scheme) * budget.lr_scale


def plan(budget: Budget, tables: Iterable[str] = ("1", "3", "2")) -> list[Run]:
    """All runs, highest priority first."""
    runs: list[Run] = []
    for table in tables:
        if table == "1":
            def t1(task: str, scheme: str, seed: int) -> Run:
                epochs = budget.frozen_epochs if scheme == "frozen" else budget.epochs
                return Run("1", task, scheme, seed, epochs, _lr(task, scheme, budget), budget.examples(task))

            # seed 0 of the acceptance schemes everywhere first, then their extra seeds, then bq_bm2
            runs += [t1(task, scheme, 0) for scheme in MULTI_SEED_SCHEMES for task in TASKS]
            runs += [t1(task, scheme, seed) for seed in range(1, budget.seeds) for task in MULTI_SEED_TASKS
                     for scheme in MULTI_SEED_SCHEMES]
            runs += [t1(task, scheme, 0) for scheme in TABLE1 if scheme not in MULTI_SEED_SCHEMES
                     for task in TASKS]
        elif table == "3":
            for size in TABLE3_SIZES:
                for scheme in TABLE3:
                    runs.append(Run("3", "sst2", scheme, 0, budget.table3_epochs, _lr("sst2", scheme, budget), size))
        elif table == "2":
            for task in TABLE2_TASKS:
                for scheme in TABLE2:
                    runs.append(Run("2", task, scheme, 0, budget.epochs, _lr(task, scheme, budget),
                                    budget.examples(task)))
        else:
            raise ValueError(f"unknown table {table!r}; choose from 1, 2, 3")
    return runs


def run_grid(budget: Budget, glue_dir: Path, runs_dir: Path, results_dir: Path, model: str = "default",
             tables: Iterable[str] = ("1", "3", "2"), deadline: float | None = None,
             progress: bool = True, log: Callable[[str], None] = print,
             deltas_dir: Path = Path("runs/accuracy")) -> dict[str, Any]:
    """Run every planned run that has no record in ``runs_dir`` yet (stopping before
    ``deadline``, a Unix time), rewriting the tables after each run. Deltas go to ``deltas_dir``."""
    from trainer.data import load_glue, subsample
    from trainer.export import write_outputs
    from trainer.train import TrainArgs, train

    runs_dir.mkdir(parents=True, exist_ok=True)
    deltas_dir.mkdir(parents=True, exist_ok=True)
    session = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "runs": 0}
    t0 = time.perf_counter()
    tables = tuple(tables)
    for run in plan(budget, tables):
        record = runs_dir / f"{run.key}.run.json"
        if record.exists():
            continue
        if deadline is not None and time.time() > deadline:
            log(f"deadline reached: stopping before {run.key}")
            break
        lock = runs_dir / f"{run.key}.lock"
        try:  # several grid workers may share runs_dir; each run is claimed by exactly one
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        data = subsample(load_glue(run.task, glue_dir), run.max_train_examples, run.seed)
        args = TrainArgs(scheme=run.scheme, lr=run.lr, epochs=run.epochs, seed=run.seed,
                         max_train_examples=run.max_train_examples)
        result = train(data, args, None if model == "default" else model, progress=progress)
        # Checkpoints of `full` runs are ~90 MB each: the grid keeps their records only.
        rec = write_outputs(result, data, args, model, deltas_dir / f"{run.key}.safetensors",
                            write_model=run.scheme != "full")
        rec["grid"] = {**asdict(run), "key": run.key}  # tagged with its grid coordinates
        atomic_write(record, (json.dumps(rec, indent=2) + "\n").encode())
        lock.unlink()
        session["runs"] += 1
        log(f"{run.key}: {rec['metric']} final {rec['final'][rec['metric']]:.2f} "
            f"best {rec['best'][rec['metric']]:.2f} ({rec['wall_s']:.0f} s)")
        write_tables(budget, runs_dir, results_dir, tables)
    session["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    session["wall_s"] = round(time.perf_counter() - t0, 1)
    with open(runs_dir / "sessions.jsonl", "a") as f:
        f.write(json.dumps(session) + "\n")
    return write_tables(budget, runs_dir, results_dir, tables)


# ----------------------------------------------------------------------------- tables

def _records(runs_dir: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(runs_dir.glob("*.run.json")):
        rec = json.loads(path.read_text())
        if "grid" in rec:
            out[rec["grid"]["key"]] = rec
    return out


def _cell(recs: list[dict[str, Any]], metrics: tuple[str, ...], which: str = "final") -> dict[str, Any] | None:
    if not recs:
        return None
    cell: dict[str, Any] = {"n_seeds": len(recs), "seeds": [r["seed"] for r in recs]}
    for m in metrics:
        values = [r[which][m] for r in recs]
        cell[m] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                   "values": values}
    cell["best_epoch_headline"] = statistics.fmean(r["best"][metrics[0]] for r in recs)
    cell["wall_s"] = sum(r["wall_s"] for r in recs)
    cell["trainable_base_values"] = recs[0]["trainable_base_values"]
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
    """accuracy.json (every cell with all seed values) and accuracy.md from the run records."""
    records = _records(runs_dir)
    planned = plan(budget, tables)

    def cell(table: str, task: str, scheme: str, n: int | None = None, metrics: tuple[str, ...] | None = None):
        recs = [records[r.key] for r in planned if r.table == table and r.task == task and r.scheme == scheme
                and (n is None or r.max_train_examples == n) and r.key in records]
        return _cell(recs, metrics or HEADLINE[task])

    t1 = {s: {t: cell("1", t, s) for t in TASKS} for s in TABLE1}
    t2 = {s: {t: cell("2", t, s) for t in TABLE2_TASKS} for s in TABLE2}
    t3 = {s: {str(n): cell("3", "sst2", s, n) for n in TABLE3_SIZES} for s in TABLE3}
    done = [r for r in planned if r.key in records]
    result = {
        "model": "all-MiniLM-L6-v2 (bundled), mean pooling, max_length 128, batch 32, AdamW wd 0, clip 1.0, "
                 "constant lr ('paper' schedule), dev sets, final epoch",
        "hardware": next((records[r.key]["hardware"] for r in done if "hardware" in records[r.key]),
                         hardware()),  # what the runs used
        "all_runs_on": "CPU",
        "budget": asdict(budget),
        "planned_runs": len(planned),
        "completed_runs": len(done),
        "sum_of_run_wall_s": round(sum(records[r.key]["wall_s"] for r in done), 1),
        "sessions": _sessions(runs_dir),
        "table1": t1, "table2": t2, "table3": t3,
        "table1_average": {s: _average(t1[s]) for s in TABLE1},
        "runs": {r.key: {"table": r.table, "final": records[r.key]["final"], "best": records[r.key]["best"],
                         "best_epoch": records[r.key]["best_epoch"], "wall_s": records[r.key]["wall_s"],
                         "n_train": records[r.key]["n_train"], "lr": r.lr, "epochs": r.epochs}
                 for r in done},
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(results_dir / "accuracy.json", (json.dumps(result, indent=2) + "\n").encode())
    markdown = render_markdown(result)
    previous = results_dir / "accuracy.md"
    if previous.exists() and HAND_WRITTEN in previous.read_text():  # keep the hand-written analysis
        markdown += "\n" + previous.read_text()[previous.read_text().index(HAND_WRITTEN):]
    atomic_write(previous, markdown.encode())
    return result


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


def render_markdown(result: dict[str, Any]) -> str:
    b = result["budget"]
    header = [f"{DISPLAY[t]} ({' / '.join(METRIC_NAMES[m] for m in HEADLINE[t])})" for t in TASKS]
    lines = ["# Accuracy: BitFit and variants on all-MiniLM-L6-v2 (GLUE dev)", "",
             "Generated by `bitfit-train grid` from the run records in `accuracy_runs/`; "
             "see the notes at the end for the command, wall time and every reduction from the paper's "
             "protocol. **Every run was on CPU** (no GPU was available to this task).", "",
             f"Completed {result['completed_runs']} of {result['planned_runs']} planned runs.", "",
             "## Table 1: BitFit vs full fine-tuning vs frozen (BitFit paper, Table 1/2 setting)", "",
             "| scheme | trained values | " + " | ".join(header) + " | avg |",
             "|---|---|" + "---|" * (len(TASKS) + 1)]
    for scheme, row in result["table1"].items():
        count = next((c["trainable_base_values"] for c in row.values() if c), None)
        avg = result["table1_average"][scheme]
        lines.append(f"| {scheme} | {count:,} | " if count is not None else f"| {scheme} | - | ")
        lines[-1] += " | ".join(_fmt(row[t], HEADLINE[t]) for t in TASKS) + f" | {avg:.1f} |" if avg is not None \
            else " | ".join(_fmt(row[t], HEADLINE[t]) for t in TASKS) + " | - |"
    majority = " | ".join(" / ".join(f"{MAJORITY[t][m]:.1f}" for m in HEADLINE[t]) for t in TASKS)
    majority_avg = statistics.fmean(MAJORITY[t][HEADLINE[t][0]] for t in TASKS)
    lines.append(f"| *majority class (no training)* | 0 | {majority} | {majority_avg:.1f} |")
    lines += ["", "`trained values` counts base-model values (the head is trained in every scheme; "
              "`frozen` trains the head only). `n=3` cells: mean ± sample std over seeds 0-2. "
              "avg = mean of the first metric of each task. `not run`: did not fit in the CPU budget.", "",
              "**The paper's BERT-base numbers are not beside ours**: no copy of its tables could be read "
              "offline (the stored copies of arXiv:2106.10199 that could be searched, ar5iv and a LaTeX "
              "dump, gave the abstract and introduction only; the authors' repository, "
              "github.com/benzakenelad/BitFit, has code but no results), and numbers quoted from memory "
              "could be wrong (Ben Zaken et al., ACL 2022, Tables 1-3). What the repository does show is "
              "the protocol gap: its `run_glue.py` defaults are lr 1e-3, **16 epochs, batch 8** "
              "(about 32x the optimizer steps of a run here). The paper's numbers are for a "
              "110M-parameter MLM-pretrained BERT, so they would not be comparable with a CPU-budget run "
              "on a 22M-parameter sentence-embedding model anyway.", ""]
    avg = result["table1_average"]
    if all(avg.get(s) is not None for s in ("bitfit", "full", "frozen")):
        gap = avg["bitfit"] - avg["full"]
        lines += ["**Acceptance check** (five-task average, final epoch): "
                  f"bitfit {avg['bitfit']:.1f}, full {avg['full']:.1f}, frozen {avg['frozen']:.1f}, "
                  f"majority class {majority_avg:.1f}. BitFit - full = {gap:+.1f} points "
                  f"({'within' if abs(gap) <= 1.5 else 'NOT within'} 1.5); BitFit - frozen = "
                  f"{avg['bitfit'] - avg['frozen']:+.1f} points. See the discussion below.", ""]
    lines += ["## Table 2: ablations (RTE, MRPC, CoLA)", "",
              "| scheme | trained values | " + " | ".join(f"{DISPLAY[t]} ({' / '.join(METRIC_NAMES[m] for m in HEADLINE[t])})"
                                                   for t in TABLE2_TASKS) + " |",
              "|---|---|" + "---|" * len(TABLE2_TASKS)]
    for scheme, row in result["table2"].items():
        count = next((c["trainable_base_values"] for c in row.values() if c), None)
        lines.append(f"| {scheme} | {count:,} | " if count is not None else f"| {scheme} | - | ")
        lines[-1] += " | ".join(_fmt(row[t], HEADLINE[t]) for t in TABLE2_TASKS) + " |"
    lines += ["", "## Table 3: which attention bias? bq vs bk vs bv on SST-2 (1,000 and 4,000 examples)", "",
              "| scheme | trained values | " + " | ".join(f"SST-2, {n:,} ex. (acc)" for n in TABLE3_SIZES) + " |",
              "|---|---|" + "---|" * len(TABLE3_SIZES)]
    for scheme, row in result["table3"].items():
        count = next((c["trainable_base_values"] for c in row.values() if c), None)
        lines.append(f"| {scheme} | {count:,} | " if count is not None else f"| {scheme} | - | ")
        lines[-1] += " | ".join(_fmt(row[str(n)], ("accuracy",)) for n in TABLE3_SIZES) + " |"
    sessions = result["sessions"]
    lines += ["", "## How these numbers were made", "",
              "```", "bitfit-train grid --glue-dir ../shared/data/glue --threads 1", "```", "",
              "(resumable: the run records in `accuracy_runs/` are committed; a run whose record exists "
              "is skipped, so the grid was run in pieces across sessions, by several worker processes).", "",
              f"- Hardware: {result['hardware']['processor']}, {result['hardware']['torch_threads']} torch threads, "
              f"torch {result['hardware']['torch']}; CPU shared with other jobs, so wall times are upper bounds.",
              f"- Wall time: {_span(sessions)} with {len(sessions)} grid worker process(es) in all sharing the "
              f"runs folder (resumed runs skip finished ones); sum of per-run wall times "
              f"{result['sum_of_run_wall_s']:.0f} s.",
              f"- Epochs: Tables 1 and 2 {b['epochs']} (frozen: {b['frozen_epochs']} epochs of the head on "
              f"cached features), Table 3 {b['table3_epochs']}. The paper trains much longer; these are "
              "CPU-budget cuts.",
              "- Train subsets (seeded random, Tables 1 and 2): " + ", ".join(
                  f"{DISPLAY[t]} {b[t + '_examples']:,} of {FULL_TRAIN[t]:,}" if b[t + "_examples"]
                  else f"{DISPLAY[t]} all {FULL_TRAIN[t]:,}" for t in TASKS)
              + ". Table 3 uses 1,000 / 4,000 SST-2 examples. Dev sets are always complete.",
              f"- Seeds: {b['seeds']} (0..{b['seeds'] - 1}) for bitfit/full/frozen on RTE and MRPC; 1 (seed 0) elsewhere.",
              f"- Learning rates: the paper's per-task rates (bias schemes RTE 1e-3, MRPC 7e-4, CoLA 7e-4, "
              f"SST-2 4e-4, STS-B 1e-4; full fine-tuning 2e-5) x {b['lr_scale']:g}, for every scheme alike; "
              f"frozen head {b['frozen_lr']:g}. Constant schedule, no warmup. Why scaled: see below.",
              "- Reported: the final epoch's dev metric (best-epoch values are in accuracy.json; picking the "
              "best epoch on dev would flatter every scheme).",
              "- `rand_uniform` / `rand_row_col` change weight-matrix entries: research baselines with a run "
              "record only, no servable delta. `full` runs keep their record only (no checkpoint) in the grid.",
              ""] + list(NOTES)
    return "\n".join(lines)
