"""``Settings``: its rules, and ``bitfit-serve serve``'s options generated from its fields."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import typer
from pydantic import ValidationError
from typer.testing import CliRunner

from bitfit_serve.cli import app
from bitfit_serve.settings import ENV_PREFIX, Settings

runner = CliRunner()

POSITIVE_INTS = ["max_batch_tokens", "max_batch_requests", "max_queue", "retry_after_s", "max_texts_per_request",
                 "max_chars_per_text", "max_items_per_predict", "max_request_bytes", "max_upload_bytes",
                 "max_connections", "max_concurrent_uploads", "max_tokens_per_request", "max_tasks", "max_bank_bytes",
                 "max_labels_per_task", "max_label_chars", "max_metadata_bytes", "max_response_bytes"]
FLAGS = ["--model", "--revision", "--deltas", "--host", "--port", "--device", "--dtype", "--threads", "--max-batch-tokens",
         "--max-batch-requests", "--forward-overhead-tokens", "--max-queue", "--retry-after-s",
         "--max-texts-per-request", "--max-chars-per-text", "--max-items-per-predict", "--max-tokens-per-request",
         "--max-request-bytes", "--max-tasks", "--max-bank-bytes", "--max-labels-per-task", "--max-label-chars",
         "--max-metadata-bytes", "--max-response-bytes", "--scores-max-labels",
         "--max-upload-bytes", "--header-timeout-s", "--body-timeout-s", "--keep-alive-s", "--max-connections",
         "--max-concurrent-uploads", "--admin-token", "--allow-insecure-admin", "--api-key", "--auto-truncate",
         "--default-task", "--watch", "--metrics-per-task", "--log-level", "--log-format"]
WIDE = {"COLUMNS": "400"}  # typer's rich help and errors: no wrapped or cut lines


@pytest.fixture(autouse=True)
def no_settings_env(monkeypatch):
    """Settings() reads BITFIT_SERVE_*: none from the shell running the tests."""
    for name in os.environ:
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def serve_options() -> dict:
    return {p.name: p for p in typer.main.get_command(app).commands["serve"].params if p.name != "help"}


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com", ""])
def test_open_admin_beyond_loopback_is_refused(host):
    with pytest.raises(ValueError, match="refusing to listen"):
        Settings(host=host)
    Settings(host=host, admin_token="t")  # with a token: allowed
    Settings(host=host, allow_insecure_admin=True)  # told explicitly: allowed


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_loopback_may_run_without_token(host):
    Settings(host=host)


@pytest.mark.parametrize("field", ["admin_token", "api_key"])
def test_empty_secrets_are_refused(field):
    with pytest.raises(ValueError, match=f"{field} must not be empty"):
        Settings(**{field: "  "})


@pytest.mark.parametrize("field", POSITIVE_INTS)
def test_limits_are_positive_integers(field):
    assert Settings(**{field: 1}).model_dump()[field] == 1
    for bad in (0, -1, 1.5, "many"):
        with pytest.raises(ValueError, match=field):
            Settings(**{field: bad})


def test_optional_and_ranged_numbers():
    assert Settings().threads is None and Settings(threads=3).threads == 3
    with pytest.raises(ValueError, match="threads"):
        Settings(threads=0)
    assert Settings().forward_overhead_tokens is None and Settings(forward_overhead_tokens=0).forward_overhead_tokens == 0
    with pytest.raises(ValueError, match="forward_overhead_tokens"):
        Settings(forward_overhead_tokens=-1)
    assert Settings(port=0).port == 0 and Settings(port=65535).port == 65535
    for bad in (-1, 65536):
        with pytest.raises(ValueError, match="port"):
            Settings(port=bad)


def test_keyword_construction_defaults_and_frozen(tmp_path):
    s = Settings(deltas=str(tmp_path), admin_token="t")
    assert s.deltas == tmp_path and isinstance(s.deltas, Path) and s.admin_token == "t"
    assert Settings().deltas == Path("deltas") and Settings().max_queue == 2048 and Settings().watch is True
    with pytest.raises(ValidationError):
        s.max_queue = 1
    with pytest.raises(ValueError, match="no_such_setting"):
        Settings(no_such_setting=1)


def test_env_vars_fill_what_keywords_do_not(monkeypatch):
    monkeypatch.setenv(f"{ENV_PREFIX}MAX_QUEUE", "7")
    assert Settings().max_queue == 7
    assert Settings(max_queue=9).max_queue == 9


def test_every_setting_is_a_cli_option_with_an_env_var():
    options = serve_options()
    assert list(options) == list(Settings.model_fields)
    for name, field in Settings.model_fields.items():
        option = options[name]
        flag = "--" + name.replace("_", "-")
        assert option.opts == [flag]
        assert option.secondary_opts == ([f"--no-{flag[2:]}"] if field.annotation is bool else [])
        assert option.envvar == f"{ENV_PREFIX}{name.upper()}"
        assert option.help == field.description and field.description
        assert option.default == field.default
    assert sorted(o for p in options.values() for o in p.opts) == sorted(FLAGS)
    help_text = runner.invoke(app, ["serve", "--help"], env=WIDE)
    assert help_text.exit_code == 0
    for name in Settings.model_fields:
        assert f"{ENV_PREFIX}{name.upper()}" in help_text.output


def test_env_var_reaches_the_settings_the_cli_builds(monkeypatch, tmp_path):
    import uvicorn

    from bitfit_serve import server
    from bitfit_serve.engine import Engine

    seen = {}
    monkeypatch.setattr(Engine, "from_pretrained", lambda *args, **kwargs: "engine")
    monkeypatch.setattr(server, "create_app", lambda engine, settings: seen.update(settings=settings) or "app")
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(app=app, **kwargs))
    r = runner.invoke(app, ["serve", "--deltas", str(tmp_path), "--no-watch"],
                      env={f"{ENV_PREFIX}MAX_QUEUE": "7", f"{ENV_PREFIX}PORT": "8123"})
    assert r.exit_code == 0, r.output
    settings = seen["settings"]
    assert settings.max_queue == 7 and settings.port == 8123 and seen["port"] == 8123 and seen["app"] == "app"
    assert settings.deltas == tmp_path and settings.watch is False
    assert settings == Settings(deltas=tmp_path, watch=False, max_queue=7, port=8123)


@pytest.mark.parametrize("args, env, message", [
    (["--max-queue", "0"], {}, "Invalid value for '--max-queue': max_queue must be a positive integer, got 0"),
    ([], {f"{ENV_PREFIX}MAX_QUEUE": "0"}, "max_queue must be a positive integer, got 0"),
    (["--port", "70000"], {}, "Invalid value for '--port': port must be <= 65535, got 70000"),
    (["--api-key", " "], {}, "Invalid value for '--api-key': api_key must not be empty"),
])
def test_a_bad_value_is_a_one_line_usage_error(args, env, message):
    r = runner.invoke(app, ["serve", *args], env={**WIDE, **env})
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert "Traceback" not in r.output
    assert [line for line in r.output.splitlines() if message in line], r.output
