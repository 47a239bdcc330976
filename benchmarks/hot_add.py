"""Hot add over HTTP: upload request to first servable prediction, while the server is kept busy.

    python -m benchmarks.hot_add                     # MiniLM, CPU fp32, 100 adds, 4 closed-loop load clients
    python -m benchmarks.hot_add --load-rate 20 --suffix _rate20   # open-loop load: 20 requests/s
    python -m benchmarks.hot_add --load-rate 20 --server-threads 1 --suffix _rate20_threads1
    python -m benchmarks.hot_add --model bert-base --adds 50 --suffix _bertbase

The real ``bitfit-serve serve`` process (subprocess, 127.0.0.1, free port, default settings, the
folder watch on) starts with 20 tasks. A load generator (one GLUE sentence per request to a random
resident task) runs the whole time: ``--load-clients`` closed-loop clients (each sends its next
request when the last one answered: the server is saturated and every request queues), or with
``--load-rate`` an open loop (Poisson arrivals at that rate, whatever the answers: the server is
busy for a known share of the time, and latency is not set by the queue the clients build).
Meanwhile, ``--adds`` times: PUT a new delta to ``/v1/tasks/hot{i}`` and, as soon as it answers,
POST a prediction to the new task; retried until it answers 200 (every non-200 counts as a failure).

* ``upload_ms``: PUT round trip (validated, written to disk atomically, row written, published);
* ``first_prediction_ms``: from sending the PUT to the first 200 prediction of the new task;
  this includes waiting for the forward pass already running for the load generator;
* ``load_request_ms``: the load generator's own request latency, what any request waits on the
  busy server: a new task's first prediction (after its upload answered) cannot beat it;
* ``server_during_adds``: from the server's /metrics over the adds: forward passes, their mean time and
  size, and the share of the wall time the model was busy.
Failed requests are counted for the load generator and the new tasks separately (target: 0).
Then, in this process and without load, the median cost of each step of an upload (the whole
``DeltaStore.install``, its fsync'd atomic write, parsing + validating, ``Engine.add_task``) and
of a batch-1 forward back to back, after 100 ms asleep, and after 100 ms of busy waiting.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import cli, glue, live, models, plotting, timing
from bitfit_serve import delta as delta_io
from bitfit_serve.engine import Engine

NAME = "hot_add"


async def run(url: str, uploads: list[tuple[str, bytes]], resident: list[str], singles: list[str],
              load_clients: int, load_rate: float, pause_s: float, seed: int, scrape) -> dict:
    """``scrape()`` returns the server's FORWARD_COUNTERS; it is read before the first add and
    after the last."""
    import httpx

    rng = random.Random(seed)
    load = {"requests": 0, "statuses": {}, "latency_ms": []}
    new = {"statuses": {}, "upload_ms": [], "first_prediction_ms": [], "attempts": []}
    done = asyncio.Event()

    async def load_request(http: httpx.AsyncClient) -> None:
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

    async def load_client(http: httpx.AsyncClient) -> None:
        while not done.is_set():
            await load_request(http)

    async def open_loop(http: httpx.AsyncClient) -> None:
        in_flight: set[asyncio.Task] = set()
        next_at = time.perf_counter()
        while not done.is_set():
            next_at += rng.expovariate(load_rate)  # a fixed schedule: a slow answer does not delay it
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            request = asyncio.create_task(load_request(http))
            in_flight.add(request)
            request.add_done_callback(in_flight.discard)
        await asyncio.gather(*in_flight)

    def count(status: str) -> None:
        new["statuses"][status] = new["statuses"].get(status, 0) + 1

    async def adder(http: httpx.AsyncClient) -> dict:
        await asyncio.sleep(1.0)  # the load generator is running first
        before, began = await asyncio.to_thread(scrape), time.perf_counter()
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
        wall = time.perf_counter() - began
        activity = live.forward_activity(before, await asyncio.to_thread(scrape), wall)
        done.set()
        return activity

    generators = [open_loop] if load_rate > 0 else [load_client] * load_clients
    limits = httpx.Limits(max_connections=None if load_rate > 0 else load_clients + 2)
    async with httpx.AsyncClient(timeout=60.0, limits=limits) as http:
        began = time.perf_counter()
        activity, *_ = await asyncio.gather(adder(http), *(generate(http) for generate in generators))
        wall = time.perf_counter() - began
    return {"load": load, "new_tasks": new, "wall_s": wall, "server_during_adds": activity}


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--adds", type=int, default=100)
    p.add_argument("--resident", type=int, default=20)
    p.add_argument("--load-clients", type=int, default=4, help="closed-loop load clients (saturate the server)")
    p.add_argument("--load-rate", type=float, default=0.0,
                   help="open-loop load instead: Poisson arrivals at this many requests/s (0: use --load-clients)")
    p.add_argument("--pause", type=float, default=0.1, help="seconds between one add's answer and the next PUT")
    p.add_argument("--server-threads", type=int, default=None, help="the server's --threads (default: its own)")
    args = p.parse_args()
    cli.setup(args)
    load_before = cli.load_average()
    adds = 5 if args.quick else args.adds
    resident_n = 3 if args.quick else args.resident
    path = models.model_path(args.model)
    singles, _ = glue.split_texts(glue.sample_texts(args.glue_dir, 2000, seed=args.seed))
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(args.dtype, args.dtype)

    factory = models.DeltaFactory(path)
    uploads = [(f"hot{i}", delta_io.to_bytes(factory(f"hot{i}", seed=10_000 + i))) for i in range(adds)]
    with tempfile.TemporaryDirectory() as tmp:
        resident = [f"task{i}" for i in range(resident_n)]
        models.write_task_files(factory, Path(tmp) / "deltas", resident, pair_every=0)
        threads = ["--threads", str(args.server_threads)] if args.server_threads else []
        with live.Server(path, Path(tmp) / "deltas", "--device", args.device, "--dtype", dtype, *threads,
                         log_path=Path(tmp) / "server.log") as server:
            out = asyncio.run(run(server.url, uploads, resident, singles, args.load_clients, args.load_rate,
                                  args.pause, args.seed, scrape=lambda: server.metrics(*live.FORWARD_COUNTERS)))
            command = server.command

    engine = Engine.from_pretrained(path, device=args.device, dtype=dtype)
    breakdown = install_breakdown(engine, factory, trials=3 if args.quick else 20)
    forward_ms = batch1_forward_after_idle(engine, factory, singles, rounds=1 if args.quick else 2)
    load_label = (f"open loop {args.load_rate:g} req/s" if args.load_rate > 0
                  else f"{args.load_clients} closed-loop clients" if args.load_clients > 0 else "no load")
    activity = out["server_during_adds"]
    new, load = out["new_tasks"], out["load"]
    new_failed = sum(n for s, n in new["statuses"].items() if not s.endswith((" 200", " 201")))
    load_failed = sum(n for s, n in load["statuses"].items() if s != "200")
    summary = {
        "adds": adds, "upload_ms": timing.stats(new["upload_ms"]), "first_prediction_ms": timing.stats(new["first_prediction_ms"]),
        "failed_requests": {"load_generator": load_failed, "new_tasks": new_failed, "total": load_failed + new_failed},
        "load_generator_requests": load["requests"], "load_generator_req_per_s": load["requests"] / out["wall_s"],
        # What any request waits on this busy server: the first prediction of a new task cannot
        # beat it, so first_prediction - upload is compared with it.
        "load_request_ms": timing.stats(load["latency_ms"]) if load["latency_ms"] else None,
        "first_prediction_after_upload_ms": timing.stats([f - u for f, u in zip(new["first_prediction_ms"],
                                                                                 new["upload_ms"])]),
        "load": load_label,
        "server_during_adds": activity,
        "delta_file_bytes": len(uploads[0][1]),
        "upload_steps_ms_in_process_no_load": breakdown,
        "batch1_forward_ms_in_process": forward_ms,
    }
    print(f"{adds} adds under load ({load_label}, {summary['load_generator_req_per_s']:.1f} req/s): "
          f"upload p50 {summary['upload_ms']['p50']:.1f} ms p99 {summary['upload_ms']['p99']:.1f} ms; "
          f"upload -> first prediction p50 {summary['first_prediction_ms']['p50']:.1f} ms "
          f"p99 {summary['first_prediction_ms']['p99']:.1f} ms; failed requests {summary['failed_requests']['total']}")
    print(f"after the upload answered, the first prediction took p50 "
          f"{summary['first_prediction_after_upload_ms']['p50']:.1f} ms" + (
              f"; any load-generator request took p50 {summary['load_request_ms']['p50']:.1f} ms"
              if summary["load_request_ms"] else " (no load generator)"))
    if activity["forward_passes"]:
        print(f"server during the adds: model busy {activity['forward_busy_share']:.2f} of the time, "
              f"{activity['forward_passes']:.0f} forwards of {activity['sequences_per_forward']:.1f} sequences, "
              f"{activity['forward_ms_mean']:.1f} ms each")
    print("upload steps in process, no load (median ms): " + ", ".join(f"{k} {v:.1f}" for k, v in breakdown.items()))
    print("batch-1 forward in process (median ms): " + ", ".join(f"{k} {v:.1f}" for k, v in forward_ms.items()))
    cli.write_result(args, NAME, {"model": str(path), "server_command": command, "summary": summary,
                                  "raw": out}, load_before)
    plot(args, new, load_label)


def install_breakdown(engine: Engine, factory: models.DeltaFactory, trials: int) -> dict:
    """Median ms of each step of an upload, in process and without load: what parsing the bytes
    and ``Tasks.install`` into a deltas folder cost in all, its fsync'd atomic write, parsing +
    validating the bytes, and the in-memory install (``Engine.add_task``, no folder)."""
    from bitfit_serve.store import DeltaStore

    data = [delta_io.to_bytes(factory(f"b{i}", seed=20_000 + i)) for i in range(2 * trials)]
    steps: dict[str, list[float]] = {"install": [], "atomic_write": [], "parse_validate": [], "add_task": []}

    def timed(step: str, fn) -> None:
        start = time.perf_counter()
        fn()
        steps[step].append((time.perf_counter() - start) * 1e3)

    with tempfile.TemporaryDirectory() as tmp:
        for i in range(trials):
            engine.tasks.use_store(DeltaStore(Path(tmp) / "store"))
            timed("install", lambda: engine.tasks.install(f"b{i}", delta_io.parse(data[i], source="bench")))
            engine.tasks.use_store(None)
            b = data[trials + i]
            timed("atomic_write", lambda: delta_io.atomic_write(Path(tmp) / f"w{i}.safetensors", b))
            timed("parse_validate", lambda: engine.tasks.check(delta_io.parse(b, source="bench").delta))
            timed("add_task", lambda: engine.add_task(b))
    return {step: statistics.median(v) for step, v in steps.items()}


def batch1_forward_after_idle(engine: Engine, factory: models.DeltaFactory, singles: list[str],
                              rounds: int, per_block: int = 20) -> dict:
    """Median ms of a batch-1 forward (one GLUE sentence) run back to back, after 100 ms asleep
    (what a prediction meets on an idle server), and after 100 ms of busy waiting (the CPU kept
    running, nothing of the model touched). In blocks of ``per_block``: the cost of sleeping
    shows when the process sleeps most of the time, as an idle server does."""
    version = engine.add_task(delta_io.to_bytes(factory("idle_probe", seed=30_000)))
    batches = [engine.collate(engine.tokenize(version, [text]), [version.row]) for text in singles[:per_block]]

    def busy_wait(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    waits = {"back_to_back": lambda: None, "after_100ms_asleep": lambda: time.sleep(0.1),
             "after_100ms_busy_wait": lambda: busy_wait(0.1)}
    times: dict[str, list[float]] = {name: [] for name in waits}
    engine.forward(batches[0])
    for _ in range(rounds):
        for name, wait in waits.items():
            for batch in batches:
                wait()
                start = time.perf_counter()
                engine.forward(batch)
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def plot(args, new: dict, load_label: str) -> None:
    fig, (a, b) = plotting.subplots(2)
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
    plotting.save_figure(fig, args, NAME, "hot add under load", threads=False, extra=load_label)


if __name__ == "__main__":
    main()
