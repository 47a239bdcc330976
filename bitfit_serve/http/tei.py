"""The TEI face: text-embeddings-inference's classifier routes, in TEI's request, answer and error
shapes, so that a TEI client of a sequence-classification model works against this server.

    POST /predict                the task named by --default-task (BITFIT_SERVE_DEFAULT_TASK); with
                                 none configured: 404 (set it, or use the route below)
    POST /tasks/{task}/predict   any task (not in TEI, which serves one model: here the task is the URL's)
    GET  /info                   TEI's Info, describing the default task (labels, version, max length)

Request ``{"inputs", "truncate"?, "raw_scores"?, "truncation_direction"?}``, read as TEI reads it:
``"text"`` is one input; ``["text"]`` too; ``["first", "second"]`` is ONE pair; a list of lists,
``[["text"], ["first", "second"]]``, is a batch. Whether an input must be a pair is the task's
(its delta's ``inputs``): a pair for a single-text task, or a single text for a pair task, is a 422.
``truncate`` None: the server's --auto-truncate. ``truncation_direction``: "Right" (TEI's default) is
what the tokenizer does; "Left" is accepted only while no input needs cutting: an input that would be
cut answers 422 naming truncation_direction (the same input with "Right" is served).

Answer: per input, EVERY label as ``{"score", "label"}``, by score descending (probabilities; the raw
logits with ``raw_scores: true``); a regression task answers one entry, its value under its one label.
One input: that list; a batch: a list of those lists. Every input of a request is served by one task
version, named by the ``X-Task-Version`` header (the native routes' ``version``).

Errors are TEI's ``{"error": "...", "error_type": "..."}`` on every route here (tag "tei", request
schema errors included): 422 Validation (our 400 invalid_input and every 422), 429 Overloaded (the
queue is full; Retry-After kept), 503 Unhealthy (the worker is not running), 424 Backend (an
internal error); 401 Unauthorized, 403 Forbidden, 404 NotFound, 405 MethodNotAllowed and 413
Validation keep their status.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from bitfit_serve import __version__
from bitfit_serve.engine import Prediction
from bitfit_serve.errors import InvalidInput, UnknownTask
from bitfit_serve.http import inference
from bitfit_serve.http.auth import require_api_key
from bitfit_serve.http.edge import ERROR_FORMATS
from bitfit_serve.http.services import Services, ServicesDep
from bitfit_serve.registry import TaskVersion
from bitfit_serve.http.strict import StrictJSONRoute

TAG = "tei"

ErrorType = Literal["Unhealthy", "Backend", "Overloaded", "Validation", "Tokenizer", "Empty",
                    "Unauthorized", "Forbidden", "NotFound", "MethodNotAllowed"]


class TeiError(BaseModel):
    error: str
    error_type: ErrorType = Field(description="TEI's error types, plus Unauthorized, Forbidden, NotFound and "
                                              "MethodNotAllowed for what TEI has no type for")


_KEPT = {401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed", 413: "Validation"}


def tei_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """One of our errors (status, code) as TEI answers it (see the module docstring)."""
    if code == "overloaded":
        status, kind = 429, "Overloaded"
    elif code == "not_ready":
        status, kind = 503, "Unhealthy"
    elif status >= 500:
        status, kind = 424, "Backend"
    elif status in _KEPT:
        kind = _KEPT[status]
    else:  # 400 invalid_input / bad_request, 422 input_too_long, 415, ...: what the client must fix
        status, kind = 422, "Validation"
    return JSONResponse({"error": message, "error_type": kind}, status_code=status, headers=headers)


ERROR_FORMATS[TAG] = tei_error


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": TeiError} for status in statuses}


# ---------------------------------------------------------------------------------------- schemas
TeiSequence = Annotated[list[str], Field(min_length=1, max_length=2, description="[text] or [first, second]")]
PredictInput = Annotated[
    Union[str, TeiSequence, Annotated[list[TeiSequence], Field(min_length=1, description="a batch")]],
    Field(description="a string, a pair of strings [first, second], or a batch of mixed single strings and "
                      "pairs [[text], [first, second], ...]", examples=["What a gripping film"])]


class TeiPredictRequest(BaseModel):
    # Unknown fields are ignored, as TEI ignores them.
    inputs: PredictInput
    truncate: Optional[bool] = Field(None, description="cut inputs longer than the task's max_length (default: "
                                                       "the server's --auto-truncate); false: such an input is a 422")
    truncation_direction: Literal["Right", "Left", "right", "left"] = Field(
        "Right", description="Left is accepted while no input needs cutting (our tokenizer cuts on the right)")
    raw_scores: bool = Field(False, description="scores are the raw logits instead of probabilities")


class TeiScore(BaseModel):
    score: float
    label: str


TeiPredictResponse = Union[list[TeiScore], list[list[TeiScore]]]


class TeiClassifier(BaseModel):
    id2label: dict[str, str]
    label2id: dict[str, int]


class TeiModelType(BaseModel):
    classifier: TeiClassifier


class TeiInfo(BaseModel):
    model_id: str = Field(description="the base model the tasks share (its hub id, or its folder)")
    model_sha: Optional[str] = Field(description="the base model's hub commit (null: not from the hub cache)")
    default_task_version: Optional[str] = Field(description="the default task's version (null: none served)")
    model_dtype: str
    served_model_name: str = Field(description="the default task, or the base model when none")
    model_type: TeiModelType = Field(description="the default task's labels (empty when none)")
    max_concurrent_requests: int = Field(description="sequences that may wait before 429 (max_queue)")
    max_input_length: int = Field(description="the default task's max_length (the base's positions when none)")
    max_batch_tokens: int
    max_batch_requests: Optional[int]
    max_client_batch_size: int = Field(description="inputs per request (max_texts_per_request)")
    auto_truncate: bool
    tokenization_workers: int
    version: str
    sha: Optional[str] = None
    docker_label: Optional[str] = None
    default_task: Optional[str] = Field(description="--default-task (not in TEI)")
    tasks: int = Field(description="tasks served (not in TEI): POST /tasks/{task}/predict for any of them")


# ----------------------------------------------------------------------------------------- routes
router = APIRouter(route_class=StrictJSONRoute, tags=[TAG], dependencies=[Depends(require_api_key)])
PREDICT = dict(tags=["inference"], response_model=TeiPredictResponse,
               responses=_errors(401, 403, 404, 413, 422, 424, 429, 503))


@router.post("/predict", **PREDICT)
async def predict_default(body: TeiPredictRequest, response: Response, s: ServicesDep) -> Any:
    """TEI's predict, on the server's --default-task."""
    task = s.settings.default_task
    if not task:
        raise UnknownTask("no default task: start the server with --default-task <task> "
                          "(BITFIT_SERVE_DEFAULT_TASK), or POST /tasks/{task}/predict")
    return await _predict(s, task, body, response)


@router.post("/tasks/{task}/predict", **PREDICT)
async def predict_task(task: str, body: TeiPredictRequest, response: Response, s: ServicesDep) -> Any:
    """TEI's predict, on any task."""
    return await _predict(s, task, body, response)


@router.get("/info", response_model=TeiInfo, responses=_errors(401, 403))
async def info(s: ServicesDep) -> TeiInfo:
    """TEI's Info for the default task; with none (or not loaded), no labels and the base's limits."""
    settings, base = s.settings, s.engine.base
    version = None
    if settings.default_task:
        try:
            version = s.tasks.get(settings.default_task)
        except UnknownTask:
            pass
    labels = version.labels if version is not None else ()
    return TeiInfo(
        model_id=base.source if base.source != "default" else base.path, model_sha=base.commit,
        default_task_version=version.version if version else None,
        model_dtype=str(base.dtype).removeprefix("torch."),
        served_model_name=settings.default_task or base.path,
        model_type=TeiModelType(classifier=TeiClassifier(id2label={str(i): x for i, x in enumerate(labels)},
                                                        label2id={x: i for i, x in enumerate(labels)})),
        max_concurrent_requests=settings.max_queue,
        max_input_length=version.max_length if version else base.max_positions,
        max_batch_tokens=settings.max_batch_tokens, max_batch_requests=settings.max_batch_requests,
        max_client_batch_size=settings.max_texts_per_request, auto_truncate=settings.auto_truncate,
        tokenization_workers=1, version=__version__, default_task=settings.default_task, tasks=len(s.tasks))


# -------------------------------------------------------------------------------------- the work
async def _predict(s: Services, task: str, body: TeiPredictRequest, response: Response) -> Any:
    batch = isinstance(body.inputs, list) and bool(body.inputs) and isinstance(body.inputs[0], list)
    sequences = body.inputs if batch else [body.inputs]
    inference.check_limits(s.settings, [sequences])
    before = inference.current_version(s, task)  # for the shape check's messages (run checks again, on its version)
    inputs = [_input(seq, before, "inputs" if not batch else f"inputs[{i}]") for i, seq in enumerate(sequences)]
    (predictions,) = await inference.run(s, [(task, inputs)], body.truncate)
    if body.truncation_direction.lower() == "left":
        for i, p in enumerate(predictions):
            if p.truncated:
                where = f"inputs[{i}]" if batch else "inputs"
                raise InvalidInput(f"{where}: {p.tokens} tokens exceed task {task!r}'s max_length "
                                   f"{inference.version_of(s, task, before, p.version).max_length} and "
                                   f"truncation_direction 'Left' is not supported (inputs are cut on the right): "
                                   f"send truncation_direction 'Right', or a shorter input")
    response.headers["X-Task-Version"] = predictions[0].version
    answers = [_scores(p, s, task, before, body.raw_scores) for p in predictions]
    return answers if batch else answers[0]


def _input(seq: str | list[str], version: TaskVersion | None, where: str) -> str | list[str]:
    """One TEI sequence as our input: a text, or [first, second] (a pair task's input). ``version``
    None: the task is unknown, ``run`` answers."""
    texts = [seq] if isinstance(seq, str) else seq
    if version is not None and version.is_pair_task and len(texts) != 2:
        names = ", ".join(repr(n) for n in version.meta.inputs)
        raise InvalidInput(f"{where}: task {version.task!r} takes text pairs [{names}]: send "
                           f'["first", "second"], or a batch [["first", "second"], ...]')
    if version is not None and not version.is_pair_task and len(texts) != 1:
        raise InvalidInput(f"{where}: task {version.task!r} takes one text per input, not a pair: send a batch "
                           f'of single texts as [["text"], ["text"], ...]')
    return texts[0] if len(texts) == 1 else list(texts)


def _scores(p: Prediction, s: Services, task: str, before: TaskVersion | None, raw: bool) -> list[TeiScore]:
    if p.value is not None:  # regression: its value under the task's one label
        return [TeiScore(score=p.value, label=inference.version_of(s, task, before, p.version).labels[0])]
    assert p.scores is not None
    values = p.logits if raw else p.scores.values()
    scores = [TeiScore(score=v, label=label) for label, v in zip(p.scores, values)]
    return sorted(scores, key=lambda x: x.score, reverse=True)
