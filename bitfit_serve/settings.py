"""Server settings: one frozen object, built once at start-up from CLI flags / ``BITFIT_SERVE_*`` env vars.

Each setting is declared once, as a field of :class:`Settings`: its type and limits, its default and
its help text. ``bitfit-serve serve`` generates one option per field from them (``--max-queue``,
env var ``BITFIT_SERVE_MAX_QUEUE``), builds a :class:`Settings` and hands it to ``create_app``.
Tests build one directly. Nothing reads the environment at import time; ``Settings()`` does read
``BITFIT_SERVE_*`` for the fields it is not given, as any pydantic ``BaseSettings`` does.

Invalid values raise pydantic's ``ValidationError`` (a ``ValueError``) naming the field;
:func:`explain` turns it into one line for a command-line error.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal, Optional

from pydantic import (Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError, ValidationInfo,
                      field_validator, model_validator)
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "BITFIT_SERVE_"
# Batch limits, shared with Engine.plan / forward_many / predict as their defaults.
MAX_BATCH_TOKENS = 8192
MAX_BATCH_REQUESTS = 64


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    model: str = Field("default", description="'default' (the bundled MiniLM), a local HF model folder, or a "
                                              "Hugging Face id found in the HF cache (HF_HUB_OFFLINE honoured)")
    revision: Optional[str] = Field(None, description="with a Hugging Face id: branch, tag or commit")
    deltas: Path = Field(Path("deltas"), description="deltas folder: loaded at start-up, watched, uploads land "
                                                     "here (created if missing)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    device: str = Field("cpu", description="cpu, cuda, cuda:1, ...")
    dtype: str = Field("float32", description="float32, float16 or bfloat16")
    # torch.set_num_threads. Fewer than the cores leave some to other work on the machine
    # (another replica, a co-located client).
    threads: Optional[PositiveInt] = Field(None, description="CPU threads per forward pass (default: one per core)")
    # Batching: a forward takes at most this many padded tokens (batch x longest sequence) and
    # this many sequences; a sequence longer than the budget runs alone.
    max_batch_tokens: PositiveInt = Field(MAX_BATCH_TOKENS, description="padded tokens per forward pass")
    max_batch_requests: PositiveInt = Field(MAX_BATCH_REQUESTS, description="sequences per forward pass")
    # None: the device's default, see bitfit_serve.engine.FORWARD_OVERHEAD_TOKENS.
    forward_overhead_tokens: Optional[NonNegativeInt] = Field(
        None, description="cost of one more forward in padded tokens: mixed lengths are cut into batches "
                          "where padding costs more (default: CPU 64, GPU 16384)")
    # Sequences admitted but not yet in a batch.
    max_queue: PositiveInt = Field(2048, description="sequences waiting before 503 + Retry-After")
    retry_after_s: PositiveInt = Field(1, description="seconds in the Retry-After header of a 503 (queue full)")
    # Input limits (413 past them, the message names the setting).
    max_texts_per_request: PositiveInt = Field(256, description="inputs (texts or pairs) per request, summed over "
                                                                "the items of POST /v1/predict")
    max_chars_per_text: PositiveInt = Field(10_000, description="characters per text (each text of a pair on "
                                                                "its own)")
    max_items_per_predict: PositiveInt = Field(64, description="items per POST /v1/predict")
    max_tokens_per_request: PositiveInt = Field(65_536, description="tokens of one request's inputs after "
                                                                    "tokenization (8 full forwards); long "
                                                                    "requests are also split across forwards "
                                                                    "so short ones are not stuck behind them")
    max_request_bytes: PositiveInt = Field(4 << 20, description="JSON body size cap")
    max_upload_bytes: PositiveInt = Field(16 << 20, description="delta upload size cap "
                                                                "(a MiniLM delta is ~60-140 KB)")
    # Connection limits (bitfit_serve.http.connections; the body deadline is http/edge.BodyTimeout).
    header_timeout_s: PositiveFloat = Field(10.0, description="seconds for a request's headers to arrive, from "
                                                              "the connection's start or its previous response; "
                                                              "past it the connection is closed (408 if some "
                                                              "bytes came)")
    body_timeout_s: PositiveFloat = Field(30.0, description="seconds for a whole request body to arrive, from "
                                                            "its headers; past it 408 request_timeout, the "
                                                            "request is not served, the connection closed")
    keep_alive_s: PositiveFloat = Field(5.0, description="seconds an idle keep-alive connection is kept open")
    max_connections: PositiveInt = Field(1024, description="open connections; one more is answered 503 busy "
                                                           "and closed at once")
    max_concurrent_uploads: PositiveInt = Field(4, description="PUT /v1/tasks/{task} uploads at once; one more is "
                                                               "answered 503 busy + Retry-After, body unread")
    # Tenant budgets, checked when a delta is added (HTTP or folder): past one, 413 limit_exceeded
    # naming it, and nothing changes. See bitfit_serve.tasks.TaskLimits.
    max_tasks: PositiveInt = Field(10_000, description="resident tasks (a MiniLM task costs ~110 KB of banks)")
    max_bank_bytes: PositiveInt = Field(4 << 30, description="bytes of all banks together (sites and heads)")
    max_labels_per_task: PositiveInt = Field(1024, description="labels of one task")
    max_label_chars: PositiveInt = Field(128, description="characters of one label")
    max_metadata_bytes: PositiveInt = Field(16 << 10, description="bytes of a delta's metadata besides its labels "
                                                                  "(metrics, train_args, ...; a trained delta "
                                                                  "has ~1 KB)")
    max_response_bytes: PositiveInt = Field(8 << 20, description="estimated bytes of one prediction response; "
                                                                 "past it 413 before any work (ask fewer inputs "
                                                                 "or scores=false)")
    scores_max_labels: NonNegativeInt = Field(32, description="tasks with more labels answer without 'scores' "
                                                              "unless the request sets scores=true")
    # Admin routes (PUT/DELETE /v1/tasks/{task}). With no token they are open, which is only
    # allowed on a loopback host unless allow_insecure_admin says otherwise.
    admin_token: Optional[str] = Field(None, description="token for PUT/DELETE /v1/tasks/{task} "
                                                         "(Authorization: Bearer <token>)")
    allow_insecure_admin: bool = Field(False, description="allow open admin routes (no token) on a "
                                                          "non-loopback host")
    # With a key set, the inference and task-listing routes need it (the admin token works too);
    # health, readiness and metrics stay open.
    api_key: Optional[str] = Field(None, description="key for inference and task listing "
                                                     "(Authorization: Bearer <key>)")
    auto_truncate: bool = Field(True, description="cut inputs longer than a task's max_length (a request's "
                                                   "'truncate' overrides); off: such an input is a 422")
    default_task: Optional[str] = Field(None, description="task served by the TEI face's POST /predict and /info")
    watch: bool = Field(True, description="watch the deltas folder for changes (adds, replaces, deletes)")
    metrics_per_task: bool = Field(False, description="per-task Prometheus labels (one series per task)")
    log_level: str = Field("info", description="debug, info, warning, error")
    log_format: Literal["text", "json"] = Field("text", description="text, or json: one JSON object per line "
                                                                    "(our logs and uvicorn's access log)")

    @field_validator("admin_token", "api_key")
    @classmethod
    def _not_blank(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not value.strip():
            raise ValueError(f"{info.field_name} must not be empty (leave it unset to run without one)")
        return value

    @model_validator(mode="after")
    def _no_open_admin_beyond_loopback(self) -> Settings:
        if self.admin_token is None and not self.allow_insecure_admin and not is_loopback(self.host):
            raise ValueError(
                f"refusing to listen on {self.host!r} with admin routes (upload/delete) open to the network: "
                f"set an admin token (--admin-token or {ENV_PREFIX}ADMIN_TOKEN), listen on 127.0.0.1, "
                f"or pass --allow-insecure-admin")
        return self


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other host name may resolve to a public interface


_CONSTRAINTS = {  # pydantic error type -> what the value must be
    "greater_than": lambda ctx: "must be a positive integer" if ctx["gt"] == 0 else f"must be > {ctx['gt']}",
    "greater_than_equal": lambda ctx: f"must be >= {ctx['ge']}",
    "less_than_equal": lambda ctx: f"must be <= {ctx['le']}",
}


def _is_float(name: str) -> bool:
    field = Settings.model_fields.get(name)
    return field is not None and field.annotation is float


def explain(error: ValidationError) -> str:
    """A :class:`Settings` error as one line, each problem naming its field:
    ``max_queue must be a positive integer, got 0``."""
    problems = []
    for e in error.errors(include_url=False):
        field = ".".join(map(str, e["loc"]))
        if e["type"] == "value_error":  # from a validator above: its message says it all
            problems.append(str(e["ctx"]["error"]))
        elif e["type"] == "greater_than" and e["ctx"]["gt"] == 0 and _is_float(field):
            problems.append(f"{field} must be a positive number, got {e['input']!r}")
        elif e["type"] in _CONSTRAINTS:
            problems.append(f"{field} {_CONSTRAINTS[e['type']](e['ctx'])}, got {e['input']!r}")
        else:
            problems.append(f"{field}: {e['msg'][:1].lower()}{e['msg'][1:]}, got {e['input']!r}")
    return "; ".join(problems)
