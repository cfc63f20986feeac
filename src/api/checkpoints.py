"""Checkpoint management, as `tinker checkpoint ...` and the SDK's RestClient call it: list (one
run's, or all of the caller's), delete, publish/unpublish, TTL, weights info, and downloads.

A download is a set of signed links, one per file, on this worker's own address
(`external_weights_urls`); the link itself is the authority (no API key), valid for
`TINK_DOWNLOAD_URL_TTL_S`, and 403 once expired or altered.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from flask import Blueprint, current_app, jsonify, request, send_from_directory
from tinker import types as sdk
from werkzeug.exceptions import Forbidden

from ..auth import UrlSigner
from ..backends import UserInputError
from ..checkpoints import TinkerPath, is_expired
from ..export import ExportInProgressError
from ..wire import parse_json
from ..worker import NotFoundError
from .common import caller, json_body, query_int, worker

bp = Blueprint("checkpoints", __name__, url_prefix="/api/v1")

SIGNED_FILES_PREFIX = "/api/v1/checkpoint_files/"  # served without an API key: the signature is the authority
MAX_PAGE = 1000  # the most checkpoints one `GET /checkpoints` answers (the CLI asks for at most 1000)
_CHECKPOINT = "/training_runs/<model_id>/checkpoints/<segment>/<name>"


def url_signer() -> UrlSigner:
    return current_app.extensions["tink.url_signer"]


@bp.get("/checkpoints")
def list_user_checkpoints():
    """All of the caller's checkpoints (every key's for an admin), newest first, a page at a time."""
    limit = query_int("limit", 100, 1, MAX_PAGE)
    offset = query_int("offset", 0, 0, None)
    c = caller()
    rows, total = worker().store.list_owner_checkpoints(None if c.admin else c.owner, limit, offset, time.time())
    return jsonify({"checkpoints": [checkpoint_json(r) for r in rows],
                    "cursor": {"offset": offset, "limit": limit, "total_count": total}})


@bp.get("/training_runs/<model_id>/checkpoints")
def list_run_checkpoints(model_id: str):
    """One run's live checkpoints, oldest first; also after the run was unloaded (they outlive it)."""
    w = worker()
    model = w.store.get_model(model_id)
    if model is None or not caller().may_see(model["owner"]):
        raise NotFoundError(f"unknown model_id {model_id!r}", "model_id")
    rows = [r for r in w.store.list_checkpoints(model_id) if not is_expired(r)]
    return jsonify({"checkpoints": [checkpoint_json(r) for r in rows]})


@bp.delete(_CHECKPOINT)
def delete_checkpoint(model_id: str, segment: str, name: str):
    """Its files, its record and its merged export go; 409 while that export is being written."""
    try:
        worker().checkpoints.delete(caller(), _path(model_id, segment, name))
    except ExportInProgressError as exc:  # neither a bad request nor a missing one: retry once it finishes
        return jsonify({"error": str(exc), "field": "checkpoint_id"}), 409
    return "", 204


@bp.post(f"{_CHECKPOINT}/publish")
def publish_checkpoint(model_id: str, segment: str, name: str):
    """Every API key of this server may then read it (sample, load, download); only the owner changes it."""
    worker().checkpoints.set_public(caller(), _path(model_id, segment, name), True)
    return "", 204


@bp.delete(f"{_CHECKPOINT}/publish")
def unpublish_checkpoint(model_id: str, segment: str, name: str):
    worker().checkpoints.set_public(caller(), _path(model_id, segment, name), False)
    return "", 204


@bp.put(f"{_CHECKPOINT}/ttl")
def set_checkpoint_ttl(model_id: str, segment: str, name: str):
    body = json_body()
    if "ttl_seconds" not in body:
        raise UserInputError("ttl_seconds is required: seconds from now (3600 to 10 years), or null for never",
                             "ttl_seconds")
    worker().checkpoints.set_ttl(caller(), _path(model_id, segment, name), body["ttl_seconds"])
    return "", 204


@bp.get(f"{_CHECKPOINT}/external_weights_urls")
def external_weights_urls(model_id: str, segment: str, name: str):
    """The SDK's `ExternalWeightsUrlsResponse`: a signed link per file of an external weights checkpoint."""
    path = _path(model_id, segment, name)
    w = worker()
    record = w.checkpoints.record(caller(), path, "checkpoint_id")
    if record["kind"] != "external":
        raise UserInputError(
            f"{path} is not an external weights checkpoint; export one with save_weights_external "
            "(`tinker checkpoint download` does this for a training checkpoint)", "checkpoint_id")
    expires = int(time.time()) + w.config.download_url_ttl_s
    base = (w.config.public_url or request.host_url).rstrip("/")
    parsed = TinkerPath.parse(path)
    urls = {}
    for file in sorted(p.name for p in _files(record["directory"])):
        resource = f"{SIGNED_FILES_PREFIX}{parsed.model_id}/{segment}/{parsed.name}/{file}"
        query = urlencode({"expires": expires, "signature": url_signer().sign(resource, expires)})
        urls[file] = f"{base}{quote(resource)}?{query}"
    return jsonify({"urls": urls, "expires": datetime.fromtimestamp(expires, tz=UTC).isoformat()})


@bp.get(f"{SIGNED_FILES_PREFIX.removeprefix('/api/v1')}<model_id>/<segment>/<name>/<file>")
def signed_file(model_id: str, segment: str, name: str, file: str):
    """One file of a checkpoint, for whoever holds an unexpired link signed by this server."""
    refusal = url_signer().refusal(request.path, request.args.get("expires"), request.args.get("signature"))
    if refusal:
        raise Forbidden(refusal)
    path = str(TinkerPath.parse(f"tinker://{model_id}/{segment}/{name}"))
    record = worker().store.get_checkpoint(path)
    if record is None or is_expired(record) or file not in {p.name for p in _files(record["directory"])}:
        raise NotFoundError(f"{path} has no file {file!r} any more (deleted or expired)", "file")
    return send_from_directory(record["directory"], file, max_age=0)


@bp.post("/weights_info")
def weights_info():
    body = json_body()
    path = body.get("tinker_path")
    if not isinstance(path, str):
        raise UserInputError("tinker_path is required: the tinker:// path of a checkpoint", "tinker_path")
    return jsonify(worker().checkpoints.weights_info(caller(), path))


@bp.post("/copy_weights")
def copy_weights():
    """Not offered: Tinker copies into another *project*, and a self-hosted worker has none."""
    req = parse_json(sdk.CopyWeightsRequest, json_body())
    raise UserInputError(
        "copy_weights is not available on a self-hosted Tink worker: it copies a checkpoint into a Tinker "
        "project, and this server has no projects. To share a checkpoint with other API keys, publish it "
        "(`tinker checkpoint publish`); to keep your own copy, create_training_client_from_state(path) and "
        "save_state.", "destination_project_id" if req.destination_project_id is not None else "session_id")


def checkpoint_json(row: dict[str, Any]) -> dict[str, Any]:
    """The SDK's `Checkpoint` for a store row."""
    path = TinkerPath.parse(row["tinker_path"])
    return {
        "checkpoint_id": path.checkpoint_id,
        "checkpoint_type": row["kind"],
        "time": _iso(row["created_at"]),
        "tinker_path": row["tinker_path"],
        "size_bytes": row["size_bytes"],
        "public": bool(row["public"]),
        "user_metadata": json.loads(row["user_metadata"] or "null"),
        "expires_at": _iso(row["expires_at"]) if row["expires_at"] is not None else None,
    }


def _path(model_id: str, segment: str, name: str) -> str:
    return str(TinkerPath.of_checkpoint_id(model_id, f"{segment}/{name}"))


def _files(folder: str) -> list[Path]:
    """The files a checkpoint folder holds (flat: PEFT writes no subfolders); none if it is gone."""
    directory = Path(folder)
    if not directory.is_dir():
        return []
    return [p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat()
