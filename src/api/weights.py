"""Weights: save (training state, sampler adapter, external export), load, and the training runs."""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Blueprint, jsonify
from tinker import types as sdk

from ..backends import UserInputError
from ..checkpoints import is_expired
from ..wire import parse_json
from .checkpoints import checkpoint_json
from .common import caller, future, json_body, worker
from .training import check_model_id_parts, optimizer_family

bp = Blueprint("weights", __name__, url_prefix="/api/v1")


@bp.post("/save_weights")
def save_weights():
    req = parse_json(sdk.SaveWeightsRequest, json_body())
    rid = worker().save_weights(caller(), req.model_id, req.path, req.overwrite, req.user_metadata,
                                req.ttl_seconds)
    return jsonify(future(rid, req.model_id))


@bp.post("/save_weights_for_sampler")
def save_weights_for_sampler():
    req = parse_json(sdk.SaveWeightsForSamplerRequest, json_body())
    if req.kind != "snapshot":
        raise UserInputError("only kind='snapshot' sampling clients are supported", "kind")
    rid = worker().save_weights_for_sampler(caller(), req.model_id, req.path, req.user_metadata, req.ttl_seconds)
    return jsonify(future(rid, req.model_id))


@bp.post("/save_weights_external")
def save_weights_external():
    """The adapter as plain PEFT files under `tinker://<model_id>/external_weights/<name>`, to download."""
    req = parse_json(sdk.SaveWeightsExternalRequest, json_body())
    if req.age_encryption_recipients:
        raise UserInputError("age encryption of exported weights is not supported by Tink; omit "
                             "age_encryption_recipients (downloads are served by this worker itself: put TLS "
                             "in front of it to protect them in transit)", "age_encryption_recipients")
    rid = worker().save_weights_external(caller(), req.model_id, req.path, req.ttl_seconds)
    return jsonify(future(rid, req.model_id))


@bp.post("/load_weights")
def load_weights():
    req = parse_json(sdk.LoadWeightsRequest, json_body())
    w = worker()
    if req.model_id is not None:
        return jsonify(future(w.load_weights(caller(), req.model_id, req.path, req.optimizer), req.model_id))
    if req.session_id is None:
        raise UserInputError("load_weights needs model_id, or session_id and model_seq_id", "model_id")
    check_model_id_parts(req.session_id, req.model_seq_id or 0)
    optimizer = optimizer_family(req.optimizer_config) if req.optimizer_config is not None else None
    if optimizer is not None and req.optimizer:
        raise UserInputError("optimizer_config chooses the optimizer of a weights-only load; with optimizer=true "
                             "the checkpoint's own optimizer state is restored", "optimizer_config")
    rid, model_id = w.create_model_from_state(
        caller(), req.session_id, req.model_seq_id or 0, req.path, req.optimizer, req.user_metadata, optimizer)
    return jsonify(future(rid, model_id))


@bp.get("/training_runs")
def list_training_runs():
    """The caller's training runs (every run for an admin key)."""
    c = caller()
    w = worker()
    runs = [_training_run(w, m) for m in w.store.list_models(None if c.admin else c.owner, include_unloaded=True)]
    return jsonify({"training_runs": runs, "cursor": {"offset": 0, "limit": len(runs), "total_count": len(runs)}})


@bp.get("/training_runs/<model_id>")
def training_run(model_id: str):
    w = worker()
    return jsonify(_training_run(w, w.model_record(caller(), model_id, loaded=False)))


def _training_run(w, record: dict) -> dict:
    model_id = record["model_id"]
    checkpoints = [c for c in w.store.list_checkpoints(model_id) if not is_expired(c)]
    return {
        "training_run_id": model_id,
        "base_model": record["base_model"],
        "model_owner": record["session_id"] or "",
        "is_lora": True,
        "lora_rank": record["lora"]["rank"],
        "last_request_time": _iso(record["created_at"]),
        "last_checkpoint": next((checkpoint_json(c) for c in reversed(checkpoints) if c["kind"] == "training"), None),
        "last_sampler_checkpoint": next(
            (checkpoint_json(c) for c in reversed(checkpoints) if c["kind"] == "sampler"), None),
    }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat()
