"""Faults inside the worker and at its edge: each hurts one request, never the worker.

* A backend exception (even a `SystemExit`) fails that one future with a clear error; the same
  model's later operations, other models and sampling keep working.
* Clients that disconnect mid-request (half-sent body, unread answer, abandoned long-poll, dropped
  event stream, idle half-open connections) leave no lock held and no thread stuck.

The worker here is a real one behind waitress whose trainer and sampler are wrapped to fail or
block on demand.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import requests

from .api import post, result
from .conftest import API_KEY, _wait_ready, free_port, new_session

HEADERS = {"X-API-Key": API_KEY}
FAULT = "simulated device fault"


@dataclass
class Faults:
    """What the wrapped backends do: models whose forward_backward raises, a gate that blocks one."""

    raise_for: dict[str, BaseException] = field(default_factory=dict)  # model_id -> exception to raise
    block_model: str | None = None
    gate: threading.Event = field(default_factory=threading.Event)
    failing_seed: int = 666  # a sample job with this seed raises in the sampler


class FaultyTrainer:
    def __init__(self, inner, faults: Faults):
        self._inner, self._faults = inner, faults

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def forward_backward(self, model_id, data, loss_fn, loss_fn_config, forward_only):
        exc = self._faults.raise_for.get(model_id)
        if exc is not None:
            raise exc
        if model_id == self._faults.block_model:
            assert self._faults.gate.wait(60), "the test never opened the gate"
        return self._inner.forward_backward(model_id, data, loss_fn, loss_fn_config, forward_only)


class FaultySampler:
    def __init__(self, inner, faults: Faults):
        self._inner, self._faults = inner, faults

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def sample(self, job, *args):
        if job.params.seed == self._faults.failing_seed:
            raise RuntimeError(f"{FAULT} while sampling")
        return self._inner.sample(job, *args)


@dataclass
class FaultServer:
    url: str
    worker: object
    wsgi: object
    faults: Faults


@pytest.fixture(scope="module")
def fault_server(tiny_model_path, tmp_path_factory) -> Iterator[FaultServer]:
    from src.app import create_app
    from src.cli import make_server
    from src.config import Config
    from src.worker import Worker

    config = Config(base_model=str(tiny_model_path), state_dir=tmp_path_factory.mktemp("faults"),
                    api_keys=(API_KEY,), port=free_port(), retrieve_wait_s=2.0, threads=16)
    worker = Worker.from_config(config)
    faults = Faults()
    worker.trainer = FaultyTrainer(worker.trainer, faults)
    worker.sampler = FaultySampler(worker.sampler, faults)
    wsgi = make_server(create_app(config, worker), config)
    thread = threading.Thread(target=wsgi.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{config.port}"
    _wait_ready(url)
    yield FaultServer(url=url, worker=worker, wsgi=wsgi, faults=faults)
    faults.gate.set()
    wsgi.close()
    worker.close()




def create_model(url: str, base: str) -> str:
    created = post(url, "create_model", {"session_id": new_session(), "model_seq_id": 0, "base_model": base,
                                         "lora_config": {"rank": 2}})
    assert "error" not in result(url, created["request_id"])
    return created["model_id"]


def fb_body(model_id: str) -> dict:
    tokens = [5, 9, 13, 17, 21, 25]
    return {"model_id": model_id, "forward_backward_input": {"loss_fn": "cross_entropy", "data": [{
        "model_input": {"chunks": [{"tokens": tokens[:-1], "type": "encoded_text"}]},
        "loss_fn_inputs": {"target_tokens": {"data": tokens[1:], "dtype": "int64"},
                           "weights": {"data": [1.0] * 5, "dtype": "float32"}}}]}}


def optim_body(model_id: str) -> dict:
    return {"model_id": model_id, "adam_params": {"learning_rate": 1e-3}}


def sample_body(base: str, seed: int) -> dict:
    return {"base_model": base, "prompt": {"chunks": [{"tokens": [1, 5, 9], "type": "encoded_text"}]},
            "num_samples": 1, "sampling_params": {"max_tokens": 3, "seed": seed}}


# ----------------------------------------------------------------------------- backend exceptions


@pytest.mark.parametrize("exc", [RuntimeError(FAULT), SystemExit(FAULT)], ids=["RuntimeError", "SystemExit"])
def test_backend_exception_fails_only_that_future(fault_server, exc):
    url, base = fault_server.url, fault_server.worker.base_model
    bad, good = create_model(url, base), create_model(url, base)
    fault_server.faults.raise_for[bad] = exc
    try:
        ids = {name: post(url, path, body)["request_id"] for name, path, body in [
            ("bad fb", "forward_backward", fb_body(bad)),
            ("good fb", "forward_backward", fb_body(good)),
            ("bad optim", "optim_step", optim_body(bad)),
            ("good optim", "optim_step", optim_body(good)),
            ("bad fb again", "forward_backward", fb_body(bad)),
        ]}
        answers = {name: result(url, rid) for name, rid in ids.items()}
    finally:
        del fault_server.faults.raise_for[bad]
    for name in ("bad fb", "bad fb again"):
        failed = answers[name]
        assert failed["category"] == "server", failed
        message = failed["error"]
        # The cause, the operation and model it hit, where the traceback is, and what to do next.
        assert f"{type(exc).__name__}: {FAULT}" in message and f"forward_backward on model {bad}" in message, message
        assert ids[name] in message and "Retry" in message, message
    assert "metrics" in answers["good fb"] and "metrics" in answers["good optim"]
    assert "metrics" in answers["bad optim"], "the failing model's next operation still runs"
    # The training thread survived: both models train on.
    assert "loss:sum" in result(url, post(url, "forward_backward", fb_body(bad))["request_id"])["metrics"]
    assert "loss:sum" in result(url, post(url, "forward_backward", fb_body(good))["request_id"])["metrics"]


def test_sampler_exception_fails_only_that_sample(fault_server):
    url, base = fault_server.url, fault_server.worker.base_model
    seed = fault_server.faults.failing_seed
    ids = [post(url, "asample", sample_body(base, s))["request_id"] for s in (1, seed, 2)]
    ok1, failed, ok2 = (result(url, rid) for rid in ids)
    assert failed["category"] == "server" and f"RuntimeError: {FAULT} while sampling" in failed["error"], failed
    assert len(ok1["sequences"]) == len(ok2["sequences"]) == 1
    # The synchronous JSON endpoint has no future: the failure is that request's answer, JSON, naming the cause.
    resp = requests.post(f"{url}/api/v1/sample", headers=HEADERS, timeout=60,
                         json={"model_id": base, "prompts": ["hi"], "sampling_params": {"max_tokens": 2, "seed": seed}})
    assert resp.status_code >= 500 and FAULT in resp.json()["error"], resp.text
    resp = requests.post(f"{url}/api/v1/sample", headers=HEADERS, timeout=60,
                         json={"model_id": base, "prompts": ["hi"], "sampling_params": {"max_tokens": 2, "seed": 3}})
    assert resp.status_code == 200, resp.text


# ----------------------------------------------------------------------------- disconnecting clients


def raw_request(url: str, method: str, path: str, body: bytes, content_length: int | None = None,
                extra: str = "") -> socket.socket:
    """Send a request by hand (so it can be cut short) and return the still-open socket."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    length = len(body) if content_length is None else content_length
    head = (f"{method} /api/v1/{path} HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n{extra}\r\n")
    sock.sendall(head.encode() + body)
    return sock


def abort(sock: socket.socket) -> None:
    """Close with a TCP reset, as a killed client does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def assert_lock_free(lock, what: str) -> None:
    assert lock.acquire(timeout=10), f"{what} is still held"
    lock.release()


def test_disconnecting_clients_leave_no_lock_held(fault_server):
    url, worker, faults = fault_server.url, fault_server.worker, fault_server.faults
    base = worker.base_model
    slow, other = create_model(url, base), create_model(url, base)

    # 1. An operation blocks inside the trainer while its client and a long-poll vanish.
    faults.block_model = slow
    faults.gate.clear()
    try:
        blocked = post(url, "forward_backward", fb_body(slow))["request_id"]
        poll = raw_request(url, "POST", "retrieve_future", json.dumps({"request_id": blocked}).encode())
        time.sleep(0.3)
        abort(poll)
        # 2. A body announced but never finished; 3. a request whose answer is never read;
        # 4. idle half-open connections that never finish their headers.
        half = raw_request(url, "POST", "forward_backward", json.dumps(fb_body(other)).encode()[:20],
                           content_length=5000)
        unread = raw_request(url, "POST", "optim_step", json.dumps(optim_body(other)).encode())
        loris = []
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10)
            s.sendall(b"POST /api/v1/asample HTTP/1.1\r\nHost: x\r\n")
            loris.append(s)
        abort(half)
        abort(unread)
        # Sampling and reads are served while the trainer is stuck; training queues behind it.
        queued = post(url, "optim_step", optim_body(other))["request_id"]
        sampled = result(url, post(url, "asample", sample_body(base, 7))["request_id"])
        assert len(sampled["sequences"]) == 1
        assert post(url, "get_info", {"model_id": other})["model_id"] == other
    finally:
        faults.gate.set()
        faults.block_model = None
    assert "metrics" in result(url, blocked), "the blocked operation finished once released"
    assert "metrics" in result(url, queued)

    # 5. An event stream dropped after its first event; 6. a synchronous sample dropped before its answer.
    stream = raw_request(url, "POST", "sample", json.dumps({
        "model_id": base, "prompts": ["Once upon a time"], "stream": True,
        "sampling_params": {"max_tokens": 64, "seed": 1}}).encode())
    assert stream.recv(1)  # the stream started
    abort(stream)
    dropped = raw_request(url, "POST", "sample", json.dumps({
        "model_id": base, "prompts": ["Hello"], "sampling_params": {"max_tokens": 32, "seed": 2}}).encode())
    abort(dropped)
    for s in loris:
        abort(s)

    # Every lock the request paths take is free again, and no request thread is stuck.
    deadline = time.time() + 30
    tasks = fault_server.wsgi.task_dispatcher
    while time.time() < deadline and (tasks.active_count or tasks.queue):
        time.sleep(0.1)
    assert not tasks.active_count and not tasks.queue, "request threads are still busy"
    assert_lock_free(worker.store._lock, "the store lock")
    assert_lock_free(worker.trainer._inner._lock, "the trainer lock")
    assert_lock_free(worker.sampler._inner._lock, "the sampler lock")
    assert_lock_free(worker.scheduler._cond, "the scheduler lock")
    assert_lock_free(worker._restore_lock, "the adapter restore lock")
    # And the worker answers as before.
    for model_id in (slow, other):
        assert "loss:sum" in result(url, post(url, "forward_backward", fb_body(model_id))["request_id"])["metrics"]
    resp = requests.post(f"{url}/api/v1/sample", headers=HEADERS, timeout=60,
                         json={"model_id": base, "prompts": ["hi"], "sampling_params": {"max_tokens": 2}})
    assert resp.status_code == 200, resp.text
