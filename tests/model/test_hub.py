"""--model as a Hugging Face id: resolved from the local HF cache (HF_HUB_OFFLINE honoured, never
a download here), its commit reported; a model that cannot be found is a one-line error."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from bitfit_serve.cli import app
from bitfit_serve.engine import Engine
from bitfit_serve.model.base import ModelNotFound, resolve_model_path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def hub_cache(tmp_path, tiny_bert_dir, monkeypatch):
    """A cache laid out as huggingface_hub lays it out: models--acme--tiny-bert/{refs/main, snapshots/<commit>}."""
    repo = tmp_path / "hub" / "models--acme--tiny-bert"
    for commit in (COMMIT, OLD):
        shutil.copytree(tiny_bert_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "v1").write_text(OLD)
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo


def test_a_hub_id_resolves_from_the_cache_with_its_commit(hub_cache, tiny_bert_dir):
    assert resolve_model_path("acme/tiny-bert") == hub_cache / "snapshots" / COMMIT
    assert resolve_model_path("acme/tiny-bert", revision="v1") == hub_cache / "snapshots" / OLD
    engine = Engine.from_pretrained("acme/tiny-bert")
    assert engine.base.source == "acme/tiny-bert" and engine.base.commit == COMMIT
    # the same weights as the folder it was copied from: deltas trained on one serve on the other
    assert engine.base.fingerprint == Engine.from_pretrained(tiny_bert_dir).base.fingerprint
    assert Engine.from_pretrained(tiny_bert_dir).base.commit is None


@pytest.mark.parametrize("name, revision, message", [
    ("acme/absent", None, "not found in the local Hugging Face cache"),
    ("acme/tiny-bert", "no-such-branch", "at revision 'no-such-branch' not found"),
    ("not a valid id!", None, "neither a local model folder nor a Hugging Face model id"),
])
def test_a_model_that_cannot_be_found_is_a_one_line_error(hub_cache, name, revision, message):
    with pytest.raises(ModelNotFound, match=message):
        resolve_model_path(name, revision)


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve_model_path(tmp_path)


def test_serve_names_the_missing_model_without_a_traceback(hub_cache, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("must not start"))
    r = CliRunner().invoke(app, ["serve", "--model", "acme/absent"], env={"COLUMNS": "300"})
    assert r.exit_code == 2 and "not found in the local Hugging Face cache" in r.output
    assert "Traceback" not in r.output


@pytest.mark.anyio
async def test_the_tei_info_reports_the_commit(hub_cache, deltas_dir):
    from tests.server.conftest import serving

    async with serving(Engine.from_pretrained("acme/tiny-bert"), deltas_dir) as client:
        info = (await client.get("/info")).json()
    assert info["model_id"] == "acme/tiny-bert" and info["model_sha"] == COMMIT
