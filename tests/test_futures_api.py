"""Futures beyond `retrieve_future`: `cancel_future` and the batched `retrieve_futures`, over plain HTTP
and through the SDK, whose client config (from this worker) turns both on.

The worker is a real one behind waitress whose trainer and sampler can be held on a gate: an
operation held there is *running*, and one behind it (same model, or a sampling pool of one thread)
stays *queued* until the gate opens. A WSGI middleware in front of the app records which routes the
SDK called.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
import requests
import tinker
from safetensors.numpy import load_file
from tinker import types

from .conftest import API_KEY, OTHER_KEY, free_port, new_session, serving

HELD_SEED = 4242  # a sample with this seed waits on the gate inside the sampler
FAILING_SEED = 666  # a sample with this seed raises inside the sampler


@dataclass
class Gate:
    """What the wrapped backends do: hold one model's forward_backward or held-seed samples until opened."""

    model_id: str | None = None
    opened: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)
    sampled_seeds: list[int | None] = field(default_factory=list)
    optim_steps: Counter = field(default_factory=Counter)

    def hold(self) -> None:
        self.entered.set()
        assert self.opened.wait(60), "the test never opened the gate"

    def reset(self) -> None:
        self.opened.clear()
        self.entered.clear()


class GatedTrainer:
    def __init__(self, inner, gate: Gate):
        self._inner, self._gate = inner, gate

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def forward_backward(self, model_id, *args):
        if model_id == self._gate.model_id:
            self._gate.hold()
        return self._inner.forward_backward(model_id, *args)

    def optim_step(self, model_id, *args):
        self._gate.optim_steps[model_id] += 1
        return self._inner.optim_step(model_id, *args)


class GatedSampler:
    def __init__(self, inner, gate: Gate):
        self._inner, self._gate = inner, gate

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def sample(self, job, *args):
        self._gate.sampled_seeds.append(job.params.seed)
        if job.params.seed == HELD_SEED:
            self._gate.hold()
        if job.params.seed == FAILING_SEED:
            raise RuntimeError("simulated sampler fault")
        return self._inner.sample(job, *args)


class RouteLog:
    """WSGI wrapper: which routes were called, and the future ids `asample` handed out, in order."""

    def __init__(self, app):
        self.app = app
        self.calls: Counter = Counter()
        self.sample_ids: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        route = environ.get("PATH_INFO", "").removeprefix("/api/v1/")
        body = b"".join(self.app(environ, start_response))
        with self.lock:
            self.calls[route] += 1
            if route == "asample" and body.startswith(b"{"):
                self.sample_ids.append(json.loads(body)["request_id"])
        return [body]


@dataclass
class GateServer:
    url: str
    worker: object
    gate: Gate
    log: RouteLog


@pytest.fixture(scope="module")
def gated(tiny_model_path, tmp_path_factory) -> Iterator[GateServer]:
    from src.app import create_app
    from src.config import Config
    from src.worker import Worker

    config = Config(base_model=str(tiny_model_path), state_dir=tmp_path_factory.mktemp("futures"),
                    api_keys=(API_KEY, OTHER_KEY), port=free_port(), retrieve_wait_s=3.0, threads=32,
                    sampling_threads=1)  # one sampling thread: a held sample keeps the next one queued
    worker = Worker.from_config(config)
    gate = Gate()
    worker.trainer = GatedTrainer(worker.trainer, gate)
    worker.sampler = GatedSampler(worker.sampler, gate)
    log = RouteLog(create_app(config, worker))
    with serving(log, config) as url:
        yield GateServer(url=url, worker=worker, gate=gate, log=log)
    gate.opened.set()
    worker.close()


def post(server: GateServer, path: str, body, key: str = API_KEY) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(f"{server.url}/api/v1/{path}", data=data, timeout=60,
                         headers={"X-API-Key": key, "Content-Type": "application/json"})


def ok(server: GateServer, path: str, body: dict, key: str = API_KEY) -> dict:
    resp = post(server, path, body, key)
    assert resp.status_code == 200, resp.text
    return resp.json()


def final(server: GateServer, request_id: str, key: str = API_KEY) -> dict:
    for _ in range(40):
        answer = ok(server, "retrieve_future", {"request_id": request_id}, key)
        if answer.get("type") != "try_again":
            return answer
    raise TimeoutError(request_id)


def status(server: GateServer, request_id: str) -> str:
    return server.worker.store.get_future(request_id).status


def wait_until(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def assert_error(resp: requests.Response, code: int, field_name: str) -> None:
    assert resp.status_code == code, resp.text
    assert resp.json()["field"] == field_name, resp.json()


def new_model(server: GateServer) -> str:
    created = ok(server, "create_model", {"session_id": new_session(), "model_seq_id": 0,
                                          "base_model": server.worker.base_model, "lora_config": {"rank": 2}})
    assert "error" not in final(server, created["request_id"])
    return created["model_id"]


def fb_body(model_id: str) -> dict:
    tokens = [5, 9, 13, 17, 21, 25]
    return {"model_id": model_id, "forward_backward_input": {"loss_fn": "cross_entropy", "data": [{
        "model_input": {"chunks": [{"tokens": tokens[:-1], "type": "encoded_text"}]},
        "loss_fn_inputs": {"target_tokens": {"data": tokens[1:], "dtype": "int64"},
                           "weights": {"data": [1.0] * 5, "dtype": "float32"}}}]}}


def saved_state(server: GateServer, model_id: str, name: str) -> tuple[dict[str, np.ndarray], int]:
    """The model's adapter tensors and optimizer step, saved now as training checkpoint `name`."""
    path = final(server, ok(server, "save_weights", {"model_id": model_id, "path": name})["request_id"])["path"]
    directory = server.worker.store.get_checkpoint(path)["directory"]
    step = json.loads(open(f"{directory}/tink_state.json").read())["step"]
    return load_file(f"{directory}/adapter_model.safetensors"), step


def sample_body(sampling_session_id: str, seq_id: int, seed: int) -> dict:
    return {"sampling_session_id": sampling_session_id, "seq_id": seq_id, "num_samples": 1,
            "prompt": {"chunks": [{"tokens": [5, 9, 13], "type": "encoded_text"}]},
            "sampling_params": {"max_tokens": 2, "seed": seed}}


def new_sampler(server: GateServer, key: str = API_KEY) -> str:
    return ok(server, "create_sampling_session", {"session_id": new_session(), "sampling_session_seq_id": 0,
                                                  "base_model": server.worker.base_model}, key)["sampling_session_id"]


# ----------------------------------------------------------------------------- cancel_future


def test_cancelled_queued_optim_step_never_runs_and_a_running_one_is_not_interrupted(gated):
    model = new_model(gated)
    before, step_before = saved_state(gated, model, "before")
    gated.gate.reset()
    gated.gate.model_id = model
    try:
        held = ok(gated, "forward_backward", fb_body(model))["request_id"]
        assert gated.gate.entered.wait(30), "forward_backward never reached the trainer"
        queued = ok(gated, "optim_step", {"model_id": model, "adam_params": {"learning_rate": 0.1}})["request_id"]
        assert status(gated, held) == "running" and status(gated, queued) == "pending"

        cancelled = ok(gated, "cancel_future", {"request_id": queued})
        assert cancelled["cancelled"] is True and cancelled["status"] == "cancelled"
        assert "nothing of it was applied" in cancelled["detail"]
        again = ok(gated, "cancel_future", {"request_id": queued})
        assert again["cancelled"] is True and "already" in again["detail"]
        running = ok(gated, "cancel_future", {"request_id": held})
        assert running["cancelled"] is False and running["status"] == "running"
        assert "not interrupted" in running["detail"]
    finally:
        gated.gate.opened.set()
        gated.gate.model_id = None
    assert "loss:sum" in final(gated, held)["metrics"], "the running operation finished with its result"
    answer = final(gated, queued)
    assert answer["category"] == "user" and "cancelled" in answer["error"], answer
    finished = ok(gated, "cancel_future", {"request_id": held})
    assert finished["cancelled"] is False and finished["status"] == "done" and "result is kept" in finished["detail"]
    assert "loss:sum" in final(gated, held)["metrics"], "cancelling a finished future keeps its result"

    # The cancelled optim_step changed nothing: same weights, same step count, and the trainer never saw it.
    assert gated.gate.optim_steps[model] == 0
    after, step_after = saved_state(gated, model, "after-cancel")
    assert step_after == step_before
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    # An optim_step that is not cancelled does move them (so the comparison above can fail).
    assert "error" not in final(gated, ok(gated, "optim_step", {"model_id": model,
                                                                 "adam_params": {"learning_rate": 0.1}})["request_id"])
    moved, step_moved = saved_state(gated, model, "after-step")
    assert step_moved == step_before + 1 and any(not np.array_equal(before[k], moved[k]) for k in before)


def test_cancel_future_errors_name_the_field(gated):
    model = new_model(gated)
    mine = ok(gated, "forward_backward", fb_body(model))["request_id"]
    assert_error(post(gated, "cancel_future", {"request_id": "forward_backward-nope"}), 404, "request_id")
    assert_error(post(gated, "cancel_future", {"request_id": mine}, OTHER_KEY), 404, "request_id")
    assert_error(post(gated, "cancel_future", {}), 400, "request_id")
    assert_error(post(gated, "cancel_future", {"request_id": 7}), 400, "request_id")
    assert_error(post(gated, "cancel_future", {"request_id": mine, "force": True}), 400, "force")
    assert_error(post(gated, "cancel_future", "{not json"), 400, "body")
    assert "metrics" in final(gated, mine), "the refused cancels left it alone"


# ----------------------------------------------------------------------------- retrieve_futures


def test_retrieve_futures_reports_a_sampling_clients_completions_in_order(gated):
    sampler = new_sampler(gated)
    first = ok(gated, "asample", sample_body(sampler, 0, seed=1))["request_id"]
    failing = ok(gated, "asample", sample_body(sampler, 1, seed=FAILING_SEED))["request_id"]
    other_clone = ok(gated, "asample", sample_body(sampler, 1_000_000_000, seed=2))["request_id"]
    for rid in (first, failing, other_clone):
        wait_until(lambda r=rid: status(gated, r) in ("done", "failed"), f"{rid} finished")

    target = {"type": "sampling_session", "sampling_session_id": sampler, "cloned_sampler_id": 0}
    polled = ok(gated, "retrieve_futures", {"target": target, "prev_cursor": 0, "timeout": 0})
    assert [(c["state"], c["request_id"]) for c in polled["completions"]] == [("finished", first), ("failed", failing)]
    assert polled["completions"][0]["response_payload_uncompressed_size"] > 0
    clone = ok(gated, "retrieve_futures", {"target": {**target, "cloned_sampler_id": 1}, "timeout": 0})
    assert [c["request_id"] for c in clone["completions"]] == [other_clone]

    # Seen completions are not reported again; an empty poll keeps the cursor.
    start = time.monotonic()
    empty = ok(gated, "retrieve_futures", {"target": target, "prev_cursor": polled["cursor"], "timeout": 0.5})
    assert empty == {"completions": [], "cursor": polled["cursor"]}
    assert time.monotonic() - start >= 0.5, "it waited for the timeout"

    # A long poll answers as soon as the next completion arrives (held in the sampler until released).
    gated.gate.reset()
    held = ok(gated, "asample", sample_body(sampler, 2, seed=HELD_SEED))["request_id"]
    assert gated.gate.entered.wait(30)
    threading.Timer(0.5, gated.gate.opened.set).start()
    start = time.monotonic()
    woke = ok(gated, "retrieve_futures", {"target": target, "prev_cursor": polled["cursor"]})
    assert [c["request_id"] for c in woke["completions"]] == [held]
    assert 0.4 <= time.monotonic() - start < 3.0, "answered on completion, before the server's wait ran out"
    assert woke["cursor"] > polled["cursor"]
    # The payload itself still comes from retrieve_future, same as without batching.
    assert len(final(gated, held)["sequences"]) == 1


def test_retrieve_futures_errors_name_the_field(gated):
    sampler = new_sampler(gated)
    theirs = new_sampler(gated, OTHER_KEY)
    target = {"type": "sampling_session", "sampling_session_id": sampler}
    assert_error(post(gated, "retrieve_futures", {"target": {**target, "sampling_session_id": "ss-nope"}}), 404,
                 "target.sampling_session_id")
    assert_error(post(gated, "retrieve_futures", {"target": {**target, "sampling_session_id": theirs}}), 404,
                 "target.sampling_session_id")
    assert_error(post(gated, "retrieve_futures", {}), 400, "target")
    assert_error(post(gated, "retrieve_futures", {"target": target, "prev_cursor": -1}), 400, "prev_cursor")
    assert_error(post(gated, "retrieve_futures", {"target": target, "timeout": -2}), 400, "timeout")
    assert_error(post(gated, "retrieve_futures", {"target": {**target, "cloned_sampler_id": -1}}), 400,
                 "target.cloned_sampler_id")
    assert_error(post(gated, "retrieve_futures", {"target": target, "prev_cursor": "zero"}), 400, "prev_cursor")


# ----------------------------------------------------------------------------- the SDK


def test_client_config_turns_on_batched_polling_and_cancel(gated):
    config = ok(gated, "client/config", {})
    assert types.ClientConfigResponse.model_validate(config).sample_use_retrieve_futures is True
    dynamic = ok(gated, "client/dynamic_config", {})
    assert types.ClientDynamicConfigResponse.model_validate(dynamic).sample_cancel_enabled is True


def test_sdk_samples_through_batched_polling(gated):
    client = tinker.ServiceClient(base_url=gated.url, api_key=API_KEY)
    try:
        sampler = client.create_sampling_client(base_model=gated.worker.base_model).result()
        polls_before = gated.log.calls["retrieve_futures"]
        futures = [sampler.sample(types.ModelInput.from_ints([5, 9, 13]), 2,
                                  types.SamplingParams(max_tokens=3, seed=10 + i)) for i in range(4)]
        results = [f.result(timeout=120) for f in futures]
    finally:
        client.close("success").result()
    assert all(len(r.sequences) == 2 and len(r.sequences[0].tokens) == 3 for r in results)
    assert gated.log.calls["retrieve_futures"] > polls_before, "the SDK polled the sampler's completions"


def test_sdk_cancel_of_an_abandoned_sample_stops_it_before_it_runs(gated):
    gated.gate.reset()
    client = tinker.ServiceClient(base_url=gated.url, api_key=API_KEY)
    try:
        sampler = client.create_sampling_client(base_model=gated.worker.base_model).result()
        prompt = types.ModelInput.from_ints([5, 9, 13])
        asked = len(gated.log.sample_ids)
        held = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2, seed=HELD_SEED))
        assert gated.gate.entered.wait(60), "the first sample never reached the sampler"
        abandoned = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2, seed=77))
        wait_until(lambda: len(gated.log.sample_ids) == asked + 2, "the second sample was submitted")
        queued_id = gated.log.sample_ids[-1]
        assert status(gated, queued_id) == "pending", "one sampling thread: it waits behind the held one"
        cancels = gated.log.calls["cancel_future"]

        abandoned.future().cancel()  # the SDK then asks the worker to cancel it
        wait_until(lambda: status(gated, queued_id) == "cancelled", "the worker cancelled the abandoned sample", 60)
        # the route log counts a call once its answer is built, just after the store says "cancelled"
        wait_until(lambda: gated.log.calls["cancel_future"] == cancels + 1, "the SDK's one cancel_future call")
        gated.gate.opened.set()
        assert len(held.result(timeout=120).sequences) == 1, "the running sample was not interrupted"
        time.sleep(0.5)  # the pool thread reaches the cancelled one now; it must skip it
        assert 77 not in gated.gate.sampled_seeds, "the cancelled sample never ran"
    finally:
        gated.gate.opened.set()
        client.close("success").result()
