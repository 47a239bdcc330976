"""Recompute a delta's dev metric with the serving engine (``bitfit_serve.Engine``).

This closes the loop: the number in the delta's metadata was measured by the trainer's HF model;
here the same dev set goes through the engine's own functional forward.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bitfit_serve import Engine
from bitfit_serve.delta import Delta
from trainer import metrics as metrics_lib
from trainer.data import TaskData


def engine_outputs(engine: Engine, delta: Delta, data: TaskData, batch_size: int = 64) -> np.ndarray:
    """[N, C] engine outputs for ``data.dev``: class probabilities (argmax = logits argmax) or values."""
    version = engine.add_task(delta)
    texts = [e.texts[0] if len(e.texts) == 1 else e.texts for e in data.dev]
    predictions = engine.predict([(version.task, t) for t in texts], max_batch_size=batch_size)
    if delta.problem_type == "regression":
        return np.array([[p.value] for p in predictions])
    return np.array([[p.scores[label] for label in delta.labels] for p in predictions])


def evaluate(engine: Engine, delta: Delta, data: TaskData) -> dict[str, Any]:
    """Engine dev metrics next to the trainer's, with the largest absolute difference."""
    if tuple(data.labels) != tuple(delta.labels) or tuple(data.inputs) != tuple(delta.inputs):
        raise ValueError(f"dev data (labels {list(data.labels)}, inputs {list(data.inputs)}) does not match the "
                         f"delta (labels {list(delta.labels)}, inputs {list(delta.inputs)})")
    served = metrics_lib.from_outputs(engine_outputs(engine, delta, data), [e.label for e in data.dev],
                                      delta.problem_type)
    trained = dict(delta.metrics.get("dev", {}))
    common = [k for k in served if k in trained]
    return {"task": delta.task, "n_dev": len(data.dev), "engine": served, "trainer": trained,
            "max_abs_diff": max((abs(served[k] - trained[k]) for k in common), default=None)}
