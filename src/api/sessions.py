"""Client sessions: their life (create, heartbeat, finish) and what the SDK's RestClient and
`tinker session export-trace` read about them (list, search, get, trace export).

A caller sees only its own sessions (an admin key every key's with `access_scope=accessible` or
`owner: accessible`); another key's session answers 404, as if it did not exist. A session's
trace is a Perfetto file built from its recorded futures (`src/session_trace.py`), fetched from a
signed link on this worker (no API key needed, valid for `TINK_DOWNLOAD_URL_TTL_S`).

    $ TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-... tinker session export-trace <session-id>
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

from flask import Blueprint, Response, current_app, jsonify, request
from tinker import types as sdk
from werkzeug.exceptions import Forbidden

from ..auth import UrlSigner
from ..backends import UserInputError
from ..session_trace import build_trace
from ..store import SESSION_EXPIRED
from ..wire import FinishSessionRequest, parse_json
from ..worker import GoneError, NotFoundError
from .common import caller, json_body, query_int, worker

bp = Blueprint("sessions", __name__, url_prefix="/api/v1")

SIGNED_TRACES_PREFIX = "/api/v1/trace_files/"  # served without an API key: the signature is the authority
DEFAULT_PROJECT = "default"  # the project of a session created without one
ACTIVE_WITHIN_S = 60.0  # a session heard from this recently is active (the SDK heartbeats every 10 s)
MAX_PAGE = 1000  # the most session ids one `GET /sessions` answers
ACCESS_SCOPES = ("owned", "accessible")


# ---------------------------------------------------------------------------- life


@bp.post("/create_session")
def create_session():
    req = parse_json(sdk.CreateSessionRequest, json_body())
    session_id = f"session-{uuid.uuid4().hex}"
    worker().store.add_session(session_id, caller().owner, req.sdk_version, list(req.tags), req.user_metadata,
                               req.display_name, req.project_id)
    return jsonify({"type": "create_session", "session_id": session_id})


@bp.post("/session_heartbeat")
def session_heartbeat():
    """Keeps the session from expiring (TINK_SESSION_EXPIRY_S). A finished session is never revived:
    410, on which the SDK stops its heartbeat loop."""
    req = parse_json(sdk.SessionHeartbeatRequest, json_body())
    record = visible_session(req.session_id, "owned")
    if record["finish_reason"] == SESSION_EXPIRED:
        raise GoneError(f"session {req.session_id!r} expired ({record['finish_detail']}); its training runs "
                        "were saved and unloaded: create a new ServiceClient", "session_id")
    if record["finish_reason"]:
        raise GoneError(f"session {req.session_id!r} was closed by its client ({record['finish_reason']})",
                        "session_id")
    worker().store.touch_session(req.session_id)
    return jsonify({"type": "session_heartbeat"})


@bp.post("/sessions/<session_id>/finish")
def finish_session(session_id: str):
    """`ServiceClient.close`: the first reason given is kept (a later close changes nothing). The
    session's live models are unloaded then, as the SDK promises that a closed session takes no more
    operations: their adapter slots and trainer memory go back, their runs and checkpoints stay."""
    req = parse_json(FinishSessionRequest, json_body())
    visible_session(session_id, "owned")
    if worker().store.finish_session(session_id, req.reason.type, req.detail):
        worker().release_session_models(caller(), session_id)
    return jsonify({})


# ---------------------------------------------------------------------------- reading


@bp.get("/sessions")
def list_sessions():
    """The SDK's `ListSessionsResponse`: session ids, newest first, `limit` from `offset`."""
    limit = query_int("limit", 20, 1, MAX_PAGE)
    offset = query_int("offset", 0, 0, None)
    c = caller()
    owner = None if _access_scope() == "accessible" and c.admin else c.owner
    ids = worker().store.session_ids_page(owner, limit, offset)
    return jsonify(sdk.ListSessionsResponse(sessions=ids).model_dump(mode="json"))


@bp.get("/sessions/<session_id>")
def get_session(session_id: str):
    """The SDK's `GetSessionResponse`: the training runs and samplers opened in the session."""
    record = visible_session(session_id, _access_scope())
    models, samplers = worker().store.session_members(session_id, record["owner"])
    answer = sdk.GetSessionResponse(training_run_ids=models, sampler_ids=samplers,
                                    user_metadata=_metadata(record), display_name=record["display_name"])
    return jsonify(answer.model_dump(mode="json"))


@bp.post("/sessions/search")
def search_sessions():
    """The SDK's `SessionSearchResponse`: one page of matching sessions, newest first."""
    req = parse_json(sdk.SessionSearchRequest, json_body())
    c = caller()
    store = worker().store
    now = time.time()
    after = None if req.cursor is None else (req.cursor.last_created_at, req.cursor.last_session_id)
    rows = sorted(((_created(r), r) for r in store.list_sessions(None if c.admin else c.owner)),
                  key=lambda pair: (pair[0], pair[1]["session_id"]), reverse=True)
    page: list[sdk.SessionSummary] = []
    next_cursor = None
    for created, record in rows:
        if after is not None and (created, record["session_id"]) >= after:
            continue
        if not _matches(req, record, c.owner, now):
            continue
        if len(page) == req.limit:
            last = page[-1]
            next_cursor = sdk.SessionSearchCursor(last_created_at=last.created_at, last_session_id=last.session_id)
            break
        count, size = store.session_checkpoint_usage(record["session_id"], record["owner"])
        page.append(sdk.SessionSummary(
            session_id=record["session_id"], created_at=created, owner=record["owner"],
            project_id=record["project_id"] or DEFAULT_PROJECT, status=session_status(record, now),
            checkpoints_count=count, checkpoint_storage_bytes=size, display_name=record["display_name"],
            user_metadata=_metadata(record)))
    return jsonify(sdk.SessionSearchResponse(sessions=page, next_cursor=next_cursor).model_dump(mode="json"))


# ---------------------------------------------------------------------------- trace export


@bp.get("/sessions/<session_id>/trace_export")
def trace_export(session_id: str):
    """The SDK's export poll: always `ready` (the trace is built from the database when fetched),
    with a signed link to it on this worker."""
    visible_session(session_id, "accessible")
    w = worker()
    expires = int(time.time()) + w.config.download_url_ttl_s
    resource = f"{SIGNED_TRACES_PREFIX}{session_id}.pftrace"
    query = urlencode({"expires": expires, "signature": url_signer().sign(resource, expires)})
    base = (w.config.public_url or request.host_url).rstrip("/")
    return jsonify({"status": "ready", "url": f"{base}{quote(resource)}?{query}"})


@bp.get(f"{SIGNED_TRACES_PREFIX.removeprefix('/api/v1')}<session_id>.pftrace")
def trace_file(session_id: str):
    """The `.pftrace` of the session as it stands now; the link's signature is the authority."""
    refusal = url_signer().refusal(request.path, request.args.get("expires"), request.args.get("signature"))
    if refusal:
        raise Forbidden(refusal)
    store = worker().store
    record = store.get_session(session_id)
    if record is None:
        raise NotFoundError(f"unknown session_id {session_id!r}", "session_id")
    trace = build_trace(session_id, store.session_futures(session_id, record["owner"]), now=time.time())
    return Response(trace, mimetype="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{session_id}.pftrace"'})


# ---------------------------------------------------------------------------- helpers


def visible_session(session_id: str, access_scope: str) -> dict[str, Any]:
    """The session's record if the caller may see it in `access_scope` (`owned`: its own only;
    `accessible`: an admin key's reach too); else a 404 naming `session_id`."""
    record = worker().store.get_session(session_id)
    c = caller()
    allowed = record is not None and (record["owner"] == c.owner or (access_scope == "accessible" and c.admin))
    if not allowed:
        raise NotFoundError(f"unknown session_id {session_id!r}", "session_id")
    return record


def session_status(record: dict[str, Any], now: float) -> sdk.SessionStatus | None:
    """Cancelled once the worker expired it (the SDK's status for a session ended server-side);
    finished once its client closed it; active while it heartbeats; else unknown (None)."""
    if record["finish_reason"] == SESSION_EXPIRED:
        return sdk.SessionCancelled(detail=f"expired: {record['finish_detail']}")
    if record["finish_reason"]:
        return sdk.ClientSessionFinished(reason={"type": record["finish_reason"]}, detail=record["finish_detail"])
    if now - (record["last_heartbeat_at"] or record["created_at"]) <= ACTIVE_WITHIN_S:
        return sdk.SessionActive()
    return None


def url_signer() -> UrlSigner:
    return current_app.extensions["tink.url_signer"]


def _matches(req: sdk.SessionSearchRequest, record: dict[str, Any], own: str, now: float) -> bool:
    owner = req.owner
    if isinstance(owner, sdk.OwnSearchOwner) and record["owner"] != own:
        return False
    if isinstance(owner, sdk.UserSearchOwner) and record["owner"] not in owner.owner_urns:
        return False
    if req.project_ids is not None and (record["project_id"] or DEFAULT_PROJECT) not in req.project_ids:
        return False
    if req.session_id is not None or req.display_name is not None:
        by_id = req.session_id == record["session_id"]
        name = (record["display_name"] or "").lower()
        by_name = req.display_name is not None and all(w in name for w in req.display_name.lower().split())
        if not (by_id or by_name):
            return False
    metadata = _metadata(record) or {}
    if any(metadata.get(k) != v for k, v in req.user_metadata.items()):
        return False
    if req.statuses is not None:
        status = session_status(record, now)
        return any(_status_matches(query, status) for query in req.statuses)
    return True


def _status_matches(query: Any, status: sdk.SessionStatus | None) -> bool:
    if status is None or query.type != status.type:
        return False
    reasons = getattr(query, "reasons", None)
    return not reasons or status.reason.type in reasons


def _metadata(record: dict[str, Any]) -> dict[str, str] | None:
    """The session's user_metadata as the SDK reads it (string values; others as their JSON)."""
    metadata = record["user_metadata"]
    if metadata is None:
        return None
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


def _created(record: dict[str, Any]) -> datetime:
    return datetime.fromtimestamp(record["created_at"], tz=UTC)


def _access_scope() -> str:
    scope = request.args.get("access_scope", "owned")
    if scope not in ACCESS_SCOPES:
        raise UserInputError(f"access_scope must be one of {', '.join(ACCESS_SCOPES)}, got {scope!r}",
                             "access_scope")
    return scope
