"""Sampling: Tinker's sampling sessions and `asample`, plus the plain JSON `/api/v1/sample`."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify
from tinker import types as sdk

from ..backends import SampleJob, UserInputError
from ..wire import parse_json, sample_job_from_request, sampling_params_from_sdk
from .common import caller, future, json_body, worker

bp = Blueprint("sampling", __name__, url_prefix="/api/v1")


@bp.post("/create_sampling_session")
def create_sampling_session():
    req = parse_json(sdk.CreateSamplingSessionRequest, json_body())
    session = worker().create_sampling_session(caller(), req.base_model, req.model_path)
    return jsonify({"type": "create_sampling_session", "sampling_session_id": session})


@bp.get("/samplers/<sampling_session_id>")
def get_sampler(sampling_session_id: str):
    record = worker().sampling_session(caller(), sampling_session_id)
    return jsonify({"sampler_id": sampling_session_id, "base_model": record["base_model"],
                    "model_path": record["model_path"]})


@bp.post("/join_sampling_session")
def join_sampling_session():
    """A new client of an existing sampler gets a number of its own (the SDK keys its seq ids on it)."""
    req = parse_json(sdk.JoinSamplingSessionRequest, json_body())
    w = worker()
    w.sampling_session(caller(), req.sampling_session_id)  # 404 unless it is the caller's
    return jsonify({"type": "join_sampling_session",
                    "client_counter": w.store.join_sampling_session(req.sampling_session_id)})


@bp.post("/asample")
def asample():
    req = parse_json(sdk.SampleRequest, json_body())
    w = worker()
    job = sample_job_from_request(req)
    job.adapter = w.resolve_sampling_target(caller(), req.sampling_session_id, req.model_path, req.base_model)
    request_id = w.sample(caller(), job)
    # The promise names each sequence up front; the SDK stamps these ids onto the final response.
    return jsonify({**future(request_id),
                    "sample_sequence_ids": [f"{request_id}/{i}" for i in range(job.num_samples)]})


@bp.post("/sample")
def sample_text():
    """Plain JSON sampling from text prompts; answers synchronously.

    Body: `{"model_id": <base model | tinker:// path | training model id>, "prompts": ["..."],
    "num_samples": 1, "sampling_params": {"max_tokens": 32, "temperature": 0.7, ...}}`.
    """
    body = json_body()
    prompts = body.get("prompts")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise UserInputError("prompts must be a non-empty list of non-empty strings", "prompts")
    num_samples = body.get("num_samples", 1)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise UserInputError("num_samples must be an integer >= 1", "num_samples")
    params = sampling_params_from_sdk(parse_json(sdk.SamplingParams, body.get("sampling_params") or {}))
    w = worker()
    adapter = _resolve_model_id(body.get("model_id"))
    tokenizer = current_app.extensions["tink.tokenizer"]()
    results = []
    for text in prompts:
        prompt = tokenizer.encode(text, add_special_tokens=True)
        out = w.sample_now(SampleJob(prompt=prompt, num_samples=num_samples, params=params, adapter=adapter,
                                     prompt_logprobs=bool(body.get("prompt_logprobs"))))
        results.append({
            "prompt": text,
            "prompt_tokens": prompt,
            "prompt_logprobs": out.prompt_logprobs,
            "completions": [
                {"text": tokenizer.decode(s.tokens, skip_special_tokens=True), "tokens": s.tokens,
                 "logprobs": s.logprobs, "stop_reason": s.stop_reason}
                for s in out.sequences
            ],
        })
    return jsonify({"model_id": body.get("model_id"), "sampler": w.sampler.name, "results": results})


def _resolve_model_id(model_id: Any):
    w = worker()
    if not isinstance(model_id, str) or not model_id:
        raise UserInputError("model_id is required: a base model name, a tinker:// path or a model id",
                             "model_id")
    if model_id.startswith("tinker://"):
        return w.adapter_for(caller(), model_id, "model_id")
    if model_id in (w.base_model, w.config.base_model):
        return None
    w.model_record(caller(), model_id)
    sampler_checkpoints = [c for c in w.store.list_checkpoints(model_id) if c["kind"] == "sampler"]
    if not sampler_checkpoints:
        raise UserInputError(
            f"model {model_id!r} has no sampler checkpoint yet; call save_weights_for_sampler first", "model_id")
    return w.adapter_for(caller(), sampler_checkpoints[-1]["tinker_path"], "model_id")
