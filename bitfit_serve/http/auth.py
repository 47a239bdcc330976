"""Bearer tokens: the admin token for task changes, the API key for inference and listing.

``HTTPBearer`` declares the scheme in OpenAPI; it is used with ``auto_error=False`` so that a
missing or non-bearer header answers our own 401 body (with ``WWW-Authenticate: Bearer``).
Every compare is ``hmac.compare_digest``: the time taken says nothing about how close a guess was.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from bitfit_serve.delta import check_task_name
from bitfit_serve.errors import Forbidden, Unauthorized
from bitfit_serve.http.services import ServicesDep

bearer = HTTPBearer(auto_error=False, description="the admin token (admin routes) or the API key")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _token(credentials: HTTPAuthorizationCredentials | None, missing: str) -> bytes:
    if credentials is None or not credentials.credentials.strip():
        raise Unauthorized(missing)
    return credentials.credentials.strip().encode()


def valid_task_name(task: str) -> None:
    check_task_name(task)  # first of all: before the token, the body, or any disk access


def require_admin(s: ServicesDep, credentials: Credentials) -> None:
    admin_token = s.settings.admin_token
    if admin_token is None:
        return  # no token configured: settings only allow that on loopback or when told explicitly
    token = _token(credentials, "admin route: send 'Authorization: Bearer <admin token>'")
    if not hmac.compare_digest(token, admin_token.encode()):
        raise Forbidden("admin route: the token is not valid")


def require_api_key(s: ServicesDep, credentials: Credentials) -> None:
    settings = s.settings
    if settings.api_key is None:
        return
    token = _token(credentials, "send 'Authorization: Bearer <api key>'")
    # Both compares always run: the time taken says nothing about which key came close.
    valid = [hmac.compare_digest(token, key.encode()) for key in (settings.api_key, settings.admin_token) if key]
    if not any(valid):
        raise Forbidden("the API key is not valid")
