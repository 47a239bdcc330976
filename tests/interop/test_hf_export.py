"""Export: the written folders load with stock loaders and reproduce the server at 1e-5 (fp32).

pooler -> transformers ``pipeline("text-classification")``; mean / cls -> ``SentenceTransformer``
(its ``encode`` returns the logits); ``full`` runs -> the same forms, reproducing the trainer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, pipeline
from typer.testing import CliRunner

from bitfit_serve import delta as delta_io
from bitfit_serve.cli import app
from bitfit_serve.engine import Engine
from bitfit_serve.errors import BaseModelMismatch, InvalidDelta
from bitfit_serve.interop.hf_export import EXPORT_INFO, ExportError, export_delta, write_model
from bitfit_serve.model.base import default_model_path, load_hf_base
from tests.factories import SENTENCES, make_tiny_model, random_delta

PAIRS = list(zip(SENTENCES, SENTENCES[1:] + SENTENCES[:1]))
LONG = " ".join(SENTENCES)  # far past a max_length of 8: truncated by both sides alike


@pytest.fixture(scope="module")
def engines(tiny_bert_dir, tiny_roberta_dir):
    return {"bert": Engine.from_pretrained(tiny_bert_dir), "roberta": Engine.from_pretrained(tiny_roberta_dir)}


def _dirs(request):
    return {"bert": request.getfixturevalue("tiny_bert_dir"), "roberta": request.getfixturevalue("tiny_roberta_dir")}


def _texts(delta, extra=()):
    texts = PAIRS if delta.is_pair_task else SENTENCES
    return [*texts, *extra]


def _served(engine, delta, texts):
    """[N, C] probabilities (softmax / sigmoid) or [N, 1] values, as the server answers."""
    engine.add_task(delta)
    preds = engine.predict([(delta.task, t) for t in texts])
    if delta.problem_type == "regression":
        return torch.tensor([[p.value] for p in preds])
    return torch.tensor([[p.scores[label] for label in delta.labels] for p in preds])


def _pipeline_scores(folder, delta, texts):
    clf = pipeline("text-classification", model=str(folder), top_k=None, device="cpu")
    inputs = [{"text": a, "text_pair": b} for a, b in texts] if delta.is_pair_task else list(texts)
    results = clf(inputs, truncation=True)  # the exported tokenizer truncates at the delta's max_length
    return torch.tensor([[{r["label"]: r["score"] for r in row}[label] for label in delta.labels] for row in results])


def _st_logits(folder, texts):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(folder), device="cpu")
    return torch.as_tensor(model.encode(list(texts), convert_to_tensor=True)).float()


def _post(logits, problem_type):
    if problem_type == "single_label_classification":
        return logits.softmax(-1)
    if problem_type == "multi_label_classification":
        return logits.sigmoid()
    return logits


def _close(got, expected):
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- pooler -> transformers

@pytest.mark.parametrize("problem_type,num_labels,inputs", [
    ("single_label_classification", 3, ("text",)),
    ("multi_label_classification", 4, ("premise", "hypothesis")),
    ("regression", 1, ("text",)),
])
def test_bert_pooler_exports_a_sequence_classification_folder(tiny_bert_dir, engines, tmp_path, problem_type,
                                                               num_labels, inputs):
    d = random_delta(tiny_bert_dir, f"bp-{problem_type[:5]}", pooling="pooler", problem_type=problem_type,
                     num_labels=num_labels, inputs=inputs, max_length=8, seed=3)
    exported = export_delta(d, tmp_path / "out")
    assert exported.form == "transformers"
    config = AutoConfig.from_pretrained(exported.path)
    assert config.architectures == ["BertForSequenceClassification"] and config.problem_type == problem_type
    assert config.num_labels == len(d.labels) and config.id2label == dict(enumerate(d.labels))
    assert config.label2id == {label: i for i, label in enumerate(d.labels)}
    info = json.loads((exported.path / EXPORT_INFO).read_text())
    assert info["pooling"] == "pooler" and info["labels"] == list(d.labels) and info["max_length"] == 8
    assert (exported.path / "README.md").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(exported.path)
    assert not model.training  # dropout inactive
    params = dict(model.named_parameters())
    _close(params["bert.pooler.dense.bias"], d.sites["pooler.dense.bias"])
    _close(params["classifier.weight"], d.head_weight)

    texts = _texts(d, extra=[(LONG, LONG)] if d.is_pair_task else [LONG])
    _close(_pipeline_scores(exported.path, d, texts), _served(engines["bert"], d, texts))


@pytest.mark.parametrize("sites", ["all", "gammas"])  # with and without a trained pooler bias
def test_roberta_pooler_becomes_the_classification_head(tiny_roberta_dir, engines, tmp_path, sites):
    d = random_delta(tiny_roberta_dir, f"rp-{sites}", pooling="pooler", num_labels=3, sites=sites,
                     inputs=("a", "b"), max_length=8, seed=4)
    exported = export_delta(d, tmp_path / "out")
    model = AutoModelForSequenceClassification.from_pretrained(exported.path)
    assert type(model).__name__ == "RobertaForSequenceClassification" and not model.training
    params = dict(model.named_parameters())
    assert not any(n.startswith("roberta.pooler.") for n in params)
    base = dict(load_hf_base(tiny_roberta_dir)[2].named_parameters())
    _close(params["classifier.dense.weight"], base["pooler.dense.weight"])
    _close(params["classifier.dense.bias"], d.sites.get("pooler.dense.bias", base["pooler.dense.bias"]))
    _close(params["classifier.out_proj.weight"], d.head_weight)
    _close(params["classifier.out_proj.bias"], d.head_bias)
    texts = _texts(d, extra=[(LONG, "x")])
    _close(_pipeline_scores(exported.path, d, texts), _served(engines["roberta"], d, texts))


# ----------------------------------------------------------------------------- mean / cls -> sentence-transformers

@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("pooling,problem_type,inputs", [
    ("mean", "single_label_classification", ("text",)),
    ("cls", "single_label_classification", ("text",)),
    ("mean", "regression", ("s1", "s2")),
    ("cls", "multi_label_classification", ("s1", "s2")),
])
def test_mean_and_cls_export_a_sentence_transformers_folder(request, engines, tmp_path, arch, pooling,
                                                            problem_type, inputs):
    model_dir = _dirs(request)[arch]
    d = random_delta(model_dir, f"st-{pooling}", pooling=pooling, problem_type=problem_type, num_labels=3,
                     inputs=inputs, max_length=8, seed=5)
    exported = export_delta(d, tmp_path / "out")
    assert exported.form == "sentence-transformers"
    folder = exported.path
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Dense"]
    pool_config = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pool_config[f"pooling_mode_{'mean_tokens' if pooling == 'mean' else 'cls_token'}"] is True
    dense_config = json.loads((folder / "2_Dense" / "config.json").read_text())
    assert dense_config == {"in_features": 32, "out_features": len(d.labels), "bias": True,
                            "activation_function": "torch.nn.modules.linear.Identity"}
    assert json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"] == 8
    info = json.loads((folder / EXPORT_INFO).read_text())
    assert info["id2label"] == {str(i): label for i, label in enumerate(d.labels)}
    assert info["postprocess"] == {"single_label_classification": "softmax", "regression": "none",
                                   "multi_label_classification": "sigmoid"}[problem_type]
    readme = (folder / "README.md").read_text()
    assert "SentenceTransformer(" in readme and all(label in readme for label in d.labels)

    texts = _texts(d, extra=[(LONG, LONG)] if d.is_pair_task else [LONG])
    logits = _st_logits(folder, texts)
    assert logits.shape == (len(texts), len(d.labels))
    _close(_post(logits, problem_type), _served(engines[arch], d, texts))


def test_shipped_minilm_delta_exports_with_mean_pooling(tmp_path):
    """deltas/sst2.safetensors on the bundled MiniLM (its base_model is 'default')."""
    path = Path(__file__).parents[2] / "deltas" / "sst2.safetensors"
    d = delta_io.load(path)
    assert d.pooling == "mean"
    exported = export_delta(path, tmp_path / "sst2")
    texts = ["a gripping, beautifully made film", "what a waste of two hours", "it is a film", LONG * 8]
    scores = _post(_st_logits(exported.path, texts), d.problem_type)
    engine = Engine.from_pretrained(None)
    _close(scores, _served(engine, d, texts))


# ----------------------------------------------------------------------------- the CLI and its refusals

def _run(*args):
    return CliRunner().invoke(app, ["export", *map(str, args)])


def _refused(result, fragment):
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: ") and fragment in result.stderr, result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


def test_cli_exports_onto_the_deltas_own_base_folder(tiny_bert_dir, engines, tmp_path):
    d = random_delta(tiny_bert_dir, "cli", pooling="cls", seed=6)  # base_model: the tiny folder
    delta_io.save(d, tmp_path / "cli.safetensors")
    r = _run(tmp_path / "cli.safetensors", "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert "sentence-transformers" in r.stdout and "SentenceTransformer(" in r.stdout
    _close(_st_logits(tmp_path / "out", SENTENCES).softmax(-1), _served(engines["bert"], d, SENTENCES))
    assert not list(tmp_path.glob(".tmp-*"))


def test_cli_refuses_an_invalid_or_missing_delta(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"nodelta")  # shorter than a header
    _refused(_run(tmp_path / "bad.safetensors", "--out", tmp_path / "o"), "not a safetensors file")
    _refused(_run(tmp_path / "missing.safetensors", "--out", tmp_path / "o"), "cannot read delta file")
    assert not (tmp_path / "o").exists()


def test_cli_refuses_another_base(tiny_bert_dir, tiny_roberta_dir, tmp_path):
    other = make_tiny_model(tmp_path / "other-bert", "bert", seed=1)  # same shapes, other weights
    d = random_delta(tiny_bert_dir, "fp", pooling="mean")
    delta_io.save(d, tmp_path / "fp.safetensors")
    _refused(_run(tmp_path / "fp.safetensors", "--out", tmp_path / "o", "--model", other), "base_fingerprint")
    _refused(_run(tmp_path / "fp.safetensors", "--out", tmp_path / "o", "--model", tiny_roberta_dir), "architecture")
    _refused(_run(tmp_path / "fp.safetensors", "--out", tmp_path / "o", "--model", tmp_path),
             "not a Hugging Face model folder")
    # the delta's base_model folder is gone: the bundled MiniLM is tried, and refused
    _refused(_run(tmp_path / "fp.safetensors", "--out", tmp_path / "o", "--model", "default"), "base_fingerprint")
    moved = d.replace(base_model=str(tmp_path / "gone"))
    delta_io.save(moved, tmp_path / "moved.safetensors")
    r = _run(tmp_path / "moved.safetensors", "--out", tmp_path / "o")
    _refused(r, "base_fingerprint")
    assert str(default_model_path()) in r.stderr  # the message names the base it read
    assert not (tmp_path / "o").exists()
    with pytest.raises(BaseModelMismatch):
        export_delta(d, tmp_path / "o", model=other)


def test_refuses_a_non_empty_output_folder_and_unknown_sites(tiny_bert_dir, tmp_path):
    d = random_delta(tiny_bert_dir, "busy", pooling="mean")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    delta_io.save(d, tmp_path / "busy.safetensors")
    _refused(_run(tmp_path / "busy.safetensors", "--out", tmp_path / "busy"), "not empty")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]
    with pytest.raises(ExportError, match="not empty"):
        export_delta(d, tmp_path / "busy")
    bad = d.replace(sites={"encoder.layer.0.attention.self.query.weight": torch.zeros(32 * 32)})
    with pytest.raises(InvalidDelta, match="weight matrices are not servable"):
        export_delta(bad, tmp_path / "w")
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    assert export_delta(d, tmp_path / "empty").path == tmp_path / "empty"


def test_pooler_on_a_base_without_one_is_refused(tiny_bert_dir, tmp_path):
    """A checkpoint saved without its pooler loads without one: 'pooler' cannot be exported on it."""
    _, _, hf = load_hf_base(tiny_bert_dir)
    hf.pooler = None

    with pytest.raises(ExportError, match="no pooler"):
        write_model(hf, AutoTokenizer.from_pretrained(tiny_bert_dir), torch.zeros(2, 32), torch.zeros(2),
                    tmp_path / "np", pooling="pooler", labels=("a", "b"), problem_type="single_label_classification")
    assert not (tmp_path / "np").exists() and not list(tmp_path.iterdir())
    with pytest.raises(ExportError, match="pooling 'max'"):
        write_model(hf, None, torch.zeros(2, 32), torch.zeros(2), tmp_path / "mx", pooling="max",
                    labels=("a", "b"), problem_type="single_label_classification")


# ----------------------------------------------------------------------------- full fine-tuning runs

@pytest.mark.parametrize("arch,pooling", [("bert", "pooler"), ("roberta", "pooler"), ("roberta", "cls")])
def test_full_run_checkpoint_reproduces_the_trainer(request, tmp_path, arch, pooling):
    from trainer import export
    from trainer.data import from_records
    from trainer.metrics import from_outputs
    from trainer.train import TrainArgs, collate, encode, train

    rows = [{"text": SENTENCES[i % len(SENTENCES)] + " !" * (i // len(SENTENCES)), "label": "pos" if i % 3 else "neg"}
            for i in range(24)]
    data = from_records("tinyfull", rows, rows[:8], ["text"], "label")
    args = TrainArgs(scheme="full", pooling=pooling, lr=1e-3, epochs=1, max_steps=2, batch_size=4, max_length=32,
                     seed=0, device="cpu")
    result = train(data, args, _dirs(request)[arch], progress=False)
    rec = export.write_outputs(result, data, args, str(_dirs(request)[arch]), tmp_path / "full.safetensors")
    folder = tmp_path / "full"
    assert (folder / "run.json").is_file() and rec["outputs"]["checkpoint"] == str(folder)
    enc = encode(result.tokenizer, data.dev, 32)
    with torch.no_grad():
        expected = result.model(**collate(enc, list(range(len(enc))), result.config.pad_token_id))
    texts = [e.texts[0] for e in data.dev]
    if pooling == "pooler":
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        assert model.config.id2label == {0: "neg", 1: "pos"}
        tok = AutoTokenizer.from_pretrained(folder)
        with torch.no_grad():
            got = model(**tok(texts, padding=True, truncation=True, return_tensors="pt")).logits
    else:
        got = _st_logits(folder, texts)
    _close(got, expected)
    assert from_outputs(got.numpy(), enc.labels, data.problem_type) == rec["final"]  # the trainer's dev metric
    # written again over a previous run: replaced, run.json rewritten
    export.write_outputs(result, data, args, str(_dirs(request)[arch]), tmp_path / "full.safetensors")
    assert (folder / "run.json").is_file() and not list(tmp_path.glob(".old-*"))
    if pooling != "pooler":
        dense = load_file(folder / "2_Dense" / "model.safetensors")
        _close(dense["linear.weight"], result.model.head.weight.detach())
