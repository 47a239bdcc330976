"""Issue 19, finding 1, measured: what one tenant's wide-head delta costs the others.

The real server over a copy of the example deltas; a mixed sst2 + cola request (2 + 1 texts) is
timed ``--reps`` times (sequential, one client), then a delta with ``--labels`` labels is uploaded,
the same request timed again, the wide task deleted, and timed a third time; ``bitfit_bank_bytes``
is read at each stage. Before heads were banked per width class, the same upload (10,000 labels)
took the bank from 1.7 MB to 248 MB at 12 tasks and the mixed request from 52.8 to 241.6 ms, and
neither came back after the delete.

    python -m benchmarks.wide_tenant                      # MiniLM, the example deltas, 1,000 labels
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.cli import load_average, parser, write_result
from benchmarks.live import Server
from benchmarks.timing import percentile

MIXED = {"items": [{"task": "sst2", "inputs": ["a gripping, beautifully made film", "the plot is thin"]},
                   {"task": "cola", "inputs": ["The book was written by John."]}]}


def wide_delta(template: Path, labels: int) -> bytes:
    """The sst2 delta with ``labels`` labels and a head as wide (a valid upload, as the tenant sent)."""
    import torch

    from bitfit_serve import delta as delta_io

    d = delta_io.load(template)
    g = torch.Generator().manual_seed(0)
    hidden = d.head_weight.shape[1]
    wide = d.replace(task="wide", labels=tuple(f"label-{i:05d}" for i in range(labels)),
                     head_weight=torch.randn(labels, hidden, generator=g) / hidden ** 0.5,
                     head_bias=torch.zeros(labels))
    return delta_io.to_bytes(wide)


def timed(client, reps: int) -> dict:
    times = []
    answers = None
    for _ in range(reps):
        start = time.perf_counter()
        r = client.post("/v1/predict", json=MIXED)
        times.append((time.perf_counter() - start) * 1e3)
        r.raise_for_status()
        answers = answers or r.json()
    return {"p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99), "answers": answers}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--labels", type=int, default=1000)
    p.add_argument("--deltas", type=Path, default=Path("deltas"))
    args = p.parse_args()
    args.reps = args.reps or 200
    load_before = load_average()
    import httpx

    model = "default" if args.model == "minilm" else args.model
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "deltas"
        shutil.copytree(args.deltas, folder)
        body = wide_delta(folder / "sst2.safetensors", args.labels)
        with Server(model, folder, "--threads", str(args.threads), "--max-labels-per-task", str(args.labels)) as server, \
                httpx.Client(base_url=server.url, timeout=60) as client:
            def stage() -> dict:
                out = timed(client, args.reps)
                out["bank_bytes"] = server.metrics("bitfit_bank_bytes")["bitfit_bank_bytes"]
                out["resident_tasks"] = server.metrics("bitfit_resident_tasks")["bitfit_resident_tasks"]
                return out

            timed(client, 10)  # warm-up
            before = stage()
            client.put("/v1/tasks/wide", content=body,
                       headers={"Content-Type": "application/octet-stream"}).raise_for_status()
            during = stage()
            client.delete("/v1/tasks/wide").raise_for_status()
            after = stage()
    same = before["answers"] == during["answers"] == after["answers"]
    stages = {"before": before, "with_wide_task": during, "after_delete": after}
    for s in stages.values():
        del s["answers"]
    result = {"labels": args.labels, "upload_bytes": len(body), "stages": stages, "answers_identical": same,
              "p50_with_over_before": during["p50_ms"] / before["p50_ms"],
              "p50_after_over_before": after["p50_ms"] / before["p50_ms"],
              "bank_bytes_after_over_before": after["bank_bytes"] / before["bank_bytes"]}
    for name, s in stages.items():
        print(f"{name:15s} p50 {s['p50_ms']:7.2f} ms  p99 {s['p99_ms']:7.2f} ms  bank {s['bank_bytes'] / 2**20:8.2f} MiB "
              f"({s['resident_tasks']:.0f} tasks)")
    print(f"answers identical: {same}")
    write_result(args, "wide_tenant", result, load_before)


if __name__ == "__main__":
    main()
