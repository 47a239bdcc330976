"""``bitfit-serve import-peft``: adapters made and saved by the real peft library, imported, served
by the engine and compared with the PEFT model's own logits (fp32, atol 1e-5); every refusal."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from bitfit_serve import delta as delta_io
from bitfit_serve.cli import app
from bitfit_serve.engine import Engine
from bitfit_serve.model.base import default_model_path, load_hf_base
from tests.factories import SENTENCES, make_tiny_model

peft = pytest.importorskip("peft")
if not hasattr(peft, "BeftConfig"):
    pytest.skip(f"peft {peft.__version__} has no BeftConfig (BEFT)", allow_module_level=True)

from peft import BeftConfig, IA3Config, LNTuningConfig, LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

runner = CliRunner()
BERT_BEFT_TARGETS = ["query", "key", "value", "dense"]  # "dense" also hits bert.pooler.dense
ATOL = 1e-5


def peft_model(model_dir: Path, config, *, seed: int = 0, roberta_head_from_pooler: bool = False):
    """AutoModelForSequenceClassification (3 labels) wrapped by peft, every trainable tensor moved to
    random non-zero values, as a few training steps would leave it; eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3, local_files_only=True,
                                                               dtype=torch.float32)
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
        if roberta_head_from_pooler:  # the servable RoBERTa head: dense weight = the base's frozen pooler
            pooler = load_hf_base(model_dir)[2].pooler.dense.weight
            model.base_model.model.classifier.modules_to_save["default"].dense.weight.copy_(pooler)
    return model.eval()


def save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


@torch.no_grad()
def peft_logits(model, model_dir: Path, texts=SENTENCES) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
    return model(**enc).logits


def served_logits(model_dir: Path | None, delta_path: Path, task: str, texts=SENTENCES) -> torch.Tensor:
    engine = Engine.from_pretrained(model_dir)
    engine.add_task(delta_path)
    return torch.tensor([p.logits for p in engine.predict([(task, t) for t in texts])])


def import_peft(*args: str):
    return runner.invoke(app, ["import-peft", *map(str, args)])


def refused(result, *fragments: str) -> str:
    """Exit 1, one ``error:`` line on stderr naming the reason, no traceback."""
    assert result.exit_code == 1, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    err = errors[0]
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture(scope="module")
def other_bert_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert-seed1"), "bert", seed=1)


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("method", ["beft", "ln_tuning"])
def test_bert_round_trip_equals_the_peft_model(method, tiny_bert_dir, tmp_path):
    config = (BeftConfig(target_modules=BERT_BEFT_TARGETS, modules_to_save=["classifier"]) if method == "beft"
              else LNTuningConfig(target_modules=["LayerNorm"], modules_to_save=["classifier"]))
    model = peft_model(tiny_bert_dir, config)
    adapter = save(model, tmp_path / "adapter")
    out = tmp_path / "sst.safetensors"
    r = import_peft(adapter, "--task", "sst", "--out", out, "--label", "neg,neu", "--label", "pos")
    assert r.exit_code == 0, r.output
    assert r.stdout.count("\n") == 1 and f"scheme peft-{method}" in r.stdout and "pooling pooler" in r.stdout

    delta = delta_io.load(out)
    assert delta.task == "sst" and delta.scheme == f"peft-{method}" and delta.pooling == "pooler"
    assert delta.labels == ("neg", "neu", "pos") and delta.problem_type == "single_label_classification"
    params = dict(load_hf_base(tiny_bert_dir)[2].named_parameters())
    if method == "beft":  # every Linear bias of the encoder and the pooler: value = base + beft_bias
        assert len(delta.sites) == 2 * 6 + 1 and "pooler.dense.bias" in delta.sites
        stored = load_file(adapter / "adapter_model.safetensors")
        key = "base_model.model.bert.encoder.layer.1.attention.self.key.beft_bias"
        site = "encoder.layer.1.attention.self.key.bias"
        torch.testing.assert_close(delta.sites[site], params[site] + stored[key].flatten())
    else:  # the LayerNorms' values themselves
        assert len(delta.sites) == 2 * (1 + 2 * 2) and all("LayerNorm" in s for s in delta.sites)
    torch.testing.assert_close(served_logits(tiny_bert_dir, out, "sst"), peft_logits(model, tiny_bert_dir),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["beft", "ln_tuning"])
def test_roberta_head_with_the_base_pooler_weight_is_served(method, tiny_roberta_dir, tmp_path):
    """RobertaForSequenceClassification's classifier.dense = the base pooler's frozen weight + a
    trained bias: served as the pooler.dense.bias site + 'pooler' pooling + out_proj as the head."""
    config = (BeftConfig(target_modules=["query", "value", "dense"], modules_to_save=["classifier"])
              if method == "beft" else LNTuningConfig(target_modules=["LayerNorm"], modules_to_save=["classifier"]))
    model = peft_model(tiny_roberta_dir, config, roberta_head_from_pooler=True)
    adapter = save(model, tmp_path / "adapter")
    out = tmp_path / "nli.safetensors"
    r = import_peft(adapter, "--task", "nli", "--model", tiny_roberta_dir, "--out", out)
    assert r.exit_code == 0, r.output
    delta = delta_io.load(out)
    assert delta.architecture == "roberta" and delta.pooling == "pooler"
    assert delta.labels == ("LABEL_0", "LABEL_1", "LABEL_2")
    head = model.base_model.model.classifier.modules_to_save["default"]
    torch.testing.assert_close(delta.sites["pooler.dense.bias"], head.dense.bias.detach())
    torch.testing.assert_close(delta.head_weight, head.out_proj.weight.detach())
    torch.testing.assert_close(served_logits(tiny_roberta_dir, out, "nli"), peft_logits(model, tiny_roberta_dir),
                               atol=ATOL, rtol=0)


def test_minilm_round_trip(tmp_path, monkeypatch):
    """The bundled MiniLM: base_model_name_or_path is its local folder, so no --model is needed;
    named by its hub id (not in the cache), the bundled copy is used with a warning."""
    start = time.monotonic()
    model_dir = default_model_path()
    model = peft_model(model_dir, BeftConfig(target_modules=["query", "value"], modules_to_save=["classifier"]))
    adapter = save(model, tmp_path / "adapter")
    out = tmp_path / "minilm.safetensors"
    r = import_peft(adapter, "--task", "minilm", "--out", out)
    assert r.exit_code == 0, r.output
    assert "12 sites" in r.stdout, r.stdout  # 6 layers x (query, value)
    torch.testing.assert_close(served_logits(None, out, "minilm"), peft_logits(model, model_dir), atol=ATOL, rtol=0)

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "base_model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2"}))
    r = import_peft(adapter, "--task", "minilm", "--out", tmp_path / "by-name.safetensors")
    assert r.exit_code == 0, r.output
    assert "warning:" in r.stderr and "bundled" in r.stderr
    by_name = delta_io.load(tmp_path / "by-name.safetensors")
    assert by_name.base_fingerprint == delta_io.load(out).base_fingerprint
    assert time.monotonic() - start < 20


def test_ln_tuning_of_a_linear_keeps_its_bias_and_refuses_a_trained_weight(tiny_bert_dir, tmp_path):
    """LN tuning copies whole modules: a targeted Linear's weight must still equal the base's."""
    config = LNTuningConfig(target_modules=["LayerNorm", "intermediate.dense"], modules_to_save=["classifier"])
    model = peft_model(tiny_bert_dir, config)  # perturbs the copied weight too
    params = dict(load_hf_base(tiny_bert_dir)[2].named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "intermediate.dense.ln_tuning_layers" in name and name.endswith(".weight"):
                layer = name.split("encoder.layer.")[1].split(".")[0]
                p.copy_(params[f"encoder.layer.{layer}.intermediate.dense.weight"])
    adapter = save(model, tmp_path / "frozen-weight")
    out = tmp_path / "ok.safetensors"
    r = import_peft(adapter, "--task", "ok", "--out", out)
    assert r.exit_code == 0, r.output
    delta = delta_io.load(out)
    assert "encoder.layer.0.intermediate.dense.bias" in delta.sites
    assert not any(s.endswith("dense.weight") for s in delta.sites)
    torch.testing.assert_close(served_logits(tiny_bert_dir, out, "ok"), peft_logits(model, tiny_bert_dir),
                               atol=ATOL, rtol=0)

    trained = save(peft_model(tiny_bert_dir, config), tmp_path / "trained-weight")
    refused(import_peft(trained, "--task", "no", "--out", tmp_path / "no.safetensors"),
            "intermediate.dense.weight", "not a servable site")


# ----------------------------------------------------------------------------- refusals

def test_roberta_head_with_a_trained_dense_is_refused(tiny_roberta_dir, tmp_path):
    model = peft_model(tiny_roberta_dir, BeftConfig(target_modules=["value"], modules_to_save=["classifier"]))
    adapter = save(model, tmp_path / "adapter")
    out = tmp_path / "x.safetensors"
    refused(import_peft(adapter, "--task", "x", "--out", out), "classifier.dense.weight", "pooler.dense.weight")
    assert not out.exists()


@pytest.mark.parametrize("config, fragments", [
    (LoraConfig(target_modules=["query", "value"], r=2, modules_to_save=["classifier"]),
     ("LORA", "changes weight matrices, which one mixed forward cannot serve per row")),
    (IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"],
               modules_to_save=["classifier"]),
     ("IA3", "scale", "no scale sites yet")),
], ids=["lora", "ia3"])
def test_weight_and_scale_methods_are_refused(config, fragments, tiny_bert_dir, tmp_path):
    adapter = save(peft_model(tiny_bert_dir, config), tmp_path / "adapter")
    refused(import_peft(adapter, "--task", "x", "--out", tmp_path / "x.safetensors"), *fragments)


@pytest.fixture
def bert_beft_adapter(tiny_bert_dir, tmp_path) -> Path:
    model = peft_model(tiny_bert_dir, BeftConfig(target_modules=["value"], modules_to_save=["classifier"]))
    return save(model, tmp_path / "bert-beft")


def test_base_mismatch_is_refused(bert_beft_adapter, other_bert_dir, tiny_roberta_dir, tmp_path):
    out = tmp_path / "x.safetensors"
    refused(import_peft(bert_beft_adapter, "--task", "x", "--model", other_bert_dir, "--out", out),
            "base:", "fingerprint", str(other_bert_dir))
    refused(import_peft(bert_beft_adapter, "--task", "x", "--model", tiny_roberta_dir, "--out", out), "base:")
    assert not out.exists()


def test_hub_base_needs_model_and_warns(bert_beft_adapter, tiny_bert_dir, tiny_roberta_dir, tmp_path):
    config_path = bert_beft_adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "base_model_name_or_path": "no-such-org/no-such-model"}))
    out = tmp_path / "x.safetensors"
    refused(import_peft(bert_beft_adapter, "--task", "x", "--out", out), "no-such-org/no-such-model", "--model")

    r = import_peft(bert_beft_adapter, "--task", "x", "--model", tiny_bert_dir, "--out", out)
    assert r.exit_code == 0, r.output
    assert "warning: cannot verify the base" in r.stderr and "no-such-org/no-such-model" in r.stderr
    # unverifiable by fingerprint, but the tensor paths still name the architecture
    refused(import_peft(bert_beft_adapter, "--task", "x", "--model", tiny_roberta_dir, "--out", out),
            "architecture", "bert", "roberta")


def test_missing_head_is_refused(tiny_bert_dir, tmp_path):
    adapter = save(peft_model(tiny_bert_dir, BeftConfig(target_modules=["value"])), tmp_path / "adapter")
    refused(import_peft(adapter, "--task", "x", "--out", tmp_path / "x.safetensors"),
            "missing head", "modules_to_save=['classifier']")


def test_labels_pooling_and_tensor_names_are_checked(bert_beft_adapter, tmp_path):
    out = tmp_path / "x.safetensors"
    refused(import_peft(bert_beft_adapter, "--task", "x", "--label", "a,b", "--out", out),
            "labels: 2", "3 outputs")
    refused(import_peft(bert_beft_adapter, "--task", "x", "--pooling", "mean", "--out", out),
            "--pooling mean", "BertForSequenceClassification", "'pooler'")
    refused(import_peft(bert_beft_adapter, "--task", "bad/name", "--out", out), "task")

    (bert_beft_adapter / "config.json").write_text(json.dumps({"id2label": {"0": "x", "1": "y", "2": "z"}}))
    r = import_peft(bert_beft_adapter, "--task", "x", "--out", out)
    assert r.exit_code == 0 and delta_io.load(out).labels == ("x", "y", "z"), r.output

    # a BEFT bias on a module that has none (hand-edited: peft only wraps Linear layers)
    weights = bert_beft_adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.bert.embeddings.word_embeddings.beft_bias"] = torch.ones(1, 32)
    save_file(tensors, weights)
    refused(import_peft(bert_beft_adapter, "--task", "x", "--out", out), "embeddings.word_embeddings", "has none")

    weights.unlink()
    refused(import_peft(bert_beft_adapter, "--task", "x", "--out", out), "adapter_model.safetensors")
    refused(import_peft(tmp_path / "nowhere", "--task", "x", "--out", out), "not a PEFT adapter folder")
