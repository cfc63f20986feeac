"""SIGTERM during training: the worker exits 0 within its grace period and nothing acknowledged is lost.

The worker runs as `python -m src serve` in a subprocess. Clients keep forward_backward, optim_step
and save_weights requests queued; SIGTERM arrives mid-stream. After a restart on the same state
folder, every acknowledged future answers with its result or with a failure whose reason says
what happened and what to do, and every checkpoint that was saved is complete and loadable.
"""

from __future__ import annotations

import hashlib
import json
import signal
import threading
import time
from pathlib import Path

import numpy as np
import requests
import torch
from safetensors.numpy import load_file

from .api import get, post, result
from .conftest import API_KEY, free_port, new_session, start_worker_process

HEADERS = {"X-API-Key": API_KEY}
GRACE_S = 4.0  # TINK_SHUTDOWN_GRACE_S for these workers
EXIT_MARGIN_S = 10.0  # closing the sampler and the interpreter's own teardown, on a loaded 2-core CI box
CLIENTS = 3
BACKLOG = 150  # acknowledged operations per model before SIGTERM: several seconds of work on 2 cores





def datum(seed: int, length: int = 48) -> dict:
    tokens = np.random.default_rng(seed).integers(3, 400, size=length + 1).tolist()
    return {"model_input": {"chunks": [{"tokens": tokens[:-1], "type": "encoded_text"}]},
            "loss_fn_inputs": {"target_tokens": {"data": tokens[1:], "dtype": "int64"},
                               "weights": {"data": [1.0] * length, "dtype": "float32"}}}


def create_model(url: str, model_path: Path) -> str:
    created = post(url, "create_model", {"session_id": new_session(), "model_seq_id": 0,
                                         "base_model": str(model_path), "lora_config": {"rank": 4}})
    assert "error" not in result(url, created["request_id"])
    return created["model_id"]


def train(url: str, model_id: str, step: int) -> None:
    fb = {"model_id": model_id, "forward_backward_input": {"loss_fn": "cross_entropy", "data": [datum(step)]}}
    assert "metrics" in result(url, post(url, "forward_backward", fb)["request_id"])
    assert "metrics" in result(url, post(url, "optim_step", {"model_id": model_id,
                                                             "adam_params": {"learning_rate": 1e-2}})["request_id"])


def checkpoint_folder(state_dir: Path, tinker_path: str) -> Path:
    model_id, kind, name = tinker_path[len("tinker://"):].split("/")
    return state_dir / "checkpoints" / model_id / kind / name


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def client_loop(url: str, model_id: str, acknowledged: list[tuple[str, str]], stop: threading.Event) -> None:
    """Queue training work without waiting for it, so SIGTERM finds a backlog; bounded in count."""
    try:
        for step in range(400):
            if stop.is_set():
                return
            fb = {"model_id": model_id, "forward_backward_input": {
                "loss_fn": "cross_entropy", "data": [datum(step + 1000 * k, 96) for k in range(4)]}}
            acknowledged.append(("forward_backward", post(url, "forward_backward", fb)["request_id"]))
            acknowledged.append(("optim_step", post(url, "optim_step", {
                "model_id": model_id, "adam_params": {"learning_rate": 1e-3}})["request_id"]))
            if step % 4 == 3:
                acknowledged.append(("save_weights", post(url, "save_weights", {
                    "model_id": model_id, "path": f"step-{step}", "overwrite": True})["request_id"]))
    except (requests.RequestException, AssertionError):
        return  # the worker stopped listening (or refused a post while stopping): nothing was acknowledged


def terminate(proc, within: float) -> float:
    """SIGTERM, then the exit code must be 0 within `within` seconds; returns how long it took."""
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(within)
    except Exception:
        proc.kill()
        proc.wait(30)
        raise AssertionError(f"the worker did not exit within {within:.0f}s of SIGTERM") from None
    assert code == 0, f"exit code {code} after SIGTERM"
    return time.monotonic() - start


def test_sigterm_mid_training_exits_0_and_loses_nothing(tiny_model_path, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"TINK_SHUTDOWN_GRACE_S": str(GRACE_S)}
    proc = start_worker_process(tiny_model_path, tmp_path, port, **env)
    acknowledged: dict[str, list[tuple[str, str]]] = {}
    try:
        models = [create_model(url, tiny_model_path) for _ in range(CLIENTS)]
        kept: dict[str, tuple[str, dict[str, str]]] = {}
        for model_id in models:
            train(url, model_id, 0)
            path = result(url, post(url, "save_weights", {"model_id": model_id, "path": "kept"})["request_id"])["path"]
            kept[model_id] = (path, folder_digest(checkpoint_folder(tmp_path, path)))
            acknowledged[model_id] = []
        stop = threading.Event()
        threads = [threading.Thread(target=client_loop, args=(url, m, acknowledged[m], stop), daemon=True)
                   for m in models]
        for t in threads:
            t.start()
        # SIGTERM once every model has a backlog longer than the grace period lets the worker finish.
        deadline = time.time() + 60
        while time.time() < deadline and not all(len(acknowledged[m]) >= BACKLOG for m in models):
            time.sleep(0.1)
        assert all(acknowledged[m] for m in models), "clients got work acknowledged before SIGTERM"
        took = terminate(proc, GRACE_S + EXIT_MARGIN_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    stop.set()
    for t in threads:
        t.join(30)

    proc = start_worker_process(tiny_model_path, tmp_path, port, **env)
    try:
        outcomes = {"done": 0, "failed at shutdown": 0, "failed at restart": 0}
        for model_id, ops in acknowledged.items():
            for op, request_id in ops:
                answer = result(url, request_id)  # never 404, never pending
                if "error" in answer:
                    assert answer["category"] == "server", answer
                    assert "Submit" in answer["error"], answer  # the reason says what to do
                    key = "failed at shutdown" if "shut down" in answer["error"] else "failed at restart"
                    assert key == "failed at shutdown" or "restarted" in answer["error"], answer
                    outcomes[key] += 1
                else:
                    outcomes["done"] += 1
                    assert ("path" if op == "save_weights" else "metrics") in answer, answer

            # Every checkpoint listed is complete and loadable; the one saved before is byte-identical.
            checkpoints = get(url, f"training_runs/{model_id}/checkpoints")["checkpoints"]
            paths = {c["tinker_path"]: c for c in checkpoints}
            kept_path, kept_digest = kept[model_id]
            assert kept_path in paths
            assert folder_digest(checkpoint_folder(tmp_path, kept_path)) == kept_digest
            for path in paths:
                folder = checkpoint_folder(tmp_path, path)
                files = {p.name for p in folder.iterdir()}
                assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= files, (path, files)
                assert load_file(folder / "adapter_model.safetensors")
                torch.load(folder / "optimizer.pt", weights_only=True)
                json.loads((folder / "adapter_config.json").read_text())
            # The model trains on after the restart, from its last complete checkpoint.
            train(url, model_id, 1)
            last = [c for c in checkpoints if c["checkpoint_type"] == "training"][-1]["tinker_path"]
            loaded = post(url, "load_weights", {"model_id": model_id, "path": last, "optimizer": True})
            assert "error" not in result(url, loaded["request_id"])
        total = sum(outcomes.values())
        print(f"\nSIGTERM: exited 0 after {took:.1f}s (grace {GRACE_S:.0f}s); {total} acknowledged futures: {outcomes}")
        assert total == sum(len(ops) for ops in acknowledged.values()) and outcomes["done"] > 0
    finally:
        terminate(proc, GRACE_S + EXIT_MARGIN_S)


def test_sigterm_keeps_training_done_since_the_last_checkpoint(tiny_model_path, tmp_path):
    """'State saved': a finished optim_step survives a graceful restart even without a save_weights."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_worker_process(tiny_model_path, tmp_path, port, TINK_SHUTDOWN_GRACE_S=str(GRACE_S))
    try:
        model_id = create_model(url, tiny_model_path)
        train(url, model_id, 0)
        saved = result(url, post(url, "save_weights", {"model_id": model_id, "path": "one-step"})["request_id"])
        train(url, model_id, 1)  # done, acknowledged, never saved explicitly
    finally:
        terminate(proc, GRACE_S + EXIT_MARGIN_S)
    proc = start_worker_process(tiny_model_path, tmp_path, port, TINK_SHUTDOWN_GRACE_S=str(GRACE_S))
    try:
        after = result(url, post(url, "save_weights", {"model_id": model_id, "path": "after"})["request_id"])
        step = torch.load(checkpoint_folder(tmp_path, after["path"]) / "optimizer.pt", weights_only=True)["step"]
        one = load_file(checkpoint_folder(tmp_path, saved["path"]) / "adapter_model.safetensors")
        two = load_file(checkpoint_folder(tmp_path, after["path"]) / "adapter_model.safetensors")
        assert step == 2, f"the restarted model is at optimizer step {step}, not 2"
        assert any(not np.array_equal(one[k], two[k]) for k in one)
    finally:
        terminate(proc, GRACE_S + EXIT_MARGIN_S)
