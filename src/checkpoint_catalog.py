"""The checkpoints a worker wrote: who may read or change each, its TTL and visibility, and its removal.

Files are laid out and written atomically by src/checkpoints.py; the store keeps one record per
`tinker://` path. A checkpoint the caller may not read answers 404, as if it did not exist, and so
does an expired one until the sweep (`remove_expired`, run by `ExpirySweeper`) removes it.

    >>> catalog = CheckpointCatalog(store, config, base_model)
    >>> catalog.write(TinkerPath(model_id, "sampler", "v1"), lambda d: trainer.export_adapter(model_id, d),
    ...               overwrite=True, user_metadata=None)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .auth import Caller
from .backends import NotFoundError
from .checkpoints import (
    TinkerPath,
    directory_for,
    expiry_for,
    is_expired,
    remove_checkpoint,
    write_atomically,
)
from .config import Config
from .export import EXPORTS_IN_PROGRESS, export_directory
from .optimizers import optimizer_config
from .store import Store

log = logging.getLogger(__name__)


class CheckpointCatalog:
    def __init__(self, store: Store, config: Config, base_model: str):
        self.store, self.config, self.base_model = store, config, base_model

    def write(self, path: TinkerPath, write: Callable[[Path], None], overwrite: bool, user_metadata: Any,
              ttl_seconds: int | None = None) -> int:
        """Write the checkpoint's files with `write(directory)`, then its record; returns its size in bytes."""
        target = directory_for(self.config.checkpoint_dir, path)
        size = write_atomically(target, write, overwrite)
        self.store.put_checkpoint(str(path), path.model_id, path.kind, target, size, user_metadata,
                                  expiry_for(ttl_seconds))
        return size

    def record(self, caller: Caller, path: str, field: str, change: bool = False) -> dict[str, Any]:
        """A live checkpoint the caller may read (its own, or one another key published) or, with
        `change`, may change (its own); else a 404, as if it did not exist."""
        parsed = TinkerPath.parse(path, field)
        record = self.store.get_checkpoint(str(parsed))
        model = self.store.get_model(parsed.model_id)
        allowed = record is not None and model is not None and (
            caller.may_see(model["owner"]) if change else caller.may_read(model["owner"], bool(record["public"])))
        if not allowed or is_expired(record) or not Path(record["directory"]).is_dir():
            raise NotFoundError(f"no checkpoint at {path!r}", field)
        return record

    def directory(self, caller: Caller, path: str, field: str) -> Path:
        return Path(self.record(caller, path, field)["directory"])

    def delete(self, caller: Caller, path: str) -> None:
        """Remove one of the caller's checkpoints: files and record; loading or sampling it is a 404 after."""
        self._remove(self.record(caller, path, "checkpoint_id", change=True))

    def set_public(self, caller: Caller, path: str, public: bool) -> None:
        """Publish (every key may read it) or unpublish one of the caller's checkpoints; idempotent."""
        record = self.record(caller, path, "checkpoint_id", change=True)
        self.store.set_checkpoint_public(record["tinker_path"], public)

    def set_ttl(self, caller: Caller, path: str, ttl_seconds: int | None) -> None:
        """Expire one of the caller's checkpoints `ttl_seconds` from now; None: never."""
        expires_at = expiry_for(ttl_seconds)
        record = self.record(caller, path, "checkpoint_id", change=True)
        self.store.set_checkpoint_expiry(record["tinker_path"], expires_at)

    def weights_info(self, caller: Caller, path: str) -> dict[str, Any]:
        """The SDK's `WeightsInfoResponse` for a checkpoint the caller may read."""
        record = self.record(caller, path, "tinker_path")
        model = self.store.get_model(record["model_id"]) or {}
        lora = model.get("lora", {})
        return {"base_model": model.get("base_model", self.base_model),
                "optimizer_config": optimizer_config(lora.get("optimizer", "adamw")), "is_lora": True,
                "lora_rank": lora.get("rank"), "train_unembed": lora.get("train_unembed"),
                "train_mlp": lora.get("train_mlp"), "train_attn": lora.get("train_attn")}

    def remove_expired(self) -> int:
        """Remove (files and record) every checkpoint whose TTL has run out; returns how many."""
        removed = 0
        for record in self.store.expired_checkpoints(time.time()):
            current = self.store.get_checkpoint(record["tinker_path"])  # not re-saved or given a new TTL since
            if current is None or not is_expired(current):
                continue
            self._remove(current)
            removed += 1
            log.info("removed expired checkpoint %s", record["tinker_path"])
        return removed

    def _remove(self, record: dict[str, Any]) -> None:
        """Remove a checkpoint: its files, its record and its merged export (`POST /api/v1/export`), in
        one hidden rename. While that export is being written, a live checkpoint's removal (DELETE) is
        refused with ExportInProgressError (HTTP 409); an expired one's (the TTL sweep: no reader reaches
        it and no new export starts) waits for the export to finish, then removes it too."""
        path, expired = record["tinker_path"], is_expired(record)
        export = export_directory(self.config.state_dir, TinkerPath.parse(path))
        with EXPORTS_IN_PROGRESS.removing(export, path, wait=expired):
            current = self.store.get_checkpoint(path)  # re-read: the sweep may have waited, and it may be renewed
            if current is None or (expired and not is_expired(current)):
                return
            remove_checkpoint(Path(current["directory"]), lambda: self.store.delete_checkpoint(path), also=(export,))
