"""The HTTP server: ``create_app(engine, settings)`` assembles the route groups of
``bitfit_serve.http`` around an engine that is already loaded. The lifespan starts the inference
worker, the folder watch and the start-up load of the deltas folder, and stops them in reverse.
No module-level app or model.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute

from bitfit_serve import __version__
from bitfit_serve.batcher import Batcher
from bitfit_serve.engine import Engine
from bitfit_serve.http import admin, hf_inference, inference, kserve, openai_compat, ops, tei
from bitfit_serve.http.edge import BodyLimit, BodyTimeout, Observe, ShedLoad, install_error_handlers
from bitfit_serve.http.services import Services
from bitfit_serve.metrics import Metrics
from bitfit_serve.settings import Settings
from bitfit_serve.store import DeltaStore
from bitfit_serve.tasks import TaskLimits
from bitfit_serve.watcher import DeltaWatcher

log = logging.getLogger(__name__)

# The route groups, each a module with a ``router``: the native API, then the faces of other
# servers' protocols. Inference routes carry the tag "inference" (load shedding finds them by it).
FACES = (inference, admin, ops, openai_compat, kserve, tei, hf_inference)


def create_app(engine: Engine, settings: Settings) -> FastAPI:
    engine.tasks.use_store(DeltaStore(settings.deltas, max_file_bytes=settings.max_upload_bytes))
    engine.tasks.use_limits(TaskLimits.from_settings(settings))
    s = Services(engine, engine.tasks, settings, Metrics(settings.metrics_per_task))
    s.metrics.watch(queue_depth=lambda: s.batcher.queue_depth if s.batcher else 0,
                    resident_tasks=lambda: len(s.tasks), bank_bytes=lambda: s.tasks.bank_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        settings.deltas.mkdir(parents=True, exist_ok=True)
        batcher = Batcher(engine, max_batch_tokens=settings.max_batch_tokens,
                          max_batch_requests=settings.max_batch_requests, max_queue=settings.max_queue,
                          retry_after_s=settings.retry_after_s, metrics=s.metrics,
                          max_tokens_per_request=settings.max_tokens_per_request)
        batcher.start()
        s.batcher = batcher
        watcher = DeltaWatcher(s.tasks, s.metrics) if settings.watch else None
        try:
            if watcher is not None:
                await watcher.start()  # before the scan: a file arriving meanwhile is not missed
            report = await asyncio.to_thread(s.tasks.load_all)
            bad = {t: r for t, r in report.items() if r.startswith("error")}
            log.info("serving %d task(s) from %s%s", len(s.tasks), settings.deltas,
                     f"; skipped {len(bad)} bad file(s): {sorted(bad)}" if bad else "")
            yield
        finally:
            if watcher is not None:
                await watcher.stop()
            await asyncio.to_thread(batcher.stop)

    # No slash redirects: a 307 would turn PUT /v1/tasks/x/ (or an empty name) into a write elsewhere.
    app = FastAPI(title="bitfit-serve", version=__version__, lifespan=lifespan, redirect_slashes=False,
                  description="One frozen encoder, thousands of BitFit tasks, mixed-task batches in one forward.")
    app.state.services = s
    for face in FACES:
        app.include_router(face.router)
    install_error_handlers(app, s.metrics)
    routes = [r for face in FACES for r in face.router.routes if isinstance(r, APIRoute)]
    inference_routes = [r for r in routes if "inference" in r.tags]
    app.add_middleware(BodyLimit, routes=lambda: routes, limit_for=lambda scope: (
        ("max_upload_bytes", settings.max_upload_bytes) if scope["method"] == "PUT"
        else ("max_request_bytes", settings.max_request_bytes)))
    app.add_middleware(BodyTimeout, timeout=settings.body_timeout_s)  # 408 once the body is late
    app.add_middleware(ShedLoad, batcher=lambda: s.batcher, metrics=s.metrics, routes=lambda: inference_routes)
    app.add_middleware(Observe, metrics=s.metrics)  # outermost: also counts the 413s and early 503s
    return app
