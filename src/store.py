"""Durable worker state in SQLite: futures and their results, sessions, models, checkpoints.

A future is written (status `pending`) before its id is returned to the client, and its
result is written before it is marked `done`, so a worker killed at any point never
loses an acknowledged request: on restart, `fail_unfinished()` turns what was pending or
running into a failure with a reason the client can act on (retry).

One connection shared by all threads behind a lock; WAL mode keeps writes cheap and
`synchronous=FULL` makes every commit durable before we answer.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS futures (
    request_id   TEXT PRIMARY KEY,
    model_id     TEXT,
    owner        TEXT NOT NULL,
    op           TEXT NOT NULL,
    status       TEXT NOT NULL,            -- pending | running | done | failed
    result_kind  TEXT,                     -- json | proto:<MessageName>
    result       BLOB,
    error        TEXT,
    category     TEXT,                     -- user | server | unknown (tinker RequestErrorCategory)
    created_at   REAL NOT NULL,
    finished_at  REAL
);
CREATE INDEX IF NOT EXISTS futures_status ON futures(status);
CREATE TABLE IF NOT EXISTS sessions (
    session_id   TEXT PRIMARY KEY,
    owner        TEXT NOT NULL,
    sdk_version  TEXT,
    tags         TEXT,
    created_at   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
    model_id     TEXT PRIMARY KEY,
    owner        TEXT NOT NULL,
    session_id   TEXT,
    base_model   TEXT NOT NULL,
    lora         TEXT NOT NULL,           -- JSON of LoraSpec
    user_metadata TEXT,
    created_at   REAL NOT NULL,
    unloaded     INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS checkpoints (
    tinker_path  TEXT PRIMARY KEY,
    model_id     TEXT NOT NULL,
    kind         TEXT NOT NULL,           -- training | sampler
    directory    TEXT NOT NULL,
    version      INTEGER NOT NULL,        -- bumps on overwrite: sampler caches key on it
    size_bytes   INTEGER,
    user_metadata TEXT,
    created_at   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sampling_sessions (
    sampling_session_id TEXT PRIMARY KEY,
    owner        TEXT NOT NULL,
    base_model   TEXT NOT NULL,
    model_path   TEXT,
    clients      INTEGER NOT NULL DEFAULT 0,  -- join_sampling_session hands out 1, 2, ...
    created_at   REAL NOT NULL
);
"""

RESTART_REASON = (
    "The Tink worker restarted before this request finished; nothing of it was applied "
    "after the last completed operation. Submit the request again."
)


@dataclass
class FutureRecord:
    request_id: str
    model_id: str | None
    owner: str
    op: str
    status: str
    result_kind: str | None
    result: bytes | None
    error: str | None
    category: str | None

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed")


class Store:
    """Thread-safe access to the worker's SQLite database."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except UnicodeEncodeError:
                # An id with a lone surrogate (valid JSON, not UTF-8) can never have been stored,
                # so it matches nothing: the caller answers 404 rather than 500.
                return []

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ futures

    def add_future(self, request_id: str, op: str, model_id: str | None, owner: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO futures(request_id, model_id, owner, op, status, created_at) VALUES (?,?,?,?,?,?)",
                (request_id, model_id, owner, op, "pending", time.time()),
            )

    def mark_running(self, request_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE futures SET status='running' WHERE request_id=?", (request_id,))

    def finish_future(self, request_id: str, result_kind: str, result: bytes) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE futures SET status='done', result_kind=?, result=?, finished_at=? WHERE request_id=?",
                (result_kind, result, time.time(), request_id),
            )

    def fail_future(self, request_id: str, error: str, category: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE futures SET status='failed', error=?, category=?, finished_at=? WHERE request_id=?",
                (error, category, time.time(), request_id),
            )

    def get_future(self, request_id: str) -> FutureRecord | None:
        rows = self._query(
            "SELECT request_id, model_id, owner, op, status, result_kind, result, error, category "
            "FROM futures WHERE request_id=?",
            (request_id,),
        )
        return FutureRecord(**dict(rows[0])) if rows else None

    def failed_futures(self, category: str) -> list[tuple[str, str]]:
        """(request_id, error) of every future failed with `category` (`user` or `server`)."""
        rows = self._query("SELECT request_id, error FROM futures WHERE category=?", (category,))
        return [(r[0], r[1]) for r in rows]

    def fail_unfinished(self) -> int:
        """Mark every future left pending/running by a previous process as failed; return how many."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE futures SET status='failed', error=?, category='server', finished_at=? "
                "WHERE status IN ('pending','running')",
                (RESTART_REASON, time.time()),
            )
            return cur.rowcount

    # ------------------------------------------------------------------ sessions and models

    def add_session(self, session_id: str, owner: str, sdk_version: str, tags: list[str]) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO sessions(session_id, owner, sdk_version, tags, created_at) VALUES (?,?,?,?,?)",
                (session_id, owner, sdk_version, json.dumps(tags), time.time()),
            )

    def session_exists(self, session_id: str) -> bool:
        return bool(self._query("SELECT 1 FROM sessions WHERE session_id=?", (session_id,)))

    def add_model(
        self, model_id: str, owner: str, session_id: str | None, base_model: str, lora: dict, user_metadata: Any
    ) -> bool:
        """Insert a model; False if the id is taken (ids come from the client's session and seq id)."""
        with self._tx() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO models(model_id, owner, session_id, base_model, lora, user_metadata, "
                "created_at) VALUES (?,?,?,?,?,?,?)",
                (model_id, owner, session_id, base_model, json.dumps(lora), json.dumps(user_metadata), time.time()),
            )
            return cursor.rowcount == 1

    def get_model(self, model_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM models WHERE model_id=?", (model_id,))
        if not rows:
            return None
        row = dict(rows[0])
        row["lora"] = json.loads(row["lora"])
        row["user_metadata"] = json.loads(row["user_metadata"] or "null")
        return row

    def mark_unloaded(self, model_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE models SET unloaded=1 WHERE model_id=?", (model_id,))

    def count_models(self, owner: str | None = None) -> int:
        if owner is None:
            return int(self._query("SELECT COUNT(*) FROM models WHERE unloaded=0")[0][0])
        return int(self._query("SELECT COUNT(*) FROM models WHERE unloaded=0 AND owner=?", (owner,))[0][0])

    def list_models(self, owner: str | None) -> list[dict[str, Any]]:
        """Live models of `owner` (all owners when None), oldest first."""
        if owner is None:
            rows = self._query("SELECT model_id FROM models WHERE unloaded=0 ORDER BY created_at")
        else:
            rows = self._query(
                "SELECT model_id FROM models WHERE unloaded=0 AND owner=? ORDER BY created_at", (owner,))
        return [m for m in (self.get_model(r[0]) for r in rows) if m is not None]

    # ------------------------------------------------------------------ checkpoints

    def put_checkpoint(
        self,
        tinker_path: str,
        model_id: str,
        kind: str,
        directory: Path,
        size_bytes: int,
        user_metadata: dict | None,
    ) -> int:
        """Record (or overwrite) a checkpoint; returns its version, unique per tinker path."""
        with self._tx() as db:
            row = db.execute("SELECT version FROM checkpoints WHERE tinker_path=?", (tinker_path,)).fetchone()
            version = (row[0] + 1) if row else 1
            db.execute(
                "INSERT OR REPLACE INTO checkpoints(tinker_path, model_id, kind, directory, version, "
                "size_bytes, user_metadata, created_at) VALUES (?,?,?,?,?,?,?,?)",
                (tinker_path, model_id, kind, str(directory), version, size_bytes,
                 json.dumps(user_metadata), time.time()),
            )
            return version

    def get_checkpoint(self, tinker_path: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM checkpoints WHERE tinker_path=?", (tinker_path,))
        return dict(rows[0]) if rows else None

    def list_checkpoints(self, model_id: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query(
            "SELECT * FROM checkpoints WHERE model_id=? ORDER BY created_at", (model_id,))]

    def delete_checkpoint(self, tinker_path: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM checkpoints WHERE tinker_path=?", (tinker_path,))

    # ------------------------------------------------------------------ sampling sessions

    def add_sampling_session(
        self, sampling_session_id: str, owner: str, base_model: str, model_path: str | None
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO sampling_sessions(sampling_session_id, owner, base_model, model_path, created_at) "
                "VALUES (?,?,?,?,?)",
                (sampling_session_id, owner, base_model, model_path, time.time()),
            )

    def join_sampling_session(self, sampling_session_id: str) -> int:
        """Allocate the next client number of a sampling session (unique within it, durable)."""
        with self._tx() as db:
            db.execute("UPDATE sampling_sessions SET clients = clients + 1 WHERE sampling_session_id=?",
                       (sampling_session_id,))
            row = db.execute("SELECT clients FROM sampling_sessions WHERE sampling_session_id=?",
                             (sampling_session_id,)).fetchone()
        return int(row[0])

    def get_sampling_session(self, sampling_session_id: str) -> dict[str, Any] | None:
        rows = self._query(
            "SELECT * FROM sampling_sessions WHERE sampling_session_id=?", (sampling_session_id,))
        return dict(rows[0]) if rows else None
