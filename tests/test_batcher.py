"""Batch planning: length-sorted, token budget and sequence cap, nothing lost or duplicated."""

from __future__ import annotations

import asyncio
import random

import pytest

from bitfit_serve.batcher import Batcher, _Request, _Seq
from bitfit_serve.engine import EncodedInput, Engine, plan_batches


class _FakeRegistry:
    def release(self, versions):
        pass


class _FakeEngine:
    registry = _FakeRegistry()
    forward_overhead_tokens = 10**9  # never cut for padding: these tests pin the budget rules
    plan = Engine.plan


def _seqs(lengths, loop):
    request = _Request(loop, loop.create_future(), [None] * len(lengths), [len(lengths)], [None] * len(lengths),
                       len(lengths))
    return [_Seq(request, i, EncodedInput([0] * n, [0] * n), None) for i, n in enumerate(lengths)]


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.mark.parametrize("lengths, max_tokens, max_requests, expected", [
    ([5, 3, 9, 3, 7], 20, 10, [[3, 3, 5], [7, 9]]),
    ([5, 3, 9, 3, 7], 20, 2, [[3, 3], [5, 7], [9]]),
    ([50, 2], 20, 10, [[2], [50]]),  # longer than the budget: runs alone
    ([4] * 6, 16, 10, [[4] * 4, [4] * 2]),
])
def test_plan(loop, lengths, max_tokens, max_requests, expected):
    batcher = Batcher(_FakeEngine(), max_batch_tokens=max_tokens, max_batch_requests=max_requests, max_queue=100)
    assert [[len(s) for s in b] for b in batcher._plan(_seqs(lengths, loop))] == expected


def test_plan_random(loop):
    rng = random.Random(0)
    batcher = Batcher(_FakeEngine(), max_batch_tokens=256, max_batch_requests=8, max_queue=1000)
    for _ in range(50):
        seqs = _seqs([rng.randint(1, 120) for _ in range(rng.randint(1, 40))], loop)
        batches = batcher._plan(seqs)
        assert sorted(id(s) for b in batches for s in b) == sorted(id(s) for s in seqs)
        flat = [len(s) for b in batches for s in b]
        assert flat == sorted(flat)
        for b in batches:
            assert len(b) <= 8
            assert len(b) == 1 or max(len(s) for s in b) * len(b) <= 256


def test_plan_drops_cancelled_requests(loop):
    batcher = Batcher(_FakeEngine(), max_batch_tokens=100, max_batch_requests=8, max_queue=100)
    kept, gone = _seqs([3, 4], loop), _seqs([5, 6], loop)
    gone[0].request.future.cancel()
    assert [[len(s) for s in b] for b in batcher._plan(kept + gone)] == [[3, 4]]
    assert gone[0].request.remaining == 0  # accounted for, so its versions get released


@pytest.mark.parametrize("lengths, overhead, expected", [
    ([4, 4, 4, 100], 64, [[4, 4, 4], [100]]),  # 3 x 96 padded tokens cost more than a forward
    ([4, 4, 4, 100], 300, [[4, 4, 4, 100]]),  # ... unless a forward costs more still
    ([10, 12, 30, 31, 33], 20, [[10, 12], [30, 31, 33]]),
    ([10, 12, 30, 31, 33], 0, [[10], [12], [30], [31], [33]]),  # no padding at all
    ([7, 7, 7], 0, [[7, 7, 7]]),  # equal lengths never pad
])
def test_plan_cuts_where_padding_costs_more_than_a_forward(lengths, overhead, expected):
    batches = plan_batches(lengths, max_tokens=10_000, max_seqs=64, overhead_tokens=overhead)
    assert [[lengths[i] for i in b] for b in batches] == expected


def test_padding_aware_plan_keeps_budget_rules_and_loses_nothing():
    rng = random.Random(1)
    for _ in range(100):
        lengths = [rng.randint(1, 128) for _ in range(rng.randint(1, 100))]
        batches = plan_batches(lengths, max_tokens=512, max_seqs=16, overhead_tokens=rng.choice([0, 8, 64, 10**6]))
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            assert len(b) <= 16 and (len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 512)
