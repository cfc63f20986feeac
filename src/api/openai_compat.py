"""OpenAI-compatible serving: `/v1/models`, `/v1/completions` and `/v1/chat/completions` on the worker's
own port, sampled by the same sampler (and the same `Worker.sample_now` path) as the Tinker API.

`model` is the base model's name, a `tinker://<run>/sampler_weights/<name>` path, its short form
`<run>/<name>`, or a training run id (its latest sampler checkpoint). The key travels as
`Authorization: Bearer <key>` (what OpenAI clients send) or `X-API-Key`; another key's adapters are
404, as in the Tinker API. Errors use OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

    >>> from openai import OpenAI
    >>> client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="tml-...")
    >>> client.completions.create(model="tinker://<run>/sampler_weights/step-100", prompt="2+2=", max_tokens=4)
    >>> for chunk in client.chat.completions.create(model="<run>/step-100", stream=True,
    ...                                             messages=[{"role": "user", "content": "hi"}]):
    ...     print(chunk.choices[0].delta.content or "", end="")

Look inside, as on `/api/v1/sample` (src/steering.py): `capture`, `steer` and `capture_format` travel as
extra body fields (`extra_body=` in the openai client, as vLLM's server takes its own extensions), parsed
by the same `request_look`. Each choice then carries `captures` (the same list as a completion of
/api/v1/sample). Streaming sends them once, in the choice's final chunk (the one with its finish_reason):
captured values exist only when the sampler has finished the sequence (`mean` and `last` reduce over all
of it), and a client that joins deltas finds them where the choice ends. Steering streams like any request.

    >>> answer = client.chat.completions.create(model="tiny", messages=[...], max_tokens=8, extra_body={
    ...     "steer": [{"vector_id": "sv-...", "scale": 4}], "capture": [{"layer": 1, "reduce": "mean"}]})
    >>> answer.choices[0].model_extra["captures"]   # [{"layer": 1, "site": "resid_post", "reduce": "mean", "values": [...]}]
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify
from werkzeug.exceptions import HTTPException

from ..backends import BackendError, SampleJob, SampleResult, TokenSink, UserInputError
from ..openai_wire import (
    ChatCompletionRequest,
    ChoiceText,
    CompletionRequest,
    Piece,
    chat_logprobs,
    completion_logprobs,
    error_json,
    usage_json,
)
from ..scheduling import Outcome
from ..steering import LookInside, capture_format, captures_json
from ..wire import parse_json
from ..worker import EvalTarget, NotFoundError, Worker
from .common import caller, json_body, worker
from .sampling import KEEP_ALIVE, background_events, request_look

log = logging.getLogger(__name__)
bp = Blueprint("openai", __name__, url_prefix="/v1")

OPENAI_SAMPLE_OP = "openai_sample"  # the operation (future) each prompt of an OpenAI request is sampled as
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
_LIST_PAGE = 1000
# What the worker's checks call a field -> what an OpenAI client calls it, per endpoint.
_COMPLETION_FIELDS = {"sampling_params.max_tokens": "max_tokens", "num_samples": "n", "prompt": "prompt",
                      "topk_sample_logprobs": "logprobs", "model_path": "model"}
_CHAT_FIELDS = {**_COMPLETION_FIELDS, "prompt": "messages", "topk_sample_logprobs": "top_logprobs"}


# ----------------------------------------------------------------------------- routes


@bp.get("/models")
def list_models():
    """The base model and the caller's sampler checkpoints (every key's for an admin), newest first."""
    w, who = worker(), caller()
    base = w.base_model
    models = [{"id": base, "object": "model", "created": int(time.time()), "owned_by": "tink", "root": base,
               "parent": None}]
    for record in _sampler_checkpoints(None if who.admin else who.owner):
        model = w.store.get_model(record["model_id"]) or {}
        run, _, name = record["tinker_path"][len("tinker://"):].partition("/sampler_weights/")
        models.append({"id": record["tinker_path"], "object": "model", "created": int(record["created_at"]),
                       "owned_by": model.get("owner", "tink"), "root": base, "parent": base,
                       "alias": f"{run}/{name}"})
    return jsonify({"object": "list", "data": models})


@bp.post("/completions")
def completions():
    g.openai_fields = _COMPLETION_FIELDS
    req = parse_json(CompletionRequest, json_body())
    req.check()
    target = _target(req.model)
    tokenizer = _tokenizer()
    prompts = [tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else p for p in req.prompt]
    look = request_look(req.look_fields, req.sampling_params(COMPLETION_MAX_TOKENS).max_tokens)
    jobs = [_job(req, target, prompt, COMPLETION_MAX_TOKENS, look) for prompt in prompts]
    return _answer(False, req, jobs)


@bp.post("/chat/completions")
def chat_completions():
    g.openai_fields = _CHAT_FIELDS
    req = parse_json(ChatCompletionRequest, json_body())
    req.check()
    if req.max_completion_tokens is not None:  # limits name the field the client used
        g.openai_fields = {**_CHAT_FIELDS, "sampling_params.max_tokens": "max_completion_tokens"}
    target = _target(req.model)
    prompt = _chat_prompt([m.for_template() for m in req.messages])
    config = worker().config
    rest_of_context = max(1, min(config.max_sample_tokens, config.max_tokens_per_datum - len(prompt)))
    look = request_look(req.look_fields, req.sampling_params(rest_of_context).max_tokens)
    return _answer(True, req, [_job(req, target, prompt, rest_of_context, look)])


def unauthenticated() -> tuple[Response, int]:
    """The 401 for a /v1 request without a valid key (the app's authentication hook answers it)."""
    message = "missing or invalid API key; send it as Authorization: Bearer <key> (or X-API-Key)"
    return jsonify(error_json(message, None, 401, "invalid_api_key")), 401


# ----------------------------------------------------------------------------- errors


@bp.errorhandler(UserInputError)
def bad_request(exc: UserInputError):
    status = 404 if isinstance(exc, NotFoundError) else 400
    code = "model_not_found" if status == 404 and _param(exc.field) == "model" else None
    return jsonify(error_json(str(exc), _param(exc.field), status, code)), status


@bp.errorhandler(HTTPException)
def http_error(exc: HTTPException):
    return jsonify(error_json(exc.description or exc.name, None, exc.code or 500)), exc.code


@bp.errorhandler(BackendError)
def backend_error(exc: BackendError):
    log.warning("backend error on an OpenAI request: %s", exc)
    return jsonify(error_json(str(exc), None, 503)), 503


@bp.errorhandler(Exception)
def server_error(exc: Exception):
    log.exception("unhandled error on an OpenAI request")
    return jsonify(error_json(f"internal error: {type(exc).__name__}: {exc}", None, 500)), 500


def _param(field: str | None, names: dict[str, str] | None = None) -> str | None:
    """The request field an error names, as the OpenAI client wrote it."""
    names = names if names is not None else g.get("openai_fields", _COMPLETION_FIELDS)
    if field in names:
        return names[field]
    return field.removeprefix("sampling_params.") if field else None


# ----------------------------------------------------------------------------- requests to jobs


def _target(model: str) -> EvalTarget:
    """The adapter (or the base model) `model` names and the caller may read; else a 404 naming `model`."""
    w = worker()
    alias = "/" in model and not model.startswith("tinker://") and model not in (w.base_model, w.config.base_model)
    if alias:
        run, _, name = model.rpartition("/")
        try:
            return w.resolve_model_id(caller(), f"tinker://{run}/sampler_weights/{name}", "model")
        except UserInputError:  # not even a well-formed checkpoint name: no such model either
            pass
    else:
        try:
            return w.resolve_model_id(caller(), model, "model")
        except NotFoundError:
            pass
    raise NotFoundError(f"the model {model!r} does not exist or is not readable with this key; "
                        "GET /v1/models lists the models it may use", "model")


def _tokenizer() -> Any:
    return current_app.extensions["tink.tokenizer"]()


def _chat_prompt(messages: list[dict[str, str]]) -> list[int]:
    """The messages through the model's chat template, ending with the assistant's turn opened."""
    from jinja2 import TemplateError

    tokenizer = _tokenizer()
    if not getattr(tokenizer, "chat_template", None):
        raise UserInputError(f"the model {worker().base_model!r} has no chat template, so /v1/chat/completions "
                             "cannot format messages; use /v1/completions with a formatted prompt, or add a "
                             "chat_template (chat_template.jinja) to the model folder", "model")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:
        raise UserInputError(f"the model's chat template refused these messages: {exc}", "messages") from None
    # The template writes the special tokens (BOS included) itself, as vLLM's chat endpoint assumes too.
    return tokenizer.encode(text, add_special_tokens=False)


def _job(req: CompletionRequest | ChatCompletionRequest, target: EvalTarget, prompt: list[int],
         default_max_tokens: int, look: LookInside | None) -> SampleJob:
    job = SampleJob(prompt=prompt, num_samples=req.n, params=req.sampling_params(default_max_tokens),
                    adapter=target.adapter, topk_sample_logprobs=req.top_logprob_count or 0, look=look)
    worker().check_sample(job)  # limits (TINK_MAX_*), before anything is sampled or streamed
    return job


# ----------------------------------------------------------------------------- answers


class _Answer:
    """Renders one request's choices, whole or as stream chunks, for either endpoint."""

    def __init__(self, chat: bool, req: CompletionRequest | ChatCompletionRequest, jobs: list[SampleJob]):
        tokenizer = _tokenizer()
        self.chat, self.req, self.jobs = chat, req, jobs
        self.top = req.top_logprob_count
        self.capture_format = capture_format(req.look_fields)  # checked here, before a stream starts
        self.fields: dict[str, str] = g.openai_fields  # for errors on the streaming thread, outside the request
        self.head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                     "model": req.model}
        self.decode: Callable[[list[int]], str] = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        self.token_text: Callable[[int], str] = lambda t: tokenizer.decode([t], skip_special_tokens=False)
        self.completion_tokens = 0

    def text(self) -> ChoiceText:
        return ChoiceText(self.decode, self.req.stop)

    def choice(self, index: int, piece: Piece, finish: str | None, streamed: bool) -> dict[str, Any]:
        logprobs = None
        if self.top is not None:
            logprobs = (chat_logprobs if self.chat else completion_logprobs)(piece, self.token_text, self.top)
        if not self.chat:
            body: dict[str, Any] = {"index": index, "text": piece.text}
        elif streamed:
            body = {"index": index, "delta": {"content": piece.text} if piece.text else {}}
        else:
            body = {"index": index, "message": {"role": "assistant", "content": piece.text}}
        return {**body, "logprobs": logprobs, "finish_reason": finish}

    def finished(self, prompt: int, out: SampleResult, texts: dict[tuple[int, int], ChoiceText],
                 streamed: bool) -> list[dict[str, Any]]:
        """The (rest of the) choices of one prompt once its sampling is done."""
        choices = []
        for sample, seq in enumerate(out.sequences):
            text = texts.setdefault((prompt, sample), self.text())
            piece = text.finish(seq)
            choice = self.choice(prompt * self.req.n + sample, piece, text.finish_reason(seq), streamed)
            if self.req.return_token_ids:
                choice.update(token_ids=list(seq.tokens), prompt_token_ids=self.jobs[prompt].prompt)
            look = self.jobs[prompt].look
            if look is not None and look.capture:  # the choice's last chunk when streaming (module docstring)
                choice["captures"] = captures_json(seq.captures, look, self.capture_format)
            choices.append(choice)
            self.completion_tokens += len(seq.tokens)
        return choices

    def usage(self) -> dict[str, int]:
        return usage_json(sum(len(job.prompt) for job in self.jobs), self.completion_tokens)

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body = {**self.head, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "choices": choices}
        if self.req.include_usage:
            body["usage"] = usage  # null on every chunk but the last, as OpenAI sends it
        return f"data: {json.dumps(body)}\n\n"


def _answer(chat: bool, req: CompletionRequest | ChatCompletionRequest, jobs: list[SampleJob]) -> Any:
    answer = _Answer(chat, req, jobs)
    if req.stream:
        return _stream(answer)
    texts, choices = {}, []
    for prompt, out in enumerate(_sample_together(worker(), caller().owner, jobs)):
        choices += answer.finished(prompt, out, texts, streamed=False)
    return jsonify({**answer.head, "object": "chat.completion" if chat else "text_completion",
                    "choices": choices, "usage": answer.usage()})


def _stream(answer: _Answer) -> Response:
    """OpenAI's server-sent events: `data: <chunk>` as text becomes final, an optional usage chunk, `data: [DONE]`."""
    w, req = worker(), answer.req
    # The sampler reports top-k alternatives only with the finished sequence: then each choice comes whole.
    per_token = not req.top_logprob_count

    owner = caller().owner

    def produce(events: queue.Queue) -> None:
        def sink(prompt: int) -> TokenSink:
            return lambda sample, tokens, logprobs: events.put(("tokens", prompt, sample, tokens, logprobs))

        try:  # the prompts sample together; chunks of different prompts interleave, each under its own index
            _sample_together(w, owner, answer.jobs, sink if per_token else None,
                             lambda prompt, out: events.put(("result", prompt, out)))
        except UserInputError as exc:
            events.put(("error", error_json(str(exc), _param(exc.field, answer.fields), 400)))
        except Exception as exc:  # the status line is sent already: the failure travels as a chunk
            log.exception("streamed OpenAI sampling failed")
            events.put(("error", error_json(f"sampling failed: {type(exc).__name__}: {exc}", None, 500)))
        finally:
            events.put(None)

    items = background_events(produce)

    def serve() -> Iterator[str]:
        texts: dict[tuple[int, int], ChoiceText] = {}
        if answer.chat:  # the first chunk of each choice names the role, as OpenAI's does
            yield answer.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None} for i in range(req.n)])
        for item in items:
            if item is KEEP_ALIVE:
                yield item
            elif item[0] == "tokens":
                _, prompt, sample, tokens, logprobs = item
                piece = texts.setdefault((prompt, sample), answer.text()).add(tokens, logprobs)
                if piece is not None and (piece.text or answer.top is not None):
                    yield answer.chunk([answer.choice(prompt * req.n + sample, piece, None, streamed=True)])
            elif item[0] == "result":
                for choice in answer.finished(item[1], item[2], texts, streamed=True):
                    yield answer.chunk([choice])
            else:
                yield f"data: {json.dumps(item[1])}\n\n"
        if req.include_usage:
            yield answer.chunk([], answer.usage())
        yield "data: [DONE]\n\n"

    return Response(serve(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                    "X-Accel-Buffering": "no"})


def _sample_together(w: Worker, owner: str, jobs: list[SampleJob], sink: Callable[[int], TokenSink] | None = None,
                     done: Callable[[int, SampleResult], None] | None = None) -> list[SampleResult]:
    """Sample every prompt of one request at once: each goes to the worker's sampling pool
    (TINK_SAMPLING_THREADS) as an `/api/v1/asample` does, so vLLM batches them; the results come in
    prompt order (`done(prompt, result)` as each finishes). If one fails, the prompts not started yet are
    cancelled and the started ones finish before its error (the first, in prompt order) is raised: the
    request gets one error, and no work of it is left running."""
    results: list[SampleResult | None] = [None] * len(jobs)
    errors: dict[int, BaseException] = {}

    def operation(prompt: int) -> Outcome:
        try:
            results[prompt] = w.sample_now(jobs[prompt], sink(prompt) if sink is not None else None)
        except BaseException as exc:
            errors[prompt] = exc
            raise  # the scheduler fails this prompt's future (and logs a backend failure)
        if done is not None:
            done(prompt, results[prompt])
        return Outcome("json", json.dumps({"type": OPENAI_SAMPLE_OP, "prompt_index": prompt}).encode())

    request_ids: list[str] = []
    try:
        for prompt in range(len(jobs)):
            request_ids.append(w.scheduler.submit_sampling(OPENAI_SAMPLE_OP, owner, functools.partial(operation, prompt)))
        for request_id in request_ids:
            _wait(w, request_id)
            if errors:
                break
    except BaseException:  # e.g. the worker began shutting down between two prompts
        _cancel_and_wait(w, request_ids)
        raise
    if errors:
        _cancel_and_wait(w, request_ids)
        raise errors[min(errors)]
    return results  # type: ignore[return-value]  # every prompt finished without an error


def _cancel_and_wait(w: Worker, request_ids: list[str]) -> None:
    """Cancel the futures not started yet; wait for the started ones (they are never interrupted)."""
    for request_id in request_ids:
        w.scheduler.cancel(request_id)
    for request_id in request_ids:
        _wait(w, request_id)


def _wait(w: Worker, request_id: str) -> None:
    """Until the sampling future `request_id` has finished (done, failed or cancelled)."""
    while w.scheduler.wait(request_id, 60).status in ("pending", "running"):
        pass


def _sampler_checkpoints(owner: str | None) -> Iterator[dict[str, Any]]:
    """The unexpired sampler checkpoints of `owner` (everyone's when None) whose folder is there."""
    offset = 0
    while True:
        rows, total = worker().store.list_owner_checkpoints(owner, _LIST_PAGE, offset, time.time())
        yield from (r for r in rows if r["kind"] == "sampler" and Path(r["directory"]).is_dir())
        offset += len(rows)
        if not rows or offset >= total:
            return
