"""Futures: `retrieve_future` long-polls one future and answers its result in the form the client
accepts; `retrieve_futures` long-polls a sampler's completions (the SDK's batched polling);
`cancel_future` stops an operation that has not started."""

from __future__ import annotations

import time

from flask import Blueprint, Response, jsonify, request
from tinker import types as sdk

from ..backends import UserInputError
from ..store import FutureRecord
from ..wire import PROTO_CONTENT_TYPE, CancelFutureRequest, parse_json, proto_result_to_json
from ..worker import NotFoundError
from .common import caller, json_body, worker

bp = Blueprint("futures", __name__, url_prefix="/api/v1")

FAILED = ("failed", "cancelled")  # a cancelled future answers as a failure (category user), as the SDK reads it


@bp.post("/retrieve_future")
def retrieve_future():
    req = parse_json(sdk.FutureRetrieveRequest, json_body())
    w = worker()
    known = _visible_future(req.request_id)
    # Wait server-side (the SDK re-polls at once on try_again, so an immediate answer would spin).
    record = w.scheduler.wait(req.request_id, w.config.retrieve_wait_s) or known
    if record.status in FAILED:
        return jsonify({"error": record.error, "category": record.category or "unknown"})
    if record.status != "done":
        return jsonify({"type": "try_again", "request_id": record.request_id, "queue_state": "active"})
    if record.result_kind == "json":
        return Response(record.result, mimetype="application/json")
    if PROTO_CONTENT_TYPE in request.headers.get("Accept", ""):
        return Response(record.result, mimetype=PROTO_CONTENT_TYPE)
    return jsonify(proto_result_to_json(record.result_kind, record.result))


@bp.post("/retrieve_futures")
def retrieve_futures():
    """The SDK's `FuturesRetrieveResponse`: the requests of one sampling client (sampling session and
    clone) that finished after `prev_cursor`, in finishing order, waiting up to `timeout` seconds
    (at most TINK_RETRIEVE_WAIT_S; 0 answers at once) for the first. Pending ones are not listed:
    the SDK waits for them on the next poll, then fetches each payload with `retrieve_future`."""
    req = parse_json(sdk.FuturesRetrieveRequest, json_body())
    for name, value in (("prev_cursor", req.prev_cursor), ("target.cloned_sampler_id", req.target.cloned_sampler_id),
                        ("timeout", req.timeout or 0)):
        if value < 0:
            raise UserInputError(f"{name} must be >= 0, got {value}", name)
    w = worker()
    sampler = req.target.sampling_session_id
    known = w.store.get_sampling_session(sampler)
    if known is None or not caller().may_see(known["owner"]):
        raise NotFoundError(f"unknown sampling_session_id {sampler!r}", "target.sampling_session_id")
    wait_s = w.config.retrieve_wait_s if req.timeout is None else min(req.timeout, w.config.retrieve_wait_s)
    deadline = time.monotonic() + wait_s
    while True:
        seen = w.scheduler.completion_count()  # before reading, so a completion in between wakes the wait
        done = w.store.sampler_completions(sampler, req.target.cloned_sampler_id, req.prev_cursor)
        left = deadline - time.monotonic()
        if done or left <= 0:
            break
        w.scheduler.wait_for_completion(seen, left)
    completions = [sdk.FutureFailed(request_id=rid) if status in FAILED else
                   sdk.FutureFinished(request_id=rid, response_payload_uncompressed_size=size)
                   for _, rid, status, size in done]
    cursor = done[-1][0] if done else req.prev_cursor
    return jsonify(sdk.FuturesRetrieveResponse(completions=completions, cursor=cursor).model_dump(mode="json"))


@bp.post("/cancel_future")
def cancel_future():
    """Cancel an operation that has not started: it never runs (a cancelled `optim_step` leaves the
    weights as they were) and its future fails as cancelled. One already running or finished is not
    interrupted and keeps its result; the answer says which happened."""
    req = parse_json(CancelFutureRequest, json_body())
    w = worker()
    _visible_future(req.request_id)
    cancelled_now = w.scheduler.cancel(req.request_id)
    record = w.store.get_future(req.request_id)
    assert record is not None  # futures are never deleted
    return jsonify({"request_id": req.request_id, "cancelled": record.status == "cancelled",
                    "status": record.status, "detail": _cancel_detail(record, cancelled_now)})


def _visible_future(request_id: str) -> FutureRecord:
    record = worker().store.get_future(request_id)
    if record is None or not caller().may_see(record.owner):
        raise NotFoundError(f"unknown request_id {request_id!r}", "request_id")
    return record


def _cancel_detail(record: FutureRecord, cancelled_now: bool) -> str:
    if record.status == "cancelled":
        return ("cancelled before it started; nothing of it was applied" if cancelled_now
                else "it was cancelled already")
    if record.status in ("pending", "running"):  # pending here: claimed by the scheduler this instant
        return "it is already running and is not interrupted: it finishes and its result is kept"
    return f"it had already finished ({record.status}); its result is kept"
