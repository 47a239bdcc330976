"""Hot add over HTTP: upload request to first servable prediction, while the server is kept busy.

    python -m benchmarks.hot_add                     # MiniLM, CPU fp32, 100 adds, 4 load clients
    python -m benchmarks.hot_add --model bert-base --adds 50 --suffix _bertbase

The real ``bitfit-serve serve`` process (subprocess, 127.0.0.1, free port, default settings, the
folder watch on) starts with 20 tasks. A load generator (``--load-clients`` closed-loop async
clients, one GLUE sentence per request to a random resident task) runs the whole time. Meanwhile,
``--adds`` times: PUT a new delta to ``/v1/tasks/hot{i}`` and, as soon as it answers, POST a
prediction to the new task; retried until it answers 200 (every non-200 counts as a failure).

* ``upload_ms``: PUT round trip (validated, written to disk atomically, row written, published);
* ``first_prediction_ms``: from sending the PUT to the first 200 prediction of the new task;
  this includes waiting for the forward pass already running for the load generator;
* ``load_request_ms``: the load generator's own request latency, what any request waits on the
  busy server: a new task's first prediction (after its upload answered) cannot beat it.
Failed requests are counted for the load generator and the new tasks separately (target: 0).
Then, in this process and without load, the median cost of each step of an upload: the whole
``DeltaStore.install``, its fsync'd atomic write, parsing + validating, ``Engine.add_task``.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from pathlib import Path

from benchmarks import common
from bitfit_serve import delta as delta_io

NAME = "hot_add"


async def run(url: str, uploads: list[tuple[str, bytes]], resident: list[str], singles: list[str],
              load_clients: int, pause_s: float, seed: int) -> dict:
    import httpx

    rng = random.Random(seed)
    load = {"requests": 0, "statuses": {}, "latency_ms": []}
    new = {"statuses": {}, "upload_ms": [], "first_prediction_ms": [], "attempts": []}
    done = asyncio.Event()

    async def load_client(http: httpx.AsyncClient) -> None:
        while not done.is_set():
            task = rng.choice(resident)
            start = time.perf_counter()
            try:
                r = await http.post(f"{url}/v1/tasks/{task}/predict", json={"inputs": [rng.choice(singles)]})
                status = str(r.status_code)
            except httpx.HTTPError as e:
                status = type(e).__name__
            load["latency_ms"].append((time.perf_counter() - start) * 1e3)
            load["requests"] += 1
            load["statuses"][status] = load["statuses"].get(status, 0) + 1

    def count(status: str) -> None:
        new["statuses"][status] = new["statuses"].get(status, 0) + 1

    async def adder(http: httpx.AsyncClient) -> None:
        await asyncio.sleep(1.0)  # the load generator is running first
        for task, data in uploads:
            start = time.perf_counter()
            r = await http.put(f"{url}/v1/tasks/{task}", content=data,
                               headers={"content-type": "application/octet-stream"})
            new["upload_ms"].append((time.perf_counter() - start) * 1e3)
            count(f"PUT {r.status_code}")
            attempts = 0
            while True:
                attempts += 1
                r = await http.post(f"{url}/v1/tasks/{task}/predict", json={"inputs": [rng.choice(singles)]})
                count(f"POST {r.status_code}")
                if r.status_code == 200:
                    break
                if attempts >= 100:
                    raise SystemExit(f"{task} still not servable after 100 attempts: {r.text}")
            new["first_prediction_ms"].append((time.perf_counter() - start) * 1e3)
            new["attempts"].append(attempts)
            await asyncio.sleep(pause_s)
        done.set()

    limits = httpx.Limits(max_connections=load_clients + 2)
    async with httpx.AsyncClient(timeout=60.0, limits=limits) as http:
        began = time.perf_counter()
        await asyncio.gather(adder(http), *(load_client(http) for _ in range(load_clients)))
        wall = time.perf_counter() - began
    return {"load": load, "new_tasks": new, "wall_s": wall}


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--adds", type=int, default=100)
    p.add_argument("--resident", type=int, default=20)
    p.add_argument("--load-clients", type=int, default=4)
    p.add_argument("--pause", type=float, default=0.1, help="seconds between one add's answer and the next PUT")
    args = p.parse_args()
    common.setup(args)
    load_before = common.load_average()
    adds = 5 if args.quick else args.adds
    resident_n = 3 if args.quick else args.resident
    path = common.model_path(args.model)
    singles, _ = common.split_texts(common.sample_texts(args.glue_dir, 2000, seed=args.seed))
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(args.dtype, args.dtype)

    factory = common.DeltaFactory(path)
    uploads = [(f"hot{i}", delta_io.to_bytes(factory(f"hot{i}", seed=10_000 + i))) for i in range(adds)]
    with tempfile.TemporaryDirectory() as tmp:
        resident = [f"task{i}" for i in range(resident_n)]
        common.write_task_files(factory, Path(tmp) / "deltas", resident, pair_every=0)
        with common.Server(path, Path(tmp) / "deltas", "--device", args.device, "--dtype", dtype,
                           log_path=Path(tmp) / "server.log") as server:
            out = asyncio.run(run(server.url, uploads, resident, singles, args.load_clients, args.pause, args.seed))
            command = server.command

    breakdown = install_breakdown(path, factory, args.device, dtype, trials=3 if args.quick else 20)
    new, load = out["new_tasks"], out["load"]
    new_failed = sum(n for s, n in new["statuses"].items() if not s.endswith((" 200", " 201")))
    load_failed = sum(n for s, n in load["statuses"].items() if s != "200")
    summary = {
        "adds": adds, "upload_ms": common.stats(new["upload_ms"]), "first_prediction_ms": common.stats(new["first_prediction_ms"]),
        "failed_requests": {"load_generator": load_failed, "new_tasks": new_failed, "total": load_failed + new_failed},
        "load_generator_requests": load["requests"], "load_generator_req_per_s": load["requests"] / out["wall_s"],
        # What any request waits on this busy server: the first prediction of a new task cannot
        # beat it, so first_prediction - upload is compared with it.
        "load_request_ms": common.stats(load["latency_ms"]) if load["latency_ms"] else None,
        "first_prediction_after_upload_ms": common.stats([f - u for f, u in zip(new["first_prediction_ms"],
                                                                                 new["upload_ms"])]),
        "delta_file_bytes": len(uploads[0][1]),
        "upload_steps_ms_in_process_no_load": breakdown,
    }
    print(f"{adds} adds under load ({args.load_clients} clients, {summary['load_generator_req_per_s']:.1f} req/s): "
          f"upload p50 {summary['upload_ms']['p50']:.1f} ms p99 {summary['upload_ms']['p99']:.1f} ms; "
          f"upload -> first prediction p50 {summary['first_prediction_ms']['p50']:.1f} ms "
          f"p99 {summary['first_prediction_ms']['p99']:.1f} ms; failed requests {summary['failed_requests']['total']}")
    print(f"after the upload answered, the first prediction took p50 "
          f"{summary['first_prediction_after_upload_ms']['p50']:.1f} ms" + (
              f"; any load-generator request took p50 {summary['load_request_ms']['p50']:.1f} ms"
              if summary["load_request_ms"] else " (no load generator)"))
    print("upload steps in process, no load (median ms): " + ", ".join(f"{k} {v:.1f}" for k, v in breakdown.items()))
    common.write_result(args, NAME, {"model": str(path), "server_command": command, "summary": summary,
                                     "raw": out}, load_before)
    plot(args, new)


def install_breakdown(path: Path, factory: common.DeltaFactory, device: str, dtype: str, trials: int) -> dict:
    """Median ms of each step of an upload, in process and without load: what ``DeltaStore.install``
    costs in all, its fsync'd atomic write, parsing + validating the bytes, ``Engine.add_task``."""
    import statistics

    from bitfit_serve.engine import Engine
    from bitfit_serve.store import DeltaStore

    engine = Engine.from_pretrained(path, device=device, dtype=dtype)
    data = [delta_io.to_bytes(factory(f"b{i}", seed=20_000 + i)) for i in range(2 * trials)]
    steps: dict[str, list[float]] = {"install": [], "atomic_write": [], "parse_validate": [], "add_task": []}

    def timed(step: str, fn) -> None:
        start = time.perf_counter()
        fn()
        steps[step].append((time.perf_counter() - start) * 1e3)

    with tempfile.TemporaryDirectory() as tmp:
        store = DeltaStore(Path(tmp) / "store")
        for i in range(trials):
            timed("install", lambda: store.install(engine, f"b{i}", data[i]))
            b = data[trials + i]
            timed("atomic_write", lambda: delta_io.atomic_write(Path(tmp) / f"w{i}.safetensors", b))
            timed("parse_validate", lambda: engine.check(delta_io.from_bytes(b, source="bench")))
            timed("add_task", lambda: engine.add_task(b))
    return {step: statistics.median(v) for step, v in steps.items()}


def plot(args, new: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(new["upload_ms"], ".", label="upload (PUT round trip)")
    a.plot(new["first_prediction_ms"], "x", label="upload -> first prediction")
    a.axhline(20, color="r", lw=0.8, ls="--", label="target p50 20 ms")
    a.set_yscale("log")
    a.set_xlabel("add #")
    a.set_ylabel("ms")
    a.legend(fontsize=8)
    for values, label in ((new["upload_ms"], "upload"), (new["first_prediction_ms"], "first prediction")):
        xs = sorted(values)
        b.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
    b.set_xscale("log")
    b.set_xlabel("ms")
    b.set_ylabel("fraction of adds")
    b.legend(fontsize=8)
    fig.suptitle(f"hot add under load ({args.model}, {args.device} {args.dtype}, {args.load_clients} load clients)")
    fig.tight_layout()
    fig.savefig(common.plot_path(args, NAME), dpi=110)


if __name__ == "__main__":
    main()
