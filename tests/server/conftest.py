"""Server test helpers: the app under its lifespan, delta files in a folder, error-body checks.
(The engine and delta fixtures are in ``tests/conftest.py``.)"""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import httpx

from bitfit_serve import delta as delta_io
from bitfit_serve.engine import Engine
from bitfit_serve.server import create_app
from bitfit_serve.settings import Settings

PAIR_TASK_KW = dict(inputs=("premise", "hypothesis"), num_labels=3)
REGRESSION_KW = dict(problem_type="regression")
MULTI_LABEL_KW = dict(problem_type="multi_label_classification", num_labels=3)
KINDS = {"sst": {}, "nli": PAIR_TASK_KW, "sts": REGRESSION_KW, "tags": MULTI_LABEL_KW}  # one task of each kind


def hold_forwards(engine: Engine, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Make each forward wait for ``release``; ``entered`` is set once the worker holds a batch."""
    entered, release = threading.Event(), threading.Event()
    real_forward = engine.forward

    def blocked_forward(batch):
        entered.set()
        release.wait(10)
        return real_forward(batch)

    monkeypatch.setattr(engine, "forward", blocked_forward)
    return entered, release


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
