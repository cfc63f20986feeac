"""Training clients: create a LoRA model, forward(_backward), optim_step, unload, get_info."""

from __future__ import annotations

import math
import re

from flask import Blueprint, jsonify, request
from tinker import types as sdk

from ..backends import AdamParams, DimuonParams, LoraSpec, UserInputError
from ..wire import (
    PROTO_CONTENT_TYPE,
    decode_forward_backward_json,
    decode_forward_backward_proto,
    parse_json,
)
from .common import caller, future, json_body, worker

bp = Blueprint("training", __name__, url_prefix="/api/v1")

# Model ids are `{session_id}:train:{model_seq_id}` and name the model's checkpoint folder, so a
# session id must be one safe path segment (the SDK's are `session-<hex>`).
_SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def check_model_id_parts(session_id: object, model_seq_id: object) -> None:
    """Raise `UserInputError` unless (session_id, model_seq_id) make a safe, well-formed model id."""
    if not isinstance(session_id, str) or not _SESSION_ID.match(session_id):
        raise UserInputError("session_id must be 1-128 characters of letters, digits, '_', '.', '-' "
                             "(the id create_session returned)", "session_id")
    if isinstance(model_seq_id, bool) or not isinstance(model_seq_id, int) or model_seq_id < 0:
        raise UserInputError("model_seq_id must be an integer >= 0", "model_seq_id")


@bp.post("/create_model")
def create_model():
    req = parse_json(sdk.CreateModelRequest, json_body())
    check_model_id_parts(req.session_id, req.model_seq_id)
    optimizer = optimizer_family(req.optimizer_config)
    lora = req.lora_config or sdk.LoraConfig(rank=32)
    spec = LoraSpec(rank=lora.rank, seed=lora.seed, train_attn=lora.train_attn,
                    train_mlp=lora.train_mlp, train_unembed=lora.train_unembed, optimizer=optimizer)
    request_id, model_id = worker().create_model(
        caller(), req.session_id, req.model_seq_id, req.base_model, spec, req.user_metadata)
    return jsonify(future(request_id, model_id))


def optimizer_family(config: sdk.OptimizerConfig) -> str:
    """`optimizer_config.type` once the whole config is valid for its family (AdamW or Dimuon v1)."""
    if config.type == "dimuon":
        parse_json(sdk.DimuonOptimizerConfig, config.model_dump(), "optimizer_config")
    elif config.type != "adamw":
        raise UserInputError(f"optimizer {config.type!r} is not supported; use adamw or dimuon",
                             "optimizer_config.type")
    return config.type


@bp.post("/get_info")
def get_info():
    req = parse_json(sdk.GetInfoRequest, json_body())
    return jsonify(worker().info(caller(), req.model_id))


@bp.post("/forward_backward")
def forward_backward():
    if PROTO_CONTENT_TYPE in (request.content_type or ""):
        if request.headers.get("Content-Encoding"):
            raise UserInputError("compressed bodies are not accepted; the worker's client config "
                                 "disables proto_compress_fwdbwd", "Content-Encoding")
        call = decode_forward_backward_proto(request.get_data())
    else:
        call = decode_forward_backward_json(json_body(), forward_only=False)
    return jsonify(future(worker().forward_backward(caller(), call), call.model_id))


@bp.post("/forward")
def forward():
    """JSON-only forward pass (no gradients) for plain HTTP clients."""
    call = decode_forward_backward_json(json_body(), forward_only=True)
    return jsonify(future(worker().forward_backward(caller(), call), call.model_id))


@bp.post("/optim_step")
def optim_step():
    body = json_body()
    key = next((k for k in ("adam_params", "optim_params", "optimizer_params") if k in body), None)
    if key is None:
        raise UserInputError("adam_params is required: this step's AdamW hyperparameters "
                             "(or optimizer_params for a Dimuon model)", "adam_params")
    req = parse_json(sdk.OptimStepRequest, body)
    p = req.optim_params
    if isinstance(p, sdk.AdamParams):
        for name in ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"):
            if not math.isfinite(getattr(p, name)):  # NaN passes every range check and poisons the weights
                raise UserInputError(f"{name} must be a finite number", f"adam_params.{name}")
        params = AdamParams(learning_rate=p.learning_rate, beta1=p.beta1, beta2=p.beta2, eps=p.eps,
                            weight_decay=p.weight_decay, grad_clip_norm=p.grad_clip_norm)
    elif p.type == "dimuon":  # the SDK's own DimuonParams checks ranges, finiteness and unknown fields
        d = parse_json(sdk.DimuonParams, body[key], key)
        params = DimuonParams(learning_rate=d.learning_rate, beta1=d.beta1, grad_clip_norm=d.grad_clip_norm)
    else:
        raise UserInputError(f"optimizer {p.type!r} is not supported; send adam_params, or dimuon "
                             "optimizer_params", f"{key}.type")
    return jsonify(future(worker().optim_step(caller(), req.model_id, params), req.model_id))


@bp.post("/unload_model")
def unload_model():
    req = parse_json(sdk.UnloadModelRequest, json_body())
    return jsonify(future(worker().unload_model(caller(), req.model_id), req.model_id))
