"""Server test helpers: a tiny BERT engine, delta bytes by (task, seed), the app under its lifespan."""

from __future__ import annotations

import functools
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import httpx
import pytest

from bitfit_serve import delta as delta_io
from bitfit_serve.engine import Engine
from bitfit_serve.model.base import load_hf_base
from bitfit_serve.server import create_app
from bitfit_serve.settings import Settings
from tests.factories import random_delta

PAIR_TASK_KW = dict(inputs=("premise", "hypothesis"), num_labels=3)
REGRESSION_KW = dict(problem_type="regression")
MULTI_LABEL_KW = dict(problem_type="multi_label_classification", num_labels=3)


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


def write_delta(folder: Path, task: str, data: bytes) -> Path:
    path = folder / f"{task}.safetensors"
    delta_io.atomic_write(path, data)
    return path


@asynccontextmanager
async def serving(engine: Engine, deltas: Path, **settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, and an httpx client talking to it in-process."""
    settings.setdefault("watch", False)
    app = create_app(engine, Settings(deltas=deltas, **settings))
    async with app.router.lifespan_context(app):
        # Like uvicorn: a 500 is answered (and logged), not raised into the client.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            client.app = app
            yield client


def assert_error(response: httpx.Response, status: int, code: str, *needles: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    for needle in needles:
        assert needle in body["error"]["message"], body
