"""Inference routes: one task, or many tasks in one call, through the batcher."""

from __future__ import annotations

import time
from collections import Counter
from typing import Sequence

from fastapi import APIRouter, Depends

from bitfit_serve.batcher import Group
from bitfit_serve.engine import Prediction
from bitfit_serve.errors import InvalidInput, NotReady, PayloadTooLarge, UnknownTask
from bitfit_serve.http.auth import require_api_key
from bitfit_serve.http.schemas import MixedPredictRequest, MixedPredictResponse, PredictRequest, TaskPredictions, \
    error_responses
from bitfit_serve.http.services import Services, ServicesDep
from bitfit_serve.registry import TaskVersion
from bitfit_serve.settings import Settings
from bitfit_serve.http.strict import StrictJSONRoute

router = APIRouter(route_class=StrictJSONRoute, tags=["inference"], dependencies=[Depends(require_api_key)],
                   responses=error_responses(400, 401, 403, 404, 413, 422, 503))


@router.post("/v1/tasks/{task}/predict", response_model=TaskPredictions, response_model_exclude_none=True)
async def predict(task: str, body: PredictRequest, s: ServicesDep) -> TaskPredictions:
    """Run one task on a list of texts (or text pairs)."""
    check_limits(s.settings, [body.inputs])
    with_scores = scores_wanted(s, task, body.scores)
    (predictions,) = await run(s, [(task, body.inputs)], body.truncate, [with_scores])
    return TaskPredictions.of(task, predictions, with_scores)


@router.post("/v1/predict", response_model=MixedPredictResponse, response_model_exclude_none=True)
async def predict_mixed(body: MixedPredictRequest, s: ServicesDep) -> MixedPredictResponse:
    """Items of many tasks in one call, batched together; each item's answer states its version."""
    if len(body.items) > s.settings.max_items_per_predict:
        raise PayloadTooLarge(f"{len(body.items)} items exceed max_items_per_predict="
                              f"{s.settings.max_items_per_predict}")
    check_limits(s.settings, [item.inputs for item in body.items])
    with_scores = [scores_wanted(s, item.task, body.scores) for item in body.items]
    results = await run(s, [(item.task, item.inputs) for item in body.items], body.truncate, with_scores)
    return MixedPredictResponse(results=[TaskPredictions.of(item.task, predictions, scores)
                                         for item, predictions, scores in zip(body.items, results, with_scores)])


def scores_wanted(s: Services, task: str, asked: bool | None) -> bool:
    """Whether the native answer carries every label's score: as asked, else for tasks of at most
    ``scores_max_labels`` labels (a 1,000-label task's scores are ~40 KB per input)."""
    if asked is not None:
        return asked
    version = current_version(s, task)
    return version is None or len(version.labels) <= s.settings.scores_max_labels


# Bytes of one prediction in any face's JSON, besides its labels: field names, numbers, quotes.
PREDICTION_BYTES = 160
SCORE_BYTES = 40  # one more label's score, besides the label's text


def check_response_size(s: Services, groups: Sequence[Group], with_scores: Sequence[bool]) -> None:
    """Refuse (413) before any work a request whose answer would exceed ``max_response_bytes``:
    a small request to a task with wide or long labels can otherwise ask for a huge body."""
    total = 0
    for (task, inputs), scores in zip(groups, with_scores):
        version = current_version(s, task)
        if version is None:
            continue  # unknown: ``run`` answers 404
        labels = version.labels
        per_input = PREDICTION_BYTES + max(len(x.encode()) for x in labels)
        if scores:
            per_input += sum(len(x.encode()) + SCORE_BYTES for x in labels)
        total += len(inputs) * per_input
    if total > s.settings.max_response_bytes:
        raise PayloadTooLarge(f"the answer would be about {total} bytes, over max_response_bytes="
                              f"{s.settings.max_response_bytes}: send fewer inputs" +
                              (", or scores=false" if any(with_scores) else ""))


async def run(s: Services, groups: Sequence[Group], truncate: bool | None = None,
              with_scores: Sequence[bool] | None = None) -> list[list[Prediction]]:
    """Submit to the batcher and count the sequences per task: every face (native or not) comes
    through here. ``truncate`` None: the server's ``auto_truncate``. ``with_scores``: whether each
    group's answer lists every label's score (the faces' protocols always do), for the response
    size check. Admission checks only that the worker runs (submit raises NotReady otherwise); a
    slow forward makes /ready fail for load balancers but must not reject requests already routed here."""
    if s.batcher is None:
        raise NotReady("the server is not ready: the inference worker is not running")
    check_response_size(s, groups, [True] * len(groups) if with_scores is None else with_scores)
    start = time.perf_counter()
    out = await s.batcher.submit(groups, s.settings.auto_truncate if truncate is None else truncate)
    sequences: Counter[str] = Counter()
    for (task, inputs), predictions in zip(groups, out):
        sequences[task] += len(inputs)
        for p in predictions:
            s.metrics.input_tokens.observe(p.tokens or 0)
    s.metrics.observe_tasks(sequences, time.perf_counter() - start)
    return out


def check_limits(settings: Settings, inputs_per_item: Sequence[Sequence[str | Sequence[str]]]) -> None:
    total = sum(len(inputs) for inputs in inputs_per_item)
    if total > settings.max_texts_per_request:
        raise PayloadTooLarge(f"{total} inputs in one request exceed max_texts_per_request="
                              f"{settings.max_texts_per_request}")
    for k, inputs in enumerate(inputs_per_item):
        where = f"items[{k}]." if len(inputs_per_item) > 1 else ""
        for i, item in enumerate(inputs):
            for text in ([item] if isinstance(item, str) else item):
                if len(text) > settings.max_chars_per_text:
                    raise PayloadTooLarge(f"{where}inputs[{i}]: {len(text)} characters exceed "
                                          f"max_chars_per_text={settings.max_chars_per_text}")
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:  # lone surrogates from JSON escapes would crash the tokenizer
                    raise InvalidInput(f"{where}inputs[{i}]: not valid Unicode text") from None


# ----------------------------------------------------------------------------- for the faces

def current_version(s: Services, task: str) -> TaskVersion | None:
    """The task's version now, for the shape check; None if unknown (``run`` answers that: 404, or 503
    before the server is ready, as on the native route)."""
    try:
        return s.tasks.get(task)
    except UnknownTask:
        return None


def version_of(s: Services, task: str, before: TaskVersion | None, version: str) -> TaskVersion:
    """The task version that served a prediction (``before``, unless the task was replaced since)."""
    if before is not None and before.version == version:
        return before
    now = current_version(s, task)
    if now is not None and now.version == version:
        return now
    if before is not None or now is not None:  # replaced again since: the same task's labels
        return before or now  # type: ignore[return-value]
    raise UnknownTask(f"task {task!r} was removed while serving the request")
