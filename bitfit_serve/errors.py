"""Error hierarchy of the core. Raised where the problem is found, mapped to HTTP only at the edge.

Each class carries the HTTP status and a stable machine-readable ``code`` so the server can
translate one-to-one without knowing where an error came from.
"""

from __future__ import annotations


class BitfitError(Exception):
    """Base of every error the runtime raises on purpose."""

    status_code: int = 400
    code: str = "bad_request"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInput(BitfitError):
    """A request the client can fix: wrong shape of inputs, empty text, too many items."""

    status_code = 400
    code = "invalid_input"


class Unauthorized(BitfitError):
    status_code = 401
    code = "unauthorized"


class Forbidden(BitfitError):
    status_code = 403
    code = "forbidden"


class UnknownTask(BitfitError):
    status_code = 404
    code = "unknown_task"


class PayloadTooLarge(BitfitError):
    status_code = 413
    code = "payload_too_large"


class InputTooLong(BitfitError):
    """With truncation off, an input has more tokens than its task's max_length."""

    status_code = 422
    code = "input_too_long"


class Conflict(BitfitError):
    """The deltas folder holds something other than a delta file where the task's file belongs."""

    status_code = 409
    code = "conflict"


class NonFiniteOutput(BitfitError):
    """A task's head produced NaN or Inf for an input: that input fails, never a 200 with nulls."""

    status_code = 500
    code = "non_finite_output"


class InvalidDelta(BitfitError):
    """A delta file that cannot be served: malformed, inconsistent, or not for this base model."""

    status_code = 422
    code = "invalid_delta"


class LimitExceeded(InvalidDelta):
    """A delta within the format's rules but past one of the server's budgets (labels, metadata,
    resident tasks, bank bytes): refused, nothing changed; the message names the setting."""

    status_code = 413
    code = "limit_exceeded"


class BaseModelMismatch(InvalidDelta):
    """The delta was trained on a different base model (fingerprint or architecture differs)."""

    code = "base_model_mismatch"


class Overloaded(BitfitError):
    """The queue is full; the client should retry after ``retry_after`` seconds."""

    status_code = 503
    code = "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class Busy(Overloaded):
    """A capacity limit other than the queue is reached (max_concurrent_uploads, max_connections):
    503 + Retry-After, the request's body unread."""

    code = "busy"


class RequestTimeout(BitfitError):
    """The request did not arrive in time (body_timeout_s, or header_timeout_s for headers left
    incomplete): 408, the request is not served and the connection is closed."""

    status_code = 408
    code = "request_timeout"


class NotReady(BitfitError):
    status_code = 503
    code = "not_ready"
