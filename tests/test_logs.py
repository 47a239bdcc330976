"""--log-format json: one JSON object per line, for our loggers and uvicorn's access log alike."""

from __future__ import annotations

import json
import logging
import logging.config

import pytest

from bitfit_serve.logs import log_config


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("name", ["bitfit_serve.tasks", "uvicorn.access"])
def test_json_lines_for_our_logs_and_uvicorns(name, capsys, restore_logging):
    logging.config.dictConfig(log_config("info", "json"))
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger(name).exception('127.0.0.1 - "GET /ready" 200 "quoted"')
    line = capsys.readouterr().err.strip().splitlines()[-1]
    record = json.loads(line)
    assert record["logger"] == name and record["level"] == "ERROR"
    assert record["message"] == '127.0.0.1 - "GET /ready" 200 "quoted"' and "ValueError: boom" in record["exception"]


def test_text_is_the_default_format(capsys, restore_logging):
    logging.config.dictConfig(log_config("warning", "text"))
    logging.getLogger("bitfit_serve").info("hidden")
    logging.getLogger("bitfit_serve").warning("shown")
    err = capsys.readouterr().err
    assert "hidden" not in err and "WARNING bitfit_serve: shown" in err
