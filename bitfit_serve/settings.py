"""Server settings: one frozen object, built once at start-up from CLI flags / ``BITFIT_SERVE_*`` env vars.

Nothing reads the environment at import time; ``bitfit-serve serve`` builds a :class:`Settings`
(typer maps every flag to its env var) and hands it to ``create_app``. Tests build one directly.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, fields
from pathlib import Path

ENV_PREFIX = "BITFIT_SERVE_"
# Batch limits, shared with Engine.plan / forward_many / predict as their defaults.
MAX_BATCH_TOKENS = 8192
MAX_BATCH_REQUESTS = 64


@dataclass(frozen=True)
class Settings:
    model: str = "default"  # HF folder, or "default" for the bundled MiniLM
    deltas: Path = Path("deltas")  # the delta store: loaded at start-up, watched, uploads land here
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    dtype: str = "float32"
    # CPU threads of one forward pass (torch.set_num_threads). None: torch's default, one per core.
    # Fewer leave cores to other work on the machine (another replica, a co-located client).
    threads: int | None = None
    # Batching: a forward takes at most this many padded tokens (batch x longest sequence) and
    # this many sequences; a sequence longer than the budget runs alone.
    max_batch_tokens: int = MAX_BATCH_TOKENS
    max_batch_requests: int = MAX_BATCH_REQUESTS
    # What one more forward costs, in padded tokens' worth: sequences of mixed lengths are cut into
    # batches wherever the padding would cost more. None: the device's default (CPU 64, GPU 16384;
    # see bitfit_serve.engine.FORWARD_OVERHEAD_TOKENS).
    forward_overhead_tokens: int | None = None
    # Sequences admitted but not yet in a batch; beyond it requests get 503 + Retry-After.
    max_queue: int = 2048
    retry_after_s: int = 1
    # Input limits (413 past them, the message names the setting).
    max_texts_per_request: int = 256  # texts (or pairs) in one request, summed over /v1/predict items
    max_chars_per_text: int = 10_000  # each text of a pair counts on its own
    max_items_per_predict: int = 64  # items of one POST /v1/predict
    max_request_bytes: int = 4 << 20  # JSON bodies
    max_upload_bytes: int = 16 << 20  # PUT /v1/tasks/{task}; a MiniLM delta is ~60-140 KB
    # Admin routes (PUT/DELETE /v1/tasks/{task}). With no token they are open, which is only
    # allowed on a loopback host unless allow_insecure_admin says otherwise.
    admin_token: str | None = None
    allow_insecure_admin: bool = False
    # Inference and task-listing routes: with a key set they need 'Authorization: Bearer <api key>'
    # (the admin token works too); health, readiness and metrics stay open.
    api_key: str | None = None
    watch: bool = True  # pick up adds/replaces/deletes in the deltas folder while running
    metrics_per_task: bool = False  # per-task Prometheus labels: one series per task, off by default
    log_level: str = "info"

    def __post_init__(self) -> None:
        object.__setattr__(self, "deltas", Path(self.deltas))  # a str from a caller is fine too
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or value < 1) and f.name != "port":
                raise ValueError(f"{f.name} must be a positive integer, got {value!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive integer, got {self.threads!r}")
        if self.forward_overhead_tokens is not None and self.forward_overhead_tokens < 0:
            raise ValueError(f"forward_overhead_tokens must be >= 0, got {self.forward_overhead_tokens}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.admin_token is not None and not self.admin_token.strip():
            raise ValueError("admin_token must not be empty (leave it unset to run without one)")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty (leave it unset to run without one)")
        if self.admin_token is None and not self.allow_insecure_admin and not is_loopback(self.host):
            raise ValueError(
                f"refusing to listen on {self.host!r} with admin routes (upload/delete) open to the network: "
                f"set an admin token (--admin-token or {ENV_PREFIX}ADMIN_TOKEN), listen on 127.0.0.1, "
                f"or pass --allow-insecure-admin")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other host name may resolve to a public interface
