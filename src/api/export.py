"""`POST /api/v1/export`: merge a checkpoint into the base weights, on the worker, into its state dir.

    POST /api/v1/export  {"path": "tinker://<model_id>/sampler_weights/<name>"}
    ->  200 {"path": ..., "directory": "<TINK_STATE_DIR>/exports/<model_id>/sampler_weights/<name>",
             "base_model": ..., "size_bytes": ...}

The caller must be allowed to read the checkpoint as for `load_weights` (its own, or one another
key published); anything else is a 404, as if it did not exist. The answer comes when the folder
is complete (seconds for a small model, minutes for a 7B one); exporting the same path again
replaces the folder. Exports run one at a time, on the CPU, so they never take the trainer's GPU
memory. See `src/export.py`.

    GET /api/v1/exports  ->  200 {"exports": [{"path", "directory", "size_bytes"}, ...]}

lists the exports on disk of the checkpoints the caller may read. An export goes with its checkpoint
(deleted or expired); deleting a checkpoint while its export is being written is a 409 naming it.
"""

from __future__ import annotations

import threading
from pathlib import Path

from flask import Blueprint, jsonify

from ..backends import BackendError, UserInputError
from ..checkpoints import TinkerPath
from ..export import EXPORTS_DIR, EXPORTS_IN_PROGRESS, ExportSource, export_directory, merge_adapter
from .common import caller, json_body, worker

bp = Blueprint("export", __name__, url_prefix="/api/v1")

# One merge at a time per process: each holds a full copy of the base weights in host memory.
_one_at_a_time = threading.Lock()


@bp.post("/export")
def export():
    path = json_body().get("path")
    if not isinstance(path, str) or not path:
        raise UserInputError("path is required: the tinker:// path of a checkpoint to export", "path")
    w, who = worker(), caller()
    directory = export_directory(w.config.state_dir, TinkerPath.parse(path, "path"))
    # In progress from here, queued behind another merge included: deleting the checkpoint meanwhile is a 409.
    with EXPORTS_IN_PROGRESS.exporting(directory, lambda: w.checkpoints.record(who, path, "path")) as record:
        model = w.store.get_model(record["model_id"]) or {}
        source = ExportSource(Path(record["directory"]), model.get("base_model") or w.base_model)
        with _one_at_a_time:
            try:
                size = merge_adapter(source, directory, overwrite=True)
            except UserInputError:
                raise
            except Exception as exc:  # out of host memory, unreadable files: this export fails, the worker serves on
                raise BackendError(f"exporting {path} merged into {source.base_model} failed: "
                                   f"{type(exc).__name__}: {exc}") from exc
    return jsonify({"path": path, "directory": str(directory), "base_model": source.base_model,
                    "size_bytes": size})


@bp.get("/exports")
def list_exports():
    """The merged exports in the state dir whose checkpoint the caller may read, by tinker:// path."""
    w, who = worker(), caller()
    root = w.config.state_dir / EXPORTS_DIR
    found = []
    for folder in sorted(root.glob("*/*/*")) if root.is_dir() else []:
        if folder.name.startswith(".") or not folder.is_dir():  # staging or retired folders of a write
            continue
        path = f"tinker://{folder.parent.parent.name}/{folder.parent.name}/{folder.name}"
        try:
            w.checkpoints.record(who, path, "path")
        except UserInputError:  # another key's, or not a checkpoint (any more)
            continue
        found.append({"path": path, "directory": str(folder),
                      "size_bytes": sum(f.stat().st_size for f in folder.iterdir() if f.is_file())})
    return jsonify({"exports": found})
