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
    status       TEXT NOT NULL,            -- pending | running | done | failed | cancelled
    result_kind  TEXT,                     -- json | proto:<MessageName>
    result       BLOB,
    error        TEXT,
    category     TEXT,                     -- user | server | unknown (tinker RequestErrorCategory)
    created_at   REAL NOT NULL,            -- queued
    finished_at  REAL,
    started_at   REAL,                     -- the scheduler began running it
    session_id   TEXT,                     -- the client session of its model / sampling session
    sampling_session_id TEXT,              -- samples: the sampler whose retrieve_futures reports it
    sampler_clone INTEGER,                 -- samples: the SDK client's clone number (seq_id // 1e9)
    completion_seq INTEGER                 -- order of finishing, across all futures: retrieve_futures' cursor
);
CREATE INDEX IF NOT EXISTS futures_status ON futures(status);
CREATE TABLE IF NOT EXISTS sessions (
    session_id   TEXT PRIMARY KEY,
    owner        TEXT NOT NULL,
    sdk_version  TEXT,
    tags         TEXT,
    created_at   REAL NOT NULL,
    user_metadata TEXT,                   -- JSON object or NULL
    display_name TEXT,
    project_id   TEXT,
    last_heartbeat_at REAL,
    finished_at  REAL,
    finish_reason TEXT,                   -- success | errored | interrupted (the client's close) | expired
    finish_detail TEXT
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
    created_at   REAL NOT NULL,
    public       INTEGER NOT NULL DEFAULT 0,  -- published: every API key may read it
    expires_at   REAL                     -- removed (files and row) after this time; NULL: never
);
CREATE TABLE IF NOT EXISTS sampling_sessions (
    sampling_session_id TEXT PRIMARY KEY,
    owner        TEXT NOT NULL,
    base_model   TEXT NOT NULL,
    model_path   TEXT,
    clients      INTEGER NOT NULL DEFAULT 0,  -- join_sampling_session hands out 1, 2, ...
    created_at   REAL NOT NULL,
    session_id   TEXT                     -- the client session that opened it (its owner's only)
);
"""

# Columns of futures / sessions / sampling_sessions added after their first release, and the indexes
# on them (created after the columns exist): a database from before gets them on open.
_FUTURE_COLUMNS_ADDED = {"started_at": "REAL", "session_id": "TEXT", "sampling_session_id": "TEXT",
                         "sampler_clone": "INTEGER", "completion_seq": "INTEGER"}
_SESSION_COLUMNS_ADDED = {"user_metadata": "TEXT", "display_name": "TEXT", "project_id": "TEXT",
                          "last_heartbeat_at": "REAL", "finished_at": "REAL", "finish_reason": "TEXT",
                          "finish_detail": "TEXT"}
_SAMPLING_SESSION_COLUMNS_ADDED = {"session_id": "TEXT"}
_SESSION_INDEXES = """
CREATE INDEX IF NOT EXISTS futures_session ON futures(session_id);
CREATE INDEX IF NOT EXISTS futures_completion ON futures(completion_seq);
CREATE INDEX IF NOT EXISTS futures_sampler ON futures(sampling_session_id, sampler_clone, completion_seq);
CREATE INDEX IF NOT EXISTS models_session ON models(session_id);
CREATE INDEX IF NOT EXISTS sampling_sessions_session ON sampling_sessions(session_id);
"""
# The next completion number, computed inside the write transaction that finishes a future.
_NEXT_COMPLETION = "(SELECT COALESCE(MAX(completion_seq), 0) + 1 FROM futures)"

# Columns added to `checkpoints` after its first release: a database from before gets them on open.
_CHECKPOINT_COLUMNS_ADDED = {
    "public": "INTEGER NOT NULL DEFAULT 0",
    "expires_at": "REAL",
}

# The dashboard's per-step series (src/run_metrics.py): one cell per (run, source, name, step) that each
# operation folds into; `seq` orders changes, so a poll asks only for cells changed since its last one.
# CREATE ... IF NOT EXISTS: a database from before this table gets it on open.
_RUN_METRICS_SCHEMA = """
CREATE TABLE IF NOT EXISTS run_metrics (
    model_id     TEXT NOT NULL,
    source       TEXT NOT NULL,           -- worker (recorded as operations finish) | client (reported)
    name         TEXT NOT NULL,
    step         INTEGER NOT NULL,        -- the optimizer step it belongs to (1 = the first)
    total        REAL,                    -- sum of the values folded in (NULL once a NaN was)
    weight       REAL,                    -- sum of their weights (tokens, or 1 each)
    last         REAL,                    -- the value folded in last
    seq          INTEGER NOT NULL,        -- bumped on every change, across all runs
    updated_at   REAL NOT NULL,
    PRIMARY KEY (model_id, source, name, step)
);
CREATE INDEX IF NOT EXISTS run_metrics_seq ON run_metrics(seq);
CREATE INDEX IF NOT EXISTS run_metrics_activity ON run_metrics(model_id, updated_at);
CREATE INDEX IF NOT EXISTS checkpoints_model ON checkpoints(model_id);
"""

# Named steering vectors (src/api/steering.py): float32 little-endian bytes, owned by an API key like adapters.
_STEERING_SCHEMA = """
CREATE TABLE IF NOT EXISTS steering_vectors (
    vector_id    TEXT PRIMARY KEY,
    owner        TEXT NOT NULL,
    name         TEXT NOT NULL,
    layer        INTEGER NOT NULL,        -- the decoder layer whose residual stream it steers by default
    hidden_size  INTEGER NOT NULL,
    vector       BLOB NOT NULL,
    source       TEXT NOT NULL,           -- upload | mean_difference
    created_at   REAL NOT NULL
);
"""

RESTART_REASON = (
    "The Tink worker restarted before this request finished; nothing of it was applied "
    "after the last completed operation. Submit the request again."
)
SESSION_EXPIRED = "expired"  # finish_reason of a session the worker ended: not heard from for TINK_SESSION_EXPIRY_S


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
        return self.status in ("done", "failed", "cancelled")


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
        self._add_missing_columns("checkpoints", _CHECKPOINT_COLUMNS_ADDED)
        self._migrate_sessions()
        with self._lock:
            self._db.executescript(_RUN_METRICS_SCHEMA)
            self._db.executescript(_STEERING_SCHEMA)

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

    def _add_missing_columns(self, table: str, columns: dict[str, str]) -> None:
        """Migrate a database written by an older Tink: ALTER TABLE for each column it lacks."""
        with self._lock:
            present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for name, declaration in columns.items():
                if name not in present:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")

    def _migrate_sessions(self) -> None:
        """Bring futures / sessions / sampling_sessions of an older database up to this schema. Futures
        recorded before they named their session get it from their model (training operations)."""
        with self._lock:
            had_session = "session_id" in {r[1] for r in self._db.execute("PRAGMA table_info(futures)")}
        self._add_missing_columns("futures", _FUTURE_COLUMNS_ADDED)
        self._add_missing_columns("sessions", _SESSION_COLUMNS_ADDED)
        self._add_missing_columns("sampling_sessions", _SAMPLING_SESSION_COLUMNS_ADDED)
        with self._lock:
            self._db.executescript(_SESSION_INDEXES)
        if not had_session:
            with self._tx() as db:
                db.execute("UPDATE futures SET session_id = (SELECT m.session_id FROM models m WHERE "
                           "m.model_id = futures.model_id AND m.owner = futures.owner) WHERE model_id IS NOT NULL")

    # ------------------------------------------------------------------ futures

    def add_future(
        self, request_id: str, op: str, model_id: str | None, owner: str,
        sampling_session_id: str | None = None, sampler_clone: int | None = None,
    ) -> None:
        """Record a pending future. Its session is its model's (training) or its sampler's (sampling),
        and only when that one belongs to the same owner."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO futures(request_id, model_id, owner, op, status, created_at, sampling_session_id, "
                "sampler_clone, session_id) VALUES (?,?,?,?,?,?,?,?, COALESCE("
                "(SELECT session_id FROM models WHERE model_id=? AND owner=?), "
                "(SELECT session_id FROM sampling_sessions WHERE sampling_session_id=? AND owner=?)))",
                (request_id, model_id, owner, op, "pending", time.time(), sampling_session_id, sampler_clone,
                 model_id, owner, sampling_session_id, owner),
            )
            # An operation is the session's client speaking, as a heartbeat is (TINK_SESSION_EXPIRY_S).
            db.execute("UPDATE sessions SET last_heartbeat_at=? WHERE session_id="
                       "(SELECT session_id FROM futures WHERE request_id=?)", (time.time(), request_id))

    def mark_running(self, request_id: str) -> None:
        """The scheduler starts running it now (`started_at`, for the session trace)."""
        with self._tx() as db:
            db.execute("UPDATE futures SET status='running', started_at=? WHERE request_id=?",
                       (time.time(), request_id))

    def finish_future(self, request_id: str, result_kind: str, result: bytes) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE futures SET status='done', result_kind=?, result=?, finished_at=?, "
                f"completion_seq={_NEXT_COMPLETION} WHERE request_id=?",
                (result_kind, result, time.time(), request_id),
            )

    def fail_future(self, request_id: str, error: str, category: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE futures SET status='failed', error=?, category=?, finished_at=?, "
                f"completion_seq={_NEXT_COMPLETION} WHERE request_id=?",
                (error, category, time.time(), request_id),
            )

    def cancel_future(self, request_id: str, reason: str) -> bool:
        """Mark a future that never started as cancelled (a user-category failure); False if it had started."""
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE futures SET status='cancelled', error=?, category='user', finished_at=?, "
                f"completion_seq={_NEXT_COMPLETION} WHERE request_id=? AND status='pending'",
                (reason, time.time(), request_id),
            )
            return cursor.rowcount == 1

    def get_future(self, request_id: str) -> FutureRecord | None:
        rows = self._query(
            "SELECT request_id, model_id, owner, op, status, result_kind, result, error, category "
            "FROM futures WHERE request_id=?",
            (request_id,),
        )
        return FutureRecord(**dict(rows[0])) if rows else None

    def session_futures(self, session_id: str, owner: str) -> list[dict[str, Any]]:
        """Every operation of a session (without results), in the order they were queued."""
        return [dict(r) for r in self._query(
            "SELECT request_id, model_id, op, status, error, category, created_at, started_at, finished_at, "
            "sampling_session_id FROM futures WHERE session_id=? AND owner=? ORDER BY created_at, rowid",
            (session_id, owner))]

    def sampler_completions(
        self, sampling_session_id: str, sampler_clone: int, after: int
    ) -> list[tuple[int, str, str, int | None]]:
        """(completion_seq, request_id, status, result size) of the sampler's futures that finished after
        completion number `after`, in finishing order."""
        rows = self._query(
            "SELECT completion_seq, request_id, status, length(result) FROM futures WHERE sampling_session_id=? "
            "AND sampler_clone=? AND completion_seq > ? ORDER BY completion_seq",
            (sampling_session_id, sampler_clone, after))
        return [(int(r[0]), r[1], r[2], r[3]) for r in rows]

    def failed_futures(self, category: str) -> list[tuple[str, str]]:
        """(request_id, error) of every future failed with `category` (`user` or `server`)."""
        rows = self._query("SELECT request_id, error FROM futures WHERE category=?", (category,))
        return [(r[0], r[1]) for r in rows]

    def fail_unfinished(self) -> int:
        """Mark every future left pending/running by a previous process as failed; return how many."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE futures SET status='failed', error=?, category='server', finished_at=?, "
                f"completion_seq={_NEXT_COMPLETION} WHERE status IN ('pending','running')",
                (RESTART_REASON, time.time()),
            )
            return cur.rowcount

    # ------------------------------------------------------------------ sessions and models

    def add_session(
        self, session_id: str, owner: str, sdk_version: str, tags: list[str],
        user_metadata: dict[str, Any] | None = None, display_name: str | None = None,
        project_id: str | None = None,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO sessions(session_id, owner, sdk_version, tags, created_at, user_metadata, "
                "display_name, project_id) VALUES (?,?,?,?,?,?,?,?)",
                (session_id, owner, sdk_version, json.dumps(tags), time.time(),
                 None if user_metadata is None else json.dumps(user_metadata), display_name, project_id),
            )

    def session_exists(self, session_id: str) -> bool:
        return bool(self._query("SELECT 1 FROM sessions WHERE session_id=?", (session_id,)))

    def get_session(self, session_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM sessions WHERE session_id=?", (session_id,))
        return _session_row(rows[0]) if rows else None

    def list_sessions(self, owner: str | None) -> list[dict[str, Any]]:
        """Sessions of `owner` (every owner's when None), newest first."""
        if owner is None:
            rows = self._query("SELECT * FROM sessions ORDER BY created_at DESC, session_id DESC")
        else:
            rows = self._query("SELECT * FROM sessions WHERE owner=? ORDER BY created_at DESC, session_id DESC",
                               (owner,))
        return [_session_row(r) for r in rows]

    def session_ids_page(self, owner: str | None, limit: int, offset: int) -> list[str]:
        """A page of session ids of `owner` (every owner's when None), newest first."""
        where, args = ("", ()) if owner is None else ("WHERE owner=?", (owner,))
        rows = self._query(f"SELECT session_id FROM sessions {where} ORDER BY created_at DESC, session_id DESC "
                           "LIMIT ? OFFSET ?", (*args, limit, offset))
        return [r[0] for r in rows]

    def touch_session(self, session_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE sessions SET last_heartbeat_at=? WHERE session_id=?", (time.time(), session_id))

    def finish_session(self, session_id: str, reason: str, detail: str | None) -> bool:
        """Record the client's close; the first reason wins (False if it was finished already)."""
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE sessions SET finished_at=?, finish_reason=?, finish_detail=? "
                "WHERE session_id=? AND finished_at IS NULL", (time.time(), reason, detail, session_id))
            return cursor.rowcount == 1

    def expire_idle_sessions(self, heard_before: float, detail: str) -> list[dict[str, Any]]:
        """Mark `expired` (finish_reason) every open session last heard from (heartbeat, operation or
        creation) before `heard_before` that has no operation pending or running; return them. One
        transaction: an operation accepted meanwhile either counts as heard or comes after the mark."""
        idle = ("finished_at IS NULL AND COALESCE(last_heartbeat_at, created_at) < ? AND NOT EXISTS "
                "(SELECT 1 FROM futures f WHERE f.session_id = sessions.session_id "
                "AND f.status IN ('pending','running'))")
        with self._tx() as db:
            rows = db.execute(f"SELECT * FROM sessions WHERE {idle}", (heard_before,)).fetchall()
            db.executemany("UPDATE sessions SET finished_at=?, finish_reason=?, finish_detail=? WHERE session_id=?",
                           [(time.time(), SESSION_EXPIRED, detail, r["session_id"]) for r in rows])
        return [_session_row(r) for r in rows]

    def stranded_expired_runs(self) -> list[tuple[str, str]]:
        """(model id, owner) of runs still loaded in an expired session with nothing queued for them: their
        save-then-unload failed (e.g. a full disk) and the next sweep tries again."""
        rows = self._query(
            "SELECT m.model_id, m.owner FROM models m JOIN sessions s ON s.session_id = m.session_id "
            "WHERE s.finish_reason=? AND m.unloaded=0 AND NOT EXISTS (SELECT 1 FROM futures f "
            "WHERE f.model_id = m.model_id AND f.status IN ('pending','running')) ORDER BY m.created_at",
            (SESSION_EXPIRED,))
        return [(r[0], r[1]) for r in rows]

    def count_expired_sessions(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM sessions WHERE finish_reason=?", (SESSION_EXPIRED,))[0][0])

    def session_members(self, session_id: str, owner: str) -> tuple[list[str], list[str]]:
        """(model ids, sampling session ids) opened in the session by its owner, oldest first."""
        models = self._query("SELECT model_id FROM models WHERE session_id=? AND owner=? ORDER BY created_at, rowid",
                             (session_id, owner))
        samplers = self._query("SELECT sampling_session_id FROM sampling_sessions WHERE session_id=? AND owner=? "
                               "ORDER BY created_at, rowid", (session_id, owner))
        return [r[0] for r in models], [r[0] for r in samplers]

    def session_checkpoint_usage(self, session_id: str, owner: str) -> tuple[int, int]:
        """(how many checkpoints, their bytes) of the session's models."""
        row = self._query(
            "SELECT COUNT(*), COALESCE(SUM(c.size_bytes), 0) FROM checkpoints c JOIN models m "
            "ON m.model_id = c.model_id WHERE m.session_id=? AND m.owner=?", (session_id, owner))[0]
        return int(row[0]), int(row[1])

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

    def list_models(self, owner: str | None, include_unloaded: bool = False) -> list[dict[str, Any]]:
        """Live models of `owner` (all owners when None), oldest first; with `include_unloaded`, every
        training run ever made (a run's record and checkpoints outlive its loaded adapter)."""
        live = "" if include_unloaded else "unloaded=0"
        if owner is None:
            rows = self._query(f"SELECT model_id FROM models {'WHERE ' + live if live else ''} ORDER BY created_at")
        else:
            rows = self._query(f"SELECT model_id FROM models WHERE {live + ' AND ' if live else ''}owner=? "
                               "ORDER BY created_at", (owner,))
        return [m for m in (self.get_model(r[0]) for r in rows) if m is not None]

    # ------------------------------------------------------------------ steering vectors

    def add_steering_vector(self, vector_id: str, owner: str, name: str, layer: int, vector: bytes,
                            hidden_size: int, source: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO steering_vectors VALUES (?,?,?,?,?,?,?,?)",
                       (vector_id, owner, name, layer, hidden_size, vector, source, time.time()))

    def get_steering_vector(self, vector_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM steering_vectors WHERE vector_id=?", (vector_id,))
        return dict(rows[0]) if rows else None

    def list_steering_vectors(self, owner: str | None) -> list[dict[str, Any]]:
        """`owner`'s vectors (everyone's when None), oldest first, without their values."""
        columns = "vector_id, owner, name, layer, hidden_size, source, created_at"
        if owner is None:
            return [dict(r) for r in self._query(f"SELECT {columns} FROM steering_vectors ORDER BY created_at")]
        return [dict(r) for r in self._query(f"SELECT {columns} FROM steering_vectors WHERE owner=? "
                                             "ORDER BY created_at", (owner,))]

    def delete_steering_vector(self, vector_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM steering_vectors WHERE vector_id=?", (vector_id,))

    # ------------------------------------------------------------------ checkpoints

    def put_checkpoint(
        self,
        tinker_path: str,
        model_id: str,
        kind: str,
        directory: Path,
        size_bytes: int,
        user_metadata: dict | None,
        expires_at: float | None = None,
    ) -> int:
        """Record (or overwrite) a checkpoint; returns its version, unique per tinker path.

        An overwrite takes the new expiry (None: never) and keeps `public`: the path was published.
        """
        with self._tx() as db:
            row = db.execute("SELECT version FROM checkpoints WHERE tinker_path=?", (tinker_path,)).fetchone()
            version = (row[0] + 1) if row else 1
            db.execute(
                "INSERT INTO checkpoints(tinker_path, model_id, kind, directory, version, size_bytes, "
                "user_metadata, created_at, expires_at) VALUES (?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(tinker_path) DO UPDATE SET model_id=excluded.model_id, kind=excluded.kind, "
                "directory=excluded.directory, version=excluded.version, size_bytes=excluded.size_bytes, "
                "user_metadata=excluded.user_metadata, created_at=excluded.created_at, "
                "expires_at=excluded.expires_at",
                (tinker_path, model_id, kind, str(directory), version, size_bytes,
                 json.dumps(user_metadata), time.time(), expires_at),
            )
            return version

    def get_checkpoint(self, tinker_path: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM checkpoints WHERE tinker_path=?", (tinker_path,))
        return dict(rows[0]) if rows else None

    def list_checkpoints(self, model_id: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query(
            "SELECT * FROM checkpoints WHERE model_id=? ORDER BY created_at", (model_id,))]

    def list_owner_checkpoints(
        self, owner: str | None, limit: int, offset: int, now: float
    ) -> tuple[list[dict[str, Any]], int]:
        """A page of the unexpired checkpoints of `owner`'s models (every owner's when None), newest
        first, and how many there are in all."""
        where = "(c.expires_at IS NULL OR c.expires_at > ?)" + ("" if owner is None else " AND m.owner=?")
        args: tuple = (now,) if owner is None else (now, owner)
        join = "FROM checkpoints c JOIN models m ON m.model_id = c.model_id WHERE " + where
        total = int(self._query(f"SELECT COUNT(*) {join}", args)[0][0])
        rows = self._query(f"SELECT c.* {join} ORDER BY c.created_at DESC, c.tinker_path LIMIT ? OFFSET ?",
                           (*args, limit, offset))
        return [dict(r) for r in rows], total

    def expired_checkpoints(self, now: float) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query(
            "SELECT * FROM checkpoints WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))]

    def set_checkpoint_public(self, tinker_path: str, public: bool) -> None:
        with self._tx() as db:
            db.execute("UPDATE checkpoints SET public=? WHERE tinker_path=?", (int(public), tinker_path))

    def set_checkpoint_expiry(self, tinker_path: str, expires_at: float | None) -> None:
        with self._tx() as db:
            db.execute("UPDATE checkpoints SET expires_at=? WHERE tinker_path=?", (expires_at, tinker_path))

    def delete_checkpoint(self, tinker_path: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM checkpoints WHERE tinker_path=?", (tinker_path,))

    # ------------------------------------------------------------------ sampling sessions

    def add_sampling_session(
        self, sampling_session_id: str, owner: str, base_model: str, model_path: str | None,
        session_id: str | None = None,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO sampling_sessions(sampling_session_id, owner, base_model, model_path, created_at, "
                "session_id) VALUES (?,?,?,?,?,?)",
                (sampling_session_id, owner, base_model, model_path, time.time(), session_id),
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


    # ------------------------------------------------------------------ run metrics (the dashboard)

    def add_run_metrics(self, model_id: str, step: int, source: str,
                        values: dict[str, tuple[float, float, float]]) -> None:
        """Fold (total, weight, last) into each named cell of the run's `step`: totals and weights add
        up, `last` is replaced, and every changed cell takes the next `seq`, in one transaction."""
        now = time.time()
        with self._tx() as db:
            seq = int(db.execute("SELECT COALESCE(MAX(seq), 0) FROM run_metrics").fetchone()[0])
            for name, (total, weight, last) in values.items():
                seq += 1
                db.execute(
                    "INSERT INTO run_metrics(model_id, source, name, step, total, weight, last, seq, updated_at) "
                    "VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(model_id, source, name, step) DO UPDATE SET "
                    "total=total+excluded.total, weight=weight+excluded.weight, last=excluded.last, "
                    "seq=excluded.seq, updated_at=excluded.updated_at",
                    (model_id, source, name, step, total, weight, last, seq, now))

    def last_run_step(self, model_id: str, source: str, name: str) -> int:
        """The highest step with a `name` cell in the run (0 if none)."""
        rows = self._query("SELECT MAX(step) FROM run_metrics WHERE model_id=? AND source=? AND name=?",
                           (model_id, source, name))
        return int(rows[0][0] or 0) if rows else 0

    def run_metric_names(self, model_id: str, source: str) -> set[str]:
        return {r[0] for r in self._query("SELECT DISTINCT name FROM run_metrics WHERE model_id=? AND source=?",
                                          (model_id, source))}

    def run_metric_cells(self, model_ids: list[str], after_seq: int, limit: int) -> list[dict[str, Any]]:
        """Cells of these runs changed after `after_seq`, oldest change first, at most `limit`."""
        if not model_ids:
            return []
        marks = ",".join("?" * len(model_ids))
        return [dict(r) for r in self._query(
            f"SELECT model_id, source, name, step, total, weight, last, seq FROM run_metrics WHERE seq > ? "
            f"AND model_id IN ({marks}) ORDER BY seq LIMIT ?", (after_seq, *model_ids, limit))]

    def run_metric_history(self, model_id: str, max_steps: int) -> list[dict[str, Any]]:
        """Every cell of the run or, past `max_steps` distinct steps, those of every k-th of its steps
        (in order, from the first) and of the last, k chosen so that about `max_steps` remain. Counting
        steps, not step numbers: a client's far-off step number cannot thin out the rest."""
        steps, last = self._query("SELECT COUNT(DISTINCT step), MAX(step) FROM run_metrics WHERE model_id=?",
                                  (model_id,))[0]
        every = max(1, -(-int(steps) // max_steps))
        return [dict(r) for r in self._query(
            "SELECT model_id, source, name, step, total, weight, last, seq FROM (SELECT *, "
            "DENSE_RANK() OVER (ORDER BY step) AS nth FROM run_metrics WHERE model_id=?) "
            "WHERE (nth - 1) % ? = 0 OR step = ? ORDER BY step", (model_id, every, last))]

    def max_run_metric_seq(self) -> int:
        return int(self._query("SELECT COALESCE(MAX(seq), 0) FROM run_metrics")[0][0])

    def run_summaries(self, owner: str | None, limit: int, steps_name: str, loss_name: str) -> list[dict[str, Any]]:
        """The runs of `owner` (every owner's when None), most recently active first: the model record
        with its checkpoint count, newest sampler and training checkpoint, optimizer steps done
        (the last `steps_name` step), latest `loss_name` cell and last activity."""
        where, args = ("", ()) if owner is None else ("WHERE m.owner=?", (owner,))
        rows = self._query(
            "SELECT m.model_id, m.owner, m.base_model, m.lora, m.created_at, m.unloaded, m.session_id, "
            "(SELECT COUNT(*) FROM checkpoints c WHERE c.model_id = m.model_id) AS checkpoints, "
            "(SELECT tinker_path FROM checkpoints c WHERE c.model_id = m.model_id AND c.kind = 'sampler' "
            " ORDER BY c.created_at DESC LIMIT 1) AS last_sampler_checkpoint, "
            "(SELECT tinker_path FROM checkpoints c WHERE c.model_id = m.model_id AND c.kind = 'training' "
            " ORDER BY c.created_at DESC LIMIT 1) AS last_checkpoint, "
            "(SELECT MAX(step) FROM run_metrics r WHERE r.model_id = m.model_id AND r.source = 'worker' "
            " AND r.name = ?) AS steps, "
            "(SELECT r.total / NULLIF(r.weight, 0) FROM run_metrics r WHERE r.model_id = m.model_id "
            " AND r.source = 'worker' AND r.name = ? ORDER BY r.step DESC LIMIT 1) AS last_loss, "
            "MAX(m.created_at, COALESCE((SELECT MAX(updated_at) FROM run_metrics r "
            " WHERE r.model_id = m.model_id), 0)) AS last_activity "
            f"FROM models m {where} ORDER BY last_activity DESC, m.model_id LIMIT ?",
            (steps_name, loss_name, *args, limit))
        return [{**dict(r), "lora": json.loads(r["lora"])} for r in rows]

    def queue_depths(self) -> dict[str | None, dict[str, int]]:
        """Operations accepted and not finished, by model (None: sampling), as {"queued", "running"}."""
        depths: dict[str | None, dict[str, int]] = {}
        for row in self._query("SELECT model_id, status, COUNT(*) FROM futures WHERE status IN "
                               "('pending', 'running') GROUP BY model_id, status"):
            entry = depths.setdefault(row[0], {"queued": 0, "running": 0})
            entry["queued" if row[1] == "pending" else "running"] += int(row[2])
        return depths


def _session_row(row: sqlite3.Row) -> dict[str, Any]:
    record = dict(row)
    record["tags"] = json.loads(record["tags"] or "[]")
    record["user_metadata"] = json.loads(record["user_metadata"]) if record["user_metadata"] else None
    return record
