"""The Flask application: the Tinker HTTP API in front of a `Worker`.

    >>> app = create_app(Config(base_model="/path/to/model", state_dir=Path("/tmp/tink")))
    >>> # production: `python -m src serve` (waitress, many threads for long-polls)

Routes live in `src/api/` (one blueprint per group) and stay thin; no model code here.
Errors are JSON: `{"error": "...", "field": "..."}` with 400 (bad input), 401 (API key),
404 (unknown id), 413 (body too large); a backend failure fails its future, not the server.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from flask import Flask, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from .auth import KeyRing
from .backends import BackendError, UserInputError
from .config import Config, ConfigError
from .worker import NotFoundError, TrainerUnavailableError, Worker

log = logging.getLogger(__name__)

UNAUTHENTICATED_PATHS = {"/api/v1/healthz"}


def create_app(config: Config | None = None, worker: Worker | None = None) -> Flask:
    """Build the app; `worker` may be given (tests share one), else it is built from `config`."""
    config = config or (worker.config if worker else Config.from_env())
    worker = worker or Worker.from_config(config)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.json.sort_keys = False
    app.extensions["tink.worker"] = worker
    app.extensions["tink.tokenizer"] = functools.cache(lambda: _load_tokenizer(worker.base_model))

    from .api import futures, sampling, service, training, weights

    for module in (service, training, weights, sampling, futures):
        app.register_blueprint(module.bp)

    keyring = KeyRing(config.all_user_keys(), config.admin_keys)

    @app.before_request
    def authenticate() -> Any:
        if request.path in UNAUTHENTICATED_PATHS:
            return None
        caller = keyring.authenticate(request.headers.get("X-API-Key"))
        if caller is None:
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
