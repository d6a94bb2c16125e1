"""Bearer-token auth for /v1/*: one API key per server, from `--api-key` or $MOERAY_API_KEY."""

from __future__ import annotations

import hmac
import os

from moeray.platform.serve.http.errors import APIError

API_KEY_ENV = "MOERAY_API_KEY"


def resolve_api_key(explicit: str | None) -> str | None:
    """`--api-key` if given, else $MOERAY_API_KEY, else None (no auth)."""
    key = explicit if explicit is not None else os.environ.get(API_KEY_ENV)
    return key or None


def check_bearer(authorization: str | None, api_key: str | None) -> None:
    """Raise a 401 APIError unless `authorization` is `Bearer <api_key>` (no-op without a key)."""
    if api_key is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), api_key.encode()
    ):
        raise APIError(
            401,
            "Missing or incorrect API key: send `Authorization: Bearer <key>`",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
