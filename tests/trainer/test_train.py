"""End-to-end on tiny random checkpoints: train a few steps, export, serve, compare at 1e-5."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel
from typer.testing import CliRunner

from bitfit_serve import Engine
from bitfit_serve import delta as delta_io
from bitfit_serve.errors import InvalidDelta
from tests.factories import SENTENCES
from tests.reference import copy_sites, head_logits
from trainer import export
from trainer.cli import app
from trainer.data import from_records
from trainer.train import TrainArgs, collate, encode, train

PAIRS = [(a, b) for a, b in zip(SENTENCES, SENTENCES[1:] + SENTENCES[:1])]


def _single(n=24):
    rows = [{"text": SENTENCES[i % len(SENTENCES)] + " " * (i // len(SENTENCES)), "label": "pos" if i % 3 else "neg"}
            for i in range(n)]
    return from_records("tiny", rows, rows[:8], ["text"], "label")


def _pairs_regression():
    rows = [{"a": a, "b": b, "score": float(i % 5)} for i, (a, b) in enumerate(PAIRS * 3)]
    return from_records("tinysts", rows, rows[:8], ["a", "b"], "score", regression=True)


def _args(**kw):
    base = dict(scheme="bitfit", pooling="mean", lr=5e-2, epochs=2, batch_size=4, max_length=32, seed=0)
    return TrainArgs(**{**base, **kw})


def _trainer_logits(result, data):
    enc = encode(result.tokenizer, data.dev, 32)
    pad = result.config.pad_token_id
    with torch.no_grad():
        return result.model(**collate(enc, list(range(len(enc))), pad))


def _hf_logits(model_dir, d, data, tokenizer):
    """A fresh HF base with the delta's values copied in + the same pooling and head."""
    hf = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    copy_sites(hf, d)
    enc = encode(tokenizer, data.dev, 32)
    batch = collate(enc, list(range(len(enc))), hf.config.pad_token_id)
    with torch.no_grad():
        return head_logits(hf(**batch), batch["attention_mask"], d)


def _engine_logits(engine, d, data):
    version = engine.add_task(d)
    texts = [e.texts[0] if len(e.texts) == 1 else e.texts for e in data.dev]
    enc = engine.tokenize(version, texts)
    return engine.forward(engine.collate(enc, [version.row] * len(enc)))[:, :len(d.labels)]


@pytest.mark.parametrize("scheme,pooling", [("bitfit", "mean"), ("bitfit", "pooler"), ("rand_bias", "cls"),
                                            ("gamma_bitfit", "mean"), ("frozen", "mean")])
def test_saved_delta_reproduces_trainer_logits(tiny_model_dir, tmp_path, scheme, pooling):
    data = _single()
    args = _args(scheme=scheme, pooling=pooling)
    result = train(data, args, tiny_model_dir, progress=False)
    out = tmp_path / "tiny.safetensors"
    rec = export.write_outputs(result, data, args, str(tiny_model_dir), out)
    d = delta_io.load(out)
    assert set(d.sites) == set(result.selection.names)
    assert d.metrics["dev"] == rec["final"] and d.labels == ("neg", "pos") and d.inputs == ("text",)
    assert d.scheme == scheme and d.pooling == pooling and d.train_args["seed"] == 0

    expected = _trainer_logits(result, data)
    engine = Engine.from_pretrained(tiny_model_dir)
    torch.testing.assert_close(_engine_logits(engine, d, data), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_hf_logits(tiny_model_dir, d, data, result.tokenizer), expected,
                               rtol=1e-5, atol=1e-5)


def test_end_to_end_regression_pairs_changes_predictions(tiny_bert_dir, tmp_path):
    data = _pairs_regression()
    args = _args(epochs=3)
    result = train(data, args, tiny_bert_dir, progress=False)
    assert len(result.history) == 3 and "spearman" in result.history[-1]["dev"]
    out = tmp_path / "sts.safetensors"
    export.write_outputs(result, data, args, str(tiny_bert_dir), out)
    d = delta_io.load(out)
    assert d.problem_type == "regression" and d.head_weight.shape[0] == 1 and d.inputs == ("a", "b")

    engine = Engine.from_pretrained(tiny_bert_dir)
    base_params = dict(AutoModel.from_pretrained(tiny_bert_dir).named_parameters())
    untrained = d.replace(task="untrained", sites={n: base_params[n].detach().clone() for n in d.sites})
    engine.add_task(d)
    engine.add_task(untrained)
    pairs = [e.texts for e in data.dev]
    trained = [p.value for p in engine.predict([("tinysts", p) for p in pairs])]
    before = [p.value for p in engine.predict([("untrained", p) for p in pairs])]
    assert max(abs(a - b) for a, b in zip(trained, before)) > 1e-3  # the biases changed the outputs
    torch.testing.assert_close(torch.tensor(trained), _trainer_logits(result, data)[:, 0], rtol=1e-5, atol=1e-5)
    # the run record sits beside the delta
    rec = json.loads((tmp_path / "sts.run.json").read_text())
    assert rec["servable"] and rec["n_train"] + rec["n_val"] == len(data.train) and len(rec["history"]) == 3


def test_weight_matrix_baseline_writes_record_only_and_masks_hold(tiny_bert_dir, tmp_path):
    data = _single()
    args = _args(scheme="rand_uniform", rand_count=200, max_steps=6)
    before = {n: p.detach().clone() for n, p in AutoModel.from_pretrained(tiny_bert_dir).named_parameters()}
    result = train(data, args, tiny_bert_dir, progress=False)
    after = dict(result.model.base.named_parameters())
    changed = 0
    for name, p in after.items():
        mask = result.selection.masks.get(name)
        if mask is None:
            assert torch.equal(p, before[name]), name  # not selected: untouched
        else:
            assert torch.equal(p[mask == 0], before[name][mask == 0]), name  # masked entries untouched
            changed += int((p != before[name]).sum())
    assert result.trainable_base_values == 200 and 0 < changed <= 200
    out = tmp_path / "r.safetensors"
    rec = export.write_outputs(result, data, args, str(tiny_bert_dir), out)
    assert not out.exists() and not rec["servable"] and "weight-matrix" in rec["note"]
    with pytest.raises(ValueError, match="not servable"):
        export.to_delta(result, data, args, "x")


def test_weight_matrix_delta_is_refused_by_the_engine(tiny_bert_dir):
    """A hand-made file carrying a weight matrix is refused with a clear message."""
    from tests.factories import random_delta

    d = random_delta(tiny_bert_dir, "w", sites=[])
    weight = torch.zeros(32 * 32)
    bad = d.replace(sites={"encoder.layer.0.attention.self.query.weight": weight})
    with pytest.raises(InvalidDelta, match="weight matrices are not servable"):
        Engine.from_pretrained(tiny_bert_dir).add_task(bad)


def test_full_writes_checkpoint(tiny_bert_dir, tmp_path):
    data = _single()
    args = _args(scheme="full", lr=1e-3, max_steps=2)
    result = train(data, args, tiny_bert_dir, progress=False)
    rec = export.write_outputs(result, data, args, str(tiny_bert_dir), tmp_path / "full.safetensors")
    folder = tmp_path / "full"
    assert (folder / "config.json").is_file() and (folder / "run.json").is_file()
    # mean pooling: a sentence-transformers folder (Transformer -> Pooling -> Dense = the head)
    head = load_file(folder / "2_Dense" / "model.safetensors")
    assert torch.equal(head["linear.weight"], result.model.head.weight.detach())
    st = pytest.importorskip("sentence_transformers")
    logits = st.SentenceTransformer(str(folder), device="cpu").encode([e.texts[0] for e in data.dev],
                                                                      convert_to_tensor=True)
    torch.testing.assert_close(logits, _trainer_logits(result, data), rtol=1e-5, atol=1e-5)
    reloaded = AutoModel.from_pretrained(folder)
    name = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(dict(reloaded.named_parameters())[name], dict(result.model.base.named_parameters())[name])
    assert rec["trainable_base_values"] == sum(p.numel() for n, p in reloaded.named_parameters()
                                               if not n.startswith("pooler."))


def test_seeded_runs_are_identical(tiny_bert_dir):
    data = _single()
    a = train(data, _args(max_steps=3), tiny_bert_dir, progress=False)
    b = train(data, _args(max_steps=3), tiny_bert_dir, progress=False)
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    assert torch.equal(a.model.head.weight, b.model.head.weight)


def test_linear_schedule_and_interrupt_leave_no_delta(tiny_bert_dir, tmp_path, monkeypatch):
    data = _single()
    out = tmp_path / "never.safetensors"

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    _write_csv(tmp_path / "t.csv", data)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", interrupt)  # Ctrl-C in the first step
    result = CliRunner().invoke(app, ["train", "--model", str(tiny_bert_dir), "--train-file", str(tmp_path / "t.csv"),
                                      "--dev-file", str(tmp_path / "t.csv"), "--name", "t", "--text-field", "text",
                                      "--out", str(out), "--schedule", "linear", "--no-progress"])
    assert result.exit_code != 0
    assert not out.exists() and not list(tmp_path.glob("*.part")) and not list(tmp_path.glob("*.run.json"))


def _write_csv(path, data):
    with open(path, "w", newline="") as f:  # csv quotes the texts that hold commas
        csv.writer(f).writerows([("text", "label"), *((e.texts[0], data.labels[e.label]) for e in data.train)])


def test_cli_train_and_eval(tiny_bert_dir, tmp_path):
    data = _single()
    _write_csv(tmp_path / "t.csv", data)
    out = tmp_path / "t.safetensors"
    runner = CliRunner()
    r = runner.invoke(app, ["train", "--model", str(tiny_bert_dir), "--train-file", str(tmp_path / "t.csv"),
                            "--dev-file", str(tmp_path / "t.csv"), "--name", "t", "--text-field", "text",
                            "--out", str(out), "--epochs", "1", "--lr", "0.01", "--batch-size", "8",
                            "--schedule", "linear", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert out.is_file() and (tmp_path / "t.run.json").is_file()
    r = runner.invoke(app, ["eval", str(out), "--model", str(tiny_bert_dir), "--dev-file", str(tmp_path / "t.csv")])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{"):])
    assert report["max_abs_diff"] == pytest.approx(0.0, abs=1e-9) and report["dtype"] == "float32"
    r = runner.invoke(app, ["eval", str(out), "--model", str(tiny_bert_dir), "--dev-file", str(tmp_path / "t.csv"),
                            "--dtype", "bfloat16"])
    assert r.exit_code == 0, r.output
    served_bf16 = json.loads(r.output[r.output.index("{"):])
    assert served_bf16["dtype"] == "bfloat16" and set(served_bf16["engine"]) == set(report["engine"])
    png = tmp_path / "h.png"
    r = runner.invoke(app, ["heatmap", str(out), "--model", str(tiny_bert_dir), "--out", str(png)])
    assert r.exit_code == 0, r.output
    assert png.stat().st_size > 1000 and "bv" in r.output


@pytest.mark.parametrize("schedule,step,factor", [("paper", 0, 1.0), ("paper", 99, 1.0), ("linear", 0, 0.1),
                                                  ("linear", 9, 1.0), ("linear", 10, 1.0), ("linear", 55, 0.5),
                                                  ("linear", 100, 0.0)])
def test_schedules(schedule, step, factor):
    from trainer.train import _schedule

    assert _schedule(TrainArgs(schedule=schedule, warmup_ratio=0.1), 100)(step) == pytest.approx(factor)


def test_bucketed_batches_cover_each_example_once():
    import random

    from trainer.train import bucketed_batches

    rng = random.Random(1)
    lengths = [rng.randint(3, 60) for _ in range(250)]
    batches = bucketed_batches(lengths, 8, random.Random(0), bucket_batches=4)
    assert sorted(i for b in batches for i in b) == list(range(250))
    assert all(len(b) <= 8 for b in batches)
    # within a window, batches hold neighbouring lengths: much less padding than random batches
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert padded < 1.3 * sum(lengths)


@pytest.mark.parametrize("n_train,epochs", [
    (96_000, 1),    # 6,000 steps at batch 16 fit in one epoch
    (8_000, 12),    # 500 steps an epoch: 12 epochs reach 6,000
    (2_000, 20),    # 125 an epoch: capped at 20 epochs (2,500 steps)
    (160, 100),     # 10 an epoch: the 1,000-step floor wins over the cap
])
def test_step_budget_sets_the_epochs(n_train, epochs):
    from trainer.train import plan_epochs

    assert plan_epochs(n_train, TrainArgs()) == epochs
    assert plan_epochs(n_train, TrainArgs(epochs=2)) == 2  # an explicit --epochs wins


def test_the_model_holds_the_epoch_with_the_best_validation_score(tiny_bert_dir, tmp_path):
    data = _single(40)
    args = _args(epochs=4, lr=0.2, patience=None)
    result = train(data, args, tiny_bert_dir, progress=False)
    vals = [h["val"]["accuracy"] for h in result.history]
    assert result.selected_epoch == 1 + vals.index(max(vals)) and result.n_val == 4 and result.n_train == 36
    # the returned weights are that epoch's: their dev score is the one recorded for it
    out = tmp_path / "t.safetensors"
    rec = export.write_outputs(result, data, args, str(tiny_bert_dir), out)
    assert rec["final"] == result.history[result.selected_epoch - 1]["dev"] and rec["final_epoch"] == result.selected_epoch
    from trainer.metrics import from_outputs
    from trainer.train import predict
    enc = encode(result.tokenizer, data.dev, 32)
    assert from_outputs(predict(result.model, enc, result.config.pad_token_id), enc.labels,
                        data.problem_type) == rec["final"]
    assert delta_io.load(out).metrics["dev"] == rec["final"]


def test_early_stopping_waits_for_half_the_budget_then_stops(tiny_bert_dir, monkeypatch):
    import trainer.train as train_module

    data = _single(40)
    learned = lambda *a: ()  # noqa: E731  (the best epoch is off the class prior)
    monkeypatch.setattr(train_module, "collapse_warnings", learned)
    # lr 0: nothing ever improves after epoch 1
    result = train(data, _args(epochs=12, lr=0.0, patience=2), tiny_bert_dir, progress=False)
    assert result.stopped_early and result.selected_epoch == 1
    assert len(result.history) == 6  # past half of 12 epochs' steps, 2 epochs without a better score
    full = train(data, _args(epochs=3, lr=0.0, patience=2), tiny_bert_dir, progress=False)
    assert len(full.history) == 3 and not full.stopped_early


def test_a_run_still_at_the_class_prior_is_never_stopped_early(tiny_bert_dir, monkeypatch):
    """Bias-only training can sit at the prior for 1,000+ steps before it learns: no early stop then."""
    import trainer.train as train_module

    monkeypatch.setattr(train_module, "collapse_warnings", lambda *a: ("predicts 'pos' for 100%",))
    result = train(_single(40), _args(epochs=12, lr=0.0, patience=2), tiny_bert_dir, progress=False)
    assert len(result.history) == 12 and not result.stopped_early


def test_one_class_and_prior_warnings():
    import numpy as np

    from trainer.train import collapse_warnings

    rows = [{"text": f"s{i}", "label": "a" if i % 4 else "b"} for i in range(40)]
    data = from_records("t", rows, rows, ["text"], "label")
    labels = [e.label for e in data.train]
    one_class = np.zeros((len(labels), 2))
    one_class[:, data.labels.index("a")] = 1.0
    found = collapse_warnings(one_class, labels, labels, data)
    assert any("predicts 'a' for 100%" in w for w in found) and any("majority class" in w for w in found)
    perfect = np.eye(2)[labels]
    assert collapse_warnings(perfect, labels, labels, data) == ()
    regression = from_records("r", [{"t": "x", "y": 1.0}, {"t": "z", "y": 2.0}], None, ["t"], "y", regression=True)
    assert collapse_warnings(np.array([[3.0], [3.0]]), [1.0, 2.0], [1.0, 2.0], regression)
    assert collapse_warnings(np.array([[1.0], [2.0]]), [1.0, 2.0], [1.0, 2.0], regression) == ()


def test_a_delta_stuck_at_the_prior_is_flagged_in_the_record_and_the_cli(tiny_bert_dir, tmp_path):
    data = _single()
    _write_csv(tmp_path / "t.csv", data)
    out = tmp_path / "t.safetensors"
    r = CliRunner().invoke(app, ["train", "--model", str(tiny_bert_dir), "--train-file", str(tmp_path / "t.csv"),
                                 "--name", "t", "--text-field", "text", "--out", str(out), "--epochs", "1",
                                 "--lr", "1e-9", "--no-progress"])  # no dev file; a rate that cannot learn
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "t.run.json").read_text())
    assert rec["warnings"] and rec["final"] is None and rec["n_dev"] == 0 and rec["n_val"] > 0
    assert "WARNING: this delta has not learned" in r.output
    assert delta_io.load(out).metrics["warnings"] == rec["warnings"]


def test_sweep_keeps_the_rate_with_the_best_validation_score(tiny_bert_dir):
    from trainer.train import sweep

    data = _single(40)
    result = sweep(data, _args(epochs=2), [0.0, 0.3], tiny_bert_dir, progress=False)
    rows = {r["lr"]: r for r in result.sweep}
    assert set(rows) == {0.0, 0.3}
    best = max(rows.values(), key=lambda r: r["val"])
    assert result.args.lr == best["lr"]
    assert result.history[result.selected_epoch - 1]["val"]["accuracy"] == best["val"]


def test_cli_lr_auto_writes_the_winner_and_its_sweep(tiny_bert_dir, tmp_path):
    data = _single()
    _write_csv(tmp_path / "t.csv", data)
    out = tmp_path / "t.safetensors"
    r = CliRunner().invoke(app, ["train", "--model", str(tiny_bert_dir), "--train-file", str(tmp_path / "t.csv"),
                                 "--name", "t", "--text-field", "text", "--out", str(out), "--epochs", "1",
                                 "--lr", "auto", "--lr-candidates", "0.001,0.05", "--no-progress"])
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "t.run.json").read_text())
    assert [row["lr"] for row in rec["sweep"]] == [0.001, 0.05]
    assert rec["train_args"]["lr"] in (0.001, 0.05) and delta_io.load(out).train_args["lr"] == rec["train_args"]["lr"]
    bad = CliRunner().invoke(app, ["train", "--model", str(tiny_bert_dir), "--train-file", str(tmp_path / "t.csv"),
                                   "--name", "t", "--text-field", "text", "--lr", "fast"])
    assert bad.exit_code != 0 and "neither a number nor 'auto'" in bad.output


def test_device_and_dtype_plumbing_on_cpu(tiny_bert_dir, tmp_path):
    from trainer.train import autocast, resolve_device

    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
        assert resolve_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="loss scaling"):
        autocast(torch.device("cpu"), "float16")
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        with pytest.raises(ValueError, match="no bf16 instructions"):
            autocast(torch.device("cpu"), "bfloat16")
        return
    data = _single()
    args = _args(dtype="bfloat16", device="cpu", max_steps=3)
    result = train(data, args, tiny_bert_dir, progress=False)
    assert result.model.head.weight.dtype == torch.float32  # master weights and the delta stay fp32
    rec = export.write_outputs(result, data, args, str(tiny_bert_dir), tmp_path / "b.safetensors")
    assert rec["hardware"]["dtype"] == "bfloat16" and rec["hardware"]["device"] == "cpu"
    assert rec["train_args"]["dtype"] == "bfloat16"
