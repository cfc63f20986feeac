"""`retrieve_future`: long-polls a future and answers its result in the form the client accepts."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request
from tinker import types as sdk

from ..wire import PROTO_CONTENT_TYPE, parse_json, proto_result_to_json
from ..worker import NotFoundError
from .common import caller, json_body, worker

bp = Blueprint("futures", __name__, url_prefix="/api/v1")


@bp.post("/retrieve_future")
def retrieve_future():
    req = parse_json(sdk.FutureRetrieveRequest, json_body())
    w = worker()
    known = w.store.get_future(req.request_id)
    if known is None or not caller().may_see(known.owner):
        raise NotFoundError(f"unknown request_id {req.request_id!r}", "request_id")
    # Wait server-side (the SDK re-polls at once on try_again, so an immediate answer would spin).
    record = w.scheduler.wait(req.request_id, w.config.retrieve_wait_s) or known
    if record.status == "failed":
        return jsonify({"error": record.error, "category": record.category or "unknown"})
    if record.status != "done":
        return jsonify({"type": "try_again", "request_id": record.request_id, "queue_state": "active"})
    if record.result_kind == "json":
        return Response(record.result, mimetype="application/json")
    if PROTO_CONTENT_TYPE in request.headers.get("Accept", ""):
        return Response(record.result, mimetype=PROTO_CONTENT_TYPE)
    return jsonify(proto_result_to_json(record.result_kind, record.result))
