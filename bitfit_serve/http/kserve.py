"""The KServe v2 / Open Inference Protocol face (the REST subset Triton's HTTP client uses): health,
server and model metadata, inference, and the model-repository extension. Each task is a model;
its version is the task version (the sha256 prefix of its delta file).

    GET  /v2/health/live                      {"live": true}
    GET  /v2/health/ready                     {"ready": bool} (503 while the inference worker is down)
    GET  /v2                                  {"name", "version", "extensions": ["model_repository"]}
    GET  /v2/models/{task}[/versions/{v}]     {"name", "versions", "platform", "inputs", "outputs"}
    GET  /v2/models/{task}[/versions/{v}]/ready   {"name", "ready"}
    POST /v2/models/{task}[/versions/{v}]/infer   inputs "text" (+ "text_pair") -> "label", "scores"
    POST /v2/repository/index                 [{"name", "version"?, "state", "reason"}]  (admin)
    POST /v2/repository/models/{task}/load    load / reload from the deltas folder         (admin)
    POST /v2/repository/models/{task}/unload  stop serving and delete the file             (admin)

Tensors. Inputs are BYTES tensors of shape ``[N]`` (or ``[N, 1]``) with the texts as JSON strings
(``data`` flat or nested row-major): ``text``, plus ``text_pair`` for pair tasks (e.g. NLI: the
two tensors hold the first and second texts, same N) -- fixed names, whatever the task's own
field names, so one client serves every task. Outputs: ``label`` (BYTES ``[N]``, the top label)
and ``scores`` (FP32 ``[N, C]``, each row the task's probabilities in label order, sigmoid per
label for multi-label tasks); for regression, ``scores`` is ``[N, 1]`` of values and ``label`` the
task's one label name. ``outputs`` in a request selects among them. Request ``parameters``:
``truncate`` (bool, like the native route's; default the server's ``--auto-truncate``); others
(``binary_data_output``, ``priority``, ...) are ignored. The binary tensor extension is not
supported: Triton's client must send ``binary_data=False`` inputs (outputs always come back as
JSON, which the client reads whatever it asked for).

Errors are the protocol's ``{"error": "<message>"}`` with the native status (400 bad tensors or
names, 401/403 tokens, 404 unknown task or version, 413 limits, 422 a bad delta file or an input
too long with truncation off, 503 not ready / overloaded), also for the refusals the edge makes
before routing (a declared body over the limit, load shedding): it finds the route by its tags.

Repository. The deltas folder is the repository. ``load`` is ``tasks.sync(task)``: it serves (or
re-serves) ``<deltas>/<task>.safetensors`` as the folder has it now; no file is a 404 naming the
path, a bad file a 422 with the reason (a version already served stays). ``unload`` is
``tasks.remove(task)``: it stops serving AND deletes the file. The folder is the source of truth
(start-up and the watcher serve what it holds), so an unload that kept the file would be undone
by the next restart or touch of the file; to take a task out of service and keep its file, move
the file out of the folder. ``index`` lists every served task (READY) and every delta file in the
folder that is not served (UNAVAILABLE), with the reason.

(About 450 lines: the protocol's tensor model, validation and the repository extension are one
face; split, each part would need the others' types.)
"""

from __future__ import annotations

import asyncio
import inspect
import math
import uuid
from typing import Any, Callable, Coroutine, Literal, Sequence, Union

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from bitfit_serve import __version__
from bitfit_serve.engine import Prediction
from bitfit_serve.errors import InvalidDelta, InvalidInput, UnknownTask
from bitfit_serve.http import inference
from bitfit_serve.http.auth import require_admin, require_api_key, valid_task_name
from bitfit_serve.http.edge import ERROR_FORMATS
from bitfit_serve.http.services import Services, ServicesDep
from bitfit_serve.registry import TaskVersion
from bitfit_serve.http.strict import StrictJSONRoute

TAG = "kserve"
PLATFORM = "bitfit-serve"
TEXT, TEXT_PAIR = "text", "text_pair"
LABEL, SCORES = "label", "scores"


def kserve_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


ERROR_FORMATS[TAG] = kserve_error  # every route tagged "kserve" answers errors in the protocol's shape


class KServeError(BaseModel):
    error: str


def kserve_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI: these statuses answer ``{"error": message}``."""
    return {status: {"model": KServeError} for status in statuses}


class KServeRoute(StrictJSONRoute):
    """Refuses the binary tensor extension before FastAPI reads the body as JSON (it would answer a
    bare "JSON decode error" to Triton's client, which sends binary tensors by default)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            if "inference-header-content-length" in request.headers:
                raise InvalidInput("the binary tensor data extension is not supported: send the tensors as JSON "
                                   "(Triton's client: set_data_from_numpy(..., binary_data=False))")
            return await handler(request)

        return checked


# Triton's client sends JSON without a Content-Type: parse it all the same (recent FastAPI versions
# otherwise leave such a body unparsed, a 400; older ones have no such option and always parse it).
LENIENT = {"strict_content_type": False} if "strict_content_type" in inspect.signature(APIRouter).parameters else {}
router = APIRouter(tags=[TAG], route_class=KServeRoute, **LENIENT)
READ = dict(dependencies=[Depends(require_api_key)], responses=kserve_errors(401, 403, 404))
ADMIN = dict(dependencies=[Depends(valid_task_name), Depends(require_admin)], tags=["admin"],
             responses=kserve_errors(400, 401, 403, 404, 413, 422))


# ---------------------------------------------------------------------------------------- bodies
class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class InputTensor(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] = Field(description="the texts (JSON strings), flat or nested row-major")
    parameters: dict[str, Any] | None = None


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str | None = None
    inputs: list[InputTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] | None = Field(None, description='"truncate": bool; other keys are ignored')


class OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Union[str, float]]


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str
    outputs: list[OutputTensor]


class IndexRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    ready: bool = Field(False, description="list only the models that are ready")


class RepositoryModel(BaseModel):
    name: str
    version: str | None = None
    state: Literal["READY", "UNAVAILABLE"]
    reason: str


class RepositoryRequest(BaseModel):
    model_config = ConfigDict(strict=True)
    parameters: dict[str, Any] | None = None


class LoadResponse(BaseModel):
    name: str
    version: str
    outcome: Literal["added", "replaced", "unchanged"] = Field(
        description="added / replaced: the file's version is served now; unchanged: it already was")


class UnloadResponse(BaseModel):
    name: str
    version: str = Field(description="the version that was served")
    unloaded: bool = True


# ---------------------------------------------------------------------------------------- health
@router.get("/v2/health/live", response_model=Live)
async def live() -> Live:
    return Live(live=True)


@router.get("/v2/health/ready", response_model=Ready, responses={503: {"model": Ready}})
async def ready(s: ServicesDep) -> Any:
    """Ready when the inference worker is alive (like ``/ready``); 503 otherwise."""
    if not _worker_alive(s):
        return JSONResponse(Ready(ready=False).model_dump(), status_code=503)
    return Ready(ready=True)


@router.get("/v2", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name=PLATFORM, version=__version__, extensions=["model_repository"])


def _worker_alive(s: Services) -> bool:
    return s.batcher is not None and s.batcher.alive


# ---------------------------------------------------------------------------------------- models
@router.get("/v2/models/{task}", response_model=ModelMetadata, **READ)
async def model_metadata(task: str, s: ServicesDep) -> ModelMetadata:
    return _metadata(s.tasks.get(task))


@router.get("/v2/models/{task}/versions/{version}", response_model=ModelMetadata, **READ)
async def model_version_metadata(task: str, version: str, s: ServicesDep) -> ModelMetadata:
    return _metadata(_served(s, task, version))


def _metadata(v: TaskVersion) -> ModelMetadata:
    classes = len(v.labels)
    inputs = [TensorMetadata(name=n, datatype="BYTES", shape=[-1]) for n in _input_names(v)]
    return ModelMetadata(name=v.task, versions=[v.version], platform=PLATFORM, inputs=inputs, outputs=[
        TensorMetadata(name=LABEL, datatype="BYTES", shape=[-1]),
        TensorMetadata(name=SCORES, datatype="FP32", shape=[-1, classes])])


def _input_names(v: TaskVersion) -> tuple[str, ...]:
    return (TEXT, TEXT_PAIR) if v.is_pair_task else (TEXT,)


def _served(s: Services, task: str, version: str | None) -> TaskVersion:
    """The task's served version; 404 when ``version`` is given and is not the one served."""
    v = s.tasks.get(task)
    if version is not None and version != v.version:
        raise UnknownTask(f"task {task!r} is served at version {v.version!r}, not {version!r}")
    return v


MODEL_READY = dict(response_model=ModelReady, dependencies=[Depends(require_api_key)],
                   responses={**kserve_errors(401, 403, 404), 503: {"model": ModelReady}})


@router.get("/v2/models/{task}/ready", **MODEL_READY)
async def model_ready(task: str, s: ServicesDep) -> Any:
    return _model_ready(s, task, None)


@router.get("/v2/models/{task}/versions/{version}/ready", **MODEL_READY)
async def model_version_ready(task: str, version: str, s: ServicesDep) -> Any:
    return _model_ready(s, task, version)


def _model_ready(s: Services, task: str, version: str | None) -> Any:
    _served(s, task, version)  # 404 for a task (or version) not served
    if not _worker_alive(s):
        return JSONResponse(ModelReady(name=task, ready=False).model_dump(), status_code=503)
    return ModelReady(name=task, ready=True)


# ---------------------------------------------------------------------------------------- infer
INFER = dict(response_model=InferResponse, tags=["inference"], dependencies=[Depends(require_api_key)],
             responses=kserve_errors(400, 401, 403, 404, 413, 422, 503))


@router.post("/v2/models/{task}/infer", **INFER)
async def infer(task: str, body: InferRequest, s: ServicesDep) -> InferResponse:
    """Classify (or score) N texts, or N text pairs for pair tasks."""
    return await _infer(s, task, None, body)


@router.post("/v2/models/{task}/versions/{version}/infer", **INFER)
async def infer_version(task: str, version: str, body: InferRequest, s: ServicesDep) -> InferResponse:
    """The same, only while ``version`` is the one served (404 otherwise)."""
    return await _infer(s, task, version, body)


async def _infer(s: Services, task: str, version: str | None, body: InferRequest) -> InferResponse:
    served = _served(s, task, version)
    inputs = _texts(served, body.inputs)
    outputs = _requested_outputs(body.outputs)
    truncate = _truncate(body.parameters)
    inference.check_limits(s.settings, [inputs])
    (predictions,) = await inference.run(s, [(task, inputs)], truncate)
    answered = predictions[0].version
    if version is not None and answered != version:  # replaced between the check and the run
        raise UnknownTask(f"task {task!r} is served at version {answered!r}, not {version!r}")
    tensors = _outputs(predictions, served.labels[0])
    return InferResponse(model_name=task, model_version=answered, id=body.id if body.id is not None else
                         uuid.uuid4().hex, outputs=[tensors[name] for name in outputs])


def _texts(v: TaskVersion, tensors: Sequence[InputTensor]) -> list:
    """The request's texts (or [first, second] pairs): names, datatypes and shapes checked."""
    expected = _input_names(v)
    by_name: dict[str, list[str]] = {}
    for k, t in enumerate(tensors):
        where = f"inputs[{k}] ({t.name!r})"
        if t.name not in expected:
            names = " and ".join(repr(n) for n in expected)
            raise InvalidInput(f"{where}: unknown input; task {v.task!r} takes {names}")
        if t.name in by_name:
            raise InvalidInput(f"{where}: input {t.name!r} is given twice")
        if t.datatype != "BYTES":
            raise InvalidInput(f"{where}: datatype {t.datatype!r}; the texts are a BYTES tensor")
        by_name[t.name] = _flat_texts(where, t)
    missing = [n for n in expected if n not in by_name]
    if missing:
        raise InvalidInput(f"input {missing[0]!r} is missing: task {v.task!r} takes "
                           + " and ".join(repr(n) for n in expected))
    if not v.is_pair_task:
        return by_name[TEXT]
    firsts, seconds = by_name[TEXT], by_name[TEXT_PAIR]
    if len(firsts) != len(seconds):
        raise InvalidInput(f"{TEXT!r} has {len(firsts)} texts but {TEXT_PAIR!r} has {len(seconds)}: "
                           f"a pair task needs one second text per first text")
    return [[a, b] for a, b in zip(firsts, seconds)]


def _flat_texts(where: str, t: InputTensor) -> list[str]:
    shape = t.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
        raise InvalidInput(f"{where}: shape {shape}; send [N] (or [N, 1]) texts, N >= 1")
    texts: list[str] = []

    def walk(items: list[Any], depth: int) -> None:
        for x in items:
            if isinstance(x, str):
                texts.append(x)
            elif isinstance(x, list) and depth < len(shape):
                walk(x, depth + 1)
            else:
                raise InvalidInput(f"{where}: data holds {type(x).__name__} values; BYTES data are JSON "
                                   f"strings (the binary tensor extension is not supported)")

    walk(t.data, 1)
    if len(texts) != math.prod(shape):
        raise InvalidInput(f"{where}: shape {shape} holds {math.prod(shape)} elements but data has {len(texts)}")
    return texts


def _requested_outputs(requested: Sequence[RequestedOutput] | None) -> list[str]:
    if not requested:
        return [LABEL, SCORES]
    names = [o.name for o in requested]
    for name in names:
        if name not in (LABEL, SCORES):
            raise InvalidInput(f"outputs: unknown output {name!r}; this model has {LABEL!r} and {SCORES!r}")
    if len(set(names)) != len(names):
        raise InvalidInput("outputs: an output is requested twice")
    return names


def _truncate(parameters: dict[str, Any] | None) -> bool | None:
    value = (parameters or {}).get("truncate")
    if value is not None and not isinstance(value, bool):
        raise InvalidInput(f"parameters.truncate: {value!r} is not a boolean")
    return value


def _outputs(predictions: Sequence[Prediction], regression_label: str) -> dict[str, OutputTensor]:
    n = len(predictions)
    if predictions[0].scores is None:  # regression: one value per input
        labels = [regression_label] * n
        rows = [[p.value] for p in predictions]
    else:
        labels = [p.label for p in predictions]
        rows = [list(p.scores.values()) for p in predictions]
    return {LABEL: OutputTensor(name=LABEL, datatype="BYTES", shape=[n], data=labels),
            SCORES: OutputTensor(name=SCORES, datatype="FP32", shape=[n, len(rows[0])],
                                 data=[x for row in rows for x in row])}


# ---------------------------------------------------------------------------------------- repository
@router.post("/v2/repository/index", response_model=list[RepositoryModel], response_model_exclude_none=True,
             tags=["admin"], dependencies=[Depends(require_admin)], responses=kserve_errors(400, 401, 403, 413))
async def repository_index(s: ServicesDep, body: IndexRequest | None = None) -> list[RepositoryModel]:
    """Every served task (READY), and every delta file in the folder that is not served
    (UNAVAILABLE), with the reason."""
    store = s.tasks.require_store()
    files = await asyncio.to_thread(store.scan)
    rejected = dict(s.tasks.rejected)
    served = {v.task: v for v in s.tasks.list()}
    entries = []
    for name in sorted(set(served) | set(rejected) | set(files)):
        v = served.get(name)
        if v is not None:
            reason = "" if name not in rejected else \
                f"the file in the folder is not served ({rejected[name]}); serving the version loaded before"
            entries.append(RepositoryModel(name=name, version=v.version, state="READY", reason=reason))
        elif name in rejected:
            entries.append(RepositoryModel(name=name, state="UNAVAILABLE", reason=rejected[name]))
        else:
            entries.append(RepositoryModel(name=name, state="UNAVAILABLE", reason=(
                f"{store.path_for(name)} is not loaded yet: POST /v2/repository/models/{name}/load")))
    if body is not None and body.ready:
        entries = [e for e in entries if e.state == "READY"]
    return entries


@router.post("/v2/repository/models/{task}/load", response_model=LoadResponse, **ADMIN)
async def load_model(task: str, s: ServicesDep, body: RepositoryRequest | None = None) -> LoadResponse:
    """Serve the task from its file in the deltas folder, as the folder has it now."""
    overrides = sorted(k for k in (body.parameters or {}) if k == "config" or k.startswith("file:")) if body else []
    if overrides:
        raise InvalidInput(f"parameters {overrides}: a task loads only from its file in the deltas folder; "
                           f"upload a delta with PUT /v1/tasks/{task}")
    store = s.tasks.require_store()
    try:
        outcome = await asyncio.to_thread(s.tasks.sync, task)
    except InvalidDelta:
        s.metrics.task_changes.labels(TAG, "rejected").inc()
        raise
    if outcome in ("added", "replaced", "removed"):
        s.metrics.task_changes.labels(TAG, outcome).inc()
    if outcome in ("absent", "removed"):
        gone = " (the task was served; its file is gone, so it is not served any more)" if outcome == "removed" else ""
        raise UnknownTask(f"no delta file for task {task!r}: {store.path_for(task)} does not exist{gone}")
    return LoadResponse(name=task, version=s.tasks.get(task).version, outcome=outcome)


@router.post("/v2/repository/models/{task}/unload", response_model=UnloadResponse, **ADMIN)
async def unload_model(task: str, s: ServicesDep, body: RepositoryRequest | None = None) -> UnloadResponse:
    """Stop serving the task (404 from now on) and delete its file from the deltas folder."""
    removed = await asyncio.to_thread(s.tasks.remove, task)
    s.metrics.task_changes.labels(TAG, "removed").inc()
    return UnloadResponse(name=task, version=removed.version)
