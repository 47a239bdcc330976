"""HTTP end to end: an async load generator against the real ``bitfit-serve serve`` process.

    python -m benchmarks.http_e2e                    # MiniLM, CPU fp32, 100 tasks, 1/16/64 clients
    python -m benchmarks.http_e2e --model bert-base --duration 20 --suffix _bertbase

The server runs as a subprocess on 127.0.0.1 (a free port) with its default batching settings,
serving 100 tasks from a deltas folder (half single-sentence, half sentence-pair tasks). Each of
c clients loops: pick one of the 100 tasks at random, POST one GLUE dev input of the matching
kind to ``/v1/tasks/{task}/predict``, wait for the answer. Per concurrency level: throughput,
p50/p99 latency, failed requests, and from the server's own ``/metrics``:

* ``forward_busy_share``: forward-pass seconds / wall seconds (how busy the model is);
* ``outside_forward_share_of_latency``: 1 - (mean forward time of a batch) / (mean request
  latency): the part of a request's time spent in HTTP, JSON, queueing, tokenizing, batching.

The client shares the machine's cores with the server (2 cores here), which is part of the cost.

``--faces native,tei`` runs each level once per face, in alternating slices of ``--slices`` (so a
slow spell of the machine hits both): the native route against the TEI face's
``POST /tasks/{task}/predict`` (``{"inputs": text or [a, b]}``), same server, same inputs. The
result records each face's throughput and the ratio tei / native per level.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from pathlib import Path

from benchmarks import cli, glue, live, models, plotting, timing

NAME = "http_e2e"


FACES = {  # face -> (path of a task's prediction route, request body for one input)
    "native": ("/v1/tasks/{task}/predict", lambda item: {"inputs": [item]}),
    "tei": ("/tasks/{task}/predict", lambda item: {"inputs": item}),
}


async def load_level(url: str, clients: int, duration_s: float, tasks: dict[str, bool], singles, pairs,
                     seed: int, face: str = "native") -> dict:
    """``clients`` closed-loop clients for ``duration_s``: latencies (s) and status counts."""
    import httpx

    rng = random.Random(seed)
    names = sorted(tasks)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    stop_at = time.perf_counter() + duration_s

    async def client(http: httpx.AsyncClient) -> None:
        while time.perf_counter() < stop_at:
            task = rng.choice(names)
            item = list(rng.choice(pairs)) if tasks[task] else rng.choice(singles)
            start = time.perf_counter()
            try:
                route, body = FACES[face]
                r = await http.post(url + route.format(task=task), json=body(item))
                status = str(r.status_code)
            except httpx.HTTPError as e:
                status = type(e).__name__
            latencies.append(time.perf_counter() - start)
            statuses[status] = statuses.get(status, 0) + 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60.0, limits=limits) as http:
        began = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - began
    return {"latencies_s": latencies, "statuses": statuses, "wall_s": wall}


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--clients", default="1,16,64")
    p.add_argument("--tasks", type=int, default=100)
    p.add_argument("--duration", type=float, default=30.0, help="seconds per concurrency level (and face)")
    p.add_argument("--faces", default="native", help="native, tei or both (native,tei): the ratio tei/native")
    p.add_argument("--slices", type=int, default=6, help="alternating slices per level when comparing faces")
    args = p.parse_args()
    cli.setup(args)
    load_before = cli.load_average()
    levels = [1, 4] if args.quick else [int(x) for x in args.clients.split(",")]
    duration = 2.0 if args.quick else args.duration
    n_tasks = 6 if args.quick else args.tasks
    path = models.model_path(args.model)
    singles, pairs = glue.split_texts(glue.sample_texts(args.glue_dir, 4000, seed=args.seed))
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(args.dtype, args.dtype)

    with tempfile.TemporaryDirectory() as tmp:
        tasks = models.write_task_files(models.DeltaFactory(path), Path(tmp) / "deltas",
                                        [f"task{i}" for i in range(n_tasks)])
        with live.Server(path, Path(tmp) / "deltas", "--device", args.device, "--dtype", dtype,
                         log_path=Path(tmp) / "server.log") as server:
            asyncio.run(load_level(server.url, 2, 1.0, tasks, singles, pairs, seed=1))  # warm-up
            results = {}
            faces = [f.strip() for f in args.faces.split(",")]
            for c in levels:
                if len(faces) > 1:
                    results[f"c{c}_faces"] = compare_faces(server.url, c, duration, tasks, singles, pairs,
                                                           args.seed + c, faces, args.slices)
                    shown = "  ".join(f"{f} {v['requests_per_s']:.1f} req/s" for f, v in
                                      results[f"c{c}_faces"]["faces"].items())
                    print(f"{c:3d} clients: {shown}  ratio {results[f'c{c}_faces']['ratio']:.3f}")
                    continue
                before = server.metrics(*live.FORWARD_COUNTERS)
                run = asyncio.run(load_level(server.url, c, duration, tasks, singles, pairs, seed=args.seed + c,
                                             face=faces[0]))
                after = server.metrics(*live.FORWARD_COUNTERS)
                f_sum, f_count = (after[n] - before[n] for n in live.FORWARD_COUNTERS[:2])
                lat = run["latencies_s"]
                ok = run["statuses"].get("200", 0)
                s = timing.stats(lat)
                mean_latency = sum(lat) / len(lat)
                results[f"c{c}"] = {
                    "clients": c, "requests": len(lat), "ok": ok, "failed": len(lat) - ok,
                    "statuses": run["statuses"], "wall_s": run["wall_s"],
                    "requests_per_s": ok / run["wall_s"],
                    "latency_ms": {k: v * 1e3 for k, v in s.items() if k != "n"},
                    "mean_latency_ms": mean_latency * 1e3,
                    "forward_passes": f_count, "forward_seconds": f_sum,
                    "mean_sequences_per_forward": len(lat) / f_count if f_count else None,
                    "forward_busy_share": f_sum / run["wall_s"],
                    "outside_forward_share_of_latency": 1 - (f_sum / f_count) / mean_latency if f_count else None,
                    "raw_latencies_s": lat,
                }
                r = results[f"c{c}"]
                print(f"{c:3d} clients: {r['requests_per_s']:7.1f} req/s  p50 {r['latency_ms']['p50']:7.1f} ms  "
                      f"p99 {r['latency_ms']['p99']:7.1f} ms  failed {r['failed']}  "
                      f"seq/forward {r['mean_sequences_per_forward'] or 0:.1f}  forward busy {r['forward_busy_share']:.2f}  "
                      f"outside forward {r['outside_forward_share_of_latency'] or 0:.2f} of latency")
            command = server.command

    cli.write_result(args, NAME, {"model": str(path), "tasks": n_tasks, "server_command": command,
                                  "duration_s_per_level": duration, "faces": faces, "levels": results}, load_before)
    if len(faces) == 1:
        plot(args, results)


def compare_faces(url: str, clients: int, duration: float, tasks: dict[str, bool], singles, pairs, seed: int,
                  faces: list[str], slices: int) -> dict:
    """Each face for ``duration`` seconds in all, in ``slices`` alternating slices; throughput per
    face and the ratio of the second to the first (e.g. tei / native)."""
    runs: dict[str, list[dict]] = {f: [] for f in faces}
    for k in range(slices):
        for face in (faces if k % 2 == 0 else faces[::-1]):
            runs[face].append(asyncio.run(load_level(url, clients, duration / slices, tasks, singles, pairs,
                                                     seed=seed + k, face=face)))
    out = {}
    for face, parts in runs.items():
        lat = [x for p in parts for x in p["latencies_s"]]
        ok = sum(p["statuses"].get("200", 0) for p in parts)
        wall = sum(p["wall_s"] for p in parts)
        out[face] = {"requests": len(lat), "ok": ok, "failed": len(lat) - ok, "wall_s": wall,
                     "requests_per_s": ok / wall, "latency_ms": {k: v * 1e3 for k, v in timing.stats(lat).items()
                                                                 if k != "n"},
                     "slice_requests_per_s": [p["statuses"].get("200", 0) / p["wall_s"] for p in parts]}
    return {"clients": clients, "faces": out,
            "ratio": out[faces[1]]["requests_per_s"] / out[faces[0]]["requests_per_s"]}


def plot(args, results: dict) -> None:
    levels = list(results.values())
    x = [str(r["clients"]) for r in levels]
    fig, (a, b, c) = plotting.subplots(3, width=13)
    a.bar(x, [r["requests_per_s"] for r in levels])
    a.set_xlabel("concurrent clients")
    a.set_ylabel("requests / s (1 input each)")
    a.set_title("throughput")
    b.plot(x, [r["latency_ms"]["p50"] for r in levels], "o-", label="p50")
    b.plot(x, [r["latency_ms"]["p99"] for r in levels], "s-", label="p99")
    b.set_yscale("log")
    b.set_xlabel("concurrent clients")
    b.set_ylabel("ms")
    b.set_title("latency")
    b.legend()
    c.bar(x, [r["outside_forward_share_of_latency"] or 0 for r in levels])
    c.set_ylim(0, 1)
    c.set_xlabel("concurrent clients")
    c.set_ylabel("share of request latency outside the forward pass")
    c.set_title("overhead")
    plotting.save_figure(fig, args, NAME, f"HTTP end to end, {args.tasks} tasks", threads=False)


if __name__ == "__main__":
    main()
