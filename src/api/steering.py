"""Named steering vectors: upload, make from two sets of prompts, list, read, delete (src/steering_vectors.py).

    POST   /api/v1/steering_vectors        {"name", "layer", "vector": [...]}                  upload
    POST   /api/v1/steering_vectors        {"name", "layer", "positive": [...], "negative": [...],
                                            "model_id": <optional, base model by default>}     mean difference
    GET    /api/v1/steering_vectors                                                            the caller's
    GET    /api/v1/steering_vectors/<id>   with its values ("format": json | base64 query)
    DELETE /api/v1/steering_vectors/<id>
"""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from ..backends import UserInputError
from ..steering import FORMATS, encode_array, model_dims
from ..steering_vectors import SteeringVectors
from .common import caller, json_body, worker

bp = Blueprint("steering", __name__, url_prefix="/api/v1")


def vectors() -> SteeringVectors:
    """The app's one `SteeringVectors`, made on first use (it reads the base model's config)."""
    found = current_app.extensions.get("tink.steering_vectors")
    if found is None:
        w = worker()
        found = current_app.extensions["tink.steering_vectors"] = SteeringVectors(w.store, model_dims(w.base_model))
    return found


@bp.post("/steering_vectors")
def create_steering_vector():
    body = json_body()
    made_from_prompts = "positive" in body or "negative" in body
    if made_from_prompts == ("vector" in body):
        raise UserInputError("give either vector (upload) or positive and negative (lists of prompts)", "vector")
    if not made_from_prompts:
        record = vectors().upload(caller(), body.get("name"), body.get("layer"), body["vector"])
        return jsonify(record), 201
    w = worker()
    model_id = body.get("model_id", w.base_model)
    adapter = w.resolve_model_id(caller(), model_id).adapter
    tokenizer = current_app.extensions["tink.tokenizer"]()
    record = vectors().mean_difference(caller(), body.get("name"), body.get("layer"), body.get("positive"),
                                       body.get("negative"), lambda text: tokenizer.encode(text, add_special_tokens=True),
                                       w.sample_now, adapter)
    return jsonify({**record, "model_id": model_id}), 201


@bp.get("/steering_vectors")
def list_steering_vectors():
    return jsonify({"steering_vectors": vectors().list(caller())})


@bp.get("/steering_vectors/<vector_id>")
def get_steering_vector(vector_id: str):
    fmt = request.args.get("format", "json")
    if fmt not in FORMATS:
        raise UserInputError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}", "format")
    record, values = vectors().get(caller(), vector_id)
    return jsonify({**record, "vector": encode_array(values, fmt)})


@bp.delete("/steering_vectors/<vector_id>")
def delete_steering_vector(vector_id: str):
    vectors().delete(caller(), vector_id)
    return jsonify({"deleted": vector_id})
