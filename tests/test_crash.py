"""Crash safety: kill -9 mid-training, restart on the same state folder, lose nothing acknowledged."""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import requests
from safetensors.numpy import load_file

from .api import post, result
from .conftest import API_KEY, free_port, new_session, start_worker_process

HEADERS = {"X-API-Key": API_KEY}
CLIENTS = 4




def datum(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 400, size=24).tolist()
    return {"model_input": {"chunks": [{"tokens": tokens[:-1], "type": "encoded_text"}]},
            "loss_fn_inputs": {"target_tokens": {"data": tokens[1:], "dtype": "int64"},
                               "weights": {"data": [1.0] * 23, "dtype": "float32"}}}


def client_loop(url: str, model_id: str, acknowledged: list[str], stop: threading.Event) -> None:
    """fwd_bwd, optim_step, and a save every third step, until the server dies."""
    step = 0
    try:
        while not stop.is_set():
            fb = {"model_id": model_id, "forward_backward_input": {"loss_fn": "cross_entropy",
                                                                   "data": [datum(step), datum(step + 1)]}}
            acknowledged.append(post(url, "forward_backward", fb)["request_id"])
            acknowledged.append(post(url, "optim_step", {"model_id": model_id,
                                                         "adam_params": {"learning_rate": 1e-2}})["request_id"])
            if step % 3 == 2:
                acknowledged.append(post(url, "save_weights", {"model_id": model_id, "path": f"step-{step}",
                                                               "overwrite": True})["request_id"])
            step += 1
    except (requests.RequestException, AssertionError):
        return  # the server was killed under us


def test_kill_9_loses_no_acknowledged_future_and_restores_last_checkpoint(tiny_model_path, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_worker_process(tiny_model_path, tmp_path, port)
    acknowledged: dict[str, list[str]] = {}
    try:
        models = []
        for i in range(CLIENTS):
            created = post(url, "create_model", {"session_id": new_session(), "model_seq_id": i,
                                                 "base_model": str(tiny_model_path), "lora_config": {"rank": 4}})
            result(url, created["request_id"])
            models.append(created["model_id"])
            acknowledged[created["model_id"]] = []
        stop = threading.Event()
        threads = [threading.Thread(target=client_loop, args=(url, m, acknowledged[m], stop)) for m in models]
        for t in threads:
            t.start()
        deadline = time.time() + 60
        # Kill once every model has at least one finished checkpoint and work is still queued.
        while time.time() < deadline:
            runs = [requests.get(f"{url}/api/v1/training_runs/{m}", headers=HEADERS, timeout=10).json() for m in models]
            if all(r["last_checkpoint"] for r in runs):
                break
            time.sleep(0.5)
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    stop.set()
    for t in threads:
        t.join(30)

    proc = start_worker_process(tiny_model_path, tmp_path, port)
    try:
        total = done = failed = 0
        for model_id, ids in acknowledged.items():
            for request_id in ids:
                answer = result(url, request_id)  # never 404, never pending forever
                total += 1
                if "error" in answer:
                    failed += 1
                    assert answer["category"] == "server" and "restarted" in answer["error"]
                else:
                    done += 1
            assert ids, "every client got work acknowledged before the kill"
            # The adapter is back at its last saved checkpoint, bit for bit.
            checkpoints = requests.get(f"{url}/api/v1/training_runs/{model_id}/checkpoints",
                                       headers=HEADERS, timeout=10).json()["checkpoints"]
            last = [c for c in checkpoints if c["checkpoint_type"] == "training"][-1]["tinker_path"]
            after = result(url, post(url, "save_weights", {"model_id": model_id, "path": "after-restart"})["request_id"])
            folder = tmp_path / "checkpoints" / model_id / "weights"
            before_tensors = load_file(folder / last.rsplit("/", 1)[-1] / "adapter_model.safetensors")
            after_tensors = load_file(folder / "after-restart" / "adapter_model.safetensors")
            assert after["path"].endswith("after-restart")
            assert before_tensors.keys() == after_tensors.keys()
            for name in before_tensors:
                np.testing.assert_array_equal(before_tensors[name], after_tensors[name])
        print(f"\nkill -9: {total} acknowledged futures, {done} with results, {failed} reported failed, 0 lost")
        assert total == done + failed and done > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
