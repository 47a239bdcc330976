"""Batch planning: length-sorted, token budget and sequence cap, nothing lost or duplicated."""

from __future__ import annotations

import asyncio
import random

import pytest

from bitfit_serve.batcher import Batcher, _Request, _Seq
from bitfit_serve.engine import Engine
from bitfit_serve.inputs import EncodedInput


class _FakeTasks:
    def release(self, versions):
        pass


class _FakeEngine:
    tasks = _FakeTasks()
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


def test_a_non_finite_output_fails_its_own_request_only(loop):
    """Two requests in one forward; the first's output is NaN: it gets NonFiniteOutput, the
    second its prediction (issue 19, finding 6)."""
    import torch

    from bitfit_serve.errors import NonFiniteOutput

    class NanFirst(_FakeEngine):
        def collate(self, encoded, rows):
            return rows

        def forward(self, rows):
            return torch.tensor([[float("nan")], [1.0]])

        def postprocess(self, version, logits, encoded):
            if not torch.isfinite(logits).all():
                raise NonFiniteOutput("nan")
            return float(logits[0])

    from types import SimpleNamespace

    batcher = Batcher(NanFirst(), max_batch_tokens=100, max_batch_requests=8, max_queue=100)
    (bad,), (good,) = _seqs([3], loop), _seqs([3], loop)
    bad, good = (_Seq(s.request, s.index, s.encoded, SimpleNamespace(row=r)) for s, r in ((bad, 1), (good, 2)))
    batcher._run_batch([bad, good])
    loop.run_until_complete(asyncio.sleep(0))  # the futures are settled on their loop
    assert isinstance(bad.request.future.exception(), NonFiniteOutput)
    assert good.request.future.result() == [[1.0]]
