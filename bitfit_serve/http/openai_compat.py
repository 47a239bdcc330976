"""The vLLM / OpenAI face: ``GET /v1/models`` and vLLM's classification API (``POST /classify``,
``POST /v1/classify``), so that clients written for ``vllm serve --task classify`` talk to
bitfit-serve unchanged. Each task is one "model".

    GET  /v1/models      {"object": "list", "data": [{"id": task, "object": "model", "created",
                          "owned_by": "bitfit-serve", "root": task, "parent": base model,
                          "max_model_len": the task's max_length}]}
    POST /v1/classify    {"model": task, "input": str | [str, ...] | [[first, second], ...],
                          "truncate_prompt_tokens"?: int}
                      -> {"id": "classify-<uuid>", "object": "list", "created", "model",
                          "data": [{"index", "label", "probs", "num_classes"}],
                          "usage": {"prompt_tokens", "total_tokens", "completion_tokens": 0}}

Choices where vLLM has no counterpart:

- Pair tasks (e.g. NLI): vLLM's classify takes strings only; here an input of a pair task is a
  ``[first, second]`` list, so ``input`` is a list of such lists (``[["a", "b"]]``; a flat
  ``["a", "b"]`` is two texts, refused by a pair task like the native route refuses it).
- ``probs`` are the task's probabilities in its label order (softmax; sigmoid per label for
  multi-label tasks, which need not sum to 1), ``label`` the top one. Regression: ``probs`` is
  ``[value]``, ``num_classes`` 1 and ``label`` the task's one label name.
- ``truncate_prompt_tokens``: unset -> the server's ``--auto-truncate``; ``-1`` (vLLM: "the
  model's length") or the task's max_length -> cut at max_length. 0, below -1 or above
  max_length -> 400 (vLLM refuses a value above max_model_len too). A value k below max_length
  is answered only when no input has more than k tokens (then cutting at k changes nothing);
  otherwise 400, because this server cuts only at a task's max_length and an answer computed on
  more than k tokens would not be the one asked for.
- ``usage.prompt_tokens``: the tokens the encoder processed (special tokens included), i.e. after
  truncation, as vLLM counts them.
- Errors keep the native JSON shape ``{"error": {"code", "message"}}``; the optional
  ``user`` / ``priority`` fields are accepted and ignored. Runtime LoRA loading
  (``/v1/load_lora_adapter``) is not offered: tasks change through ``PUT /v1/tasks/{task}``
  or the deltas folder.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Annotated, Literal, Union

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from bitfit_serve.engine import Prediction
from bitfit_serve.errors import InvalidInput
from bitfit_serve.http import inference
from bitfit_serve.http.auth import require_api_key
from bitfit_serve.http.schemas import TextPair, error_responses
from bitfit_serve.http.services import Services, ServicesDep
from bitfit_serve.registry import TaskVersion
from bitfit_serve.http.strict import StrictJSONRoute

router = APIRouter(route_class=StrictJSONRoute, dependencies=[Depends(require_api_key)])

OWNER = "bitfit-serve"


class ModelCard(BaseModel):
    id: str = Field(description="the task name")
    object: Literal["model"] = "model"
    created: int = Field(description="when this version of the task was loaded (Unix seconds)")
    owned_by: str = OWNER
    root: str = Field(description="the task name")
    parent: str | None = Field(description="the base model the task's delta was trained on")
    max_model_len: int = Field(description="the task's max_length in tokens")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


ClassifyInput = Union[str, Annotated[list[Union[str, TextPair]], Field(min_length=1)]]


class ClassificationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str = Field(description="the task name")
    input: ClassifyInput = Field(description="a text, a list of texts, or for pair tasks a list of "
                                             "[first, second] pairs", examples=["a gripping film"])
    truncate_prompt_tokens: int | None = Field(
        None, description="-1 or the task's max_length: cut longer inputs at max_length; unset: the "
                          "server's --auto-truncate; a smaller k: only inputs of at most k tokens")
    user: str | None = Field(None, description="accepted, ignored")
    priority: int = Field(0, description="accepted, ignored")


class ClassificationData(BaseModel):
    index: int
    label: str | None
    probs: list[float] = Field(description="per label, in the task's label order ([value] for regression)")
    num_classes: int


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class ClassificationResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassificationData]
    usage: Usage


@router.get("/v1/models", response_model=ModelList, tags=["openai"], responses=error_responses(401, 403))
async def list_models(s: ServicesDep) -> ModelList:
    """Every served task, as a model."""
    return ModelList(data=[_card(v, s) for v in s.tasks.list()])


def _card(v: TaskVersion, s: Services) -> ModelCard:
    parent = v.meta.base_model or Path(str(s.tasks.base.path)).name or None
    return ModelCard(id=v.task, created=int(v.loaded_at), root=v.task, parent=parent, max_model_len=v.max_length)


CLASSIFY = dict(response_model=ClassificationResponse, tags=["inference", "openai"],
                responses=error_responses(400, 401, 403, 404, 413, 422, 503))


@router.post("/v1/classify", **CLASSIFY)
@router.post("/classify", **CLASSIFY)
async def classify(body: ClassificationRequest, s: ServicesDep) -> ClassificationResponse:
    """vLLM's classification API: one task ("model") on a text or a list of texts (or pairs)."""
    task = body.model
    inputs = [body.input] if isinstance(body.input, str) else body.input
    version = s.tasks.get(task)  # 404 for an unknown task before anything else
    truncate, limit = _truncation(body.truncate_prompt_tokens, version)
    inference.check_limits(s.settings, [inputs])
    (predictions,) = await inference.run(s, [(task, inputs)], truncate)
    if limit is not None:
        for i, p in enumerate(predictions):
            if (p.tokens or 0) > limit:
                raise InvalidInput(
                    f"input[{i}]: {p.tokens} tokens exceed truncate_prompt_tokens={limit}; this server cuts "
                    f"inputs only at task {task!r}'s max_length {version.max_length}: send "
                    f"truncate_prompt_tokens={version.max_length} (or -1), or shorter inputs")
    label = version.labels[0]
    data = [_data(i, p, label) for i, p in enumerate(predictions)]
    tokens = sum(_processed_tokens(p, version) for p in predictions)
    return ClassificationResponse(id=f"classify-{uuid.uuid4().hex}", created=int(time.time()), model=task,
                                  data=data, usage=Usage(prompt_tokens=tokens, total_tokens=tokens))


def _truncation(k: int | None, version: TaskVersion) -> tuple[bool | None, int | None]:
    """(truncate for inference.run, the token limit left to check afterwards, if any)."""
    if k is None:
        return None, None
    if k == -1 or k == version.max_length:
        return True, None
    if k <= 0 or k > version.max_length:
        raise InvalidInput(f"truncate_prompt_tokens={k}: must be -1 or between 1 and task "
                           f"{version.task!r}'s max_length {version.max_length}")
    return True, k


def _data(index: int, p: Prediction, regression_label: str) -> ClassificationData:
    if p.scores is None:  # regression
        return ClassificationData(index=index, label=regression_label, probs=[p.value], num_classes=1)
    return ClassificationData(index=index, label=p.label, probs=list(p.scores.values()), num_classes=len(p.scores))


def _processed_tokens(p: Prediction, version: TaskVersion) -> int:
    """Tokens the encoder saw: the input's, or max_length when it was cut."""
    return min(p.tokens or 0, version.max_length)
