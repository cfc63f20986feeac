"""The live dashboard: its page (no key needed to load it; it asks for one) and the JSON it polls,
plus the endpoint through which a client attaches its own scalars to a run.

    GET  /                                      -> redirect to /dashboard
    GET  /dashboard                             the page (src/dashboard/static, uPlot vendored)
    GET  /api/v1/dashboard/state?cursor=&runs=&full=&max_points=
                                                worker health, the key's runs, series deltas
    GET  /api/v1/training_runs/<id>/metrics     one run's series (decimated to max_points)
    POST /api/v1/training_runs/<id>/metrics     {"step": 3, "metrics": {"reward/mean": 0.42}}

    $ curl -H "X-API-Key: $KEY" -d '{"step": 3, "metrics": {"reward/mean": 0.42}}' \\
        -H 'Content-Type: application/json' http://127.0.0.1:8000/api/v1/training_runs/$RUN/metrics
    {"model_id": "...", "step": 3, "recorded": 1}

A poll sends the `cursor` of its previous answer and gets only the series cells changed since
(`changes`); runs it starts showing are named in `full` and come whole, decimated to `max_points`
steps. Ownership is the Tinker API's: a key sees its own runs (an admin key every run), others are 404.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from flask import Blueprint, current_app, jsonify, redirect, request, send_from_directory

from ..backends import UserInputError
from ..run_metrics import STEP_CLOSER, owner_label, parse_client_metrics
from ..worker import NotFoundError, Worker
from .common import caller, json_body, worker

STATIC = Path(__file__).resolve().parents[1] / "dashboard" / "static"
STATIC_PREFIX = "/dashboard/static/"  # these and the page need no key (src/app.py): they hold no data
MAX_RUNS = 200  # most recently active first
MAX_CHANGES = 5000  # a poll further behind than this gets whole series instead
DEFAULT_POINTS, MAX_POINTS = 300, 5000
HEALTH_TTL_S = 2.0  # many open pages must not each probe the backends on every poll
EXPORT_ROUTE = "/api/v1/export"

bp = Blueprint("dashboard", __name__, static_folder=str(STATIC), static_url_path=STATIC_PREFIX.rstrip("/"))


@bp.get("/")
def root():
    return redirect("/dashboard")


@bp.get("/dashboard")
def page():
    response = send_from_directory(STATIC, "index.html")
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/api/v1/dashboard/state")
def state():
    """Everything one poll of the page needs, in one answer."""
    w, c = worker(), caller()
    cursor = _int_arg("cursor", 0, 0, 2**62)
    max_points = _int_arg("max_points", DEFAULT_POINTS, 2, MAX_POINTS)
    runs = w.store.run_summaries(None if c.admin else c.owner, MAX_RUNS, STEP_CLOSER, "loss")
    visible = {r["model_id"] for r in runs}
    queues = w.store.queue_depths()
    wanted = [m for m in _id_list("runs") if m in visible]
    full = [m for m in _id_list("full") if m in visible]
    new_cursor = w.store.max_run_metric_seq()  # first: a cell written meanwhile comes again next time
    changes = w.run_metrics.changes([m for m in wanted if m not in full], cursor, MAX_CHANGES) if cursor else []
    # Too far behind (whole series are smaller than the changes), or a cursor from another database.
    if len(changes) >= MAX_CHANGES or cursor > new_cursor:
        full, changes = wanted, []
    return jsonify({
        "cursor": new_cursor,
        "worker": _worker_state(w, queues),
        "runs": [_run_json(r, queues) for r in runs],
        "series": {m: w.run_metrics.series(m, max_points) for m in full},
        "changes": [[ch["model_id"], ch["source"], ch["name"], ch["step"], ch["value"]] for ch in changes],
    })


@bp.get("/api/v1/training_runs/<model_id>/metrics")
def run_series(model_id: str):
    w = worker()
    _visible_run(w, model_id)
    max_points = _int_arg("max_points", DEFAULT_POINTS, 2, MAX_POINTS)
    return jsonify({"model_id": model_id, "steps": w.run_metrics.steps_done(model_id),
                    "series": w.run_metrics.series(model_id, max_points)})


@bp.post("/api/v1/training_runs/<model_id>/metrics")
def report_metrics(model_id: str):
    """A client's scalars for its run, at `step` (left out: the step in progress, optimizer steps + 1)."""
    w = worker()
    _visible_run(w, model_id)
    step, metrics = parse_client_metrics(json_body())
    used = w.run_metrics.client_report(model_id, step, metrics)
    return jsonify({"model_id": model_id, "step": used, "recorded": len(metrics)})


# ---------------------------------------------------------------------------- helpers


def _visible_run(w: Worker, model_id: str) -> None:
    """404 unless the run exists and is the caller's (an admin's: any). Unloaded runs keep their series."""
    record = w.store.get_model(model_id)
    if record is None or not caller().may_see(record["owner"]):
        raise NotFoundError(f"unknown model_id {model_id!r}", "model_id")


def _int_arg(name: str, default: int, minimum: int, maximum: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not minimum <= int(raw) <= maximum:
        raise UserInputError(f"{name} must be an integer in [{minimum}, {maximum}]", name)
    return int(raw)


def _id_list(name: str) -> list[str]:
    return [part for part in request.args.get(name, "").split(",") if part][:MAX_RUNS]


def _run_json(record: dict[str, Any], queues: dict[str | None, dict[str, int]]) -> dict[str, Any]:
    queue = queues.get(record["model_id"], {"queued": 0, "running": 0})
    return {
        "model_id": record["model_id"], "base_model": record["base_model"], "rank": record["lora"]["rank"],
        "optimizer": record["lora"].get("optimizer", "adamw"), "owner": owner_label(record["owner"]),
        "session_id": record["session_id"], "steps": record["steps"] or 0, "last_loss": record["last_loss"],
        "checkpoints": record["checkpoints"], "last_checkpoint": record["last_checkpoint"],
        "last_sampler_checkpoint": record["last_sampler_checkpoint"], "created_at": record["created_at"],
        "last_activity": record["last_activity"], "unloaded": bool(record["unloaded"]), **queue,
    }


def _worker_state(w: Worker, queues: dict[str | None, dict[str, int]]) -> dict[str, Any]:
    health = _cached_health(w)
    training = [q for model, q in queues.items() if model is not None]
    return {
        "base_model": w.base_model, "status": health["status"], "reasons": health["reasons"],
        "trainer": {"name": health["trainer"], **health["trainer_health"]},
        "sampler": health["sampler"], "memory": health["memory"],
        # Counts over every key (no ids): how busy the worker is, not whose work it is.
        "queues": {"training_queued": sum(q["queued"] for q in training),
                   "training_running": sum(q["running"] for q in training),
                   **{f"sampling_{k}": v for k, v in queues.get(None, {"queued": 0, "running": 0}).items()}},
        "features": {"export": _has_route(EXPORT_ROUTE, "POST")},
    }


def _cached_health(w: Worker) -> dict[str, Any]:
    cache = current_app.extensions.setdefault("tink.dashboard_health", {"lock": threading.Lock(), "at": -1e9})
    with cache["lock"]:
        if time.monotonic() - cache["at"] > HEALTH_TTL_S:
            cache["value"], cache["at"] = w.health(), time.monotonic()
        return cache["value"]


def _has_route(path: str, method: str) -> bool:
    """Whether another blueprint serves it yet (the merged-export button shows once it does)."""
    return any(rule.rule == path and method in (rule.methods or ()) for rule in current_app.url_map.iter_rules())
