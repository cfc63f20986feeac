"""Checkpoint lifetimes across restarts: what expired while the worker was down is removed before
it serves again, and a database from before TTLs and publishing is migrated in place."""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path

from src.store import Store

from .api import post, result
from .conftest import free_port, new_session, start_worker_process
from .test_checkpoint_cli import tinker_cli

_OLD_CHECKPOINTS_TABLE = """
CREATE TABLE checkpoints (
    tinker_path  TEXT PRIMARY KEY,
    model_id     TEXT NOT NULL,
    kind         TEXT NOT NULL,
    directory    TEXT NOT NULL,
    version      INTEGER NOT NULL,
    size_bytes   INTEGER,
    user_metadata TEXT,
    created_at   REAL NOT NULL
);
"""


def test_checkpoints_that_expired_while_down_are_removed_at_start(tiny_model_path, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    slow_timer = {"TINK_CHECKPOINT_SWEEP_S": "3600"}  # only the sweep at start can remove anything here
    proc = start_worker_process(tiny_model_path, tmp_path, port, **slow_timer)
    try:
        created = post(url, "create_model", {"session_id": new_session(), "model_seq_id": 0,
                                             "base_model": str(tiny_model_path), "lora_config": {"rank": 4}})
        model_id = created["model_id"]
        result(url, created["request_id"])
        paths = {}
        for name, ttl in (("expiring", None), ("saved-with-ttl", 3600), ("lasting", None)):
            body = {"model_id": model_id, "path": name, **({"ttl_seconds": ttl} if ttl else {})}
            paths[name] = result(url, post(url, "save_weights", body)["request_id"])["path"]
        assert tinker_cli(url, "checkpoint", "set-ttl", paths["expiring"], "--ttl", "3600").returncode == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0

    store = Store(tmp_path / "tink.sqlite3")
    folders = {name: Path(store.get_checkpoint(p)["directory"]) for name, p in paths.items()}
    assert store.get_checkpoint(paths["saved-with-ttl"])["expires_at"] > time.time() + 3000
    for name in ("expiring", "saved-with-ttl"):  # the hour passed while the worker was down
        store.set_checkpoint_expiry(paths[name], time.time() - 1)
    # A removal a crash interrupted: the hidden folder is cleared at start too.
    leftover = folders["lasting"].parent / ".gone.deleted-abc123"
    (leftover / "c").mkdir(parents=True)
    store.close()

    proc = start_worker_process(tiny_model_path, tmp_path, port, **slow_timer)
    try:
        store = Store(tmp_path / "tink.sqlite3")
        for name in ("expiring", "saved-with-ttl"):
            assert store.get_checkpoint(paths[name]) is None and not folders[name].exists(), name
        assert store.get_checkpoint(paths["lasting"])["expires_at"] is None and folders["lasting"].is_dir()
        assert not leftover.exists()
        store.close()
        loaded = post(url, "load_weights", {"model_id": model_id, "path": paths["lasting"], "optimizer": True})
        assert result(url, loaded["request_id"])["path"] == paths["lasting"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def test_a_database_from_before_gets_the_new_checkpoint_columns(tmp_path):
    path = tmp_path / "tink.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(_OLD_CHECKPOINTS_TABLE)
    old.execute("INSERT INTO checkpoints VALUES ('tinker://m/weights/a', 'm', 'training', '/x', 1, 10, 'null', 1.0)")
    old.commit()
    old.close()

    store = Store(path)
    row = store.get_checkpoint("tinker://m/weights/a")
    assert row["public"] == 0 and row["expires_at"] is None and row["size_bytes"] == 10
    store.set_checkpoint_public("tinker://m/weights/a", True)
    store.set_checkpoint_expiry("tinker://m/weights/a", 123.0)
    store.close()
    reopened = Store(path)  # a second open finds the columns and adds nothing
    row = reopened.get_checkpoint("tinker://m/weights/a")
    assert row["public"] == 1 and row["expires_at"] == 123.0
    reopened.close()
