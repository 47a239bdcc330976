"""Prometheus metrics for one app: their own CollectorRegistry (two apps in one process, as in
tests, never collide), names prefixed ``bitfit_``, times in seconds.

Per-task labels are off by default: with thousands of tasks they would create thousands of series
per metric. ``metrics_per_task`` turns on two extra per-task families.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH_TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
INPUT_TOKEN_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Metrics:
    def __init__(self, per_task: bool = False):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("bitfit_requests", "HTTP requests by route template and status code.",
                                ["method", "route", "status"], registry=r)
        self.request_seconds = Histogram("bitfit_request_duration_seconds", "HTTP request latency.",
                                         ["method", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("bitfit_errors", "Error responses by error code.", ["code"], registry=r)
        self.batch_size = Histogram("bitfit_batch_size", "Sequences per forward pass.",
                                    buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("bitfit_batch_tokens",
                                      "Padded tokens per forward pass (sequences x longest sequence).",
                                      buckets=BATCH_TOKEN_BUCKETS, registry=r)
        self.forward_seconds = Histogram("bitfit_forward_duration_seconds", "Time of one batched forward pass.",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.input_tokens = Histogram("bitfit_request_input_tokens",
                                      "Tokens of each input before truncation (all routes and faces).",
                                      buckets=INPUT_TOKEN_BUCKETS, registry=r)
        self.queue_depth = Gauge("bitfit_queue_depth", "Sequences admitted and waiting for a batch.", registry=r)
        self.resident_tasks = Gauge("bitfit_resident_tasks", "Tasks being served.", registry=r)
        self.bank_bytes = Gauge("bitfit_bank_bytes", "Bytes of the per-task banks (all rows, serving dtype).",
                                registry=r)
        self.task_changes = Counter("bitfit_task_changes", "Task adds/replaces/removals by source and result.",
                                    ["source", "action"], registry=r)
        self.connections_closed = Counter("bitfit_connections_closed",
                                          "Connections the server closed before serving a request, by reason "
                                          "(max_connections, header_timeout).", ["reason"], registry=r)
        self.per_task = per_task
        if per_task:
            self.task_sequences = Counter("bitfit_task_sequences", "Sequences served per task.", ["task"],
                                          registry=r)
            self.task_seconds = Histogram("bitfit_task_request_duration_seconds",
                                          "Time from admission to answer of the requests touching each task.",
                                          ["task"], buckets=LATENCY_BUCKETS, registry=r)

    def watch(self, queue_depth: Callable[[], float], resident_tasks: Callable[[], float],
              bank_bytes: Callable[[], float]) -> None:
        """Gauges read at scrape time, so they are never stale and cost nothing between scrapes."""
        self.queue_depth.set_function(queue_depth)
        self.resident_tasks.set_function(resident_tasks)
        self.bank_bytes.set_function(bank_bytes)

    def observe_tasks(self, counts: dict[str, int], seconds: float) -> None:
        if not self.per_task:
            return
        for task, n in counts.items():
            self.task_sequences.labels(task).inc(n)
            self.task_seconds.labels(task).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
