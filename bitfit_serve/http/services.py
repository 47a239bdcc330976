"""What every route group shares, injected with ``Depends(services)`` (no closures over locals)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from bitfit_serve.batcher import Batcher
from bitfit_serve.engine import Engine
from bitfit_serve.metrics import Metrics
from bitfit_serve.settings import Settings
from bitfit_serve.tasks import Tasks


@dataclass
class Services:
    """``batcher`` exists only between lifespan start and stop."""

    engine: Engine
    tasks: Tasks
    settings: Settings
    metrics: Metrics
    batcher: Batcher | None = None
    uploads: int = 0  # uploads in progress (http/admin.upload_slot caps them)


def services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(services)]
