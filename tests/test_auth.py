"""API keys and ownership: another key sees none of your models, checkpoints, futures or samplers."""

from __future__ import annotations

import json

import requests

from src.auth import KeyRing, fingerprint

from .conftest import ADMIN_KEY, API_KEY, OTHER_KEY, new_session


def post(server, path: str, key: str, body: dict) -> requests.Response:
    return requests.post(f"{server.url}/api/v1/{path}", json=body, headers={"X-API-Key": key}, timeout=30)


def wait(server, key: str, request_id: str) -> dict:
    for _ in range(20):
        answer = post(server, "retrieve_future", key, {"request_id": request_id}).json()
        if answer.get("type") != "try_again":
            return answer
    raise TimeoutError(request_id)


def test_keyring_constant_time_lookup_and_roles():
    ring = KeyRing(("alice", "bob"), ("root",))
    assert ring.authenticate("alice").owner == fingerprint("alice")
    assert not ring.authenticate("alice").admin and ring.authenticate("root").admin
    assert ring.authenticate("alic") is None and ring.authenticate(None) is None
    assert KeyRing((), ()).authenticate(None).admin  # no keys configured: single-user mode


def test_other_key_gets_404_for_everything_of_mine(server):
    created = post(server, "create_model", API_KEY, {"session_id": new_session(), "model_seq_id": 0,
                                                     "base_model": server.worker.base_model,
                                                     "lora_config": {"rank": 4}}).json()
    model_id = created["model_id"]
    assert wait(server, API_KEY, created["request_id"])["model_id"] == model_id
    saved = post(server, "save_weights_for_sampler", API_KEY, {"model_id": model_id, "path": "mine"}).json()
    path = wait(server, API_KEY, saved["request_id"])["path"]
    session = post(server, "create_sampling_session", API_KEY,
                   {"session_id": "s", "sampling_session_seq_id": 0, "model_path": path}).json()

    prompt = {"chunks": [{"tokens": [1, 2], "type": "encoded_text"}]}
    probes = [
        ("get_info", {"model_id": model_id}),
        ("optim_step", {"model_id": model_id, "adam_params": {"learning_rate": 0.1}}),
        ("save_weights", {"model_id": model_id, "path": "stolen"}),
        ("unload_model", {"model_id": model_id}),
        ("load_weights", {"model_id": model_id, "path": path, "optimizer": False}),
        ("retrieve_future", {"request_id": created["request_id"]}),
        ("create_sampling_session", {"session_id": "s", "sampling_session_seq_id": 0, "model_path": path}),
        ("asample", {"prompt": prompt, "num_samples": 1, "sampling_params": {"max_tokens": 1}, "model_path": path}),
        ("asample", {"prompt": prompt, "num_samples": 1, "sampling_params": {"max_tokens": 1},
                     "sampling_session_id": session["sampling_session_id"]}),
        ("sample", {"model_id": model_id, "prompts": ["hi"]}),
    ]
    never_existed = "0" * len(model_id)
    for route, body in probes:
        resp = post(server, route, OTHER_KEY, body)
        assert resp.status_code == 404, (route, resp.status_code, resp.text)
        # Indistinguishable from an id that never existed, so ids cannot be probed.
        if route not in ("retrieve_future", "asample") or "model_path" in body:
            ghost = json.loads(json.dumps(body).replace(model_id, never_existed))
            ghost_resp = post(server, route, OTHER_KEY, ghost)
            assert ghost_resp.status_code == 404
            assert ghost_resp.json() == json.loads(resp.text.replace(model_id, never_existed)), route
    other_runs = requests.get(f"{server.url}/api/v1/training_runs", headers={"X-API-Key": OTHER_KEY}, timeout=10)
    assert model_id not in {r["training_run_id"] for r in other_runs.json()["training_runs"]}
    admin_runs = requests.get(f"{server.url}/api/v1/training_runs", headers={"X-API-Key": ADMIN_KEY}, timeout=10)
    assert model_id in {r["training_run_id"] for r in admin_runs.json()["training_runs"]}
    # The owner still can.
    assert post(server, "get_info", API_KEY, {"model_id": model_id}).status_code == 200
