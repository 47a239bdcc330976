"""``bitfit-serve``: run the HTTP server, inspect a delta file, list a deltas folder, convert.

    bitfit-serve serve --model default --deltas deltas           # every flag also BITFIT_SERVE_<FLAG>
    bitfit-serve inspect deltas/sst2.safetensors --model default
    bitfit-serve tasks deltas
    bitfit-serve import-peft ./adapter --task sst2 --out deltas/sst2.safetensors   # BEFT / LN tuning
    bitfit-serve export deltas/sst2.safetensors --out exported/sst2                 # HF / ST folder
"""

from __future__ import annotations

import json
import logging.config
import types
from inspect import Parameter, Signature
from pathlib import Path
from typing import Annotated, Optional, Union, get_args, get_origin

import typer
from pydantic import ValidationError

from bitfit_serve import delta as delta_io
from bitfit_serve.errors import InvalidDelta
from bitfit_serve.logs import log_config
from bitfit_serve.model.base import ModelNotFound
from bitfit_serve.settings import ENV_PREFIX, Settings, explain
from bitfit_serve.store import DeltaStore

app = typer.Typer(help="Serve thousands of BitFit tasks from one frozen encoder.", no_args_is_help=True,
                  add_completion=False)


def _settings_options(func):
    """Give ``func(**options)`` one option per :class:`Settings` field: ``--max-queue`` (``--watch/--no-watch``
    for a bool), also settable by the env var ``BITFIT_SERVE_MAX_QUEUE``, with the field's default and help."""
    params = []
    for name, field in Settings.model_fields.items():
        flag = name.replace("_", "-")
        decl = f"--{flag}/--no-{flag}" if field.annotation is bool else f"--{flag}"
        option = typer.Option(decl, envvar=f"{ENV_PREFIX}{name.upper()}", help=field.description)
        params.append(Parameter(name, Parameter.KEYWORD_ONLY, default=field.get_default(),
                                annotation=Annotated[_without_constraints(field.annotation), option]))
    func.__signature__ = Signature(params, return_annotation=None)
    return func


def _without_constraints(tp):
    """``Optional[PositiveInt]`` -> ``Optional[int]``: typer wants plain types, pydantic checks the values."""
    if get_origin(tp) is Annotated:
        return _without_constraints(get_args(tp)[0])
    if get_origin(tp) in (Union, types.UnionType):
        return Union[tuple(_without_constraints(a) for a in get_args(tp))]
    return tp


@app.command()
@_settings_options
def serve(**options) -> None:
    """Run the HTTP server (OpenAPI docs at /docs)."""
    # The options are the Settings fields (see _settings_options); Settings checks their values.
    import torch
    import uvicorn

    from bitfit_serve.engine import Engine
    from bitfit_serve.http.connections import uvicorn_options
    from bitfit_serve.server import create_app

    try:
        settings = Settings(**options)
    except ValidationError as e:
        flags = [f"--{err['loc'][0].replace('_', '-')}" for err in e.errors() if err["loc"]]
        raise typer.BadParameter(explain(e), param_hint=flags or None) from None
    config = log_config(settings.log_level, settings.log_format)
    logging.config.dictConfig(config)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)  # process-wide, before any forward; the inference thread inherits it
    try:
        engine = Engine.from_pretrained(None if settings.model == "default" else settings.model,
                                        device=settings.device, dtype=settings.dtype, revision=settings.revision,
                                        forward_overhead_tokens=settings.forward_overhead_tokens)
    except ModelNotFound as e:
        raise typer.BadParameter(str(e), param_hint="--model") from None
    app = create_app(engine, settings)
    # Address, keep-alive, header deadline and connection cap (bitfit_serve.http.connections).
    uvicorn.run(app, **uvicorn_options(settings, app), log_level=settings.log_level.lower(), log_config=config)


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="a delta file (.safetensors)")],
    model: Annotated[Optional[str], typer.Option(help="also check it against this base model "
                                                      "('default' = bundled MiniLM)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Print a delta's metadata, sites and sizes; with --model, check that it can be served on it."""
    try:
        data = path.read_bytes()
    except OSError as e:
        typer.echo(f"error: cannot read {path}: {e.strerror}", err=True)
        raise typer.Exit(1)
    try:
        file = delta_io.parse(data, source=str(path))
    except InvalidDelta as e:
        typer.echo(f"invalid delta: {e.message}", err=True)
        raise typer.Exit(1)
    check = None
    if model is not None:
        from bitfit_serve.engine import Engine

        try:
            Engine.from_pretrained(None if model == "default" else model).tasks.check(file.delta)
            check = "ok"
        except InvalidDelta as e:
            check = e.message
    delta = file.delta
    meta = {k: v for k, v in delta.metadata().items() if k not in ("metrics", "train_args", "labels", "inputs")}
    info = {
        **meta, "labels": list(delta.labels), "inputs": list(delta.inputs), "metrics": dict(delta.metrics),
        "train_args": dict(delta.train_args), "version": file.version,
        "file_bytes": len(data), "value_bytes": delta.nbytes,
        "head": list(delta.head_weight.shape),
        "sites": {name: t.numel() for name, t in sorted(delta.sites.items())},
        "check": check,
    }
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            if key == "sites":
                typer.echo(f"sites: {len(value)} ({sum(value.values())} values)")
                for name, n in value.items():
                    typer.echo(f"  {name} [{n}]")
            elif key == "check":
                typer.echo(f"check against {model}: {value}" if value is not None else "check: skipped (no --model)")
            else:
                typer.echo(f"{key}: {value}")
    if check not in (None, "ok"):
        raise typer.Exit(1)


@app.command()
def tasks(folder: Annotated[Path, typer.Argument(help="a deltas folder")]) -> None:
    """List the deltas a server would load from a folder (bad files are flagged)."""
    store = DeltaStore(folder)
    names = store.scan(regular_only=False)  # a link or FIFO under a delta's name is listed, not read
    if not names:
        typer.echo(f"no deltas in {folder}")
        return
    rows = [("task", "version", "problem_type", "labels", "scheme", "bytes", "status")]
    for task in names:
        path = store.path_for(task)
        try:
            data = store.read(task) or b""
        except InvalidDelta as e:
            rows.append((task, "-", "-", "-", "-", "-", f"not read: {e.message}"))
            continue
        try:
            file = delta_io.parse(data, source=str(path))
            d = file.delta
            status = "ok" if d.task == task else f"metadata names task {d.task!r}"
            rows.append((task, file.version, d.problem_type, ",".join(d.labels), d.scheme, str(len(data)), status))
        except InvalidDelta as e:
            rows.append((task, "-", "-", "-", "-", str(len(data)), f"invalid: {e.message}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


@app.command()
def export(
    path: Annotated[Path, typer.Argument(help="a delta file (.safetensors)")],
    out: Annotated[Path, typer.Option(help="the folder to write (must not exist, or be empty)")],
    model: Annotated[Optional[str], typer.Option(help="the base the delta was trained on: a folder, a hub id, "
                                                      "or 'default' (bundled MiniLM); default: the delta's "
                                                      "base_model if it is a local folder, else the bundled "
                                                      "MiniLM")] = None,
) -> None:
    """Write a delta as a folder standard loaders read: pooling 'pooler' -> a transformers
    AutoModelForSequenceClassification folder; 'mean' / 'cls' -> a sentence-transformers folder."""
    from transformers.utils import logging as hf_logging

    from bitfit_serve.interop.hf_export import ExportError, export_delta

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # stderr carries the error line only
    try:
        exported = export_delta(path, out, model)
    except (InvalidDelta, ExportError, ValueError, OSError) as e:
        message = getattr(e, "message", None) or (f"{e.strerror}: {e.filename}" if isinstance(e, OSError)
                                                  and e.strerror else str(e))
        typer.echo(f"error: {' '.join(message.split())}", err=True)  # one line
        raise typer.Exit(1)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    typer.echo(f"wrote {exported.path} ({exported.form}, pooling {exported.pooling}, "
               f"{exported.problem_type}, labels {', '.join(exported.labels)})")
    typer.echo("load it with:\n" + exported.usage)


@app.command("import-peft")
def import_peft(
    adapter: Annotated[Path, typer.Argument(help="a PEFT adapter folder (adapter_config.json + "
                                                 "adapter_model.safetensors): BEFT or LN_TUNING")],
    task: Annotated[str, typer.Option(help="the task name of the delta")],
    model: Annotated[Optional[str], typer.Option(help="the base to serve on ('default' = bundled MiniLM); default: "
                                                      "the adapter's base_model_name_or_path if local")] = None,
    out: Annotated[Optional[Path], typer.Option(help="the delta file to write (default: <task>.safetensors)")] = None,
    pooling: Annotated[Optional[str], typer.Option(help="pooler, cls or mean: required only for a head of a "
                                                        "custom model class")] = None,
    label: Annotated[Optional[list[str]], typer.Option("--label", "--labels", help="label names in class order "
                                                       "(repeat, or comma-separated)")] = None,
    problem_type: Annotated[Optional[str], typer.Option(help="single_label_classification, "
                                                             "multi_label_classification or regression")] = None,
    input_name: Annotated[Optional[list[str]], typer.Option("--input", help="input field name(s); two for a "
                                                            "sentence-pair task (default: text)")] = None,
    max_length: Annotated[int, typer.Option(help="token limit for truncation")] = 128,
) -> None:
    """Convert a Hugging Face PEFT adapter (BEFT or LN tuning + a saved classifier) into a delta file."""
    from bitfit_serve.errors import BitfitError
    from bitfit_serve.interop.peft_import import import_peft as convert

    labels = [name.strip() for value in label or () for name in value.split(",") if name.strip()]
    try:
        imported = convert(adapter, task, model=model, pooling=pooling, labels=labels or None,
                           problem_type=problem_type, inputs=tuple(input_name or ("text",)), max_length=max_length)
        path = delta_io.save(imported.delta, out or Path(f"{imported.delta.task}.safetensors"))
    except (BitfitError, OSError, ValueError) as e:  # + a --model that cannot be loaded, an unwritable --out
        typer.echo(f"error: {' '.join(str(getattr(e, 'message', e)).split())}", err=True)  # one line
        raise typer.Exit(1)
    for warning in imported.warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"imported {imported.peft_type} adapter {adapter} -> {path}: {imported.summary()}")
