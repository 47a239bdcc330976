"""Loading a base: every weight comes from the checkpoint; one saved without its pooler loads without one."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitfit_serve import Engine
from bitfit_serve.errors import InvalidDelta
from bitfit_serve.model.base import load_base
from tests.factories import SENTENCES, random_delta
from tests.reference import reference_logits


def _copy_without(model_dir, folder, drop) -> None:
    shutil.copytree(model_dir, folder, dirs_exist_ok=True)
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not drop(k)}, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def roberta_without_pooler(tiny_roberta_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("roberta-no-pooler")
    _copy_without(tiny_roberta_dir, folder, lambda name: "pooler." in name)
    return folder


def test_a_checkpoint_without_a_pooler_is_the_same_model_at_every_load(roberta_without_pooler):
    # HF would fill the pooler with random values: a new fingerprint at each load, every delta refused.
    torch.manual_seed(0)
    first = load_base(roberta_without_pooler)
    torch.manual_seed(1)
    second = load_base(roberta_without_pooler)
    assert first.fingerprint == second.fingerprint
    assert not any("pooler" in name for name in [*first.weights, *first.site_shapes])


def test_a_base_without_a_pooler_serves_cls_and_mean_tasks_and_refuses_pooler_ones(roberta_without_pooler):
    engine = Engine.from_pretrained(roberta_without_pooler)
    texts = SENTENCES[:4]
    for pooling in ("mean", "cls"):
        delta = random_delta(roberta_without_pooler, pooling, pooling=pooling, num_labels=3)
        version = engine.add_task(delta)
        logits = engine.forward(engine.collate(engine.tokenize(version, texts), [version.row] * len(texts)))
        expected = reference_logits(roberta_without_pooler, delta, texts)
        torch.testing.assert_close(logits[:, :3], expected, atol=1e-5, rtol=0)
    with pytest.raises(InvalidDelta, match="no pooler"):
        engine.add_task(random_delta(roberta_without_pooler, "pooled", pooling="pooler"))


def test_a_checkpoint_missing_an_encoder_weight_is_refused(tiny_bert_dir, tmp_path):
    _copy_without(tiny_bert_dir, tmp_path, lambda name: name.endswith("layer.0.attention.self.query.weight"))
    with pytest.raises(ValueError, match="lacks 1 weight.*query.weight"):
        load_base(tmp_path)
