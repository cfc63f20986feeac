"""Abandoned client sessions expire (TINK_SESSION_EXPIRY_S): a client killed without closing its session
stops heartbeating, and the checkpoint sweep then saves and unloads its runs, so their adapters and trainer
memory go back. A session that heartbeats or sends operations stays; one with an operation in flight is not
expired before it finishes; 0 never expires. After expiry the session stays ended: its heartbeat, its runs
and new runs in it answer 410 naming it, and the saved state resumes in a new session.

A worker of its own (tiny model, HF trainer) with a 3 s expiry and a 0.2 s sweep; the Tinker SDK is the client.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests
import tinker
from tinker import types

from src.config import Config, ConfigError

from .conftest import API_KEY, RunningServer, free_port, serving

EXPIRY_S = 3.0
SWEEP_S = 0.2


def start_server(model_path, state_dir, expiry_s: float) -> tuple[Config, object, object]:
    from src.app import create_app
    from src.worker import Worker

    config = Config(base_model=str(model_path), state_dir=state_dir, api_keys=(API_KEY,), port=free_port(),
                    retrieve_wait_s=5.0, threads=32, session_expiry_s=expiry_s, checkpoint_sweep_s=SWEEP_S)
    worker = Worker.from_config(config)
    return config, worker, create_app(config, worker)


@pytest.fixture(scope="module")
def expiring(tiny_model_path, tmp_path_factory) -> Iterator[RunningServer]:
    state = tmp_path_factory.mktemp("expiring-state")
    config, worker, app = start_server(tiny_model_path, state, EXPIRY_S)
    with serving(app, config) as url:
        yield RunningServer(url=url, worker=worker, state_dir=state)
    worker.close()


def datum(length: int = 6) -> types.Datum:
    tokens = [(5 + 4 * i) % 500 + 1 for i in range(length)]
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (length - 1)})


def heartbeat(server: RunningServer, session_id: str) -> requests.Response:
    """What the SDK's heartbeat loop sends (every 10 s)."""
    return requests.post(f"{server.url}/api/v1/session_heartbeat", json={"session_id": session_id},
                         headers={"X-API-Key": API_KEY}, timeout=30)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"{what}: not after {timeout} s")
        time.sleep(0.05)


def session(server: RunningServer, session_id: str) -> dict:
    return server.worker.store.get_session(session_id)


def logprobs(tc) -> list[float]:
    return tc.forward([datum()], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data


def assert_autosave_resumes(server: RunningServer, model_id: str, trained: list[float]) -> None:
    """The run's autosave holds its last step: resumed in a new session, it scores as the run did."""
    newer = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    try:
        resumed = newer.create_training_client_from_state_with_optimizer(
            f"tinker://{model_id}/weights/autosave").result()
        assert logprobs(resumed) == pytest.approx(trained, abs=1e-5)
    finally:
        newer.close("success").result()


@pytest.mark.filterwarnings("ignore:RestClient.search_sessions is experimental")
def test_an_abandoned_session_is_expired_its_runs_saved_and_unloaded(expiring, caplog):
    """The client trains a step it never saves, then goes silent (as a killed one does): after the
    expiry the run is unloaded (trainer and listing), the session reads as cancelled with the reason,
    one log line names the session and the run, and the unsaved step survives in the autosave."""
    caplog.set_level(logging.INFO, logger="src.worker")
    worker = expiring.worker
    client = tinker.ServiceClient(base_url=expiring.url, api_key=API_KEY)
    try:
        session_id = client.holder.get_session_id()
        tc = client.create_lora_training_client(base_model=worker.base_model, rank=2).result()
        second = client.create_lora_training_client(base_model=worker.base_model, rank=2).result()
        tc.forward_backward([datum()], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
        trained = logprobs(tc)
        assert worker.trainer.has_adapter(tc.model_id)
        expired_before = requests.get(f"{expiring.url}/api/v1/healthz", timeout=30).json()["sessions"]["expired"]

        wait_for(lambda: session(expiring, session_id)["finish_reason"] == "expired", 30, "session expired")
        # each run's unload waits in that run's own queue: they finish in either order
        wait_for(lambda: all(worker.store.get_model(m)["unloaded"] for m in (tc.model_id, second.model_id)),
                 30, "both runs unloaded")
        assert not worker.trainer.has_adapter(tc.model_id) and not worker.trainer.has_adapter(second.model_id)
        runs = {m["model_id"]: m["unloaded"] for m in worker.store.list_models(None, include_unloaded=True)}
        assert runs[tc.model_id] == 1 and runs[second.model_id] == 1, "the runs stay listed, unloaded"
        assert tc.model_id not in {m["model_id"] for m in worker.store.list_models(None)}

        def logged() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.name == "src.worker" and session_id in r.getMessage()]

        wait_for(logged, 10, "the expiry logged")  # the sweep logs once the unloads are queued
        lines = logged()
        assert len(lines) == 1 and tc.model_id in lines[0] and second.model_id in lines[0], lines
        assert "TINK_SESSION_EXPIRY_S" in lines[0]
        health = requests.get(f"{expiring.url}/api/v1/healthz", timeout=30).json()["sessions"]
        assert health == {"expiry_s": EXPIRY_S, "expired": expired_before + 1}

        rest = tinker.RestClient(base_url=expiring.url, api_key=API_KEY)
        found = rest.search_sessions(types.SessionSearchRequest(
            session_id=session_id, statuses=[types.CancelledSessionStatusQuery()])).result().sessions
        assert [s.session_id for s in found] == [session_id]
        assert found[0].status.type == "cancelled" and "TINK_SESSION_EXPIRY_S" in found[0].status.detail

        # Nothing acknowledged is lost: the autosave holds the unsaved step, and resumes in a new session.
        assert_autosave_resumes(expiring, tc.model_id, trained)
    finally:
        client.close("success").result()  # an expired session's close changes nothing
    assert session(expiring, session_id)["finish_reason"] == "expired"


def test_a_run_whose_autosave_failed_is_saved_and_unloaded_by_a_later_sweep(expiring, monkeypatch):
    """The autosave at expiry fails once (a full disk): the run stays loaded rather than lose its step, and
    a later sweep saves and unloads it; the step survives in the autosave."""
    worker = expiring.worker
    save, failed = worker._save_autosave, []

    def full_disk_once(model_id: str) -> None:
        if not failed:
            failed.append(model_id)
            raise OSError(28, "No space left on device")
        save(model_id)

    monkeypatch.setattr(worker, "_save_autosave", full_disk_once)
    client = tinker.ServiceClient(base_url=expiring.url, api_key=API_KEY)
    try:
        tc = client.create_lora_training_client(base_model=worker.base_model, rank=2).result()
        tc.forward_backward([datum()], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
        trained = logprobs(tc)
        wait_for(lambda: worker.store.get_model(tc.model_id)["unloaded"], 30, "run unloaded by a later sweep")
        assert failed == [tc.model_id] and not worker.trainer.has_adapter(tc.model_id)
        with sqlite3.connect(worker.config.database_path) as db:
            unloads = [row[0] for row in db.execute("SELECT status FROM futures WHERE model_id=? AND op='unload_model' "
                                                    "ORDER BY completion_seq", (tc.model_id,))]
        assert unloads == ["failed", "done"]
        assert_autosave_resumes(expiring, tc.model_id, trained)
    finally:
        client.close("success").result()


def test_after_expiry_the_session_stays_ended_and_says_so(expiring):
    """No silent resurrection: the heartbeat gets 410 (the SDK then stops its loop), the released run
    and a new run in the session get 410 naming the session, and nothing is loaded again."""
    worker = expiring.worker
    client = tinker.ServiceClient(base_url=expiring.url, api_key=API_KEY)
    try:
        session_id = client.holder.get_session_id()
        tc = client.create_lora_training_client(base_model=worker.base_model, rank=2).result()
        tc.forward_backward([datum()], "cross_entropy").result()
        wait_for(lambda: worker.store.get_model(tc.model_id)["unloaded"], 30, "run unloaded")

        late = heartbeat(expiring, session_id)
        assert late.status_code == 410 and late.json()["field"] == "session_id"
        assert session_id in late.json()["error"] and "TINK_SESSION_EXPIRY_S" in late.json()["error"]
        assert session(expiring, session_id)["finish_reason"] == "expired", "the heartbeat did not revive it"

        with pytest.raises(tinker.APIStatusError) as used:
            tc.forward_backward([datum()], "cross_entropy").result()
        assert used.value.status_code == 410
        assert session_id in str(used.value) and f"tinker://{tc.model_id}/weights/autosave" in str(used.value)
        with pytest.raises(tinker.APIStatusError) as created:
            client.create_lora_training_client(base_model=worker.base_model, rank=2).result()
        assert created.value.status_code == 410 and session_id in str(created.value)
        assert not worker.trainer.has_adapter(tc.model_id)
        assert worker.store.get_model(tc.model_id)["unloaded"]
    finally:
        client.close("success").result()


def test_a_session_heard_from_is_not_expired(expiring):
    """One client only heartbeats, another only sends operations, for three expiry periods: both keep
    their runs loaded and usable."""
    worker = expiring.worker
    beating = tinker.ServiceClient(base_url=expiring.url, api_key=API_KEY)
    working = tinker.ServiceClient(base_url=expiring.url, api_key=API_KEY)
    stop = threading.Event()
    try:
        beating_id, working_id = beating.holder.get_session_id(), working.holder.get_session_id()
        idle_tc = beating.create_lora_training_client(base_model=worker.base_model, rank=2).result()
        busy_tc = working.create_lora_training_client(base_model=worker.base_model, rank=2).result()

        def beat() -> None:
            while not stop.wait(0.3):
                assert heartbeat(expiring, beating_id).status_code == 200

        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
        until = time.time() + 3 * EXPIRY_S
        while time.time() < until:
            busy_tc.forward([datum()], "cross_entropy").result()
            time.sleep(0.5)
        stop.set()
        beater.join()

        for session_id, tc in ((beating_id, idle_tc), (working_id, busy_tc)):
            assert session(expiring, session_id)["finish_reason"] is None
            assert worker.trainer.has_adapter(tc.model_id) and not worker.store.get_model(tc.model_id)["unloaded"]
            tc.forward_backward([datum()], "cross_entropy").result()
    finally:
        stop.set()
        beating.close("success").result()
        working.close("success").result()


def test_a_run_with_operations_in_flight_is_released_only_after_they_finish(expiring):
    """The client queues more training than the expiry lasts, then goes silent: every operation
    finishes and succeeds, the session expires only after the last one, and the unload comes last.

    How long the queue lasts is estimated from one timed pass; on a loaded machine that pass can be slow
    and the queue then shorter than the expiry, which would test nothing: such a try is repeated, in a new
    session, with twice the queue."""
    worker = expiring.worker
    heavy = [datum(512) for _ in range(16)]
    scale = 1
    for _ in range(3):
        client = tinker.ServiceClient(base_url=expiring.url, api_key=API_KEY)
        try:
            session_id = client.holder.get_session_id()
            tc = client.create_lora_training_client(base_model=worker.base_model, rank=2).result()
            tc.forward_backward(heavy, "cross_entropy").result()  # warm-up: the first pass is slower than the rest
            started = time.time()
            tc.forward_backward(heavy, "cross_entropy").result()
            one = max(time.time() - started, 0.01)
            count = min(400, scale * (int((2 * EXPIRY_S + 2) / one) + 1))  # queued work lasts past the expiry
            futures = [tc.forward_backward(heavy, "cross_entropy") for _ in range(count)]
            for f in futures:
                f.result()
            model_id = tc.model_id
            wait_for(lambda m=model_id: worker.store.get_model(m)["unloaded"], 60, "run unloaded")
        finally:
            client.close("success").result()

        with sqlite3.connect(worker.config.database_path) as db:
            ops = db.execute("SELECT op, status, created_at, finished_at FROM futures WHERE model_id=? "
                             "ORDER BY completion_seq", (model_id,)).fetchall()
        work = [op for op in ops if op[0] == "forward_backward"]
        assert len(work) == count + 2 and {op[1] for op in work} == {"done"}
        last_heard = max(op[2] for op in work)  # each operation accepted counts as hearing from the client
        if work[-1][3] - last_heard > EXPIRY_S + 2 * SWEEP_S:  # the queue outlasted the expiry
            break
        scale *= 2
    else:
        pytest.fail("three queues in a row finished before the expiry: nothing was tested")
    assert session(expiring, session_id)["finished_at"] >= work[-1][3], "not expired mid-operation"
    assert ops[-1][0] == "unload_model" and ops[-1][1] == "done"


def test_expiry_zero_never_expires(tiny_model_path, tmp_path):
    """TINK_SESSION_EXPIRY_S=0: a session silent for an hour keeps its run through many sweeps."""
    config, worker, app = start_server(tiny_model_path, tmp_path / "state", 0)
    try:
        with serving(app, config) as url:
            client = tinker.ServiceClient(base_url=url, api_key=API_KEY)
            try:
                session_id = client.holder.get_session_id()
                tc = client.create_lora_training_client(base_model=worker.base_model, rank=2).result()
                with sqlite3.connect(config.database_path) as db:  # last heard from an hour ago
                    db.execute("UPDATE sessions SET created_at=created_at-3600, last_heartbeat_at=? "
                               "WHERE session_id=?", (time.time() - 3600, session_id))
                time.sleep(10 * SWEEP_S)
                assert worker.expire_idle_sessions() == 0
                assert worker.store.get_session(session_id)["finish_reason"] is None
                assert worker.trainer.has_adapter(tc.model_id)
                tc.forward_backward([datum()], "cross_entropy").result()
                assert requests.get(f"{url}/api/v1/healthz", timeout=30).json()["sessions"]["expired"] == 0
            finally:
                client.close("success").result()
    finally:
        worker.close()


def test_the_setting_is_read_and_checked():
    assert Config.from_env({"TINK_SESSION_EXPIRY_S": "120"}, dotenv_path="/nonexistent").session_expiry_s == 120
    assert Config.from_env({}, dotenv_path="/nonexistent").session_expiry_s == 900
    with pytest.raises(ConfigError, match="TINK_SESSION_EXPIRY_S"):
        Config.from_env({"TINK_SESSION_EXPIRY_S": "-1"}, dotenv_path="/nonexistent")
