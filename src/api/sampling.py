"""Sampling: Tinker's sampling sessions and `asample`, plus the plain JSON `/api/v1/sample` (text
prompts, optional server-sent-event streaming and train-inference logprob gap) and `/api/v1/perplexity`."""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from tinker import types as sdk

from ..backends import SampledSequence, SampleJob, SampleResult, UserInputError
from ..evaluation import logprob_gap
from ..steering import LookInside, capture_format, captures_json, look_sampler, model_dims, parse_look
from ..wire import parse_json, sample_job_from_request, sampling_params_from_sdk
from ..worker import EvalTarget, Worker
from .common import caller, future, json_body, worker

log = logging.getLogger(__name__)
bp = Blueprint("sampling", __name__, url_prefix="/api/v1")


@bp.post("/create_sampling_session")
def create_sampling_session():
    req = parse_json(sdk.CreateSamplingSessionRequest, json_body())
    session = worker().create_sampling_session(caller(), req.base_model, req.model_path, req.session_id)
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
    request_id = w.sample(caller(), job, req.sampling_session_id, req.seq_id)
    # The promise names each sequence up front; the SDK stamps these ids onto the final response.
    return jsonify({**future(request_id),
                    "sample_sequence_ids": [f"{request_id}/{i}" for i in range(job.num_samples)]})


@bp.post("/sample")
def sample_text():
    """Plain JSON sampling from text prompts.

    Body: `{"model_id": <base model | tinker:// path | training model id>, "prompts": ["..."],
    "num_samples": 1, "sampling_params": {"max_tokens": 32, "temperature": 0.7, ...},
    "prompt_logprobs": false, "logprob_gap": false, "stream": false, "capture": [{"layer", "site", "reduce"}],
    "steer": [{"layer", "vector" | "vector_id", "scale", "positions"}], "capture_format": "json" | "base64"}`
    (capture and steer: src/steering.py; each completion then has `captures`). With `stream: true` the answer
    is `text/event-stream`: `token` events as tokens are chosen, one `result` per prompt, then `done`.
    """
    body = json_body()
    w = worker()
    target = w.resolve_model_id(caller(), body.get("model_id"))
    jobs = _sample_jobs(body, target)
    want_gap = _flag(body, "logprob_gap")
    fmt = capture_format(body)
    if want_gap:
        w.trainer_logprobs(target, jobs[0][1].prompt[:2])  # fail now (4xx/503), not mid-answer
    tokenizer = current_app.extensions["tink.tokenizer"]()
    if _flag(body, "stream"):
        return _stream(w, tokenizer, jobs, target, want_gap, body.get("model_id"), fmt)
    results, served_by = [], []
    for text, job in jobs:
        out = w.sample_now(job)
        served_by.append(out.served_by or w.sampler.name)
        results.append(_prompt_result(w, tokenizer, text, job, out, target, want_gap, fmt))
    return jsonify({"model_id": body.get("model_id"), "sampler": _one_name(served_by), "checkpoint": target.checkpoint,
                    "results": results})


@bp.post("/perplexity")
def perplexity():
    """Sliding-window perplexity through the sampler and the trainer, side by side.

    Body: `{"model_id": ..., "text": "..." | "tokens": [...], "context_length": 512, "stride": 256,
    "backends": ["sampler", "trainer"]}`.
    """
    body = json_body()
    w = worker()
    target = w.resolve_model_id(caller(), body.get("model_id"))
    if ("text" in body) == ("tokens" in body):
        raise UserInputError("give exactly one of text (a string) or tokens (a list of token ids)", "text")
    if "text" in body:
        if not isinstance(body["text"], str) or not body["text"]:
            raise UserInputError("text must be a non-empty string", "text")
        tokens = current_app.extensions["tink.tokenizer"]().encode(body["text"], add_special_tokens=True)
    else:
        tokens = body["tokens"]
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise UserInputError("tokens must be a list of integer token ids", "tokens")
    context_length = _int(body, "context_length", 512, minimum=2)
    stride = _int(body, "stride", context_length // 2 or 1, minimum=1)
    backends = body.get("backends", ["sampler", "trainer"])
    if not isinstance(backends, list) or not backends or not set(backends) <= {"sampler", "trainer"}:
        raise UserInputError('backends must be a non-empty subset of ["sampler", "trainer"]', "backends")
    return jsonify({"model_id": body.get("model_id"),
                    **w.perplexity(target, tokens, context_length, stride, backends)})


# ---------------------------------------------------------------------------- helpers


def _sample_jobs(body: dict[str, Any], target: EvalTarget) -> list[tuple[str, SampleJob]]:
    prompts = body.get("prompts")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise UserInputError("prompts must be a non-empty list of non-empty strings", "prompts")
    num_samples = _int(body, "num_samples", 1, minimum=1)
    params = sampling_params_from_sdk(parse_json(sdk.SamplingParams, body.get("sampling_params") or {},
                                                 "sampling_params"))
    tokenizer = current_app.extensions["tink.tokenizer"]()
    look = request_look(body, params.max_tokens)
    jobs = [(text, SampleJob(prompt=tokenizer.encode(text, add_special_tokens=True), num_samples=num_samples,
                             params=params, adapter=target.adapter,
                             prompt_logprobs=_flag(body, "prompt_logprobs"), look=look))
            for text in prompts]
    for _, job in jobs:
        worker().check_sample(job)  # every prompt is valid before the first is sampled
    return jobs


def request_look(body: dict[str, Any], max_tokens: int) -> LookInside | None:
    """The body's `capture` / `steer` (src/steering.py), validated against the base model's shape, `vector_id`s
    resolved among the caller's named vectors. Where this worker's sampler cannot look inside, the 400 naming
    `capture` comes now, before a stream starts. Shared by `/api/v1/sample` and the OpenAI endpoints."""
    if not body.get("capture") and not body.get("steer"):
        return None
    from .steering import vectors

    w = worker()
    look = parse_look(body, model_dims(w.base_model), max_tokens, w.config.capture_all_max_tokens,
                      vectors().lookup(caller()))
    if look is not None:
        look_sampler(w.sampler)  # raises the UserInputError the sampling would raise later
    return look


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise UserInputError(f"{name} must be true or false", name)
    return value


def _int(body: dict[str, Any], name: str, default: int, minimum: int) -> int:
    value = body.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UserInputError(f"{name} must be an integer >= {minimum}", name)
    return value


def _completion(tokenizer: Any, seq: SampledSequence) -> dict[str, Any]:
    return {"text": tokenizer.decode(seq.tokens, skip_special_tokens=True), "tokens": seq.tokens,
            "logprobs": seq.logprobs, "stop_reason": seq.stop_reason}


def _prompt_result(w: Worker, tokenizer: Any, text: str, job: SampleJob, out: SampleResult, target: EvalTarget,
                   want_gap: bool, fmt: str = "json") -> dict[str, Any]:
    completions = []
    for seq in out.sequences:
        completion = _completion(tokenizer, seq)
        if want_gap and seq.tokens:
            # The trainer scores prompt + completion; its last len(tokens) values are the sampled tokens'.
            trainer_lps = w.trainer_logprobs(target, job.prompt + seq.tokens)[-len(seq.tokens):]
            completion["logprob_gap"] = logprob_gap(seq.logprobs, trainer_lps)
            w.run_metrics.logprob_gap(target.trained_model_id, completion["logprob_gap"])  # the dashboard
        if job.look is not None and job.look.capture:
            completion["captures"] = captures_json(seq.captures, job.look, fmt)
        completions.append(completion)
    return {"prompt": text, "prompt_tokens": job.prompt, "prompt_logprobs": out.prompt_logprobs,
            "completions": completions}


def _stream(w: Worker, tokenizer: Any, jobs: list[tuple[str, SampleJob]], target: EvalTarget, want_gap: bool,
            model_id: Any, fmt: str = "json") -> Response:
    """Server-sent events; the sampling runs on its own thread, so a slow reader never stalls a backend."""
    served_by: list[str] = []

    def produce(events: queue.Queue) -> None:
        try:
            for index, (text, job) in enumerate(jobs):
                def sink(sample: int, tokens: list[int], logprobs: list[float], prompt: int = index) -> None:
                    events.put(("token", {"prompt_index": prompt, "sample_index": sample, "tokens": tokens,
                                          "logprobs": logprobs}))

                out = w.sample_now(job, sink)
                served_by.append(out.served_by or w.sampler.name)
                events.put(("result", {"prompt_index": index,
                                       **_prompt_result(w, tokenizer, text, job, out, target, want_gap, fmt)}))
            events.put(("done", {"model_id": model_id, "sampler": _one_name(served_by),
                                 "checkpoint": target.checkpoint}))
        except UserInputError as exc:
            events.put(("error", {"error": str(exc), "field": exc.field}))
        except Exception as exc:  # the status line is sent already: report the failure as an event
            log.exception("streamed sampling failed")
            events.put(("error", {"error": f"{type(exc).__name__}: {exc}", "field": None}))
        finally:
            events.put(None)

    items = background_events(produce)

    def serve() -> Iterator[str]:
        sent: dict[tuple[int, int], list[int]] = {}  # (prompt, sample) -> tokens so far, for text deltas
        for item in items:
            if item is KEEP_ALIVE:
                yield item
                continue
            kind, data = item
            if kind == "token":
                so_far = sent.setdefault((data["prompt_index"], data["sample_index"]), [])
                before = tokenizer.decode(so_far, skip_special_tokens=True)
                so_far.extend(data["tokens"])
                data["text"] = tokenizer.decode(so_far, skip_special_tokens=True)[len(before):]
            yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    return Response(serve(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                    "X-Accel-Buffering": "no"})


KEEP_ALIVE = ": keep-alive\n\n"  # an SSE comment: clients skip it, proxies see the connection is alive


def background_events(produce: Callable[[queue.Queue], None]) -> Iterator[Any]:
    """Start `produce(events)` on its own thread now, so a slow reader never stalls a backend; iterate
    what it puts until it puts None, with `KEEP_ALIVE` after 15 s of silence. Stops early when the
    client has gone (waitress tells). Call it inside the request; iterate it in the response."""
    events: queue.Queue = queue.Queue()
    threading.Thread(target=produce, args=(events,), name="tink-stream", daemon=True).start()
    disconnected = request.environ.get("waitress.client_disconnected", lambda: False)

    def drain() -> Iterator[Any]:
        while True:
            try:
                item = events.get(timeout=15)
            except queue.Empty:
                if disconnected():
                    return
                yield KEEP_ALIVE
                continue
            if item is None:
                return
            yield item

    return drain()


def _one_name(served_by: list[str]) -> str:
    """The sampler that answered, or "vllm+hf" when the prompts of one request went to different ones."""
    return "+".join(dict.fromkeys(served_by))
