"""Handshake, capabilities, health, telemetry and the caller's key: what the SDK calls before any work."""

from __future__ import annotations

from flask import Blueprint, jsonify
from werkzeug.exceptions import Forbidden

from ..auth import ANONYMOUS
from .common import caller, worker

bp = Blueprint("service", __name__, url_prefix="/api/v1")

# Feature flags for SDK 0.38: plain httpx transport, uncompressed protobuf bodies, client-side
# custom losses, and one forward_backward chunk at a time (the worker runs a model's operations in
# arrival order). A sampling client polls its sampler's completions in one long-poll
# (`retrieve_futures`, src/api/futures.py) instead of one `retrieve_future` per sample.
# The SDK's pyqwest transport would carry a batch of 64 samples x 8 x 256 tokens in ~0.6x the time
# (bench/bench_http_sampling.py), but under the full test suite's load one of its requests reached
# waitress as "xPOST" (a byte left over on a kept-alive connection, a 400 the SDK does not retry);
# until that is understood, httpx.
CLIENT_CONFIG = {
    "pjwt_auth_enabled": False,
    "credential_default_source": "api_key",
    "use_pyqwest_transport": False,
    "proto_compress_fwdbwd": False,
    "parallel_fwdbwd_chunks": False,
    "sample_use_retrieve_futures": True,
    "custom_loss_server_side": False,
    "sample_join_sampling_session": False,
}

# An abandoned sample (its future cancelled or timed out in the client) is cancelled on the worker
# (`cancel_future`), so it does not run if it has not started.
CLIENT_DYNAMIC_CONFIG = {"refresh_interval_sec": 300, "sample_cancel_enabled": True}


@bp.post("/client/config")
def client_config():
    return jsonify(CLIENT_CONFIG)


@bp.post("/client/dynamic_config")
def client_dynamic_config():
    return jsonify(CLIENT_DYNAMIC_CONFIG)


@bp.get("/healthz")
def healthz():
    return jsonify(worker().health())


@bp.get("/get_server_capabilities")
def capabilities():
    return jsonify(worker().capabilities())


@bp.get("/auth/apikey/me")
def api_key_me():
    """What `tinker auth login` checks about the key it was given (the CLI's `SelfApiKeyResponse`).

    Tink keys have no names or e-mail: the key is named by its fingerprint (the owner id everything
    it creates is recorded under), never by the key itself.
    """
    c = caller()
    kind = "admin" if c.admin else "user"
    if c.owner == ANONYMOUS:
        name, note = ANONYMOUS, "no API keys are configured on this worker: every caller is one anonymous admin"
    else:
        name, note = f"key-{c.owner[:12]}", f"{kind} key of this Tink worker (owner {c.owner})"
    return jsonify({
        "key_id": int(c.owner[:12], 16) if c.owner != ANONYMOUS else 0,
        "name": name,
        "note": note,
        "details": {"org_details": {"name": f"Tink worker ({worker().base_model})"},
                    "user_details": {"email": name}},
    })


@bp.delete("/auth/apikey/me")
def delete_api_key_me():
    raise Forbidden("this worker's API keys are set by its operator (TINK_API_KEYS, TINK_API_KEYS_FILE, "
                    "TINK_ADMIN_KEYS) and cannot be deleted over the API; ask the operator to remove the key")


@bp.post("/telemetry")
def telemetry():
    return jsonify({"status": "accepted"})
