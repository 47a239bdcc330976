"""bitfit-serve: one frozen encoder, thousands of BitFit tasks, mixed-task batches in one forward."""

from bitfit_serve.delta import Delta
from bitfit_serve.engine import Engine, Prediction
from bitfit_serve.errors import BitfitError, InvalidDelta, InvalidInput, UnknownTask
from bitfit_serve.registry import TaskVersion

__version__ = "0.1.0"
__all__ = ["Delta", "Engine", "Prediction", "TaskVersion", "BitfitError", "InvalidDelta", "InvalidInput",
           "UnknownTask", "__version__"]
