"""Sessions: the SDK's RestClient lists, searches and reads them; `tinker session export-trace` (the
CLI, as a subprocess) downloads a Perfetto trace of a session's operations with their real queue and
run times; `tinker auth login` checks its key with `auth/apikey/me`. Another key's session is 404.

The trace is decoded here with a generic protobuf wire reader, field numbers from Perfetto's
perfetto_trace.proto, independently of how the worker writes it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import tinker
from tinker import types

from src.auth import fingerprint
from src.session_trace import build_trace
from src.store import Store

from .conftest import ADMIN_KEY, API_KEY, OTHER_KEY, REPO

TINKER_CLI = REPO / ".venv" / "bin" / "tinker"


def call(server, method: str, path: str, key: str = API_KEY, **kwargs) -> requests.Response:
    headers = {"X-API-Key": key, **kwargs.pop("headers", {})}
    return requests.request(method, f"{server.url}/api/v1/{path}", headers=headers, timeout=60, **kwargs)


def assert_error(resp: requests.Response, status: int, field_name: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.json()["field"] == field_name, resp.json()


def datum() -> types.Datum:
    tokens = [5, 9, 13, 17, 21, 25]
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 5})


def cli(server, tmp_path: Path, *args: str, key: str = API_KEY, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The `tinker` CLI against the worker, with a HOME of its own (no stored credentials)."""
    env = {**os.environ, "TINKER_BASE_URL": server.url, "TINKER_API_KEY": key, "HOME": str(tmp_path),
           "TINKER_TELEMETRY": "0"}
    if key == "":
        env.pop("TINKER_API_KEY")
    return subprocess.run([str(TINKER_CLI), *args], env=env, cwd=tmp_path, input=stdin, capture_output=True,
                          text=True, timeout=120)


# ----------------------------------------------------------------------------- a generic protobuf reader


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def fields(buf: bytes) -> list[tuple[int, Any]]:
    """(field number, value) of a protobuf message: ints for varints, bytes for the rest."""
    out, i = [], 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire} at byte {i}")
        out.append((number, value))
    assert i == len(buf), "message overran its bytes"
    return out


@dataclass
class Slice:
    name: str
    track: int
    begin: int
    end: int = -1
    annotations: dict[str, Any] = field(default_factory=dict)
    children: list[Slice] = field(default_factory=list)


@dataclass
class Trace:
    tracks: dict[int, tuple[str, int | None]]  # uuid -> (name, parent uuid)
    slices: list[Slice]  # top-level slices (the operations), by begin time


def read_trace(blob: bytes) -> Trace:
    """Trace.packet (1) -> TracePacket: timestamp (8), track_event (11), track_descriptor (60);
    TrackEvent: type (9: 1 begin, 2 end), track_uuid (11), name (23), debug_annotations (4);
    DebugAnnotation: name (10), double_value (5), string_value (6); TrackDescriptor: uuid (1), name (2),
    parent_uuid (5)."""
    import struct

    tracks: dict[int, tuple[str, int | None]] = {}
    open_slices: dict[int, list[Slice]] = {}
    top: list[Slice] = []
    for number, packet in fields(blob):
        assert number == 1
        values = dict(fields(packet))
        if 60 in values:
            desc = dict(fields(values[60]))
            tracks[desc[1]] = (desc[2].decode(), desc.get(5))
            continue
        event = fields(values[11])
        ev = dict(event)
        ts, track = values[8], ev[11]
        assert track in tracks, "an event on a track that was never described"
        stack = open_slices.setdefault(track, [])
        if ev[9] == 1:
            s = Slice(ev[23].decode(), track, ts)
            for n, a in event:
                if n == 4:
                    ann = dict(fields(a))
                    s.annotations[ann[10].decode()] = ann[6].decode() if 6 in ann else struct.unpack("<d", ann[5])[0]
            (stack[-1].children if stack else top).append(s)
            stack.append(s)
        else:
            assert ev[9] == 2 and stack, "an END without a BEGIN"
            stack.pop().end = ts
    assert all(not s for s in open_slices.values()), "slices left open"
    return Trace(tracks, sorted(top, key=lambda s: s.begin))


def check_timing(op: Slice) -> None:
    """queued <= started <= finished, and the slices say the same as the annotations."""
    names = [c.name for c in op.children]
    assert names in (["queued", "running"], ["queued"]), names
    queued = op.children[0]
    assert queued.begin == op.begin and queued.end >= queued.begin
    if len(op.children) == 2:
        running = op.children[1]
        assert running.begin == queued.end and running.end >= running.begin and running.end == op.end
        assert op.annotations["queue_ms"] >= 0 and op.annotations["run_ms"] >= 0
        assert abs((running.end - running.begin) / 1e6 - op.annotations["run_ms"]) < 1
        assert abs((queued.end - queued.begin) / 1e6 - op.annotations["queue_ms"]) < 1


# ----------------------------------------------------------------------------- tests


@pytest.mark.filterwarnings("ignore:RestClient.search_sessions is experimental")
def test_sdk_lists_reads_and_searches_only_the_callers_sessions(server):
    tag = f"nightly-{time.time_ns()}"
    first = tinker.ServiceClient(base_url=server.url, api_key=API_KEY, user_metadata={"run": tag, "team": "rl"},
                                 display_name=f"Nightly GRPO {tag}")
    second = tinker.ServiceClient(base_url=server.url, api_key=API_KEY, user_metadata={"run": tag},
                                  display_name=f"Eval {tag}")
    theirs = tinker.ServiceClient(base_url=server.url, api_key=OTHER_KEY, user_metadata={"run": tag})
    try:
        tc = first.create_lora_training_client(base_model=server.worker.base_model, rank=2).result()
        first.create_sampling_client(base_model=server.worker.base_model).result()
        first_id, second_id = first.holder.get_session_id(), second.holder.get_session_id()
        their_id = theirs.holder.get_session_id()
        rest = tinker.RestClient(base_url=server.url, api_key=API_KEY)

        listed = rest.list_sessions(limit=1000).result().sessions
        assert listed.index(second_id) < listed.index(first_id), "newest first"
        assert their_id not in listed
        page = rest.list_sessions(limit=1, offset=listed.index(first_id)).result().sessions
        assert page == [first_id]

        got = rest.get_session(first_id).result()
        assert got.training_run_ids == [tc.model_id]
        assert len(got.sampler_ids) == 1
        assert rest.get_sampler(got.sampler_ids[0]).result().base_model == server.worker.base_model
        assert got.user_metadata == {"run": tag, "team": "rl"} and got.display_name == f"Nightly GRPO {tag}"
        assert rest.get_session(second_id).result().training_run_ids == []
        with pytest.raises(tinker.NotFoundError):
            rest.get_session(their_id).result()

        search = rest.search_sessions
        by_meta = search(types.SessionSearchRequest(user_metadata={"run": tag})).result()
        assert [s.session_id for s in by_meta.sessions] == [second_id, first_id]
        summary = by_meta.sessions[1]
        assert summary.owner == fingerprint(API_KEY) and summary.project_id == "default"
        assert summary.status is not None and summary.status.type == "active"
        assert summary.created_at.tzinfo is not None and summary.checkpoints_count == 0
        words = search(types.SessionSearchRequest(display_name=f"grpo NIGHTLY {tag}")).result()
        assert [s.session_id for s in words.sessions] == [first_id]
        either = search(types.SessionSearchRequest(session_id=second_id, display_name=f"Nightly GRPO {tag}")).result()
        assert {s.session_id for s in either.sessions} == {first_id, second_id}
        both_pairs = search(types.SessionSearchRequest(user_metadata={"run": tag, "team": "rl"})).result()
        assert [s.session_id for s in both_pairs.sessions] == [first_id]

        # Cursor pagination walks the same results one at a time.
        request = types.SessionSearchRequest(user_metadata={"run": tag}, limit=1)
        walked = []
        while True:
            got_page = search(request).result()
            walked += [s.session_id for s in got_page.sessions]
            if got_page.next_cursor is None:
                break
            request = request.model_copy(update={"cursor": got_page.next_cursor})
        assert walked == [second_id, first_id]

        # Status follows the client's close (first reason wins).
        second.close("errored", detail="eval crashed").result()
        finished = types.ClientFinishedSessionStatusQuery(reasons=["errored"])
        closed = search(types.SessionSearchRequest(user_metadata={"run": tag}, statuses=[finished])).result()
        assert [s.session_id for s in closed.sessions] == [second_id]
        assert closed.sessions[0].status.reason.type == "errored" and closed.sessions[0].status.detail == "eval crashed"
        active = search(types.SessionSearchRequest(user_metadata={"run": tag},
                                                   statuses=[types.ActiveSessionStatusQuery()])).result()
        assert [s.session_id for s in active.sessions] == [first_id]

        # An admin key reaches every key's sessions only when it asks for `accessible`.
        admin = tinker.RestClient(base_url=server.url, api_key=ADMIN_KEY)
        assert their_id not in admin.list_sessions(limit=1000).result().sessions
        assert their_id in admin.list_sessions(limit=1000, access_scope="accessible").result().sessions
        assert admin.get_session(their_id, access_scope="accessible").result().training_run_ids == []
        with pytest.raises(tinker.NotFoundError):
            admin.get_session(their_id).result()
        everyone = admin.search_sessions(types.SessionSearchRequest(
            user_metadata={"run": tag}, owner=types.AccessibleSearchOwner())).result()
        assert {s.session_id for s in everyone.sessions} == {first_id, second_id, their_id}
        only_theirs = admin.search_sessions(types.SessionSearchRequest(
            user_metadata={"run": tag}, owner=types.UserSearchOwner(owner_urns=[fingerprint(OTHER_KEY)]))).result()
        assert [s.session_id for s in only_theirs.sessions] == [their_id]
        mine_only = search(types.SessionSearchRequest(user_metadata={"run": tag},
                                                      owner=types.AccessibleSearchOwner())).result()
        assert their_id not in {s.session_id for s in mine_only.sessions}
    finally:
        for client in (first, second, theirs):
            client.close("success").result()


def test_closing_a_session_unloads_its_models_but_keeps_runs_and_checkpoints(server):
    """A closed session takes no more operations (the SDK's promise), so its live models are unloaded:
    `tinker checkpoint download` opens a run per download and closes its session, which must not pin an
    adapter slot forever. The run's checkpoint still loads afterwards, in a new session."""
    service = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    other = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    try:
        tc = service.create_lora_training_client(base_model=server.worker.base_model, rank=2).result()
        kept = other.create_lora_training_client(base_model=server.worker.base_model, rank=2).result()
        tc.forward_backward([datum()], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        saved = tc.save_state("before-close").result().path
        before = tc.forward([datum()], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
        assert server.worker.trainer.has_adapter(tc.model_id)

        service.close("success").result()
        deadline = time.time() + 60
        while not server.worker.store.get_model(tc.model_id)["unloaded"] and time.time() < deadline:
            time.sleep(0.1)  # the unload is queued behind the run's pending operations
        assert not server.worker.trainer.has_adapter(tc.model_id)
        live = {m["model_id"] for m in server.worker.store.list_models(None)}
        assert tc.model_id not in live and kept.model_id in live, "only the closed session's models go"

        rest = tinker.RestClient(base_url=server.url, api_key=API_KEY)
        assert rest.get_training_run(tc.model_id).result().training_run_id == tc.model_id
        restored = other.create_training_client_from_state(saved).result()
        after = restored.forward([datum()], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
        assert after == pytest.approx(before, abs=1e-5)
    finally:
        service.close("success").result()
        other.close("success").result()


def test_export_trace_lists_the_sessions_operations_with_real_times(server, tmp_path):
    client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    try:
        session_id = client.holder.get_session_id()
        tc = client.create_lora_training_client(base_model=server.worker.base_model, rank=2).result()
        tc.forward_backward([datum()], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        tc.save_state("trace-state").result()
        sampler = tc.save_weights_and_get_sampling_client("trace-sampler").result()
        sampler.sample(types.ModelInput.from_ints([5, 9, 13]), 1, types.SamplingParams(max_tokens=3, seed=1)).result()
    finally:
        client.close("success").result()
    deadline = time.time() + 60  # closing the session unloads its model: the last operation of the trace
    while not server.worker.store.get_model(tc.model_id)["unloaded"] and time.time() < deadline:
        time.sleep(0.1)

    out = cli(server, tmp_path, "-f", "json", "session", "export-trace", session_id, "-o", "trace.pftrace")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    blob = (tmp_path / "trace.pftrace").read_bytes()
    assert report == {"session_id": session_id, "destination": "trace.pftrace", "file_size_bytes": len(blob)}

    trace = read_trace(blob)
    ops = [s.name for s in trace.slices]
    assert ops == ["create_model", "forward_backward", "optim_step", "save_weights", "save_weights_for_sampler",
                   "sample", "unload_model"], ops
    for op in trace.slices:
        assert op.annotations["status"] == "done", op.annotations
        assert len(op.children) == 2, "every operation ran: queued, then running"
        check_timing(op)
    assert all(a.end <= b.begin or a.annotations["op"] == "sample" or b.annotations["op"] == "sample"
               for a, b in zip(trace.slices, trace.slices[1:])), "one model's operations run one after another"
    training = {s.annotations.get("model_id") for s in trace.slices if s.name != "sample"}
    assert training == {tc.model_id}
    # The tracks: the session, then a group per training run and per sampler.
    names = {name for name, _ in trace.tracks.values()}
    assert f"Tink session {session_id}" in names and f"training run {tc.model_id}" in names
    assert any(name.startswith("sampler ") for name in names)

    # The same trace through --url-only: a signed link on this worker that needs no API key.
    url = cli(server, tmp_path, "session", "export-trace", session_id, "--url-only").stdout.strip()
    assert url.startswith(f"{server.url}/api/v1/trace_files/{session_id}.pftrace?")
    fetched = requests.get(url, timeout=30)
    assert fetched.status_code == 200 and read_trace(fetched.content).slices[0].name == "create_model"
    assert requests.get(url.replace("signature=", "signature=0"), timeout=30).status_code == 403
    assert requests.get(url.split("?")[0], timeout=30).status_code == 403


def test_export_trace_of_another_keys_or_an_unknown_session_is_not_found(server, tmp_path):
    theirs = tinker.ServiceClient(base_url=server.url, api_key=OTHER_KEY)
    try:
        their_id = theirs.holder.get_session_id()
        out = cli(server, tmp_path, "session", "export-trace", their_id)
        assert out.returncode != 0 and "not found" in (out.stdout + out.stderr).lower()
        assert not (tmp_path / f"{their_id}.pftrace").exists()
        assert_error(call(server, "GET", f"sessions/{their_id}/trace_export"), 404, "session_id")
    finally:
        theirs.close("success").result()
    out = cli(server, tmp_path, "session", "export-trace", "session-nope")
    assert out.returncode != 0 and "not found" in (out.stdout + out.stderr).lower()


def test_session_routes_reject_bad_input_naming_the_field(server):
    client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    try:
        sid = client.holder.get_session_id()
        for path in ("sessions/session-nope", "sessions/session-nope/trace_export"):
            assert_error(call(server, "GET", path), 404, "session_id")
        assert_error(call(server, "GET", f"sessions/{sid}", OTHER_KEY), 404, "session_id")
        assert_error(call(server, "GET", f"sessions/{sid}/trace_export", OTHER_KEY), 404, "session_id")
        assert_error(call(server, "POST", "session_heartbeat", OTHER_KEY, json={"session_id": sid}), 404,
                     "session_id")
        assert_error(call(server, "POST", f"sessions/{sid}/finish", OTHER_KEY, json={"reason": {"type": "success"}}),
                     404, "session_id")
        assert_error(call(server, "GET", f"sessions/{sid}?access_scope=everything"), 400, "access_scope")
        assert_error(call(server, "GET", "sessions?limit=many"), 400, "limit")
        assert_error(call(server, "GET", "sessions?limit=0"), 400, "limit")
        assert_error(call(server, "GET", "sessions?offset=-1"), 400, "offset")
        assert_error(call(server, "POST", "sessions/search", json={"limit": 0}), 400, "limit")
        assert_error(call(server, "POST", "sessions/search", json={"limit": "ten"}), 400, "limit")
        assert_error(call(server, "POST", "sessions/search", json={"owner": {"type": "everyone"}}), 400, "owner.type")
        assert_error(call(server, "POST", "sessions/search", json={"colour": "red"}), 400, "colour")
        assert_error(call(server, "POST", "sessions/search", json={"cursor": {"last_session_id": "x"}}), 400,
                     "cursor.last_created_at")
        assert_error(call(server, "POST", "sessions/search", data="[1", headers={"Content-Type": "application/json"}),
                     400, "body")
        assert_error(call(server, "POST", f"sessions/{sid}/finish", json={"reason": {"type": "done"}}), 400,
                     "reason.type")
        assert_error(call(server, "POST", f"sessions/{sid}/finish", json={}), 400, "reason")
        assert_error(call(server, "POST", "session_heartbeat", json={}), 400, "session_id")
        # Nothing above changed the session.
        record = server.worker.store.get_session(sid)
        assert record["finish_reason"] is None
    finally:
        client.close("interrupted").result()
    assert server.worker.store.get_session(sid)["finish_reason"] == "interrupted"


def test_api_key_me_names_the_key_without_its_secret_and_login_stores_it(server, tmp_path):
    resp = call(server, "GET", "auth/apikey/me")
    assert resp.status_code == 200, resp.text
    me = resp.json()
    owner = fingerprint(API_KEY)
    assert me["name"] == f"key-{owner[:12]}" and owner in me["note"] and isinstance(me["key_id"], int)
    assert API_KEY not in resp.text
    assert call(server, "GET", "auth/apikey/me", OTHER_KEY).json()["key_id"] != me["key_id"]
    assert call(server, "GET", "auth/apikey/me", ADMIN_KEY).json()["note"].startswith("admin key")
    assert call(server, "GET", "auth/apikey/me", "tml-wrong").status_code == 401
    assert call(server, "DELETE", "auth/apikey/me").status_code == 403

    out = cli(server, tmp_path, "auth", "login", key="", stdin=API_KEY + "\n")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"Stored API key 'key-{owner[:12]}'" in out.stdout
    stored = json.loads((tmp_path / ".tinker" / "credentials.json").read_text())
    assert API_KEY in json.dumps(stored)  # the CLI keeps the key it was given; the worker never sent it
    (tmp_path / "other-home").mkdir()
    bad = cli(server, tmp_path / "other-home", "auth", "login", key="", stdin="tml-wrong\n")
    assert bad.returncode != 0 and "401" in bad.stdout + bad.stderr


# ----------------------------------------------------------------------------- an older database

OLD_SCHEMA = """
CREATE TABLE futures (request_id TEXT PRIMARY KEY, model_id TEXT, owner TEXT NOT NULL, op TEXT NOT NULL,
    status TEXT NOT NULL, result_kind TEXT, result BLOB, error TEXT, category TEXT, created_at REAL NOT NULL,
    finished_at REAL);
CREATE INDEX futures_status ON futures(status);
CREATE TABLE sessions (session_id TEXT PRIMARY KEY, owner TEXT NOT NULL, sdk_version TEXT, tags TEXT,
    created_at REAL NOT NULL);
CREATE TABLE models (model_id TEXT PRIMARY KEY, owner TEXT NOT NULL, session_id TEXT, base_model TEXT NOT NULL,
    lora TEXT NOT NULL, user_metadata TEXT, created_at REAL NOT NULL, unloaded INTEGER NOT NULL DEFAULT 0);
CREATE TABLE checkpoints (tinker_path TEXT PRIMARY KEY, model_id TEXT NOT NULL, kind TEXT NOT NULL,
    directory TEXT NOT NULL, version INTEGER NOT NULL, size_bytes INTEGER, user_metadata TEXT,
    created_at REAL NOT NULL);
CREATE TABLE sampling_sessions (sampling_session_id TEXT PRIMARY KEY, owner TEXT NOT NULL,
    base_model TEXT NOT NULL, model_path TEXT, clients INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL);
"""


def test_a_database_from_before_gains_the_new_columns_and_its_history(tmp_path):
    path = tmp_path / "tink.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO sessions VALUES ('session-old', 'alice', '0.37', '[]', 100.0)")
    db.execute("INSERT INTO models VALUES ('session-old:train:0', 'alice', 'session-old', 'tiny', '{\"rank\": 2}', "
               "'null', 100.0, 0)")
    db.execute("INSERT INTO futures VALUES ('fb-1', 'session-old:train:0', 'alice', 'forward_backward', 'done', "
               "'json', X'7B7D', NULL, NULL, 101.0, 103.0)")
    db.execute("INSERT INTO futures VALUES ('sample-1', NULL, 'alice', 'sample', 'done', 'json', X'7B7D', NULL, "
               "NULL, 102.0, 102.5)")
    db.commit()
    db.close()

    store = Store(path)
    try:
        rows = store.session_futures("session-old", "alice")
        assert [r["request_id"] for r in rows] == ["fb-1"], "training history joins its session"
        assert rows[0]["started_at"] is None and rows[0]["finished_at"] == 103.0
        session = store.get_session("session-old")
        assert session["user_metadata"] is None and session["finish_reason"] is None
        # The new columns work on the old rows, and the trace of old history (no start time) is valid.
        store.add_future("opt-2", "optim_step", "session-old:train:0", "alice")
        store.mark_running("opt-2")
        store.finish_future("opt-2", "json", b"{}")
        trace = read_trace(build_trace("session-old", store.session_futures("session-old", "alice"), now=200.0))
        assert [s.name for s in trace.slices] == ["forward_backward", "optim_step"]
        assert [c.name for c in trace.slices[0].children] == ["queued"]  # start unknown: queued until finished
        assert [c.name for c in trace.slices[1].children] == ["queued", "running"]
        check_timing(trace.slices[1])
    finally:
        store.close()
    Store(path).close()  # opening again migrates nothing twice
