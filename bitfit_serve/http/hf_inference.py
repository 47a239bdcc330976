"""The HF Inference face: the Hugging Face Inference API's text-classification route, so that

    InferenceClient(model=f"{server}/models/sst2").text_classification("a gripping film")

works (``huggingface_hub``'s sync and async clients post ``{"inputs", "parameters"}`` to the model
URL itself and read the first of the answer's lists).

    POST /models/{task}   {"inputs": text | [text, ...] | {"text", "text_pair"} | [{"text", "text_pair"}, ...],
                           "parameters": {"top_k"?, "function_to_apply"?, "truncation"?}?}
                          -> [[{"label", "score"}, ...], ...]: one list per input, by score descending

``{"text", "text_pair"}`` is one pair (pair tasks, e.g. NLI); a plain text is one input of a
single-text task. ``function_to_apply``: "softmax", "sigmoid" or "none" (the raw logits), applied to
the head's outputs; unset, each task's own (single-label: softmax, multi-label: sigmoid, regression:
none, its value), i.e. the native route's ``scores``. ``top_k``: keep the k best (default: every
label). ``truncation``: the native ``truncate`` (unset: the server's --auto-truncate). Every input
of a request is served by one task version, named by the ``X-Task-Version`` header. Errors are the
native ``{"error": {"code", "message"}}`` body (the client raises ``HfHubHTTPError`` with the message).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Optional, Union

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from bitfit_serve.engine import Prediction
from bitfit_serve.errors import InvalidInput
from bitfit_serve.http import inference
from bitfit_serve.http.auth import require_api_key
from bitfit_serve.http.schemas import error_responses
from bitfit_serve.http.services import ServicesDep
from bitfit_serve.registry import TaskVersion
from bitfit_serve.http.strict import StrictJSONRoute

TAG = "hf-inference"
Function = Literal["softmax", "sigmoid", "none"]


class HfTextPair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    text_pair: Optional[str] = Field(None, description="the second text of a pair task's input")


HfInput = Union[str, HfTextPair]
HfInputs = Annotated[Union[str, HfTextPair, Annotated[list[HfInput], Field(min_length=1)]], Field(
    description="a text, a {text, text_pair} pair, or a list of them", examples=["a gripping, beautifully made film"])]


class HfParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_k: Optional[PositiveInt] = Field(None, description="keep the k best labels (default: all)")
    function_to_apply: Optional[Function] = Field(
        None, description="applied to the head's outputs (default: the task's own: softmax, sigmoid, or none for "
                          "regression)")
    truncation: Optional[bool] = Field(None, description="cut inputs longer than the task's max_length (default: "
                                                         "the server's --auto-truncate); false: such an input is a 422")


class HfRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: HfInputs
    parameters: Optional[HfParameters] = None
    options: Optional[dict[str, Any]] = Field(None, description="the old API's options (use_cache, "
                                                                "wait_for_model): accepted, ignored")


class HfLabelScore(BaseModel):
    label: str
    score: float


router = APIRouter(route_class=StrictJSONRoute, tags=[TAG, "inference"], dependencies=[Depends(require_api_key)],
                   responses=error_responses(400, 401, 403, 404, 413, 422, 503))


@router.post("/models/{task}", response_model=list[list[HfLabelScore]])
async def text_classification(task: str, body: HfRequest, response: Response, s: ServicesDep) -> Any:
    """Text classification as the HF Inference API answers it: one list per input."""
    listed = isinstance(body.inputs, list)
    inputs = [_raw(item) for item in (body.inputs if listed else [body.inputs])]
    parameters = body.parameters or HfParameters()
    inference.check_limits(s.settings, [inputs])
    before = inference.current_version(s, task)  # for the shape check's messages (run checks again, on its version)
    for i, item in enumerate(inputs if before is not None else ()):
        _check_shape(item, before, f"inputs[{i}]" if listed else "inputs")
    (predictions,) = await inference.run(s, [(task, inputs)], parameters.truncation)
    response.headers["X-Task-Version"] = predictions[0].version
    return [_scores(p, inference.version_of(s, task, before, p.version), parameters) for p in predictions]


def _raw(item: HfInput) -> str | list[str]:
    """A text, or [text, text_pair]: our input."""
    if isinstance(item, str):
        return item
    return item.text if item.text_pair is None else [item.text, item.text_pair]


def _check_shape(item: str | list[str], version: TaskVersion, where: str) -> None:
    if version.is_pair_task and isinstance(item, str):
        names = ", ".join(repr(n) for n in version.meta.inputs)
        raise InvalidInput(f'{where}: task {version.task!r} takes text pairs [{names}]: send '
                           f'{{"text": "...", "text_pair": "..."}}')
    if not version.is_pair_task and not isinstance(item, str):
        raise InvalidInput(f"{where}: task {version.task!r} takes one text per input, not a text_pair")


def _scores(p: Prediction, version: TaskVersion, parameters: HfParameters) -> list[HfLabelScore]:
    if p.scores is None:  # regression: its value under the task's one label
        labels, own, native = list(version.labels), "none", [p.value]
    else:
        labels, native = list(p.scores), list(p.scores.values())
        own = "sigmoid" if version.problem_type == "multi_label_classification" else "softmax"
    function = parameters.function_to_apply or own
    if function == own:  # the native answer itself
        values = native
    else:
        values = _apply(function, p.logits)
    ranked = sorted((HfLabelScore(label=label, score=v) for label, v in zip(labels, values)),
                    key=lambda x: x.score, reverse=True)
    return ranked[:parameters.top_k] if parameters.top_k else ranked


def _apply(function: Function, logits: tuple[float, ...]) -> list[float]:
    if function == "none":
        return list(logits)
    if function == "sigmoid":
        return [1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x)) for x in logits]
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]
