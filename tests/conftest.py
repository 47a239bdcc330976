import os

import pytest

# Tests never reach a model hub: everything loads from local folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import functools  # noqa: E402
from pathlib import Path  # noqa: E402

from bitfit_serve import delta as delta_io  # noqa: E402
from bitfit_serve.engine import Engine  # noqa: E402
from bitfit_serve.model.base import load_hf_base  # noqa: E402
from tests.factories import make_tiny_model, random_delta  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def tiny_roberta_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-roberta"), "roberta")


@pytest.fixture(scope="session", params=["bert", "roberta"])
def tiny_model_dir(request, tiny_bert_dir, tiny_roberta_dir):
    """Each test using this runs once per supported architecture."""
    return {"bert": tiny_bert_dir, "roberta": tiny_roberta_dir}[request.param]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="session")
def hf_base(tiny_bert_dir):
    return load_hf_base(tiny_bert_dir)[2]


@pytest.fixture(scope="session")
def make_delta(tiny_bert_dir, hf_base):
    """(task, seed=0, **random_delta kwargs) -> Delta, cached."""
    @functools.lru_cache(maxsize=None)
    def make(task: str, seed: int = 0, **kw):
        return random_delta(tiny_bert_dir, task, seed=seed, hf_base=hf_base, **kw)

    return make


@pytest.fixture(scope="session")
def delta_bytes(make_delta):
    """Bytes of a delta file, cached so that its version (sha256 prefix) is stable within the session."""
    @functools.lru_cache(maxsize=None)
    def make(task: str, seed: int = 0, **kw):
        return delta_io.to_bytes(make_delta(task, seed, **kw))

    return make


@pytest.fixture
def engine(tiny_bert_dir):
    return Engine.from_pretrained(tiny_bert_dir)


@pytest.fixture
def deltas_dir(tmp_path) -> Path:
    return tmp_path / "deltas"
