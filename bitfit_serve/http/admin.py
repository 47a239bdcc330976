"""Task routes: list and inspect (API key), add / replace / remove (admin token).

A change goes to the ``tasks`` room in one call; the room persists it to the deltas folder."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.exceptions import HTTPException

from bitfit_serve import delta as delta_io
from bitfit_serve.errors import Busy, InvalidInput
from bitfit_serve.http.auth import require_admin, require_api_key, valid_task_name
from bitfit_serve.http.schemas import RemoveResponse, TaskInfo, TaskList, UploadResponse, error_responses
from bitfit_serve.http.services import ServicesDep
from bitfit_serve.http.strict import StrictJSONRoute
from bitfit_serve.tasks import metadata_bytes

router = APIRouter(route_class=StrictJSONRoute, tags=["tasks"])
ADMIN = dict(dependencies=[Depends(valid_task_name), Depends(require_admin)], tags=["admin"],
             responses=error_responses(400, 401, 403, 404, 413, 415, 422, 503))


@router.get("/v1/tasks", response_model=TaskList, dependencies=[Depends(require_api_key)],
            responses=error_responses(400, 401, 403))
async def list_tasks(s: ServicesDep, request: Request,
                     limit: Annotated[int, Query(ge=1, le=MAX_PAGE_TASKS, description="tasks per page")] = 100,
                     after: Annotated[str, Query(description="the previous page's 'next': the page starts after "
                                                             "this task name (empty: the first page)")] = "") -> TaskList:
    """Tasks in name order, a page at a time: at most ``limit`` tasks and about PAGE_BYTES of
    metadata (at least one task); ``next`` is the cursor of the following page, null at the end."""
    unknown = sorted(set(request.query_params) - {"limit", "after"})
    if unknown:
        raise InvalidInput(f"unknown query parameter(s) {unknown}: this route takes limit and after")
    repeated = sorted(k for k in request.query_params if len(request.query_params.getlist(k)) > 1)
    if repeated:
        raise InvalidInput(f"query parameter(s) {repeated} given more than once")
    versions = [v for v in s.tasks.list() if v.task > after]
    page, size = [], 0
    for v in versions:
        if len(page) == limit or (page and size > PAGE_BYTES):
            break
        page.append(TaskInfo.of(v, s.tasks))
        size += _listed_bytes(v)
    more = len(page) < len(versions)
    return TaskList(tasks=page, next=page[-1].task if more else None)


MAX_PAGE_TASKS = 1000
PAGE_BYTES = 1 << 20  # a page's metadata, so that listing stays cheap whatever the tenants uploaded


def _listed_bytes(v) -> int:
    """About what a task's entry weighs in the listing: its labels and other metadata, plus fields."""
    return 400 + sum(len(x.encode()) + 3 for x in v.labels) + metadata_bytes(v.meta)


@router.get("/v1/tasks/{task}", response_model=TaskInfo, dependencies=[Depends(require_api_key)],
            responses=error_responses(401, 403, 404))
async def get_task(task: str, s: ServicesDep) -> TaskInfo:
    return TaskInfo.of(s.tasks.get(task), s.tasks)


async def upload_slot(s: ServicesDep) -> AsyncIterator[None]:
    """One of ``max_concurrent_uploads`` upload slots, held until the upload is answered. Taken after
    the admin check and before the body is read: with none free, 503 ``busy`` + Retry-After at once,
    so that concurrent uploads cannot hold more than that many bodies in memory."""
    limit = s.settings.max_concurrent_uploads
    if s.uploads >= limit:
        raise Busy(f"{s.uploads} uploads are in progress (max_concurrent_uploads={limit}); retry later",
                   retry_after=s.settings.retry_after_s)
    s.uploads += 1  # on the event loop: no await between the check and this
    try:
        yield
    finally:
        s.uploads -= 1


@router.put("/v1/tasks/{task}", response_model=UploadResponse, status_code=201,
            **{**ADMIN, "dependencies": [*ADMIN["dependencies"], Depends(upload_slot)],
               "responses": error_responses(400, 401, 403, 404, 408, 413, 415, 422, 503)},
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
async def upload_task(task: str, request: Request, response: Response, s: ServicesDep) -> UploadResponse:
    """Add or replace a task: the body is the delta file (.safetensors bytes). Validated fully,
    persisted atomically into the deltas folder, then swapped in. 201 if new, 200 if replaced.
    The URL name wins over the delta's ``task`` metadata (the stored copy is renamed)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media.startswith("multipart/"):
        raise HTTPException(415, "send the delta file's raw bytes as the body "
                                 "(curl --data-binary @file.safetensors), not a multipart form")
    data = bytearray()
    async for chunk in request.stream():  # BodyLimit stops this at max_upload_bytes
        data += chunk
    if not data:
        raise InvalidInput("the request body is empty: send the delta file's bytes")
    file = await asyncio.to_thread(delta_io.parse, bytes(data), "upload")
    installed = await asyncio.to_thread(s.tasks.install, task, file)
    s.metrics.task_changes.labels("http", "replaced" if installed.previous else "added").inc()
    response.status_code = 200 if installed.previous else 201
    return UploadResponse(**TaskInfo.of(installed.version, s.tasks).model_dump(),
                          replaced=installed.previous.version if installed.previous else None)


@router.delete("/v1/tasks/{task}", response_model=RemoveResponse, **ADMIN)
async def delete_task(task: str, s: ServicesDep) -> RemoveResponse:
    """Stop serving a task (404 from now on) and delete its file; its row is freed once idle."""
    removed = await asyncio.to_thread(s.tasks.remove, task)
    s.metrics.task_changes.labels("http", "removed").inc()
    return RemoveResponse(task=removed.task, version=removed.version)
