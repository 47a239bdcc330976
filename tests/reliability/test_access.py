"""Access control (issue 7, point 10): admin routes need the token (constant-time compare, 401 /
403); no open admin routes beyond loopback unless told (the Settings rules: tests/test_settings.py);
optional API key for inference routes."""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import shutil

import pytest

from bitfit_serve.http import auth
from tests.factories import SENTENCES
from tests.reliability.live import ENV
from tests.server.conftest import assert_error, serving, write_delta

OCTET = {"Content-Type": "application/octet-stream"}


def _bearer(token: str) -> dict[str, bytes]:
    return {"Authorization": b"Bearer " + token.encode()}  # bytes: non-ASCII tokens go out as UTF-8


@pytest.mark.anyio
async def test_admin_token_and_api_key(engine, deltas_dir, delta_bytes):
    write_delta(deltas_dir, "a", delta_bytes("a"))
    data = delta_bytes("b")
    async with serving(engine, deltas_dir, admin_token="admin-secret", api_key="api-secret") as client:
        body = {"inputs": SENTENCES[:2]}
        mixed = {"items": [{"task": "a", "inputs": ["x"]}]}
        inference = [("POST", "/v1/tasks/a/predict", body), ("POST", "/v1/predict", mixed),
                     ("GET", "/v1/tasks", None), ("GET", "/v1/tasks/a", None)]
        for method, path, payload in inference:
            assert_error(await client.request(method, path, json=payload), 401, "unauthorized")
            r = await client.request(method, path, json=payload, headers={"Authorization": "Basic YTpi"})
            assert_error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"] == "Bearer"
            for wrong in ("api-secre", "api-secret2", "API-SECRET", "x" * 1000, "ápi"):
                r = await client.request(method, path, json=payload, headers=_bearer(wrong))
                assert_error(r, 403, "forbidden")
            for key in ("api-secret", "admin-secret"):
                r = await client.request(method, path, json=payload, headers=_bearer(key))
                assert r.status_code == 200, (path, r.text)
        # Admin routes: the API key is not enough; wrong or missing tokens change nothing.
        for headers, status in [({}, 401), (_bearer("api-secret"), 403), (_bearer("admin-secre"), 403),
                                ({"Authorization": "Bearer"}, 401), ({"Authorization": "admin-secret"}, 401)]:
            assert (await client.put("/v1/tasks/b", content=data, headers={**OCTET, **headers})).status_code == status
            assert (await client.delete("/v1/tasks/a", headers=headers)).status_code == status
        assert sorted(p.name for p in deltas_dir.iterdir()) == ["a.safetensors"]
        assert (await client.put("/v1/tasks/b", content=data, headers={**OCTET, **_bearer("admin-secret")})).status_code == 201
        assert (await client.delete("/v1/tasks/a", headers=_bearer("admin-secret"))).status_code == 200
        # Operations stay open for probes and scrapers.
        for path in ("/health", "/ready", "/metrics"):
            assert (await client.get(path)).status_code == 200


def test_tokens_are_compared_in_constant_time():
    """Every secret compare in the server goes through hmac.compare_digest, never ``==``."""
    tree = ast.parse(inspect.getsource(auth))
    compared = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Compare)
                and any(("token" in ast.unparse(x) or "key" in ast.unparse(x)) and "admin_token" in ast.unparse(x)
                        or "api_key" in ast.unparse(x) for x in [n.left, *n.comparators])
                and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in n.ops)]
    assert not compared, compared
    assert inspect.getsource(auth).count("hmac.compare_digest") >= 2


def test_cli_refuses_before_binding(tmp_path):
    """The real CLI exits with an error before loading a model or opening a socket."""
    cmd = [shutil.which("bitfit-serve") or "bitfit-serve", "serve", "--host", "0.0.0.0", "--port", "1",
           "--model", str(tmp_path / "no-model"), "--deltas", str(tmp_path / "d")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, **ENV})
    assert r.returncode == 2 and "refusing to listen" in r.stderr and "allow-insecure-admin" in r.stderr
    assert not (tmp_path / "d").exists()
