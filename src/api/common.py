"""Helpers shared by the route modules: the worker handle, JSON bodies, query numbers, future answers."""

from __future__ import annotations

from typing import Any

from flask import current_app, g, request

from ..auth import Caller
from ..backends import UserInputError
from ..worker import Worker


def worker() -> Worker:
    return current_app.extensions["tink.worker"]


def caller() -> Caller:
    """Who is calling (set by the app's authentication hook)."""
    return g.caller


def json_body() -> dict[str, Any]:
    """The request's JSON object, or a 400 naming `body` (malformed JSON, wrong type)."""
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # json's C parser recurses once per nesting level
        raise UserInputError("request body is nested too deeply", "body") from None
    if body is None:
        raise UserInputError("request body must be valid JSON (Content-Type: application/json)", "body")
    if not isinstance(body, dict):
        raise UserInputError("request body must be a JSON object", "body")
    return body


def query_int(name: str, default: int, minimum: int, maximum: int | None) -> int:
    """An integer query parameter (paging) within [minimum, maximum], or a 400 naming it."""
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UserInputError(f"{name} must be an integer, got {raw!r}", name) from None
    if value < minimum or (maximum is not None and value > maximum):
        limit = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise UserInputError(f"{name} must be {limit}, got {value}", name)
    return value


def future(request_id: str, model_id: str | None = None) -> dict[str, Any]:
    """The SDK's `UntypedAPIFuture`."""
    answer: dict[str, Any] = {"request_id": request_id}
    if model_id is not None:
        answer["model_id"] = model_id
    return answer
