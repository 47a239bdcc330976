"""Request and response bodies (the HTTP edge only; the core speaks dataclasses)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool

if TYPE_CHECKING:  # the client imports these models: no torch for it
    from bitfit_serve.engine import Prediction
    from bitfit_serve.registry import TaskVersion
    from bitfit_serve.tasks import Tasks

TextPair = Annotated[list[str], Field(min_length=2, max_length=2, description="[first, second] for pair tasks")]
Inputs = Annotated[list[Union[str, TextPair]], Field(
    min_length=1, description="Texts, or [first, second] text pairs for pair tasks (e.g. NLI).",
    examples=[["a gripping, beautifully made film"]])]


Truncate = Annotated[StrictBool | None, Field(description="cut inputs longer than the task's max_length (default: "
                                                    "the server's --auto-truncate); false: such an input is a 422")]


Scores = Annotated[StrictBool | None, Field(description="answer every label's probability in 'scores' (default: "
                                                  "when the task has at most the server's scores_max_labels "
                                                  "labels)")]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: Inputs
    truncate: Truncate = None
    scores: Scores = None


class MixedItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str
    inputs: Inputs


class MixedPredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[MixedItem] = Field(min_length=1)
    truncate: Truncate = None
    scores: Scores = None


class PredictionOut(BaseModel):
    label: str | None = Field(None, description="classification: the top label")
    score: float | None = Field(None, description="classification: its probability")
    scores: dict[str, float] | None = Field(None, description="classification: every label's probability")
    value: float | None = Field(None, description="regression: the predicted value")
    tokens: int | None = Field(None, description="the input's tokens before truncation")
    truncated: bool | None = Field(None, description="the input was cut to the task's max_length")


class TaskPredictions(BaseModel):
    task: str
    version: str = Field(description="the task version (sha256 prefix of its delta file) that served every input")
    predictions: list[PredictionOut]

    @classmethod
    def of(cls, task: str, predictions: list[Prediction], with_scores: bool = True) -> "TaskPredictions":
        return cls(task=task, version=predictions[0].version, predictions=[
            PredictionOut(label=p.label, score=p.score, scores=p.scores if with_scores else None, value=p.value,
                          tokens=p.tokens, truncated=p.truncated) for p in predictions])


class MixedPredictResponse(BaseModel):
    results: list[TaskPredictions] = Field(description="one per request item, in order")


class TaskInfo(BaseModel):
    task: str
    version: str
    sha256: str
    problem_type: str
    labels: list[str]
    inputs: list[str]
    pooling: str
    max_length: int
    scheme: str
    metrics: dict[str, Any]
    train_args: dict[str, Any]
    bytes: int = Field(description="fp32 bytes of the delta's trained values")
    bank_bytes: int = Field(description="bank bytes one task occupies at the serving dtype")
    sites: int = Field(description="number of trained sites (bias / LayerNorm vectors)")
    base_model: str
    base_fingerprint: str
    created_at: str
    trainer_version: str
    loaded_at: float

    @classmethod
    def of(cls, v: TaskVersion, tasks: Tasks, **extra: Any) -> "TaskInfo":
        """The delta's metadata as served (max_length capped at the base's positions), plus where
        and how it is served."""
        m = v.meta
        return cls(task=m.task, version=v.version, sha256=v.sha256, problem_type=m.problem_type,
                   labels=list(m.labels), inputs=list(m.inputs), pooling=m.pooling, max_length=v.max_length,
                   scheme=m.scheme, metrics=dict(m.metrics), train_args=dict(m.train_args), bytes=v.nbytes,
                   bank_bytes=tasks.bank_bytes_of(v), sites=len(v.sites), base_model=m.base_model,
                   base_fingerprint=tasks.base.fingerprint, created_at=m.created_at,
                   trainer_version=m.trainer_version, loaded_at=v.loaded_at, **extra)


class TaskList(BaseModel):
    tasks: list[TaskInfo]
    next: str | None = Field(None, description="pass as ?after= for the next page; null on the last page")


class UploadResponse(TaskInfo):
    replaced: str | None = Field(description="the version this upload replaced, if any")


class RemoveResponse(BaseModel):
    task: str
    version: str
    removed: bool = True


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI: these statuses answer with an ErrorResponse body."""
    return {status: {"model": ErrorResponse} for status in statuses}
