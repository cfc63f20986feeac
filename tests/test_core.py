"""Config, store, checkpoints and scheduling, without models."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from src.backends import UserInputError
from src.checkpoints import TinkerPath, write_atomically
from src.config import Config, ConfigError
from src.scheduling import Outcome, QueueDepths, Scheduler
from src.store import RESTART_REASON, Store


def test_config_reads_env_over_dotenv(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("TINK_PORT=9001\nUSE_VLLM=true\nVLLM_MAX_LORAS=8\nTINK_API_KEYS=a, b\n")
    cfg = Config.from_env({"TINK_PORT": "9002"}, dotenv_path=dotenv)
    assert (cfg.port, cfg.use_vllm, cfg.vllm_max_loras, cfg.api_keys) == (9002, True, 8, ("a", "b"))
    assert Config.from_env({"VLLM_BASE_URL": "http://x:1"}, dotenv_path=tmp_path / "none").vllm_backend == "server"


@pytest.mark.parametrize("env,name", [
    ({"TINK_PORT": "eighty"}, "TINK_PORT"),
    ({"USE_VLLM": "maybe"}, "USE_VLLM"),
    ({"VLLM_BACKEND": "nope"}, "VLLM_BACKEND"),
    ({"USE_MEGATRON": "true"}, "MEGATRON_SERVER_URL"),
])
def test_config_errors_name_the_variable(tmp_path, env, name):
    with pytest.raises(ConfigError, match=name):
        Config.from_env(env, dotenv_path=tmp_path / "none")


def test_tinker_paths():
    p = TinkerPath.parse("tinker://abc/sampler_weights/step-1")
    assert (p.model_id, p.kind, p.name, str(p)) == ("abc", "sampler", "step-1", "tinker://abc/sampler_weights/step-1")
    for bad in ["s3://x", "tinker://abc/other/x", "tinker://abc/weights/../../etc", "tinker://a/weights/"]:
        with pytest.raises(UserInputError):
            TinkerPath.parse(bad)


def test_atomic_write_never_leaves_a_partial_folder(tmp_path):
    target = tmp_path / "ckpt"
    write_atomically(target, lambda d: (d / "a.txt").write_text("one"), overwrite=False)

    def crash(d: Path):
        (d / "a.txt").write_text("two-partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomically(target, crash, overwrite=True)
    assert (target / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folders left
    with pytest.raises(UserInputError):
        write_atomically(target, lambda d: None, overwrite=False)
    write_atomically(target, lambda d: (d / "b.txt").write_text("new"), overwrite=True)
    assert [p.name for p in target.iterdir()] == ["b.txt"]


def test_store_fails_unfinished_futures_on_reopen(tmp_path):
    db = tmp_path / "t.sqlite3"
    store = Store(db)
    store.add_future("r1", "optim_step", "m", "o")
    store.add_future("r2", "optim_step", "m", "o")
    store.finish_future("r1", "json", b'{"ok": 1}')
    store.close()
    store = Store(db)
    assert store.fail_unfinished() == 1
    assert store.get_future("r1").result == b'{"ok": 1}'
    r2 = store.get_future("r2")
    assert (r2.status, r2.error, r2.category) == ("failed", RESTART_REASON, "server")
    assert store.put_checkpoint("tinker://m/weights/a", "m", "training", tmp_path, 1, None) == 1
    assert store.put_checkpoint("tinker://m/weights/a", "m", "training", tmp_path, 1, None) == 2


def test_scheduler_keeps_order_per_model_and_interleaves_models(tmp_path):
    store = Store(tmp_path / "s.sqlite3")
    sched = Scheduler(store, sampling_threads=2)
    gate, holding = threading.Event(), threading.Event()
    ran: list[str] = []

    def op(tag: str, wait: bool = False):
        def run() -> Outcome:
            if wait:
                holding.set()
                gate.wait(10)
            ran.append(tag)
            return Outcome("json", b"{}")
        return run

    first = sched.submit_training("op", "a", "o", op("a0", wait=True))  # holds the trainer thread
    assert holding.wait(10)  # a0 is off its queue before the rest arrive (else a0's queue goes on holding a1)
    ids = [sched.submit_training("op", "a", "o", op(f"a{i}")) for i in range(1, 4)]
    ids += [sched.submit_training("op", "b", "o", op(f"b{i}")) for i in range(3)]
    gate.set()
    for rid in [first, *ids]:
        assert sched.wait(rid, 10).status == "done"
    assert ran == ["a0", "a1", "b0", "a2", "b1", "a3", "b2"]
    sched.shutdown()


def test_an_operation_taken_off_its_queue_but_not_started_still_counts_as_waiting(tmp_path, monkeypatch):
    """/metrics' futures gauge (and a client waiting for `pending + running == 0`) must never miss an operation:
    CI once read both as 0 while a session's unload sat between the queue and its start."""
    store = Store(tmp_path / "s.sqlite3")
    sched = Scheduler(store)
    between, go = threading.Event(), threading.Event()
    claim = Scheduler._claim

    def slow_claim(self, request_id):  # hold the training thread right after it took the operation off the queue
        between.set()
        go.wait(10)
        return claim(self, request_id)

    monkeypatch.setattr(Scheduler, "_claim", slow_claim)
    rid = sched.submit_training("unload_model", "m", "o", lambda: Outcome("json", b"{}"))
    assert between.wait(10)
    depths = sched.queue_depths()
    assert (depths.training, depths.running, depths.longest_training_queue) == (1, 0, 0)
    go.set()
    assert sched.wait(rid, 10).status == "done"
    assert sched.queue_depths() == QueueDepths(training=0, sampling=0, training_models=0, longest_training_queue=0,
                                               running=0)
    sched.shutdown()


def test_scheduler_failure_fails_only_that_future(tmp_path):
    store = Store(tmp_path / "s.sqlite3")
    sched = Scheduler(store)

    def boom() -> Outcome:
        raise RuntimeError("backend exploded")

    def bad() -> Outcome:
        raise UserInputError("rank too big", "lora_config.rank")

    r1, r2 = sched.submit_training("op", "m", "o", boom), sched.submit_training("op", "m", "o", bad)
    r3 = sched.submit_sampling("sample", "o", lambda: Outcome("json", b"[]"))
    assert (sched.wait(r1, 10).status, sched.wait(r1, 10).category) == ("failed", "server")
    assert "backend exploded" in sched.wait(r1, 10).error
    assert (sched.wait(r2, 10).category, sched.wait(r3, 10).status) == ("user", "done")
    sched.shutdown()
