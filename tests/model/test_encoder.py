"""Equivalence: the engine's mixed-task forward equals plain HF with each task's values, row by row."""

from __future__ import annotations

import random

import pytest
import torch

from bitfit_serve import Engine
from bitfit_serve.model.base import default_model_path, load_hf_base
from tests.factories import SENTENCES, random_delta
from tests.reference import reference_logits

ATOL = 1e-5

# (task, sites, labels, problem_type, pooling, inputs): every problem type and pooling, different
# label counts and different trained sites, so a wrong gather or a wrong head shows.
TASKS = [
    ("all_mean", "all", 2, "single_label_classification", "mean", ("text",)),
    ("bias_cls", "biases", 3, "single_label_classification", "cls", ("text",)),
    ("gamma_pooler", "gammas", 5, "single_label_classification", "pooler", ("text",)),
    ("bqbm2_reg", ["encoder.layer.0.attention.self.query.bias", "encoder.layer.1.intermediate.dense.bias",
                   "encoder.layer.1.attention.self.query.bias"], 1, "regression", "mean", ("a", "b")),
    ("multi_pooler", ["embeddings.LayerNorm.bias", "encoder.layer.1.attention.self.value.bias",
                      "pooler.dense.bias"], 4, "multi_label_classification", "pooler", ("a", "b")),
    ("head_only", [], 2, "single_label_classification", "cls", ("text",)),
]


def _inputs_for(delta, n: int, offset: int) -> list:
    texts = [SENTENCES[(offset + i) % len(SENTENCES)] for i in range(n)]
    if delta.is_pair_task:
        return [(t, SENTENCES[(offset + i + 3) % len(SENTENCES)]) for i, t in enumerate(texts)]
    return texts


def _make_deltas(model_dir, hf_base):
    return [random_delta(model_dir, name, sites=sites, num_labels=c, problem_type=pt, pooling=pool,
                         inputs=inputs, seed=i, hf_base=hf_base)
            for i, (name, sites, c, pt, pool, inputs) in enumerate(TASKS)]


def _check_mixed_batch(model_dir, deltas, engine: Engine, rows_per_task: int = 3):
    versions = {d.task: engine.add_task(d) for d in deltas}
    items = []  # (delta, input)
    for i, d in enumerate(deltas):
        items += [(d, x) for x in _inputs_for(d, rows_per_task, offset=i)]
    random.Random(0).shuffle(items)  # interleave tasks within the batch

    encoded = [engine.tokenize(versions[d.task], [x])[0] for d, x in items]
    batch = engine.collate(encoded, [versions[d.task].row for d, _ in items])
    assert batch.single_row is None
    logits = engine.forward(batch)

    for d in deltas:
        idx = [i for i, (dd, _) in enumerate(items) if dd is d]
        expected = reference_logits(model_dir, d, [items[i][1] for i in idx])
        got = logits[idx, : d.num_labels]
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=f"task {d.task}")
        # Padded head columns never win a softmax.
        assert torch.isneginf(logits[idx, d.num_labels:]).all()


def test_each_delta_changes_the_output(tiny_model_dir):
    """Guard against a vacuous equivalence test: every trained site set moves the logits."""
    _, _, hf_base = load_hf_base(tiny_model_dir)
    for d in _make_deltas(tiny_model_dir, hf_base):
        if d.sites:
            inputs = _inputs_for(d, 2, offset=0)
            moved = reference_logits(tiny_model_dir, d, inputs) - reference_logits(
                tiny_model_dir, d.replace(sites={}), inputs)
            assert moved.abs().max() > 1e-3, d.task


def test_mixed_batch_equals_hf_per_task(tiny_model_dir):
    _, _, hf_base = load_hf_base(tiny_model_dir)
    engine = Engine.from_pretrained(tiny_model_dir, initial_capacity=2)  # forces capacity doubling
    _check_mixed_batch(tiny_model_dir, _make_deltas(tiny_model_dir, hf_base), engine)


@pytest.mark.parametrize("pooling", ["pooler", "mean", "cls"])
def test_mixed_batch_of_alike_tasks_equals_hf_per_task(tiny_model_dir, pooling):
    """Tasks that pool the same way and share a label count take the short path (one pooling,
    no column mask); per-row values, the pooler's bias included, must still apply per row."""
    _, _, hf_base = load_hf_base(tiny_model_dir)
    sites = ["pooler.dense.bias", "encoder.layer.1.output.dense.bias"] if pooling == "pooler" else "biases"
    deltas = [random_delta(tiny_model_dir, f"{pooling}{i}", sites=sites, num_labels=3, pooling=pooling,
                           seed=10 + i, hf_base=hf_base) for i in range(3)]
    _check_mixed_batch(tiny_model_dir, deltas, Engine.from_pretrained(tiny_model_dir))


@pytest.mark.parametrize("kind", ["gammas", "query_and_mlp_biases"])
def test_mixed_batch_with_shared_and_per_task_sites_equals_hf(tiny_model_dir, kind):
    """No task here trains every site, so in a batch some values are per row and others shared:
    a per-task LayerNorm gamma with the base beta, or a per-task query bias next to the shared
    key and value biases of the fused QKV."""
    _, _, hf_base = load_hf_base(tiny_model_dir)
    per_task = {"gammas": ["gammas", "gammas", "gammas"],
                "query_and_mlp_biases": [["encoder.layer.0.attention.self.query.bias"],
                                         ["encoder.layer.0.attention.self.query.bias",
                                          "encoder.layer.1.intermediate.dense.bias"],
                                         ["encoder.layer.1.attention.self.query.bias"]]}[kind]
    deltas = [random_delta(tiny_model_dir, f"{kind}{i}", sites=sites, num_labels=2, pooling="mean",
                           seed=20 + i, hf_base=hf_base) for i, sites in enumerate(per_task)]
    _check_mixed_batch(tiny_model_dir, deltas, Engine.from_pretrained(tiny_model_dir))


def test_single_task_batch_uses_fused_path_and_matches(tiny_model_dir):
    _, _, hf_base = load_hf_base(tiny_model_dir)
    engine = Engine.from_pretrained(tiny_model_dir)
    deltas = _make_deltas(tiny_model_dir, hf_base)
    versions = [engine.add_task(d) for d in deltas]  # heads of different widths
    for d, v in zip(deltas, versions):
        for inputs in (_inputs_for(d, 4, offset=1), _inputs_for(d, 1, offset=2)):  # padded, and not
            batch = engine.collate(engine.tokenize(v, inputs), [v.row] * len(inputs))
            assert batch.single_row == v.row and batch.has_padding == (len(inputs) > 1)
            expected = reference_logits(tiny_model_dir, d, inputs)
            logits = engine.forward(batch)
            torch.testing.assert_close(logits[:, : d.num_labels], expected, atol=ATOL, rtol=0, msg=d.task)
            assert logits.shape[1] == d.num_labels  # its own head only: no padding, no mask


def test_predict_postprocesses_each_problem_type(tiny_bert_dir):
    _, _, hf_base = load_hf_base(tiny_bert_dir)
    engine = Engine.from_pretrained(tiny_bert_dir)
    deltas = _make_deltas(tiny_bert_dir, hf_base)
    for d in deltas:
        engine.add_task(d)
    items = [(d.task, _inputs_for(d, 1, 0)[0]) for d in deltas]
    for d, (task, x), pred in zip(deltas, items, engine.predict(items)):
        ref = reference_logits(tiny_bert_dir, d, [x])[0]
        assert pred.task == task and len(pred.version) == 16
        if d.problem_type == "regression":
            assert pred.value == pytest.approx(float(ref[0]), abs=ATOL) and pred.label is None
        elif d.problem_type == "multi_label_classification":
            assert pred.scores == pytest.approx(dict(zip(d.labels, torch.sigmoid(ref).tolist())), abs=ATOL)
        else:
            probs = torch.softmax(ref, -1)
            assert pred.label == d.labels[int(probs.argmax())]
            assert pred.score == pytest.approx(float(probs.max()), abs=ATOL)
            assert sum(pred.scores.values()) == pytest.approx(1.0, abs=1e-5)


def test_real_minilm_mixed_batch_equals_hf():
    model_dir = default_model_path()
    _, _, hf_base = load_hf_base(model_dir)
    engine = Engine.from_pretrained(model_dir)
    deltas = []
    for i, (name, sites, c, pt, pool, inputs) in enumerate(TASKS[:3] + TASKS[4:]):
        sites = sites if isinstance(sites, str) else [s.replace("layer.1.", "layer.5.") for s in sites]
        deltas.append(random_delta(model_dir, name, sites=sites, num_labels=c, problem_type=pt,
                                   pooling=pool, inputs=inputs, seed=i, scale=0.05, hf_base=hf_base))
    deltas.append(random_delta(model_dir, "reg_pair", sites=["encoder.layer.2.intermediate.dense.bias"],
                               problem_type="regression", pooling="mean", inputs=("a", "b"), seed=9,
                               scale=0.05, hf_base=hf_base))
    _check_mixed_batch(model_dir, deltas, engine, rows_per_task=2)


@pytest.mark.parametrize("dtype,atol", [("bfloat16", 3e-2), ("float16", 3e-3)])
def test_half_precision_engine_runs_and_stays_close(tiny_bert_dir, dtype, atol):
    """GPU dtypes are selectable; on CPU they run too and stay near the fp32 reference (tolerance:
    about 1.5x the measured error), each row nearer its own input's reference than any other's."""
    _, _, hf_base = load_hf_base(tiny_bert_dir)
    engine = Engine.from_pretrained(tiny_bert_dir, dtype=dtype)
    assert all(t.dtype == getattr(torch, dtype) for t in engine.base.weights.values())
    d = random_delta(tiny_bert_dir, "half", sites="all", num_labels=3, pooling="mean", hf_base=hf_base)
    v = engine.add_task(d)
    assert engine._banks.view().heads[4].weight.dtype == getattr(torch, dtype)
    batch = engine.collate(engine.tokenize(v, SENTENCES[:4]), [v.row, 0, v.row, v.row])
    logits = engine.forward(batch)[[0, 2, 3], :3]
    expected = reference_logits(tiny_bert_dir, d, [SENTENCES[0], SENTENCES[2], SENTENCES[3]])
    torch.testing.assert_close(logits, expected, atol=atol, rtol=0)
    distance = torch.cdist(logits.float(), expected)  # [row, reference]
    assert torch.equal(distance.argmin(dim=1), torch.arange(3)), distance
