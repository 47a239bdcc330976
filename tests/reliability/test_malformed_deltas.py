"""Every malformed delta in the corpus is rejected with a specific 4xx, and nothing else changes."""

from __future__ import annotations

import pytest
import torch

from bitfit_serve import Engine
from bitfit_serve.errors import InvalidDelta
from tests.factories import SENTENCES, random_delta
from tests.reliability.corpus import malformed_deltas


@pytest.fixture(scope="module")
def served(tiny_bert_dir):
    engine = Engine.from_pretrained(tiny_bert_dir)
    others = [random_delta(tiny_bert_dir, f"other{i}", seed=i, sites=s, num_labels=2 + i)
              for i, s in enumerate(["all", "biases", "gammas"])]
    for d in others:
        engine.add_task(d)
    good = random_delta(tiny_bert_dir, "victim", sites="biases", num_labels=3, pooling="pooler", seed=7)
    return engine, good


def _snapshot(engine: Engine) -> torch.Tensor:
    items = [(v.task, SENTENCES[i % len(SENTENCES)]) for i, v in enumerate(engine.tasks.list()) for _ in range(2)]
    return torch.tensor([[p.score or 0.0] for p in engine.predict(items)])


def test_corpus_is_large_and_unique(served):
    _, good = served
    ids = [case_id for case_id, _ in malformed_deltas(good)]
    assert len(ids) >= 200 and len(set(ids)) == len(ids)


def test_every_malformed_delta_is_rejected_and_nothing_changes(served, record_property):
    engine, good = served
    before_scores, before_rows = _snapshot(engine), engine.tasks.rows_in_use
    before_versions = {v.task: v.version for v in engine.tasks.list()}
    unexpected = []
    for case_id, data in malformed_deltas(good):
        try:
            engine.add_task(data)
        except InvalidDelta as e:
            assert 400 <= e.status_code < 500 and e.message, case_id
        except Exception as e:  # noqa: BLE001 - the point is to catch anything else
            unexpected.append(f"{case_id}: {type(e).__name__}: {e}")
        else:
            unexpected.append(f"{case_id}: accepted")
    record_property("corpus_engine", {"cases": sum(1 for _ in malformed_deltas(good)), "unexpected": len(unexpected)})
    assert not unexpected, "\n".join(unexpected)
    assert "victim" not in engine.tasks
    assert engine.tasks.rows_in_use == before_rows
    assert {v.task: v.version for v in engine.tasks.list()} == before_versions
    assert torch.equal(_snapshot(engine), before_scores)
    engine.add_task(good)  # the good file itself is accepted
