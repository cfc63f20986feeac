"""Durable futures: a restarted worker still answers for work it finished, and fails what it did not."""

from __future__ import annotations

import signal

from src.auth import fingerprint
from src.store import RESTART_REASON, Store

from .api import post, result
from .conftest import API_KEY, free_port, new_session, start_worker_process


def test_restart_keeps_finished_results_and_fails_unfinished(tiny_model_path, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_worker_process(tiny_model_path, tmp_path, port)
    try:
        created = post(url, "create_model", {"session_id": new_session(), "model_seq_id": 0, "base_model": str(tiny_model_path),
                                             "lora_config": {"rank": 4}})
        model_id = created["model_id"]
        assert result(url, created["request_id"])["model_id"] == model_id
        step = post(url, "optim_step", {"model_id": model_id, "adam_params": {"learning_rate": 0.01}})
        first = result(url, step["request_id"])
        saved = post(url, "save_weights", {"model_id": model_id, "path": "kept"})
        assert result(url, saved["request_id"])["path"] == f"tinker://{model_id}/weights/kept"
    finally:
        proc.send_signal(signal.SIGKILL)  # no chance to clean up: like a crash
        proc.wait(30)

    # A future that was accepted but never finished (as if the crash hit mid-operation).
    store = Store(tmp_path / "tink.sqlite3")
    store.add_future("forward_backward-inflight", "forward_backward", model_id, fingerprint(API_KEY))
    store.close()

    proc = start_worker_process(tiny_model_path, tmp_path, port)
    try:
        assert result(url, step["request_id"]) == first
        lost = result(url, "forward_backward-inflight")
        assert lost["error"] == RESTART_REASON and lost["category"] == "server"
        # The model comes back from its last checkpoint and keeps training.
        again = post(url, "optim_step", {"model_id": model_id, "adam_params": {"learning_rate": 0.01}})
        assert "metrics" in result(url, again["request_id"])
        info = post(url, "get_info", {"model_id": model_id})
        assert info["lora_rank"] == 4
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
