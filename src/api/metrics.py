"""`GET /metrics`: the worker's Prometheus metrics (`src/metrics.py`), and the timing of every request.

No API key is needed (Prometheus scrapes without one), as for `/api/v1/healthz`: the output holds
counts and timings only, no model, request or key ids.

    curl -s http://127.0.0.1:8000/metrics | grep tink_tokens_trained_total
"""

from __future__ import annotations

import time

from flask import Blueprint, Response, g, request

from .common import worker

bp = Blueprint("metrics", __name__)

METRICS_PATH = "/metrics"


@bp.get(METRICS_PATH)
def metrics():
    from ..metrics import CONTENT_TYPE

    return Response(worker().prometheus.render(), content_type=CONTENT_TYPE)


@bp.before_app_request
def start_timer() -> None:
    g.tink_request_started = time.perf_counter()


@bp.after_app_request
def count_request(response: Response) -> Response:
    """Every answer, errors (401, 4xx, 5xx) included: error handlers run before this hook."""
    started = g.get("tink_request_started")
    if started is not None:
        rule = request.url_rule.rule if request.url_rule is not None else None
        worker().prometheus.request_answered(rule, request.method, response.status_code,
                                             time.perf_counter() - started)
    return response
