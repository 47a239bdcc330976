"""Memory: process RSS with 0, 10, 100, 1,000, 10,000 resident tasks vs their arithmetic size,
and vs N separate full models.

    python -m benchmarks.memory                      # MiniLM, CPU fp32
    python -m benchmarks.memory --model bert-base --tasks 0,10,100,1000 --suffix _bertbase
    python -m benchmarks.memory --device cuda --dtype bf16 --suffix _gpu    # adds CUDA allocated bytes

Each measurement runs in a fresh subprocess so nothing of an earlier one stays in the heap:
* ``tasks N``: load the engine and the delta generator, read RSS, add N random BitFit deltas
  (generated one at a time and dropped), read RSS again. Bytes per task = (RSS after - RSS
  before) / N, against the arithmetic size of one bank row at the serving dtype
  (``Tasks.bank_bytes_of``: every banked site + the task's head slot). The bank capacity and bytes
  are recorded too, so over-allocation shows apart from allocator overhead.
* ``models N`` (N = 1, 2, 4, 8): RSS of N ``AutoModelForSequenceClassification`` copies, each
  holding its own weights as N fine-tuned models would, the no-BitFit way to serve N tasks;
  beyond 8 it is extrapolated linearly from the measured slope and labelled ``extrapolated``.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import cli, models, plotting

NAME = "memory"


def rss_bytes() -> int:
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss


def child_tasks(args, n: int) -> dict:
    from bitfit_serve.engine import Engine
    from bitfit_serve.model.banks import release_freed_memory

    path = models.model_path(args.model)
    dtype = cli.torch_dtype(args.dtype)
    engine = Engine.from_pretrained(path, device=args.device, dtype=dtype)
    factory = models.DeltaFactory(path)
    factory("warm-up", seed=0)  # first-call allocations (RNG, safetensors) out of the baseline
    # The banks give freed heap pages back when they grow; do it once before the baseline too, or
    # pages freed while loading would be returned during the adds and counted against them.
    release_freed_memory()
    before = rss_bytes()
    cuda_before = torch.cuda.memory_allocated() if args.device.startswith("cuda") else None
    start = time.perf_counter()
    for i in range(n):
        engine.add_task(factory(f"task{i}", seed=i))
    add_s = time.perf_counter() - start
    after = rss_bytes()
    engine.predict([(f"task{n - 1}", "a gripping film")] if n else [])  # the last task serves
    one = engine.tasks.get(f"task{n - 1}") if n else engine.add_task(factory("sizing", seed=0))
    out = {"tasks": n, "rss_before": before, "rss_after": after, "bank_bytes": engine.tasks.bank_bytes,
           "bank_capacity_rows": engine.tasks.capacity, "bytes_per_task_arithmetic": engine.tasks.bank_bytes_of(one),
           "add_seconds_total": add_s, "sites_per_task": len(factory.base)}
    if cuda_before is not None:
        out["cuda_allocated_before"] = cuda_before
        out["cuda_allocated_after"] = torch.cuda.memory_allocated()
    return out


def child_models(args, n: int) -> dict:
    path = models.model_path(args.model)
    dtype = cli.torch_dtype(args.dtype)
    models.hf_classifier(path, 2, dtype, args.device)  # imports and first-load caches out of the baseline
    gc.collect()
    before = rss_bytes()
    cuda_before = torch.cuda.memory_allocated() if args.device.startswith("cuda") else None
    copies = [distinct(models.hf_classifier(path, 2, dtype, args.device)) for _ in range(n)]
    out = {"models": len(copies), "rss_before": before, "rss_after": rss_bytes(),
           "param_bytes_per_model": sum(p.numel() * p.element_size() for p in copies[0].parameters()) if n else 0}
    if cuda_before is not None:
        out["cuda_allocated_before"] = cuda_before
        out["cuda_allocated_after"] = torch.cuda.memory_allocated()
    return out


@torch.no_grad()
def distinct(model):
    """Give the model its own copy of every weight. ``from_pretrained`` maps the checkpoint file,
    so N loads of one file would share its pages (2.7 MiB RSS per extra MiniLM, measured); N
    fine-tuned models are N different files, each resident on its own."""
    for p in model.parameters():
        p.data = p.data.clone()
    return model


def run_child(args, kind: str, n: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.memory", f"--child-{kind}", str(n), "--model", args.model,
           "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads)]
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=repo)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--tasks", default="0,10,100,1000,10000")
    p.add_argument("--models", default="1,2,4,8", help="full model copies, measured")
    p.add_argument("--extrapolate", default="100,1000,10000", help="full model copies, extrapolated")
    p.add_argument("--child-tasks", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-models", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    cli.setup(args)
    if args.child_tasks is not None or args.child_models is not None:
        out = child_tasks(args, args.child_tasks) if args.child_tasks is not None else child_models(args, args.child_models)
        print(json.dumps(out))
        return
    load_before = cli.load_average()
    task_counts = [10] if args.quick else [int(x) for x in args.tasks.split(",")]
    model_counts = [1] if args.quick else [int(x) for x in args.models.split(",")]

    tasks = []
    for n in task_counts:
        r = run_child(args, "tasks", n)
        r["rss_delta"] = r["rss_after"] - r["rss_before"]
        if n:
            r["rss_bytes_per_task"] = r["rss_delta"] / n
            r["rss_over_arithmetic"] = r["rss_bytes_per_task"] / r["bytes_per_task_arithmetic"]
            r["bank_bytes_over_arithmetic"] = r["bank_bytes"] / (n * r["bytes_per_task_arithmetic"])
        tasks.append(r)
        print(f"{n:6d} tasks: RSS +{r['rss_delta'] / 2**20:8.1f} MiB  bank {r['bank_bytes'] / 2**20:8.1f} MiB "
              f"(capacity {r['bank_capacity_rows']})  arithmetic {r['bytes_per_task_arithmetic'] / 1024:.1f} KiB/task"
              + (f"  RSS/task {r['rss_bytes_per_task'] / 1024:.1f} KiB = {r['rss_over_arithmetic']:.2f}x" if n else ""))

    copies = []
    for n in model_counts:
        r = run_child(args, "models", n)
        r["rss_delta"] = r["rss_after"] - r["rss_before"]
        copies.append(r)
        print(f"{n:6d} full models: RSS +{r['rss_delta'] / 2**20:8.1f} MiB")
    per_model = (copies[-1]["rss_delta"] - copies[0]["rss_delta"]) / (copies[-1]["models"] - copies[0]["models"]) \
        if len(copies) > 1 else copies[0]["rss_delta"]
    extrapolated = [{"models": n, "rss_delta_extrapolated": copies[0]["rss_delta"] + per_model * (n - copies[0]["models"]),
                     "label": "extrapolated"} for n in (int(x) for x in args.extrapolate.split(","))]

    cli.write_result(args, NAME, {
        "model": str(models.model_path(args.model)), "resident_tasks": tasks, "full_models_measured": copies,
        "full_model_rss_slope_bytes": per_model, "full_models_extrapolated": extrapolated,
    }, load_before)
    plot(args, tasks, copies, extrapolated)


def plot(args, tasks: list[dict], copies: list[dict], extrapolated: list[dict]) -> None:
    fig, (a, b) = plotting.subplots(2)
    measured = [t for t in tasks if t["tasks"]]
    n = [t["tasks"] for t in measured]
    a.loglog(n, [t["rss_delta"] / 2**20 for t in measured], "o-", label="engine: RSS growth, measured")
    a.loglog(n, [t["tasks"] * t["bytes_per_task_arithmetic"] / 2**20 for t in measured], "k--",
             label="engine: arithmetic (bank rows)")
    a.loglog([m["models"] for m in copies], [m["rss_delta"] / 2**20 for m in copies], "s-", label="N full models, measured")
    a.loglog([m["models"] for m in extrapolated], [m["rss_delta_extrapolated"] / 2**20 for m in extrapolated], "s:",
             label="N full models, extrapolated")
    a.set_xlabel("resident tasks")
    a.set_ylabel("MiB above the idle process")
    a.legend(fontsize=8)
    b.semilogx(n, [t["rss_over_arithmetic"] for t in measured], "o-", label="RSS per task / arithmetic")
    b.semilogx(n, [t["bank_bytes_over_arithmetic"] for t in measured], "^-", label="bank bytes / arithmetic")
    b.axhline(1.2, color="r", lw=0.8, ls="--", label="target 1.2x")
    b.axhline(1.0, color="k", lw=0.8)
    b.set_xlabel("resident tasks")
    b.set_ylabel("ratio")
    b.legend(fontsize=8)
    plotting.save_figure(fig, args, NAME, "memory per task", threads=False)


if __name__ == "__main__":
    main()
