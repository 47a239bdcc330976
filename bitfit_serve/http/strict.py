"""Strict request JSON: a body with a duplicate key is refused (400) instead of silently keeping
the last value, on every route (each router uses ``StrictJSONRoute``)."""

from __future__ import annotations

import json
from typing import Any, Callable

from fastapi import Request
from fastapi.routing import APIRoute


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            # FastAPI turns a JSONDecodeError into its 400 request-validation error, message kept
            raise json.JSONDecodeError(f"duplicate key {key!r}", "", 0)
        seen.add(key)
    return dict(pairs)


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), object_pairs_hook=_unique_keys)
        return self._json


class StrictJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def strict(request: Request):
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict
