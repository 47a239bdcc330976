"""``bitfit-serve``: run the HTTP server, inspect a delta file, list a deltas folder.

    bitfit-serve serve --model default --deltas deltas           # every flag also BITFIT_SERVE_<FLAG>
    bitfit-serve inspect deltas/sst2.safetensors --model default
    bitfit-serve tasks deltas
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from bitfit_serve import delta as delta_io
from bitfit_serve.errors import InvalidDelta
from bitfit_serve.settings import ENV_PREFIX, Settings
from bitfit_serve.store import DeltaStore

app = typer.Typer(help="Serve thousands of BitFit tasks from one frozen encoder.", no_args_is_help=True,
                  add_completion=False)

_D = Settings()  # the defaults, shown in --help


def _opt(name: str, help: str, flag: bool = False):
    """An option settable as ``--name`` or by the env var ``BITFIT_SERVE_NAME``."""
    decl = f"--{name}/--no-{name}" if flag else f"--{name}"
    return typer.Option(decl, envvar=f"{ENV_PREFIX}{name.upper().replace('-', '_')}", help=help)


@app.command()
def serve(
    model: Annotated[str, _opt("model", "HF model folder, or 'default' for the bundled MiniLM")] = _D.model,
    deltas: Annotated[Path, _opt("deltas", "deltas folder: loaded at start-up, watched, uploads land here "
                                            "(created if missing)")] = _D.deltas,
    host: Annotated[str, _opt("host", "address to listen on")] = _D.host,
    port: Annotated[int, _opt("port", "port to listen on")] = _D.port,
    device: Annotated[str, _opt("device", "cpu, cuda, cuda:1, ...")] = _D.device,
    dtype: Annotated[str, _opt("dtype", "float32, float16 or bfloat16")] = _D.dtype,
    threads: Annotated[Optional[int], _opt("threads", "CPU threads per forward pass (default: one per core)")] = None,
    max_batch_tokens: Annotated[int, _opt("max-batch-tokens", "padded tokens per forward pass")] = _D.max_batch_tokens,
    max_batch_requests: Annotated[int, _opt("max-batch-requests", "sequences per forward pass")] = _D.max_batch_requests,
    forward_overhead_tokens: Annotated[Optional[int], _opt(
        "forward-overhead-tokens", "cost of one more forward in padded tokens: mixed lengths are cut into "
                                   "batches where padding costs more (default: CPU 64, GPU 16384)")] = None,
    max_queue: Annotated[int, _opt("max-queue", "sequences waiting before 503 + Retry-After")] = _D.max_queue,
    max_texts_per_request: Annotated[int, _opt("max-texts-per-request", "inputs per request")] = _D.max_texts_per_request,
    max_chars_per_text: Annotated[int, _opt("max-chars-per-text", "characters per text")] = _D.max_chars_per_text,
    max_items_per_predict: Annotated[int, _opt("max-items-per-predict", "items per POST /v1/predict")] = _D.max_items_per_predict,
    max_request_bytes: Annotated[int, _opt("max-request-bytes", "JSON body size cap")] = _D.max_request_bytes,
    max_upload_bytes: Annotated[int, _opt("max-upload-bytes", "delta upload size cap")] = _D.max_upload_bytes,
    admin_token: Annotated[Optional[str], _opt("admin-token", "token for PUT/DELETE /v1/tasks/{task} "
                                                              "(Authorization: Bearer <token>)")] = None,
    allow_insecure_admin: Annotated[bool, _opt("allow-insecure-admin", "allow open admin routes (no token) on a "
                                                                       "non-loopback host", flag=True)] = False,
    api_key: Annotated[Optional[str], _opt("api-key", "key for inference and task listing "
                                                      "(Authorization: Bearer <key>)")] = None,
    watch: Annotated[bool, _opt("watch", "watch the deltas folder for changes", flag=True)] = _D.watch,
    metrics_per_task: Annotated[bool, _opt("metrics-per-task", "per-task Prometheus labels", flag=True)] = _D.metrics_per_task,
    log_level: Annotated[str, _opt("log-level", "debug, info, warning, error")] = _D.log_level,
) -> None:
    """Run the HTTP server (OpenAPI docs at /docs)."""
    import torch
    import uvicorn

    from bitfit_serve.engine import Engine
    from bitfit_serve.server import create_app

    try:
        settings = Settings(model=model, deltas=deltas, host=host, port=port, device=device, dtype=dtype,
                            threads=threads, max_batch_tokens=max_batch_tokens, max_batch_requests=max_batch_requests,
                            forward_overhead_tokens=forward_overhead_tokens, max_queue=max_queue,
                            max_texts_per_request=max_texts_per_request,
                            max_chars_per_text=max_chars_per_text, max_items_per_predict=max_items_per_predict,
                            max_request_bytes=max_request_bytes, max_upload_bytes=max_upload_bytes,
                            admin_token=admin_token, allow_insecure_admin=allow_insecure_admin,
                            api_key=api_key, watch=watch,
                            metrics_per_task=metrics_per_task, log_level=log_level)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)  # process-wide, before any forward; the inference thread inherits it
    engine = Engine.from_pretrained(None if settings.model == "default" else settings.model,
                                    device=settings.device, dtype=settings.dtype,
                                    forward_overhead_tokens=settings.forward_overhead_tokens)
    uvicorn.run(create_app(engine, settings), host=settings.host, port=settings.port,
                log_level=settings.log_level.lower())


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
        delta = delta_io.from_bytes(data, source=str(path))
    except InvalidDelta as e:
        typer.echo(f"invalid delta: {e.message}", err=True)
        raise typer.Exit(1)
    check = None
    if model is not None:
        from bitfit_serve.engine import Engine

        try:
            Engine.from_pretrained(None if model == "default" else model).check(delta)
            check = "ok"
        except InvalidDelta as e:
            check = e.message
    meta = {k: v for k, v in delta.metadata().items() if k not in ("metrics", "train_args", "labels", "inputs")}
    info = {
        **meta, "labels": list(delta.labels), "inputs": list(delta.inputs), "metrics": dict(delta.metrics),
        "train_args": dict(delta.train_args), "version": delta_io.sha256_bytes(data)[:16],
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
    names = store.scan()
    if not names:
        typer.echo(f"no deltas in {folder}")
        return
    rows = [("task", "version", "problem_type", "labels", "scheme", "bytes", "status")]
    for task in names:
        path = store.path_for(task)
        data = path.read_bytes()
        try:
            d = delta_io.from_bytes(data, source=str(path))
            status = "ok" if d.task == task else f"metadata names task {d.task!r}"
            rows.append((task, delta_io.sha256_bytes(data)[:16], d.problem_type, ",".join(d.labels), d.scheme,
                         str(len(data)), status))
        except InvalidDelta as e:
            rows.append((task, "-", "-", "-", "-", str(len(data)), f"invalid: {e.message}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
