"""Handshake, sessions, capabilities, health, telemetry: what the SDK calls before any work."""

from __future__ import annotations

import uuid

from flask import Blueprint, jsonify
from tinker import types as sdk

from ..wire import parse_json
from .common import caller, json_body, worker

bp = Blueprint("service", __name__, url_prefix="/api/v1")

# Feature flags for SDK 0.38: plain httpx transport, uncompressed protobuf bodies, per-request
# future polling, client-side custom losses, and one forward_backward chunk at a time (the
# worker runs a model's operations in arrival order).
CLIENT_CONFIG = {
    "pjwt_auth_enabled": False,
    "credential_default_source": "api_key",
    "use_pyqwest_transport": False,
    "proto_compress_fwdbwd": False,
    "parallel_fwdbwd_chunks": False,
    "sample_use_retrieve_futures": False,
    "custom_loss_server_side": False,
    "sample_join_sampling_session": False,
}


@bp.post("/client/config")
def client_config():
    return jsonify(CLIENT_CONFIG)


@bp.post("/client/dynamic_config")
def client_dynamic_config():
    return jsonify({"refresh_interval_sec": 300, "sample_cancel_enabled": False})


@bp.get("/healthz")
def healthz():
    return jsonify(worker().health())


@bp.get("/get_server_capabilities")
def capabilities():
    return jsonify(worker().capabilities())


@bp.post("/create_session")
def create_session():
    req = parse_json(sdk.CreateSessionRequest, json_body())
    session_id = f"session-{uuid.uuid4().hex}"
    worker().store.add_session(session_id, caller().owner, req.sdk_version, list(req.tags))
    return jsonify({"type": "create_session", "session_id": session_id})


@bp.post("/session_heartbeat")
def session_heartbeat():
    parse_json(sdk.SessionHeartbeatRequest, json_body())
    return jsonify({"type": "session_heartbeat"})


@bp.post("/sessions/<session_id>/finish")
def finish_session(session_id: str):
    return jsonify({})


@bp.post("/telemetry")
def telemetry():
    return jsonify({"status": "accepted"})
