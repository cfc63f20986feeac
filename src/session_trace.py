"""A session's operations as a Perfetto trace (`.pftrace`), what `tinker session export-trace` downloads.

Every future the session queued becomes one slice from when it was queued to when it finished,
split into a `queued` child (queued -> the scheduler started it) and a `running` child (started ->
finished); its kind, model, status, error and the three times ride along as debug annotations.
Slices are grouped per training run and per sampler. Operations of one group that overlap in time
(a queued step behind a running one, concurrent samples) go on separate lanes, because a Perfetto
track only nests slices, it cannot show two that overlap partly.

    >>> rows = store.session_futures(session_id, owner)
    >>> Path("s.pftrace").write_bytes(build_trace(session_id, rows, now=time.time()))
    >>> # open it in https://ui.perfetto.dev

The file is the protobuf `perfetto.protos.Trace` (protos/perfetto/trace/perfetto_trace.proto),
written by hand: only the few messages below are used, so Tink needs no Perfetto package.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# Field numbers from perfetto_trace.proto.
TRACE_PACKET = 1  # Trace.packet
PACKET_TIMESTAMP, PACKET_SEQUENCE_ID, PACKET_TRACK_EVENT = 8, 10, 11
PACKET_SEQUENCE_FLAGS, PACKET_TRACK_DESCRIPTOR = 13, 60
TRACK_UUID, TRACK_NAME, TRACK_PARENT_UUID = 1, 2, 5  # TrackDescriptor
EVENT_ANNOTATIONS, EVENT_TYPE, EVENT_TRACK_UUID, EVENT_NAME = 4, 9, 11, 23  # TrackEvent
ANNOTATION_DOUBLE, ANNOTATION_STRING, ANNOTATION_NAME = 5, 6, 10  # DebugAnnotation
SLICE_BEGIN, SLICE_END = 1, 2  # TrackEvent.Type
SEQ_INCREMENTAL_STATE_CLEARED = 1
SEQUENCE_ID = 1  # all packets come from one writer
ROOT_TRACK = 1


@dataclass(frozen=True)
class Operation:
    """One future of the session, with the times the store recorded (seconds since the epoch)."""

    request_id: str
    op: str
    model_id: str | None
    sampling_session_id: str | None
    status: str
    error: str | None
    queued_at: float
    started_at: float | None
    finished_at: float | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Operation:
        return cls(row["request_id"], row["op"], row["model_id"], row["sampling_session_id"], row["status"],
                   row["error"], row["created_at"], row["started_at"], row["finished_at"])

    @property
    def group(self) -> str:
        if self.model_id:
            return f"training run {self.model_id}"
        if self.sampling_session_id:
            return f"sampler {self.sampling_session_id}"
        return "other requests"


def build_trace(session_id: str, rows: Iterable[dict[str, Any]], now: float) -> bytes:
    """The serialized trace of the session's operations (rows of `Store.session_futures`). An operation
    still queued or running ends at `now`, and its status says so."""
    operations = sorted((Operation.from_row(r) for r in rows), key=lambda o: o.queued_at)
    tracks: list[bytes] = [_track(ROOT_TRACK, f"Tink session {session_id}", None)]
    events: list[tuple[int, int, bytes]] = []  # (timestamp ns, order of emission, packet)
    groups: dict[str, tuple[int, list[tuple[int, int]]]] = {}  # group -> (its track, [(lane track, busy until)])
    for op in operations:
        begin = _ns(op.queued_at)
        end = max(begin, _ns(op.finished_at if op.finished_at is not None else now))
        if op.group not in groups:
            groups[op.group] = (_next_uuid(tracks), [])
            tracks.append(_track(groups[op.group][0], op.group, ROOT_TRACK))
        group_track, lanes = groups[op.group]
        lane = _free_lane(lanes, begin, end)
        if lane is None:
            lane_track = _next_uuid(tracks)
            tracks.append(_track(lane_track, f"lane {len(lanes) + 1}", group_track))
            lanes.append((lane_track, end))
        else:
            lane_track = lanes[lane][0]
            lanes[lane] = (lane_track, end)
        for ts, packet in _slices(op, lane_track, begin, end):
            events.append((ts, len(events), packet))
    packets = tracks + [packet for _, _, packet in sorted(events)]
    first = packets[0] + _uint(PACKET_SEQUENCE_FLAGS, SEQ_INCREMENTAL_STATE_CLEARED)
    return b"".join(_field(TRACE_PACKET, p) for p in [first, *packets[1:]])


def _free_lane(lanes: Sequence[tuple[int, int]], begin: int, end: int) -> int | None:
    """The first lane whose last slice ended by `begin`."""
    return next((i for i, (_, busy_until) in enumerate(lanes) if busy_until <= begin), None)


def _next_uuid(tracks: list[bytes]) -> int:
    return len(tracks) + 1


def _slices(op: Operation, track: int, begin: int, end: int) -> list[tuple[int, bytes]]:
    """BEGIN/END packets of the operation's slice and of its `queued` / `running` children, in order."""
    started = None if op.started_at is None else min(max(_ns(op.started_at), begin), end)
    out = [(begin, _event(track, begin, SLICE_BEGIN, op.op, _annotations(op)))]
    queued_until = started if started is not None else end
    out += [(begin, _event(track, begin, SLICE_BEGIN, "queued")),
            (queued_until, _event(track, queued_until, SLICE_END))]
    if started is not None:
        out += [(started, _event(track, started, SLICE_BEGIN, "running")), (end, _event(track, end, SLICE_END))]
    out.append((end, _event(track, end, SLICE_END)))
    return out


def _annotations(op: Operation) -> list[bytes]:
    values: dict[str, str | float] = {"request_id": op.request_id, "op": op.op, "status": op.status,
                                      "queued_at": _iso(op.queued_at)}
    for name, value in (("model_id", op.model_id), ("sampling_session_id", op.sampling_session_id),
                        ("started_at", _iso(op.started_at)), ("finished_at", _iso(op.finished_at)),
                        ("error", op.error)):
        if value is not None:
            values[name] = value
    if op.started_at is not None:
        values["queue_ms"] = (op.started_at - op.queued_at) * 1000
        if op.finished_at is not None:
            values["run_ms"] = (op.finished_at - op.started_at) * 1000
    return [_annotation(name, value) for name, value in values.items()]


# ---------------------------------------------------------------------------- protobuf encoding


def _track(uuid: int, name: str, parent: int | None) -> bytes:
    descriptor = _uint(TRACK_UUID, uuid) + _string(TRACK_NAME, name)
    if parent is not None:
        descriptor += _uint(TRACK_PARENT_UUID, parent)
    return _uint(PACKET_SEQUENCE_ID, SEQUENCE_ID) + _field(PACKET_TRACK_DESCRIPTOR, descriptor)


def _event(track: int, ts: int, kind: int, name: str | None = None, annotations: Sequence[bytes] = ()) -> bytes:
    event = _uint(EVENT_TYPE, kind) + _uint(EVENT_TRACK_UUID, track)
    if name is not None:
        event += _string(EVENT_NAME, name)
    event += b"".join(_field(EVENT_ANNOTATIONS, a) for a in annotations)
    return _uint(PACKET_TIMESTAMP, ts) + _uint(PACKET_SEQUENCE_ID, SEQUENCE_ID) + _field(PACKET_TRACK_EVENT, event)


def _annotation(name: str, value: str | float) -> bytes:
    encoded = _string(ANNOTATION_STRING, value) if isinstance(value, str) else \
        _key(ANNOTATION_DOUBLE, 1) + struct.pack("<d", value)
    return _string(ANNOTATION_NAME, name) + encoded


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _uint(field: int, n: int) -> bytes:
    return _key(field, 0) + _varint(n)


def _field(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _string(field: int, text: str) -> bytes:
    return _field(field, text.encode())


def _ns(seconds: float) -> int:
    return max(0, round(seconds * 1e9))


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, tz=UTC).isoformat()
