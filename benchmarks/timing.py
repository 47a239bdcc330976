"""Measuring and summarizing: variants timed round-robin in one process (:func:`interleave`),
medians, nearest-rank percentiles and paired ratios of those timings, and the FLOP counts and
measured matmul rates that turn a forward's time into a fraction of what the machine can do.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Mapping, Sequence

import torch


def sync(device: str) -> None:
    """Wait for queued GPU work so a timer measures the work, not its launch."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleave(variants: Mapping[str, Callable[[], object]], reps: int, warmup: int = 1,
               device: str = "cpu", cpu_out: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each variant, run round-robin; the order rotates every repetition so no
    variant always follows the same neighbour (cache state, thermal, the other agents' load).

    ``cpu_out`` (optional) receives the process CPU seconds of each call (all threads): unlike wall
    time it barely moves when other processes take the cores, so on a shared machine it is the
    steadier measure of the work each variant does."""
    names = list(variants)
    for _ in range(warmup):
        for n in names:
            variants[n]()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            cpu_start, start = time.process_time(), time.perf_counter()
            variants[n]()
            sync(device)
            times[n].append(time.perf_counter() - start)
            if cpu_out is not None:
                cpu_out.setdefault(n, []).append(time.process_time() - cpu_start)
    return times


def summarize_variants(times: Mapping[str, list[float]], cpu: Mapping[str, list[float]], seqs: int) -> dict[str, dict]:
    """Per variant of one ``interleave`` run: median wall seconds per call, sequences per second
    (``seqs`` per call), median process CPU seconds, and the raw timings behind them."""
    out = {}
    for v, t in times.items():
        median = stats(t)["median"]
        out[v] = {"median_s": median, "seq_per_s": seqs / median, "raw_s": t,
                  "cpu_median_s": stats(cpu[v])["median"], "cpu_raw_s": cpu[v]}
    return out


def paired_ratio(reference: Sequence[float], variant: Sequence[float]) -> float:
    """Median over repetitions of ``reference[r] / variant[r]`` (the variant's speed relative to
    the reference, as a throughput ratio). ``interleave`` runs every variant on the same batch
    within a repetition, back to back, so a slow spell of the machine hits both sides of a pair:
    the per-repetition ratios cancel it, the ratio of the two medians does not."""
    assert len(reference) == len(variant), "paired timings come from one interleave run"
    return statistics.median(r / v for r, v in zip(reference, variant))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of raw values, no interpolation: the smallest value
    with at least q% of the values at or below it (of 100 values, p99 is the 99th, not the max)."""
    ordered = sorted(values)
    rank = math.ceil(q / 100 * len(ordered))
    return ordered[min(len(ordered), max(1, rank)) - 1]


def stats(values: Sequence[float]) -> dict:
    return {"n": len(values), "median": statistics.median(values), "p50": percentile(values, 50),
            "p99": percentile(values, 99), "min": min(values), "max": max(values)}


def forward_flops(config, batch_size: int, seq_len: int) -> float:
    """Matmul FLOPs of one encoder forward over a padded [batch, seq_len] batch (2 per MAC):
    Q/K/V/output projections, the MLP, and attention scores + weighted sum. Pooler and head are
    negligible and left out. MiniLM at 32 x 128: 91.8 GFLOP."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tokens = batch_size * seq_len
    per_token_layer = 2 * (4 * h * h + 2 * h * i) + 2 * 2 * seq_len * h
    return float(tokens * layers * per_token_layer)


def matmul_rate(device: str, dtype: torch.dtype, reps: int = 20, rows: int = 4096) -> dict:
    """The machine's measured matmul rate (FLOP/s) on the shapes a MiniLM/BERT forward uses:
    the best median over a few [rows, k] @ [k, n] products (rows = 4096 = 32 x 128 tokens). It is the denominator of the
    "fraction of the matmul rate" (MFU) figures."""
    shapes = [(rows, 384, 1536), (rows, 1536, 384), (rows, 384, 1152), (rows, 768, 3072)]
    best, per_shape = 0.0, {}
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(n, k, device=device, dtype=dtype)
        torch.nn.functional.linear(a, b)
        sync(device)
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            torch.nn.functional.linear(a, b)
            sync(device)
            samples.append(time.perf_counter() - start)
        rate = 2 * m * k * n / statistics.median(samples)
        per_shape[f"{m}x{k}x{n}"] = rate
        best = max(best, rate)
    return {"flops_per_s": best, "per_shape_flops_per_s": per_shape}


def gemm_probe(config, tokens: int, device: str, dtype: torch.dtype) -> tuple[Callable[[], object], float]:
    """A callable doing one encoder layer's four projection matmuls (fused QKV, attention output,
    MLP in, MLP out) on random [tokens, *] inputs, and its FLOPs. Timed interleaved with the
    forwards, it gives the matmul rate under the same contention as they run, the denominator of
    the "fraction of the matmul rate" figure."""
    h, i = config.hidden_size, config.intermediate_size
    x = torch.randn(tokens, h, device=device, dtype=dtype)
    mid = torch.randn(tokens, i, device=device, dtype=dtype)
    weights = [torch.randn(3 * h, h, device=device, dtype=dtype), torch.randn(h, h, device=device, dtype=dtype),
               torch.randn(i, h, device=device, dtype=dtype)]
    w_out = torch.randn(h, i, device=device, dtype=dtype)

    def run():
        for w in weights:
            torch.nn.functional.linear(x, w)
        return torch.nn.functional.linear(mid, w_out)

    return run, float(2 * tokens * (3 * h * h + h * h + 2 * h * i))


def cycling(fn: Callable[[object], object], items: Sequence[object]) -> Callable[[], object]:
    """A no-argument callable that applies ``fn`` to the next item each call (its own counter, so
    every variant built this way sees the same item sequence)."""
    state = {"i": 0}

    def call():
        item = items[state["i"] % len(items)]
        state["i"] += 1
        return fn(item)

    return call
