"""Engine task lifecycle: add / remove / re-add reuse rows without leaking into other tasks."""

from __future__ import annotations

import pytest
import torch

from bitfit_serve import Engine
from bitfit_serve.errors import InvalidInput, UnknownTask
from bitfit_serve.model.base import load_hf_base
from tests.factories import SENTENCES, random_delta
from tests.reference import reference_logits


def _logits(engine: Engine, task: str, texts):
    v = engine.tasks.get(task)
    return engine.forward(engine.collate(engine.tokenize(v, texts), [v.row] * len(texts)))[:, : len(v.labels)]


def test_add_remove_readd_reuses_rows_without_leaking(tiny_bert_dir):
    _, _, hf = load_hf_base(tiny_bert_dir)
    engine = Engine.from_pretrained(tiny_bert_dir, initial_capacity=2)
    a = random_delta(tiny_bert_dir, "a", sites="all", num_labels=4, pooling="pooler", hf_base=hf)
    b = random_delta(tiny_bert_dir, "b", sites="gammas", seed=1, hf_base=hf)
    c = random_delta(tiny_bert_dir, "c", sites=["encoder.layer.0.output.dense.bias"], seed=2, hf_base=hf)
    texts = SENTENCES[:4]
    row_a = engine.add_task(a).row
    engine.add_task(b)
    b_before = _logits(engine, "b", texts)

    engine.remove_task("a")
    with pytest.raises(UnknownTask):
        engine.predict([("a", "x")])
    assert engine.add_task(c).row == row_a  # c reuses a's row ...
    # ... and sees none of a's values (a trained every site, c only one) nor a's wider head
    torch.testing.assert_close(_logits(engine, "c", texts), reference_logits(tiny_bert_dir, c, texts), atol=1e-5, rtol=0)
    assert torch.equal(_logits(engine, "b", texts), b_before)

    engine.add_task(a)  # re-add under the same name
    torch.testing.assert_close(_logits(engine, "a", texts), reference_logits(tiny_bert_dir, a, texts), atol=1e-5, rtol=0)
    assert {v.task for v in engine.tasks.list()} == {"a", "b", "c"}


def test_replace_swaps_version_and_frees_old_row_when_idle(tiny_bert_dir):
    _, _, hf = load_hf_base(tiny_bert_dir)
    engine = Engine.from_pretrained(tiny_bert_dir)
    v1 = engine.add_task(random_delta(tiny_bert_dir, "t", seed=1, hf_base=hf))
    pinned = engine.tasks.acquire(["t"])  # a batch in flight on v1
    v2 = engine.add_task(random_delta(tiny_bert_dir, "t", seed=2, hf_base=hf))
    assert v2.version != v1.version and v2.row != v1.row
    assert engine.predict([("t", "hello")])[0].version == v2.version
    assert engine.tasks.rows_in_use == 2  # v1's row still held by the in-flight batch
    engine.tasks.release(pinned)
    assert engine.tasks.rows_in_use == 1


def test_predict_rejects_wrong_input_shape(tiny_bert_dir):
    _, _, hf = load_hf_base(tiny_bert_dir)
    engine = Engine.from_pretrained(tiny_bert_dir)
    engine.add_task(random_delta(tiny_bert_dir, "single", hf_base=hf))
    engine.add_task(random_delta(tiny_bert_dir, "pair", inputs=("premise", "hypothesis"), hf_base=hf))
    with pytest.raises(InvalidInput, match="takes text pairs"):
        engine.predict([("pair", "just one text")])
    with pytest.raises(InvalidInput, match="not a pair"):
        engine.predict([("single", ("a", "b"))])
    assert engine.tasks._registry._in_flight == {}, "a failed predict must release its pins"


def test_truncates_to_task_max_length(tiny_bert_dir):
    _, _, hf = load_hf_base(tiny_bert_dir)
    engine = Engine.from_pretrained(tiny_bert_dir)
    v = engine.add_task(random_delta(tiny_bert_dir, "short", max_length=6, hf_base=hf))
    (enc,) = engine.tokenize(v, [" ".join(["word"] * 50)])
    assert len(enc) == 6


def test_reports_bank_bytes(tiny_bert_dir):
    _, _, hf = load_hf_base(tiny_bert_dir)
    engine = Engine.from_pretrained(tiny_bert_dir, initial_capacity=4)
    d = random_delta(tiny_bert_dir, "t", sites="biases", num_labels=2, hf_base=hf)
    v = engine.add_task(d)
    # per row: every bias the task trains (fp32), label count, pooling code; its 2 x H head and 2
    # biases in the 2-wide class, which starts with 8 slots
    site_values = sum(t.numel() for t in d.sites.values())
    head_values = 2 * hf.config.hidden_size + 2
    assert engine.tasks.bank_bytes_of(v) == (site_values + head_values) * 4 + 8 + 8
    assert engine.tasks.bank_bytes == engine.tasks.capacity * (site_values * 4 + 16) + 8 * head_values * 4


def test_version_is_the_file_sha256_whatever_the_source(tiny_bert_dir, tmp_path):
    from bitfit_serve import delta as delta_io

    engine = Engine.from_pretrained(tiny_bert_dir)
    d = random_delta(tiny_bert_dir, "t", seed=3)
    data = delta_io.to_bytes(d)
    path = tmp_path / "t.safetensors"
    path.write_bytes(data)
    sha = delta_io.sha256_bytes(data)
    parsed = delta_io.parse(data)
    # A DeltaFile carries the bytes it was parsed from; a bare Delta is serialized byte-stably.
    for source in (data, path, parsed, parsed.delta):
        assert engine.add_task(source).sha256 == sha


def test_predict_assembles_forwards_of_different_head_widths(tiny_bert_dir, monkeypatch):
    """Heads are banked per width class, so a forward's logits are as wide as its widest task: one
    predict whose forwards hold tasks of different widths must still be assembled right, and a
    wide task added meanwhile changes nothing for the others (Python API, threads)."""
    _, _, hf = load_hf_base(tiny_bert_dir)
    engine = Engine.from_pretrained(tiny_bert_dir, forward_overhead_tokens=0)  # one forward per length
    engine.add_task(random_delta(tiny_bert_dir, "a", num_labels=2, hf_base=hf))
    engine.add_task(random_delta(tiny_bert_dir, "b", num_labels=5, hf_base=hf))
    items = [("a", SENTENCES[0]), ("b", SENTENCES[0] * 4), ("a", SENTENCES[0] * 4)]
    expected = [engine.predict([item])[0] for item in items]
    forward, widths = engine.forward, []

    def forward_then_add(batch):
        logits = forward(batch)
        if not widths:  # after the first forward of the predict below
            engine.add_task(random_delta(tiny_bert_dir, "wide", num_labels=100, hf_base=hf))
        widths.append(logits.shape[1])
        return logits

    monkeypatch.setattr(engine, "forward", forward_then_add)
    got = engine.predict(items)
    assert widths == [2, 8]  # "a" alone; then "a" and "b" mixed: the 8-wide class of b's 5 labels
    for g, e in zip(got, expected):
        assert g.label == e.label and g.scores == pytest.approx(e.scores, abs=1e-6)


@pytest.mark.parametrize("overhead", [0, 8, 10**6])
def test_forward_many_equals_one_padded_forward(tiny_bert_dir, overhead):
    """Cutting mixed lengths into several forwards changes the work, never the logits or their order."""
    _, _, hf = load_hf_base(tiny_bert_dir)
    engine = Engine.from_pretrained(tiny_bert_dir, forward_overhead_tokens=overhead)
    rows = [engine.add_task(random_delta(tiny_bert_dir, f"t{i}", seed=i, hf_base=hf)).row for i in range(3)]
    texts = [SENTENCES[i % len(SENTENCES)] * (1 + i % 4) for i in range(12)]
    v = engine.tasks.get("t0")
    encoded = engine.tokenize(v, texts)
    row_of = [rows[i % 3] for i in range(len(texts))]
    assert len({len(e) for e in encoded}) > 2
    expected = engine.forward(engine.collate(encoded, row_of))
    torch.testing.assert_close(engine.forward_many(encoded, row_of, max_batch_size=5), expected, atol=1e-5, rtol=0)
    if overhead == 0:
        assert len(engine.plan([len(e) for e in encoded])) == len({len(e) for e in encoded})
