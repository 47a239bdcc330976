"""bitfit-serve: one frozen encoder, thousands of BitFit tasks, mixed-task batches in one forward.

The names below load on first use, so that ``bitfit_serve.client`` (an HTTP client) does not
import torch."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_EXPORTS = {"Delta": "bitfit_serve.delta", "Engine": "bitfit_serve.engine", "Prediction": "bitfit_serve.engine",
            "TaskVersion": "bitfit_serve.registry", "BitfitError": "bitfit_serve.errors",
            "InvalidDelta": "bitfit_serve.errors", "InvalidInput": "bitfit_serve.errors",
            "UnknownTask": "bitfit_serve.errors"}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bitfit_serve' has no attribute {name!r}")
