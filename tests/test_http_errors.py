"""Bad input over plain HTTP: each gets the right 4xx whose JSON names the field; nothing changes.

`CASES` is a table of bad requests across every endpoint (wrong types, missing fields, huge and
negative values, unicode garbage, token ids out of range, unknown loss names, unknown or another
key's model/checkpoint/session/future ids, oversize and malformed bodies). Each must answer
`{"error": ..., "field": ...}` with the expected status and field. After the table,
`test_bad_input_changed_no_state` proves that nothing was applied: the adapter and optimizer state
saved before and after are bit-identical, no model, checkpoint, sampling session or future was
added, and a normal forward_backward + optim_step still works. The limits (TINK_MAX_*) are checked
on a second small server whose limits are low.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
from safetensors.numpy import load_file
from tinker import types
from tinker.proto import tinker_public_pb2 as pb
from tinker.proto.request_conv import forward_backward_request_to_proto

from src.app import create_app
from src.auth import fingerprint
from src.config import Config

from .conftest import API_KEY, OTHER_KEY, RunningServer, free_port, new_session, serving

HEADERS = {"X-API-Key": API_KEY}


def post(server, path: str, key: str = API_KEY, **kwargs) -> requests.Response:
    return requests.post(f"{server.url}/api/v1/{path}", headers={"X-API-Key": key, **kwargs.pop("headers", {})},
                         timeout=60, **kwargs)


def wait_result(server, request_id: str, key: str = API_KEY) -> dict:
    for _ in range(20):
        answer = post(server, "retrieve_future", key, json={"request_id": request_id}).json()
        if answer.get("type") != "try_again":
            return answer
    raise TimeoutError(request_id)


def done(server, path: str, body: dict, key: str = API_KEY) -> dict:
    """POST an operation and wait for its result; fail the test on any error."""
    resp = post(server, path, key, json=body)
    assert resp.status_code == 200, resp.text
    answer = wait_result(server, resp.json()["request_id"], key)
    assert "error" not in answer, answer
    return answer


def fwd_bwd_proto(model_id: str, tokens, targets, weights=None, loss_fn="cross_entropy") -> bytes:
    inputs = {"target_tokens": types.TensorData(data=targets, dtype="int64", shape=[len(targets)])}
    if weights is not None:
        inputs["weights"] = types.TensorData(data=weights, dtype="float32", shape=[len(weights)])
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs=inputs)
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[datum], loss_fn=loss_fn), model_id=model_id, seq_id=1)
    return forward_backward_request_to_proto(req).SerializeToString()


def proto_post(server, body: bytes, key: str = API_KEY, **headers: str) -> requests.Response:
    return post(server, "forward_backward", key, data=body,
                headers={"Content-Type": "application/x-protobuf", **headers})


def assert_error(resp: requests.Response, status: int, field: str | None) -> dict:
    assert resp.status_code == status, resp.text
    payload = resp.json()
    assert set(payload) >= {"error", "field"}, payload
    assert payload["field"] == field, payload
    assert isinstance(payload["error"], str) and payload["error"], payload
    return payload


def json_datum(tokens: list[int], targets: list[int] | None = None, weights: list | None = None,
               **extra: dict) -> dict:
    targets = tokens[1:] + [1] if targets is None else targets
    weights = [1.0] * len(targets) if weights is None else weights
    return {"model_input": {"chunks": [{"tokens": tokens, "type": "encoded_text"}]},
            "loss_fn_inputs": {"target_tokens": {"data": targets, "dtype": "int64"},
                               "weights": {"data": weights, "dtype": "float32"}, **extra}}


def fb_body(model_id: str, data: list, loss_fn: str = "cross_entropy", key: str = "forward_backward_input") -> dict:
    return {"model_id": model_id, key: {"loss_fn": loss_fn, "data": data}}


def prompt(tokens: list[int]) -> dict:
    return {"chunks": [{"tokens": tokens, "type": "encoded_text"}]}


# ----------------------------------------------------------------------------- the world the cases act on


@dataclass
class World:
    """Ids the cases refer to: the caller's own (trained, saved) model and another key's."""

    base: str
    vocab: int
    session: str  # the session `mine` was created in (for duplicate model_seq_id)
    mine: str
    training_ckpt: str
    sampler_ckpt: str
    sampling_session: str
    theirs: str
    their_training_ckpt: str
    their_sampler_ckpt: str
    their_sampling_session: str
    their_future: str
    snapshot: dict[str, Any] = field(default_factory=dict)


def train_step(server, model_id: str, seed: int = 0) -> dict:
    tokens = np.random.default_rng(seed).integers(3, 400, size=12).tolist()
    body = fb_body(model_id, [json_datum(tokens[:-1], tokens[1:])])
    fb = done(server, "forward_backward", body)
    step = done(server, "optim_step", {"model_id": model_id, "adam_params": {"learning_rate": 1e-2}})
    return {"forward_backward": fb, "optim_step": step}


def state_snapshot(state_dir: Path) -> dict[str, Any]:
    """Every durable row that a request could add or change (read-only; WAL allows a second reader)."""
    db = sqlite3.connect(f"file:{state_dir / 'tink.sqlite3'}?mode=ro", uri=True)
    try:
        return {
            "models": db.execute("SELECT model_id, owner, unloaded FROM models ORDER BY model_id").fetchall(),
            "checkpoints": db.execute("SELECT tinker_path, version, directory FROM checkpoints "
                                      "ORDER BY tinker_path").fetchall(),
            "sampling_sessions": db.execute("SELECT sampling_session_id, clients FROM sampling_sessions "
                                            "ORDER BY sampling_session_id").fetchall(),
            "futures": db.execute("SELECT COUNT(*) FROM futures").fetchone()[0],
            "sessions": db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0],
        }
    finally:
        db.close()


@pytest.fixture(scope="module")
def world(server) -> World:
    base = server.worker.base_model
    session = new_session()
    mine = done(server, "create_model", {"session_id": session, "model_seq_id": 0, "base_model": base,
                                         "lora_config": {"rank": 4}})["model_id"]
    train_step(server, mine)
    training_ckpt = done(server, "save_weights", {"model_id": mine, "path": "suite-before"})["path"]
    sampler_ckpt = done(server, "save_weights_for_sampler", {"model_id": mine, "path": "suite-sampler"})["path"]
    sampling_session = post(server, "create_sampling_session", json={
        "session_id": session, "sampling_session_seq_id": 0, "model_path": sampler_ckpt}).json()["sampling_session_id"]

    other_session = new_session()
    theirs = done(server, "create_model", {"session_id": other_session, "model_seq_id": 0, "base_model": base,
                                           "lora_config": {"rank": 4}}, OTHER_KEY)["model_id"]
    their_training_ckpt = done(server, "save_weights", {"model_id": theirs, "path": "theirs"}, OTHER_KEY)["path"]
    resp = post(server, "save_weights_for_sampler", OTHER_KEY, json={"model_id": theirs, "path": "theirs-sampler"})
    their_future = resp.json()["request_id"]
    their_sampler_ckpt = wait_result(server, their_future, OTHER_KEY)["path"]
    their_sampling_session = post(server, "create_sampling_session", OTHER_KEY, json={
        "session_id": other_session, "sampling_session_seq_id": 0,
        "model_path": their_sampler_ckpt}).json()["sampling_session_id"]
    w = World(base=base, vocab=server.worker.trainer.vocab_size(), session=session, mine=mine,
              training_ckpt=training_ckpt, sampler_ckpt=sampler_ckpt, sampling_session=sampling_session,
              theirs=theirs, their_training_ckpt=their_training_ckpt, their_sampler_ckpt=their_sampler_ckpt,
              their_sampling_session=their_sampling_session, their_future=their_future)
    w.snapshot = state_snapshot(server.state_dir)
    return w


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    path: str
    body: Callable[[World], Any]  # a JSON value, or bytes/str sent raw with `content_type`
    status: int
    field: str | None
    method: str = "POST"
    key: str = API_KEY
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    new_route: bool = False  # being added concurrently: skip while the route is unknown (404, field None)


def case(name: str, path: str, body, status: int, field: str | None, marks=(), **kw):
    return pytest.param(Case(path, body if callable(body) else (lambda w, b=body: b), status, field, **kw),
                        id=name, marks=marks)


def rank(r) -> Callable[[World], dict]:
    return lambda w: {"session_id": new_session(), "model_seq_id": 0, "base_model": w.base, "lora_config": {"rank": r}}


def asample(**over) -> Callable[[World], dict]:
    def build(w: World) -> dict:
        body = {"base_model": w.base, "prompt": prompt([1, 2, 3]), "num_samples": 1,
                "sampling_params": {"max_tokens": 2}}
        body.update({k: (v(w) if callable(v) else v) for k, v in over.items()})
        return body
    return build


def text_sample(**over) -> Callable[[World], dict]:
    def build(w: World) -> dict:
        body = {"model_id": w.base, "prompts": ["Hello"], "sampling_params": {"max_tokens": 2}}
        body.update({k: (v(w) if callable(v) else v) for k, v in over.items()})
        return {k: v for k, v in body.items() if v is not _DROP}
    return build


def ppl(**over) -> Callable[[World], dict]:
    def build(w: World) -> dict:
        body = {"model_id": w.base, "tokens": [1, 5, 9, 13, 17, 21], "context_length": 4, "stride": 2}
        body.update({k: (v(w) if callable(v) else v) for k, v in over.items()})
        return {k: v for k, v in body.items() if v is not _DROP}
    return build


_DROP = object()
LONE_SURROGATE = "\ud800"  # valid in JSON ("\\ud800"), not encodable as UTF-8
GARBAGE = "\u202e\u0000\ufffd\U0001f600" + LONE_SURROGATE + "名前"
DEEP = "[" * 100_000 + "]" * 100_000
JSON_CT = "application/json"
PROTO_CT = "application/x-protobuf"


def proto_datum_request(w: World, mutate: Callable[[pb.ForwardBackwardRequest], None], model: str = "mine") -> bytes:
    msg = pb.ForwardBackwardRequest()
    msg.ParseFromString(fwd_bwd_proto(getattr(w, model), [1, 2, 3], [2, 3, 4], [1.0, 1.0, 1.0]))
    mutate(msg)
    return msg.SerializeToString()


def _odd_token_bytes(msg: pb.ForwardBackwardRequest) -> None:
    msg.data[0].model_input[0].encoded_text.tokens = b"\x01\x00\x00\x00\x02"  # 5 bytes: not int32s


def _bad_dtype(msg: pb.ForwardBackwardRequest) -> None:
    msg.data[0].loss_fn_inputs["weights"].dtype = 999


def _short_tensor(msg: pb.ForwardBackwardRequest) -> None:
    msg.data[0].loss_fn_inputs["weights"].dense = b"\x00\x00\x80\x3f"  # one float, shape says 3


def _sparse_weights(msg: pb.ForwardBackwardRequest, shape: list[int], crow: list[int], col: list[int]) -> None:
    t = msg.data[0].loss_fn_inputs["weights"]
    t.ClearField("dense")
    del t.shape[:]
    t.shape.extend(shape)
    t.sparse_csr.values = np.ones(len(col), dtype=np.float32).tobytes()
    t.sparse_csr.crow_indices = np.asarray(crow, dtype=np.int64).tobytes()
    t.sparse_csr.col_indices = np.asarray(col, dtype=np.int64).tobytes()


def _no_data(msg: pb.ForwardBackwardRequest) -> None:
    del msg.data[:]


CASES = [
    # --- authentication
    case("no-api-key", "create_session", {}, 401, "X-API-Key", key=""),
    case("wrong-api-key", "get_info", lambda w: {"model_id": w.mine}, 401, "X-API-Key", key="tml-wrong"),
    # --- malformed bodies
    case("malformed-json", "create_model", "{not json", 400, "body", content_type=JSON_CT),
    case("json-not-object", "create_model", [1, 2, 3], 400, "body"),
    case("json-scalar", "optim_step", "42", 400, "body", content_type=JSON_CT),
    case("empty-body", "get_info", "", 400, "body", content_type=JSON_CT),
    case("invalid-utf8", "create_model", b'{"session_id": "\xff\xfe"}', 400, "body", content_type=JSON_CT),
    case("deeply-nested-json", "create_model", DEEP, 400, "body", content_type=JSON_CT),
    # --- create_model
    case("create-missing-base-model", "create_model",
         lambda w: {"session_id": new_session(), "model_seq_id": 0}, 400, "base_model"),
    case("create-base-model-wrong-type", "create_model",
         lambda w: {"session_id": new_session(), "model_seq_id": 0, "base_model": 5}, 400, "base_model"),
    case("create-unserved-base-model", "create_model",
         lambda w: {"session_id": new_session(), "model_seq_id": 0, "base_model": "meta/unknown"}, 400, "base_model"),
    case("create-unicode-base-model", "create_model",
         lambda w: {"session_id": new_session(), "model_seq_id": 0, "base_model": GARBAGE}, 400, "base_model"),
    case("create-rank-zero", "create_model", rank(0), 400, "lora_config.rank"),
    case("create-rank-negative", "create_model", rank(-4), 400, "lora_config.rank"),
    case("create-rank-huge", "create_model", rank(10**12), 400, "lora_config.rank"),
    case("create-rank-beyond-int64", "create_model", rank(10**40), 400, "lora_config.rank"),
    case("create-rank-string", "create_model", rank("four"), 400, "lora_config.rank"),
    case("create-rank-float", "create_model", rank(4.5), 400, "lora_config.rank"),
    case("create-nothing-to-train", "create_model",
         lambda w: {"session_id": new_session(), "model_seq_id": 0, "base_model": w.base,
                    "lora_config": {"rank": 4, "train_attn": False, "train_mlp": False, "train_unembed": False}},
         400, "lora_config"),
    case("create-unknown-optimizer", "create_model",
         lambda w: {"session_id": new_session(), "model_seq_id": 0, "base_model": w.base,
                    "optimizer_config": {"type": "sgd"}}, 400, "optimizer_config.type"),
    case("create-negative-seq-id", "create_model",
         lambda w: {"session_id": new_session(), "model_seq_id": -1, "base_model": w.base}, 400, "model_seq_id"),
    case("create-seq-id-string", "create_model",
         lambda w: {"session_id": new_session(), "model_seq_id": "zero", "base_model": w.base}, 400, "model_seq_id"),
    case("create-duplicate-seq-id", "create_model",
         lambda w: {"session_id": w.session, "model_seq_id": 0, "base_model": w.base}, 400, "model_seq_id"),
    case("create-unicode-session-id", "create_model",
         lambda w: {"session_id": GARBAGE, "model_seq_id": 0, "base_model": w.base}, 400, "session_id"),
    case("create-slash-session-id", "create_model",
         lambda w: {"session_id": "../../etc", "model_seq_id": 0, "base_model": w.base}, 400, "session_id"),
    # --- get_info / unload_model
    case("info-missing-model-id", "get_info", {}, 400, "model_id"),
    case("info-model-id-wrong-type", "get_info", {"model_id": 12}, 400, "model_id"),
    case("info-unknown-model", "get_info", {"model_id": "nope:train:0"}, 404, "model_id"),
    case("info-unicode-model-id", "get_info", {"model_id": GARBAGE}, 404, "model_id"),
    case("info-their-model", "get_info", lambda w: {"model_id": w.theirs}, 404, "model_id"),
    case("info-mine-with-their-key", "get_info", lambda w: {"model_id": w.mine}, 404, "model_id", key=OTHER_KEY),
    case("unload-unknown-model", "unload_model", {"model_id": "nope"}, 404, "model_id"),
    case("unload-their-model", "unload_model", lambda w: {"model_id": w.theirs}, 404, "model_id"),
    case("unload-model-id-list", "unload_model", {"model_id": ["a"]}, 400, "model_id"),
    # --- forward_backward, JSON body
    case("fb-missing-model-id", "forward_backward", lambda w: {"forward_backward_input": {
        "loss_fn": "cross_entropy", "data": [json_datum([1, 2])]}}, 400, "model_id"),
    case("fb-missing-input", "forward_backward", lambda w: {"model_id": w.mine}, 400, "forward_backward_input"),
    case("fb-input-not-object", "forward_backward", lambda w: {"model_id": w.mine, "forward_backward_input": [1]},
         400, "forward_backward_input"),
    case("fb-data-not-list", "forward_backward", lambda w: {"model_id": w.mine, "forward_backward_input": {
        "loss_fn": "cross_entropy", "data": "tokens"}}, 400, "data"),
    case("fb-unknown-loss", "forward_backward", lambda w: fb_body(w.mine, [json_datum([1, 2])], "bogus_loss"),
         400, "loss_fn"),
    case("fb-unicode-loss", "forward_backward", lambda w: fb_body(w.mine, [json_datum([1, 2])], GARBAGE),
         400, "loss_fn"),
    case("fb-empty-data", "forward_backward", lambda w: fb_body(w.mine, []), 400, "data"),
    case("fb-empty-tokens", "forward_backward", lambda w: fb_body(w.mine, [json_datum([], [], [])]),
         400, "data[0].model_input"),
    case("fb-token-out-of-vocab", "forward_backward", lambda w: fb_body(w.mine, [json_datum([1, w.vocab])]),
         400, "data[0].model_input"),
    case("fb-token-negative", "forward_backward", lambda w: fb_body(w.mine, [json_datum([1, -3])]),
         400, "data[0].model_input"),
    case("fb-token-huge", "forward_backward", lambda w: fb_body(w.mine, [json_datum([1, 2**62])]),
         400, "data[0].model_input"),
    case("fb-target-out-of-vocab", "forward_backward",
         lambda w: fb_body(w.mine, [json_datum([1, 2], [2, w.vocab + 5])]), 400, "data[0].loss_fn_inputs.target_tokens"),
    case("fb-target-negative", "forward_backward",
         lambda w: fb_body(w.mine, [json_datum([1, 2], [2, -1])]), 400, "data[0].loss_fn_inputs.target_tokens"),
    case("fb-weights-length-mismatch", "forward_backward",
         lambda w: fb_body(w.mine, [json_datum([1, 2, 3], [2, 3, 4], [1.0, 1.0])]),
         400, "data[0].loss_fn_inputs.weights"),
    case("fb-weights-nan", "forward_backward",
         lambda w: json.dumps(fb_body(w.mine, [json_datum([1, 2], [2, 3], [1.0, float("nan")])])),
         400, "data[0].loss_fn_inputs.weights", content_type=JSON_CT),
    case("fb-weights-strings", "forward_backward",
         lambda w: fb_body(w.mine, [json_datum([1, 2], [2, 3], ["a", "b"])]),
         400, "data[0].loss_fn_inputs.weights.data[0]"),
    case("fb-missing-weights-for-ce", "forward_backward", lambda w: fb_body(w.mine, [{
        "model_input": prompt([1, 2]), "loss_fn_inputs": {"target_tokens": {"data": [2, 3], "dtype": "int64"}}}]),
        400, "data[0].loss_fn_inputs.weights"),
    case("fb-unknown-input-name", "forward_backward",
         lambda w: fb_body(w.mine, [json_datum([1, 2], advantages={"data": [1.0, 1.0], "dtype": "float32"})]),
         400, "data[0].loss_fn_inputs.advantages"),
    case("fb-bad-loss-config", "forward_backward", lambda w: {"model_id": w.mine, "forward_backward_input": {
        "loss_fn": "ppo", "loss_fn_config": {"clip_low_threshold": "x"}, "data": [json_datum([1, 2])]}},
        400, "loss_fn_config.clip_low_threshold"),
    case("fb-seq-id-string", "forward_backward", lambda w: {**fb_body(w.mine, [json_datum([1, 2])]), "seq_id": "x"},
         400, "seq_id"),
    case("fb-unknown-model", "forward_backward", lambda w: fb_body("nope", [json_datum([1, 2])]), 404, "model_id"),
    case("fb-their-model", "forward_backward", lambda w: fb_body(w.theirs, [json_datum([1, 2])]), 404, "model_id"),
    case("fb-unicode-model-id", "forward_backward", lambda w: fb_body(GARBAGE, [json_datum([1, 2])]),
         404, "model_id"),
    # --- forward_backward, protobuf body (what the SDK sends)
    case("fb-proto-garbage", "forward_backward", b"\xff\xfe\x00garbage", 400, "body", content_type=PROTO_CT),
    case("fb-proto-unknown-model", "forward_backward",
         lambda w: fwd_bwd_proto("nope", [1, 2], [2, 3], [1.0, 1.0]), 404, "model_id", content_type=PROTO_CT),
    case("fb-proto-their-model", "forward_backward",
         lambda w: fwd_bwd_proto(w.theirs, [1, 2], [2, 3], [1.0, 1.0]), 404, "model_id", content_type=PROTO_CT),
    case("fb-proto-token-out-of-vocab", "forward_backward",
         lambda w: fwd_bwd_proto(w.mine, [1, w.vocab], [2, 3], [1.0, 1.0]), 400, "data[0].model_input",
         content_type=PROTO_CT),
    case("fb-proto-target-out-of-vocab", "forward_backward",
         lambda w: fwd_bwd_proto(w.mine, [1, 2], [2, w.vocab + 5], [1.0, 1.0]),
         400, "data[0].loss_fn_inputs.target_tokens", content_type=PROTO_CT),
    case("fb-proto-weights-length-mismatch", "forward_backward",
         lambda w: fwd_bwd_proto(w.mine, [1, 2, 3], [2, 3, 4], [1.0, 1.0]), 400, "data[0].loss_fn_inputs.weights",
         content_type=PROTO_CT),
    case("fb-proto-unknown-loss", "forward_backward",
         lambda w: fwd_bwd_proto(w.mine, [1, 2], [2, 3], [1.0, 1.0], loss_fn="nope"), 400, "loss_fn",
         content_type=PROTO_CT),
    case("fb-proto-empty-data", "forward_backward", lambda w: proto_datum_request(w, _no_data), 400, "data",
         content_type=PROTO_CT),
    case("fb-proto-odd-token-bytes", "forward_backward", lambda w: proto_datum_request(w, _odd_token_bytes),
         400, "data[0].model_input", content_type=PROTO_CT),
    case("fb-proto-bad-dtype", "forward_backward", lambda w: proto_datum_request(w, _bad_dtype),
         400, "data[0].loss_fn_inputs.weights", content_type=PROTO_CT),
    case("fb-proto-short-tensor", "forward_backward", lambda w: proto_datum_request(w, _short_tensor),
         400, "data[0].loss_fn_inputs.weights", content_type=PROTO_CT),
    case("fb-proto-sparse-column-out-of-range", "forward_backward",
         lambda w: proto_datum_request(w, lambda m: _sparse_weights(m, [3, 2], [0, 1, 1, 1], [7])),
         400, "data[0].loss_fn_inputs.weights", content_type=PROTO_CT),
    case("fb-proto-sparse-huge-shape", "forward_backward",
         lambda w: proto_datum_request(w, lambda m: _sparse_weights(m, [1, 2**40], [0, 0], [])),
         400, "data[0].loss_fn_inputs.weights", content_type=PROTO_CT),
    case("fb-proto-compressed", "forward_backward",
         lambda w: fwd_bwd_proto(w.mine, [1, 2], [2, 3], [1.0, 1.0]), 400, "Content-Encoding",
         content_type=PROTO_CT, headers=(("Content-Encoding", "zstd"),)),
    # --- forward (JSON)
    case("forward-missing-input", "forward", lambda w: {"model_id": w.mine}, 400, "forward_backward_input"),
    case("forward-unknown-loss", "forward",
         lambda w: fb_body(w.mine, [json_datum([1, 2])], "nope", key="forward_input"), 400, "loss_fn"),
    case("forward-token-out-of-vocab", "forward",
         lambda w: fb_body(w.mine, [json_datum([w.vocab + 1, 2])], key="forward_input"), 400, "data[0].model_input"),
    case("forward-their-model", "forward",
         lambda w: fb_body(w.theirs, [json_datum([1, 2])], key="forward_input"), 404, "model_id"),
    # --- optim_step
    case("optim-missing-params", "optim_step", lambda w: {"model_id": w.mine}, 400, "adam_params"),
    case("optim-lr-negative", "optim_step", lambda w: {"model_id": w.mine, "adam_params": {"learning_rate": -1}},
         400, "adam_params.learning_rate"),
    case("optim-lr-string", "optim_step", lambda w: {"model_id": w.mine, "adam_params": {"learning_rate": "fast"}},
         400, "adam_params.learning_rate"),
    case("optim-lr-nan", "optim_step",
         lambda w: json.dumps({"model_id": w.mine, "adam_params": {"learning_rate": float("nan")}}),
         400, "adam_params.learning_rate", content_type=JSON_CT),
    case("optim-lr-infinite", "optim_step",
         lambda w: json.dumps({"model_id": w.mine, "adam_params": {"learning_rate": float("inf")}}),
         400, "adam_params.learning_rate", content_type=JSON_CT),
    case("optim-lr-huge", "optim_step", lambda w: json.dumps({"model_id": w.mine, "adam_params": {
        "learning_rate": 1e400}}), 400, "adam_params.learning_rate", content_type=JSON_CT),
    case("optim-beta1-too-big", "optim_step", lambda w: {"model_id": w.mine, "adam_params": {"beta1": 1.5}},
         400, "adam_params.beta1"),
    case("optim-beta2-negative", "optim_step", lambda w: {"model_id": w.mine, "adam_params": {"beta2": -0.1}},
         400, "adam_params.beta2"),
    case("optim-eps-negative", "optim_step", lambda w: {"model_id": w.mine, "adam_params": {"eps": -1e-8}},
         400, "adam_params.eps"),
    case("optim-unknown-field", "optim_step", lambda w: {"model_id": w.mine, "adam_params": {"momentum": 0.9}},
         400, "adam_params.momentum"),
    case("optim-unknown-model", "optim_step", {"model_id": "nope", "adam_params": {}}, 404, "model_id"),
    case("optim-their-model", "optim_step", lambda w: {"model_id": w.theirs, "adam_params": {}}, 404, "model_id"),
    # --- save_weights / save_weights_for_sampler
    case("save-path-traversal", "save_weights", lambda w: {"model_id": w.mine, "path": "../../escape"}, 400, "path"),
    case("save-path-slash", "save_weights", lambda w: {"model_id": w.mine, "path": "a/b"}, 400, "path"),
    case("save-path-unicode", "save_weights", lambda w: {"model_id": w.mine, "path": GARBAGE}, 400, "path"),
    case("save-path-huge", "save_weights", lambda w: {"model_id": w.mine, "path": "a" * 100_000}, 400, "path"),
    case("save-path-wrong-type", "save_weights", lambda w: {"model_id": w.mine, "path": 7}, 400, "path"),
    case("save-overwrite-wrong-type", "save_weights",
         lambda w: {"model_id": w.mine, "path": "x", "overwrite": "maybe"}, 400, "overwrite"),
    case("save-unknown-model", "save_weights", {"model_id": "nope", "path": "x"}, 404, "model_id"),
    case("save-their-model", "save_weights", lambda w: {"model_id": w.theirs, "path": "x"}, 404, "model_id"),
    case("sampler-save-bad-kind", "save_weights_for_sampler", lambda w: {"model_id": w.mine, "kind": "bogus"},
         400, "kind"),
    case("sampler-save-inflight", "save_weights_for_sampler", lambda w: {"model_id": w.mine, "kind": "inflight"},
         400, "kind"),
    case("sampler-save-path-traversal", "save_weights_for_sampler",
         lambda w: {"model_id": w.mine, "path": "..%2F.."}, 400, "path"),
    case("sampler-save-their-model", "save_weights_for_sampler", lambda w: {"model_id": w.theirs}, 404, "model_id"),
    # --- load_weights
    case("load-missing-path", "load_weights", lambda w: {"model_id": w.mine, "optimizer": True}, 400, "path"),
    case("load-not-tinker-path", "load_weights", lambda w: {"model_id": w.mine, "path": "s3://x", "optimizer": True},
         400, "path"),
    case("load-malformed-tinker-path", "load_weights",
         lambda w: {"model_id": w.mine, "path": "tinker://a/b", "optimizer": True}, 400, "path"),
    case("load-unknown-checkpoint", "load_weights",
         lambda w: {"model_id": w.mine, "path": f"tinker://{w.mine}/weights/missing", "optimizer": True}, 404, "path"),
    case("load-their-checkpoint", "load_weights",
         lambda w: {"model_id": w.mine, "path": w.their_training_ckpt, "optimizer": True}, 404, "path"),
    case("load-unknown-model", "load_weights",
         lambda w: {"model_id": "nope", "path": w.training_ckpt, "optimizer": True}, 404, "model_id"),
    case("load-no-target", "load_weights", lambda w: {"path": w.training_ckpt, "optimizer": True}, 400, "model_id"),
    case("load-optimizer-wrong-type", "load_weights",
         lambda w: {"model_id": w.mine, "path": w.training_ckpt, "optimizer": "yes please"}, 400, "optimizer"),
    case("load-from-state-their-checkpoint", "load_weights",
         lambda w: {"session_id": new_session(), "model_seq_id": 0, "path": w.their_training_ckpt,
                    "optimizer": False}, 404, "path"),
    case("load-from-state-unknown-checkpoint", "load_weights",
         lambda w: {"session_id": new_session(), "model_seq_id": 0, "path": f"tinker://{w.mine}/weights/nope",
                    "optimizer": False}, 404, "path"),
    # --- create_sampling_session / samplers / join_sampling_session
    case("sampling-session-unserved-base", "create_sampling_session",
         {"session_id": "s", "sampling_session_seq_id": 0, "base_model": "meta/unknown"}, 400, "base_model"),
    case("sampling-session-unknown-path", "create_sampling_session",
         lambda w: {"session_id": "s", "sampling_session_seq_id": 0, "model_path": f"tinker://{w.mine}/sampler_weights/x"},
         404, "model_path"),
    case("sampling-session-their-path", "create_sampling_session",
         lambda w: {"session_id": "s", "sampling_session_seq_id": 0, "model_path": w.their_sampler_ckpt},
         404, "model_path"),
    case("sampling-session-seq-id-missing", "create_sampling_session",
         lambda w: {"session_id": "s", "base_model": w.base}, 400, "sampling_session_seq_id"),
    case("sampler-unknown", "samplers/ss-nope", None, 404, "sampling_session_id", method="GET"),
    case("sampler-theirs", lambda w: f"samplers/{w.their_sampling_session}", None, 404, "sampling_session_id",
         method="GET"),
    case("join-unknown", "join_sampling_session", {"sampling_session_id": "ss-nope"}, 404, "sampling_session_id"),
    case("join-theirs", "join_sampling_session", lambda w: {"sampling_session_id": w.their_sampling_session},
         404, "sampling_session_id"),
    case("join-missing-id", "join_sampling_session", {}, 400, "sampling_session_id"),
    # --- asample
    case("asample-token-out-of-vocab", "asample", asample(prompt=lambda w: prompt([1, w.vocab + 1])), 400, "prompt"),
    case("asample-token-negative", "asample", asample(prompt=prompt([1, -1])), 400, "prompt"),
    case("asample-empty-prompt", "asample", asample(prompt=prompt([])), 400, "prompt"),
    case("asample-prompt-wrong-type", "asample", asample(prompt="Hello"), 400, "prompt"),
    case("asample-max-tokens-zero", "asample", asample(sampling_params={"max_tokens": 0}),
         400, "sampling_params.max_tokens"),
    case("asample-max-tokens-huge", "asample", asample(sampling_params={"max_tokens": 10**12}),
         400, "sampling_params.max_tokens"),
    case("asample-num-samples-zero", "asample", asample(num_samples=0), 400, "num_samples"),
    case("asample-num-samples-negative", "asample", asample(num_samples=-5), 400, "num_samples"),
    case("asample-num-samples-huge", "asample", asample(num_samples=10**9), 400, "num_samples"),
    case("asample-temperature-negative", "asample", asample(sampling_params={"max_tokens": 2, "temperature": -1}),
         400, "sampling_params.temperature"),
    case("asample-top-p-zero", "asample", asample(sampling_params={"max_tokens": 2, "top_p": 0}),
         400, "sampling_params.top_p"),
    case("asample-top-k-zero", "asample", asample(sampling_params={"max_tokens": 2, "top_k": 0}),
         400, "sampling_params.top_k"),
    case("asample-stop-mixed", "asample", asample(sampling_params={"max_tokens": 2, "stop": ["a", 3]}),
         400, "sampling_params.stop"),
    case("asample-topk-logprobs", "asample", asample(topk_prompt_logprobs=-1), 400, "topk_prompt_logprobs"),
    case("asample-unserved-base", "asample", asample(base_model="meta/unknown"), 400, "base_model"),
    case("asample-unknown-path", "asample", asample(model_path="tinker://nope/sampler_weights/x"), 404, "model_path"),
    case("asample-their-path", "asample", asample(model_path=lambda w: w.their_sampler_ckpt), 404, "model_path"),
    case("asample-unknown-session", "asample", asample(sampling_session_id="ss-nope"), 404, "sampling_session_id"),
    case("asample-their-session", "asample", asample(sampling_session_id=lambda w: w.their_sampling_session),
         404, "sampling_session_id"),
    # --- retrieve_future
    case("future-unknown", "retrieve_future", {"request_id": "nope"}, 404, "request_id"),
    case("future-theirs", "retrieve_future", lambda w: {"request_id": w.their_future}, 404, "request_id"),
    case("future-wrong-type", "retrieve_future", {"request_id": 5}, 400, "request_id"),
    case("future-missing-id", "retrieve_future", {}, 400, "request_id"),
    case("future-unicode-id", "retrieve_future", {"request_id": GARBAGE}, 404, "request_id"),
    # --- plain JSON /sample
    case("sample-no-prompts", "sample", text_sample(prompts=[]), 400, "prompts"),
    case("sample-prompts-not-list", "sample", text_sample(prompts="Hello"), 400, "prompts"),
    case("sample-prompt-not-string", "sample", text_sample(prompts=["ok", 3]), 400, "prompts"),
    case("sample-num-samples-zero", "sample", text_sample(num_samples=0), 400, "num_samples"),
    case("sample-num-samples-string", "sample", text_sample(num_samples="2"), 400, "num_samples"),
    case("sample-num-samples-huge", "sample", text_sample(num_samples=10**9), 400, "num_samples"),
    case("sample-max-tokens-huge", "sample", text_sample(sampling_params={"max_tokens": 10**9}),
         400, "sampling_params.max_tokens"),
    case("sample-params-not-object", "sample", text_sample(sampling_params=[1]), 400, "sampling_params"),
    case("sample-missing-model-id", "sample", text_sample(model_id=_DROP), 400, "model_id"),
    case("sample-unknown-model", "sample", text_sample(model_id="nope"), 404, "model_id"),
    case("sample-their-model", "sample", text_sample(model_id=lambda w: w.theirs), 404, "model_id"),
    case("sample-their-path", "sample", text_sample(model_id=lambda w: w.their_sampler_ckpt), 404, "model_id"),
    case("sample-unicode-model-id", "sample", text_sample(model_id=GARBAGE), 404, "model_id"),
    case("sample-stream-not-bool", "sample", text_sample(stream="yes"), 400, "stream", new_route=True),
    # --- plain JSON /perplexity
    case("ppl-neither-text-nor-tokens", "perplexity", ppl(tokens=_DROP), 400, "text", new_route=True),
    case("ppl-text-and-tokens", "perplexity", ppl(text="hi"), 400, "text", new_route=True),
    case("ppl-tokens-out-of-vocab", "perplexity", ppl(tokens=lambda w: [1, w.vocab]), 400, "tokens", new_route=True),
    case("ppl-tokens-negative", "perplexity", ppl(tokens=[1, -2, 3]), 400, "tokens", new_route=True),
    case("ppl-tokens-strings", "perplexity", ppl(tokens=["a", "b"]), 400, "tokens", new_route=True),
    case("ppl-text-empty", "perplexity", ppl(tokens=_DROP, text=""), 400, "text", new_route=True),
    case("ppl-context-zero", "perplexity", ppl(context_length=0), 400, "context_length", new_route=True),
    case("ppl-context-string", "perplexity", ppl(context_length="long"), 400, "context_length", new_route=True),
    case("ppl-stride-negative", "perplexity", ppl(stride=-2), 400, "stride", new_route=True),
    case("ppl-unknown-model", "perplexity", ppl(model_id="nope"), 404, "model_id", new_route=True),
    case("ppl-their-model", "perplexity", ppl(model_id=lambda w: w.theirs), 404, "model_id", new_route=True),
    # --- training_runs
    case("run-unknown", "training_runs/nope", None, 404, "model_id", method="GET"),
    case("run-theirs", lambda w: f"training_runs/{w.theirs}", None, 404, "model_id", method="GET"),
    case("run-checkpoints-unknown", "training_runs/nope/checkpoints", None, 404, "model_id", method="GET"),
    case("run-checkpoints-theirs", lambda w: f"training_runs/{w.theirs}/checkpoints", None, 404, "model_id",
         method="GET"),
]


def send(server, c: Case, w: World) -> requests.Response:
    path = c.path(w) if callable(c.path) else c.path
    body = c.body(w)
    headers = {"X-API-Key": c.key, **dict(c.headers)} if c.key else dict(c.headers)
    kwargs: dict[str, Any] = {}
    if isinstance(body, bytes | str):
        kwargs["data"] = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
        headers["Content-Type"] = c.content_type or JSON_CT
    elif body is not None:
        kwargs["data"] = json.dumps(body)  # ensure_ascii: lone surrogates travel as \ud800 escapes
        headers["Content-Type"] = JSON_CT
    return requests.request(c.method, f"{server.url}/api/v1/{path}", headers=headers, timeout=60, **kwargs)


@pytest.mark.parametrize("c", CASES)
def test_bad_input(server, world, c: Case):
    resp = send(server, c, world)
    if c.new_route and resp.status_code == 404 and resp.headers.get("Content-Type", "").startswith(JSON_CT) \
            and resp.json().get("field") is None:
        pytest.skip(f"/api/v1/{c.path} is not routed yet")
    assert_error(resp, c.status, c.field)


def test_bad_input_table_is_large_and_covers_every_endpoint():
    paths = {(p.values[0].path if isinstance(p.values[0].path, str) else "dynamic") for p in CASES}
    assert len(CASES) >= 40
    for route in ("create_model", "forward", "forward_backward", "optim_step", "save_weights",
                  "save_weights_for_sampler", "load_weights", "asample", "create_sampling_session",
                  "join_sampling_session", "retrieve_future", "get_info", "unload_model", "sample", "perplexity"):
        assert route in paths, route


def test_bad_input_changed_no_state(server, world):
    """Runs after the table: nothing it sent was applied, and training still works."""
    assert state_snapshot(server.state_dir) == world.snapshot
    after = done(server, "save_weights", {"model_id": world.mine, "path": "suite-after"})["path"]
    folder = server.state_dir / "checkpoints" / world.mine / "weights"
    before_dir, after_dir = folder / world.training_ckpt.rsplit("/", 1)[-1], folder / after.rsplit("/", 1)[-1]
    before_tensors = load_file(before_dir / "adapter_model.safetensors")
    after_tensors = load_file(after_dir / "adapter_model.safetensors")
    assert before_tensors.keys() == after_tensors.keys() and before_tensors
    for name in before_tensors:
        np.testing.assert_array_equal(before_tensors[name], after_tensors[name])
    before_opt = torch.load(before_dir / "optimizer.pt", weights_only=True)
    after_opt = torch.load(after_dir / "optimizer.pt", weights_only=True)
    assert before_opt["step"] == after_opt["step"] == 1
    assert before_opt["state"].keys() == after_opt["state"].keys()
    for name, moments in before_opt["state"].items():
        for k, v in moments.items():
            assert torch.equal(v, after_opt["state"][name][k]), (name, k)
    # A normal step still works and moves the weights.
    step = train_step(server, world.mine, seed=1)
    assert "loss:sum" in step["forward_backward"]["metrics"]
    moved = done(server, "save_weights", {"model_id": world.mine, "path": "suite-trained"})["path"]
    trained = load_file(folder / moved.rsplit("/", 1)[-1] / "adapter_model.safetensors")
    assert any(not np.array_equal(trained[n], before_tensors[n]) for n in before_tensors)


# ----------------------------------------------------------------------------- earlier single checks


def test_missing_or_wrong_api_key_is_401(server):
    assert requests.post(f"{server.url}/api/v1/create_session", json={}, timeout=10).status_code == 401
    resp = requests.post(f"{server.url}/api/v1/create_session", json={}, headers={"X-API-Key": "nope"}, timeout=10)
    assert resp.status_code == 401 and "key" in resp.json()["error"].lower()
    assert requests.get(f"{server.url}/api/v1/healthz", timeout=10).status_code == 200


def test_unknown_future_and_checkpoint(server, world):
    assert_error(post(server, "retrieve_future", json={"request_id": "nope"}), 404, "request_id")
    body = {"model_id": world.mine, "path": f"tinker://{world.mine}/weights/missing", "optimizer": True}
    assert_error(post(server, "load_weights", json=body), 404, "path")
    assert_error(post(server, "load_weights", json={**body, "path": "s3://x"}), 400, "path")


def test_overwriting_a_checkpoint_without_overwrite_fails_that_future_only(server, world):
    resp = post(server, "save_weights", json={"model_id": world.mine, "path": "suite-before"})
    assert resp.status_code == 200, resp.text
    answer = wait_result(server, resp.json()["request_id"])
    assert answer["category"] == "user" and "overwrite" in answer["error"], answer


def test_oversize_body_is_413(server):
    small = Config(base_model=server.worker.config.base_model, state_dir=server.state_dir, max_body_bytes=1024)
    client = create_app(small, server.worker).test_client()
    resp = client.post("/api/v1/create_session", data=b"x" * 4096, headers={"Content-Type": "application/json"})
    assert resp.status_code == 413 and resp.get_json()["field"] == "body"


def test_plain_json_sample_and_training_still_work_after_bad_input(server, world):
    resp = post(server, "sample", json={"model_id": server.worker.base_model, "prompts": ["Hello", "The cat"],
                                        "num_samples": 2, "sampling_params": {"max_tokens": 4, "seed": 1}})
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert len(results) == 2 and all(len(r["completions"]) == 2 for r in results)
    completion = results[0]["completions"][0]
    assert len(completion["tokens"]) == len(completion["logprobs"]) and isinstance(completion["text"], str)
    answer = proto_post(server, fwd_bwd_proto(world.mine, [1, 2, 3], [2, 3, 4], [1.0, 1.0, 1.0])).json()
    result = wait_result(server, answer["request_id"])
    assert "loss:sum" in result["metrics"] and len(result["loss_fn_outputs"][0]["logprobs"]["data"]) == 3


# ----------------------------------------------------------------------------- limits


LIMITS = dict(max_datums=2, max_tokens_per_datum=16, max_tokens_per_request=24, max_sample_tokens=8,
              max_num_samples=3, max_lora_rank=8, max_adapters_per_key=2, max_body_bytes=64 * 1024)


@pytest.fixture(scope="module")
def limited(tiny_model_path, tmp_path_factory) -> Iterator[RunningServer]:
    """A second real server whose limits are low enough to hit with small requests."""
    from src.worker import Worker

    state = tmp_path_factory.mktemp("limited")
    config = Config(base_model=str(tiny_model_path), state_dir=state, api_keys=(API_KEY, OTHER_KEY),
                    port=free_port(), retrieve_wait_s=5.0, threads=8, **LIMITS)
    worker = Worker.from_config(config)
    with serving(create_app(config, worker), config) as url:
        yield RunningServer(url=url, worker=worker, state_dir=state)
    worker.close()


@pytest.fixture(scope="module")
def limited_model(limited) -> str:
    return done(limited, "create_model", {"session_id": new_session(), "model_seq_id": 0,
                                          "base_model": limited.worker.base_model, "lora_config": {"rank": 8}})["model_id"]


def _datums(n: int, length: int) -> list[dict]:
    return [json_datum(list(range(3, 3 + length))) for _ in range(n)]


def _limit_request(limited, limited_model: str, setting: str) -> requests.Response:
    base = limited.worker.base_model
    if setting == "TINK_MAX_DATUMS":
        return post(limited, "forward_backward", json=fb_body(limited_model, _datums(3, 4)))
    if setting == "TINK_MAX_TOKENS_PER_DATUM":
        return post(limited, "forward_backward", json=fb_body(limited_model, _datums(1, 17)))
    if setting == "TINK_MAX_TOKENS_PER_DATUM (prompt)":
        return post(limited, "asample", json={"base_model": base, "prompt": prompt(list(range(3, 20))),
                                              "sampling_params": {"max_tokens": 2}})
    if setting == "TINK_MAX_TOKENS_PER_REQUEST":
        return post(limited, "forward_backward", json=fb_body(limited_model, _datums(2, 13)))
    if setting == "TINK_MAX_SAMPLE_TOKENS":
        return post(limited, "asample", json={"base_model": base, "prompt": prompt([1, 2]),
                                              "sampling_params": {"max_tokens": 9}})
    if setting == "TINK_MAX_SAMPLE_TOKENS (text)":
        return post(limited, "sample", json={"model_id": base, "prompts": ["Hi"], "sampling_params": {"max_tokens": 9}})
    if setting == "TINK_MAX_NUM_SAMPLES":
        return post(limited, "asample", json={"base_model": base, "prompt": prompt([1, 2]), "num_samples": 4,
                                              "sampling_params": {"max_tokens": 2}})
    if setting == "TINK_MAX_NUM_SAMPLES (text)":
        return post(limited, "sample", json={"model_id": base, "prompts": ["Hi"], "num_samples": 4,
                                             "sampling_params": {"max_tokens": 2}})
    if setting == "TINK_MAX_LORA_RANK":
        return post(limited, "create_model", json={"session_id": new_session(), "model_seq_id": 0,
                                                   "base_model": base, "lora_config": {"rank": 9}})
    if setting == "TINK_MAX_ADAPTERS_PER_KEY":
        # Fill the key's quota (`limited_model` holds one place); the request after that is refused.
        while limited.worker.store.count_models(fingerprint(API_KEY)) < LIMITS["max_adapters_per_key"]:
            done(limited, "create_model", {"session_id": new_session(), "model_seq_id": 0, "base_model": base,
                                           "lora_config": {"rank": 2}})
        return post(limited, "create_model", json={"session_id": new_session(), "model_seq_id": 0,
                                                   "base_model": base, "lora_config": {"rank": 2}})
    if setting == "TINK_MAX_BODY_BYTES":
        return post(limited, "forward_backward", json=fb_body(limited_model, _datums(1, 20_000)))
    if setting == "TINK_MAX_BODY_BYTES (protobuf)":
        tokens = list(range(3, 3 + 20_000))
        return proto_post(limited, fwd_bwd_proto(limited_model, tokens, tokens, [1.0] * len(tokens)))
    raise AssertionError(setting)


# setting -> (status, field, the limit's value as the message must show it)
LIMIT_CASES = {
    "TINK_MAX_DATUMS": (400, "data", "2"),
    "TINK_MAX_TOKENS_PER_DATUM": (400, "data[0].model_input", "16"),
    "TINK_MAX_TOKENS_PER_DATUM (prompt)": (400, "prompt", "16"),
    "TINK_MAX_TOKENS_PER_REQUEST": (400, "data", "24"),
    "TINK_MAX_SAMPLE_TOKENS": (400, "sampling_params.max_tokens", "8"),
    "TINK_MAX_SAMPLE_TOKENS (text)": (400, "sampling_params.max_tokens", "8"),
    "TINK_MAX_NUM_SAMPLES": (400, "num_samples", "3"),
    "TINK_MAX_NUM_SAMPLES (text)": (400, "num_samples", "3"),
    "TINK_MAX_LORA_RANK": (400, "lora_config.rank", "8"),
    "TINK_MAX_ADAPTERS_PER_KEY": (400, "base_model", "2"),
    "TINK_MAX_BODY_BYTES": (413, "body", str(64 * 1024)),
    "TINK_MAX_BODY_BYTES (protobuf)": (413, "body", str(64 * 1024)),
}


@pytest.mark.parametrize("setting", list(LIMIT_CASES))
def test_limit_is_enforced_naming_field_and_limit(limited, limited_model, setting):
    status, field_name, value = LIMIT_CASES[setting]
    payload = assert_error(_limit_request(limited, limited_model, setting), status, field_name)
    assert value in payload["error"], payload
    assert not limited.worker.store.failed_futures("server")


@pytest.mark.parametrize("setting", list(LIMIT_CASES))
def test_limit_message_names_its_setting(limited, limited_model, setting):
    """The client learns which knob to ask the operator about."""
    status, field_name, _ = LIMIT_CASES[setting]
    payload = assert_error(_limit_request(limited, limited_model, setting), status, field_name)
    assert setting.split(" ")[0] in payload["error"], payload


def test_requests_within_the_limits_pass(limited, limited_model):
    fb = done(limited, "forward_backward", fb_body(limited_model, _datums(2, 12)))  # 24 tokens: at the limit
    assert "loss:sum" in fb["metrics"]
    resp = post(limited, "asample", json={"base_model": limited.worker.base_model, "prompt": prompt([1, 2]),
                                          "num_samples": 3, "sampling_params": {"max_tokens": 8}})
    assert resp.status_code == 200, resp.text
    assert len(wait_result(limited, resp.json()["request_id"])["sequences"]) == 3
