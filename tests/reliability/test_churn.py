"""No leaks on churn: add / replace / delete cycles leave memory flat and rows reusable."""

from __future__ import annotations

import gc
import random

import psutil
import torch

from bitfit_serve import Engine, delta as delta_io
from bitfit_serve.model.base import load_hf_base
from tests.factories import random_delta


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def test_add_replace_delete_cycles_do_not_leak(tiny_bert_dir, scale, record_property):
    _, _, hf = load_hf_base(tiny_bert_dir)
    engine = Engine.from_pretrained(tiny_bert_dir)
    # A fixed pool of pre-serialized files: the loop measures the engine, not the test's allocations.
    pool = [delta_io.to_bytes(random_delta(tiny_bert_dir, f"t{i % 20}", seed=i, hf_base=hf,
                                           sites=random.Random(i).choice(["all", "biases", "gammas"])))
            for i in range(60)]
    cycles = scale(ci=1_500, full=10_000)
    rng = random.Random(0)
    warmup = cycles // 5
    for i in range(cycles):
        if i == warmup:
            rss_after_warmup = _rss()
            rows_after_warmup = engine.tasks.capacity
        data = rng.choice(pool)
        engine.add_task(data)  # add or replace
        if rng.random() < 0.4:
            victim = rng.choice(engine.tasks.list()).task
            engine.remove_task(victim)
    drift = (_rss() - rss_after_warmup) / rss_after_warmup
    record_property("engine_churn", {"cycles": cycles, "rss_drift": round(drift, 4),
                                     "bank_capacity": engine.tasks.capacity})
    assert drift < 0.02, f"RSS grew {drift:.1%} over {cycles - warmup} cycles"
    assert engine.tasks.capacity == rows_after_warmup, "freed rows must be reused, not grown past"
    assert engine.tasks.rows_in_use == len(engine.tasks.list()) <= 20
    # Still correct after the churn: every task equals its own file's values.
    for v in engine.tasks.list():
        data = next(d for d in pool if delta_io.sha256_bytes(d)[:16] == v.version)
        d = delta_io.parse(data).delta
        bank = engine._banks.view().sites
        for name, value in d.sites.items():
            assert torch.equal(bank[name][v.row], value), (v.task, name)
