"""The Flask application: the Tinker HTTP API in front of a `Worker`.

    >>> app = create_app(Config(base_model="/path/to/model", state_dir=Path("/tmp/tink")))
    >>> # production: `python -m src serve` (waitress, many threads for long-polls)

Routes live in `src/api/` (one blueprint per group) and stay thin; no model code here.
Errors are JSON: `{"error": "...", "field": "..."}` with 400 (bad input), 401 (API key),
403 (expired or altered download link), 404 (unknown id), 410 (an expired session or a run released
with it), 413 (body too large); a backend
failure fails its future, not the server.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from flask import Flask, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from .auth import KeyRing, UrlSigner, presented_key
from .backends import BackendError, UserInputError
from .config import Config, ConfigError
from .worker import GoneError, NotFoundError, TrainerUnavailableError, Worker

log = logging.getLogger(__name__)

UNAUTHENTICATED_PATHS = {"/api/v1/healthz", "/", "/dashboard"}  # the dashboard page asks for a key itself
UNAUTHENTICATED_PATHS.add("/chat")  # the chat page asks for a key itself, like the dashboard
UNAUTHENTICATED_PATHS.add("/metrics")  # Prometheus scrapes without a key; counts and timings only, no ids
# Download links (checkpoint files, session traces): their signature is the authority.
SIGNED_PATH_PREFIXES = ("/api/v1/checkpoint_files/", "/api/v1/trace_files/")
PAGE_PATH_PREFIXES = ("/dashboard/static/", "/chat/static/")  # the pages' scripts and styles: no data in them


def create_app(config: Config | None = None, worker: Worker | None = None) -> Flask:
    """Build the app; `worker` may be given (tests share one), else it is built from `config`."""
    config = config or (worker.config if worker else Config.from_env())
    worker = worker or Worker.from_config(config)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.json.sort_keys = False
    app.extensions["tink.worker"] = worker
    app.extensions["tink.tokenizer"] = functools.cache(lambda: _load_tokenizer(worker.base_model))
    app.extensions["tink.url_signer"] = UrlSigner(
        config.url_signing_secret.encode() if config.url_signing_secret else None)

    from .api import (
        checkpoints,
        dashboard,
        export,
        futures,
        metrics,
        openai_compat,
        sampling,
        service,
        sessions,
        steering,
        training,
        weights,
    )

    for module in (service, sessions, training, weights, checkpoints, sampling, futures, dashboard,
                   openai_compat, export, metrics, steering):
        app.register_blueprint(module.bp)
    from . import chat

    app.register_blueprint(chat.bp)  # the chat page (src/chat)

    keyring = KeyRing(config.all_user_keys(), config.admin_keys)

    @app.before_request
    def authenticate() -> Any:
        if request.path in UNAUTHENTICATED_PATHS or request.path.startswith(SIGNED_PATH_PREFIXES + PAGE_PATH_PREFIXES):
            return None
        caller = keyring.authenticate(presented_key(request.headers))
        if caller is None:
            if request.blueprint == openai_compat.bp.name:  # OpenAI clients expect OpenAI's error shape
                return openai_compat.unauthenticated()
            return jsonify({"error": "missing or invalid X-API-Key", "field": "X-API-Key"}), 401
        g.caller = caller
        return None

    _register_error_handlers(app)
    return app


def _load_tokenizer(base_model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model)


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(NotFoundError)
    def not_found(exc: NotFoundError):
        return jsonify({"error": str(exc), "field": exc.field}), 404

    @app.errorhandler(GoneError)
    def gone(exc: GoneError):
        return jsonify({"error": str(exc), "field": exc.field}), 410

    @app.errorhandler(UserInputError)
    def bad_input(exc: UserInputError):
        return jsonify({"error": str(exc), "field": exc.field}), 400

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(exc: RequestEntityTooLarge):
        limit = app.config["MAX_CONTENT_LENGTH"]
        return jsonify({"error": f"request body exceeds {limit} bytes (TINK_MAX_BODY_BYTES)",
                        "field": "body"}), 413

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if request.path.startswith("/v1/"):  # no /v1 route matched (404, 405): still OpenAI's error shape
            from .api.openai_compat import http_error as openai_http_error

            return openai_http_error(exc)
        return jsonify({"error": exc.description, "field": None}), exc.code

    @app.errorhandler(BackendError)
    def backend_error(exc: BackendError):  # a backend that failed while answering synchronously
        log.warning("backend error on %s: %s", request.path, exc)
        return jsonify({"error": str(exc), "field": None}), 503

    @app.errorhandler(TrainerUnavailableError)
    def trainer_down(exc: TrainerUnavailableError):
        return jsonify({"error": str(exc), "field": None}), 503

    @app.errorhandler(ConfigError)
    def config_error(exc: ConfigError):
        return jsonify({"error": str(exc), "field": None}), 503

    @app.errorhandler(Exception)
    def server_error(exc: Exception):
        log.exception("unhandled error on %s", request.path)
        return jsonify({"error": f"internal error: {type(exc).__name__}: {exc}", "field": None}), 500
