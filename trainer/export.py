"""Write what a run produced: a servable delta, a run record, or (``full``) an HF checkpoint.

Everything is written atomically (temp file, fsync, rename): an interrupted run never leaves a
half-written delta or record behind.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import trainer
from bitfit_serve import delta as delta_io
from bitfit_serve.delta import Delta
from trainer import schemes
from trainer.data import TaskData
from trainer.train import RunResult, TrainArgs, hardware, resolve_device, summary


def to_delta(result: RunResult, data: TaskData, args: TrainArgs, base_model: str) -> Delta:
    """The trained values of the sites the scheme trains (HF base names, fp32) + the head."""
    if args.scheme not in schemes.SERVABLE:
        raise ValueError(f"scheme {args.scheme!r} changes weight matrices: not servable as a delta")
    params = dict(result.model.base.named_parameters())
    stats = summary(result, data.metric)
    return Delta.of(
        task=data.name,
        sites={name: params[name].detach().float().clone() for name in result.selection.names},
        head_weight=result.model.head.weight.detach().float().clone(),
        head_bias=result.model.head.bias.detach().float().clone(),
        labels=data.labels,
        problem_type=data.problem_type,
        pooling=args.pooling,
        base_fingerprint=result.base_fingerprint,
        architecture=result.config.model_type,
        base_model=base_model,
        inputs=data.inputs,
        max_length=args.max_length,
        scheme=args.scheme,
        metrics={"dev": stats["final"], "val": stats["val"], "metric": data.metric, "epoch": stats["final_epoch"],
                 "n_dev": result.n_dev, "n_val": result.n_val, "warnings": list(result.warnings)},
        train_args={**asdict(args), "n_train": result.n_train},
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        trainer_version=trainer.__version__,
    )


def record(result: RunResult, data: TaskData, args: TrainArgs, base_model: str,
           outputs: dict[str, str]) -> dict[str, Any]:
    """The JSON run record: arguments, counts, per-epoch history (val and dev), the selected
    epoch's metrics, warnings, and the learning-rate sweep when there was one."""
    servable = args.scheme in schemes.SERVABLE
    return {
        "task": data.name,
        "scheme": args.scheme,
        "seed": args.seed,
        "servable": servable,
        "note": None if servable else (
            "full fine-tuning: HF checkpoint, not a delta" if args.scheme == "full" else
            "research baseline: changes weight-matrix entries, so no servable delta was written"),
        "train_args": asdict(args),
        "base_model": base_model,
        "base_fingerprint": result.base_fingerprint,
        "trainable_base_values": result.trainable_base_values,
        "head_values": result.head_values,
        "n_train": result.n_train,
        "n_val": result.n_val,
        "n_dev": result.n_dev,
        "labels": list(data.labels),
        "problem_type": data.problem_type,
        **summary(result, data.metric),
        "history": result.history,
        "warnings": list(result.warnings),
        "sweep": list(result.sweep),
        "stopped_early": result.stopped_early,
        "wall_s": result.wall_s,
        "hardware": hardware(str(resolve_device(args.device)), args.dtype),
        "outputs": outputs,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "trainer_version": trainer.__version__,
    }


def write_json(path: Path, obj: Any) -> Path:
    delta_io.atomic_write(Path(path), (json.dumps(obj, indent=2) + "\n").encode())
    return Path(path)


def record_path(out: Path) -> Path:
    """``deltas/rte.safetensors`` -> ``deltas/rte.run.json`` (beside the delta)."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".safetensors") + ".run.json")


def write_checkpoint(result: RunResult, folder: Path, data: TaskData | None = None) -> Path:
    """``full``: the fine-tuned base + its head as a folder a standard loader runs exactly as
    trained (``bitfit_serve.interop.hf_export.write_model``): pooling ``pooler`` -> a transformers
    ``AutoModelForSequenceClassification`` folder; ``mean`` / ``cls`` -> a sentence-transformers
    folder whose ``encode`` returns the logits. A previous checkpoint in ``folder`` is replaced.
    ``data`` names the labels and the problem type (without it: ``LABEL_i``, and one output
    means regression)."""
    from bitfit_serve.interop.hf_export import write_model

    head = result.model.head
    if data is not None:
        labels, problem_type, inputs = data.labels, data.problem_type, data.inputs
    else:
        labels = tuple(f"LABEL_{i}" for i in range(head.out_features))
        problem_type = "regression" if head.out_features == 1 else "single_label_classification"
        inputs = ("text",)
    if problem_type == "regression":
        labels = ("score",) if len(labels) != 1 else labels
    provenance = {"source": "bitfit-train full", "task": data.name if data is not None else "",
                  "scheme": result.args.scheme, "base_model": str(result.model_path),
                  "base_fingerprint": result.base_fingerprint, "architecture": result.config.model_type,
                  "selected_epoch": result.selected_epoch, "trainer_version": trainer.__version__}
    write_model(result.model.base, result.tokenizer, head.weight, head.bias, folder, pooling=result.args.pooling,
                labels=labels, problem_type=problem_type, inputs=inputs, max_length=result.args.max_length,
                task=provenance["task"], provenance=provenance, replace=True)
    return Path(folder)


def write_outputs(result: RunResult, data: TaskData, args: TrainArgs, base_model: str, out: Path,
                  write_model: bool = True) -> dict[str, Any]:
    """Write the delta / checkpoint (unless ``write_model`` is False) and the run record.

    Servable schemes: ``out`` is the delta file, the record goes beside it (``*.run.json``).
    ``rand_uniform`` / ``rand_row_col``: only the record. ``full``: ``out`` (minus a
    ``.safetensors`` suffix) is a checkpoint folder holding ``run.json``.
    """
    out = Path(out)
    outputs: dict[str, str] = {}
    if args.scheme == "full":
        folder = out.with_name(out.name.removesuffix(".safetensors"))
        if write_model:
            outputs["checkpoint"] = str(write_checkpoint(result, folder, data))
        rec_path = folder / "run.json" if write_model else record_path(out)
    else:
        if args.scheme in schemes.SERVABLE and write_model:
            outputs["delta"] = str(delta_io.save(to_delta(result, data, args, base_model), out))
        rec_path = record_path(out)
    rec = record(result, data, args, base_model, outputs)
    write_json(rec_path, rec)
    rec["record_path"] = str(rec_path)
    return rec
