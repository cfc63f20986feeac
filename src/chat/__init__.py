"""The chat page: talk to the base model or an adapter with streamed tokens, optionally steered, and see a
captured quantity per generated token. Plain HTML/JS (static/), no build step; it asks for the API key
and then uses only the public JSON API (`/api/v1/sample` with `stream`, `steer`, `capture`).

    GET /chat                     the page (no key needed to load it; it holds no data)
    GET /api/v1/chat/models       what the key may chat with: the base model and its sampler checkpoints

The plotted quantity: with a steering vector on, the projection of the residual stream after the
vector's layer on the vector's direction; without one, the norm of the last layer's residual stream.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, jsonify, send_from_directory

from ..api.common import caller, worker
from ..steering import model_dims

STATIC = Path(__file__).resolve().parent / "static"
STATIC_PREFIX = "/chat/static/"  # like the page, no key needed (src/app.py): no data in them
MAX_CHECKPOINTS = 200  # most recent first

bp = Blueprint("chat", __name__, static_folder=str(STATIC), static_url_path=STATIC_PREFIX.rstrip("/"))


@bp.get("/chat")
def page():
    response = send_from_directory(STATIC, "index.html")
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/api/v1/chat/models")
def models():
    """The base model, then the caller's sampler checkpoints, newest first; and the model's layer count."""
    w, c = worker(), caller()
    checkpoints = []
    for model in w.store.list_models(None if c.admin else c.owner, include_unloaded=True):
        checkpoints += [ckpt for ckpt in w.store.list_checkpoints(model["model_id"]) if ckpt["kind"] == "sampler"]
    checkpoints.sort(key=lambda ckpt: ckpt["created_at"], reverse=True)
    dims = model_dims(w.base_model)
    return jsonify({"base_model": w.base_model, "num_layers": dims.num_layers, "hidden_size": dims.hidden_size,
                    "models": [{"model_id": w.base_model, "label": "base model"}]
                    + [{"model_id": ckpt["tinker_path"], "label": ckpt["tinker_path"]}
                       for ckpt in checkpoints[:MAX_CHECKPOINTS]]})
