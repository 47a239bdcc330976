"""Operations routes: liveness, readiness, Prometheus metrics (open: no key needed)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from bitfit_serve.errors import NotReady
from bitfit_serve.http.schemas import error_responses
from bitfit_serve.http.services import ServicesDep
from bitfit_serve.http.strict import StrictJSONRoute

router = APIRouter(route_class=StrictJSONRoute, tags=["operations"])


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/ready", responses=error_responses(503))
async def ready(s: ServicesDep) -> dict[str, Any]:
    """Readiness: the model is loaded and the inference worker is alive."""
    if s.batcher is None or not s.batcher.alive:
        raise NotReady("not ready: the inference worker is not running")
    return {"status": "ready", "tasks": len(s.tasks), "queue_depth": s.batcher.queue_depth}


@router.get("/metrics", response_class=Response)
async def metrics(s: ServicesDep) -> Response:
    return Response(s.metrics.render(), media_type=CONTENT_TYPE_LATEST)
