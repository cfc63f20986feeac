"""Bad input over plain HTTP: each gets a 4xx whose JSON names the field; nothing accepted is lost."""

from __future__ import annotations

import pytest
import requests
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from src.app import create_app
from src.config import Config

from .conftest import API_KEY, new_session

HEADERS = {"X-API-Key": API_KEY}


def post(server, path: str, **kwargs) -> requests.Response:
    return requests.post(f"{server.url}/api/v1/{path}", headers={**HEADERS, **kwargs.pop("headers", {})},
                         timeout=30, **kwargs)


def wait_result(server, request_id: str) -> dict:
    for _ in range(20):
        answer = post(server, "retrieve_future", json={"request_id": request_id}).json()
        if answer.get("type") != "try_again":
            return answer
    raise TimeoutError(request_id)


@pytest.fixture(scope="module")
def model_id(server) -> str:
    body = {"session_id": new_session(), "model_seq_id": 0, "base_model": server.worker.base_model,
            "lora_config": {"rank": 4}}
    answer = post(server, "create_model", json=body).json()
    assert wait_result(server, answer["request_id"])["model_id"] == answer["model_id"]
    return answer["model_id"]


def fwd_bwd_proto(model_id: str, tokens, targets, weights=None, loss_fn="cross_entropy") -> bytes:
    inputs = {"target_tokens": types.TensorData(data=targets, dtype="int64", shape=[len(targets)])}
    if weights is not None:
        inputs["weights"] = types.TensorData(data=weights, dtype="float32", shape=[len(weights)])
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs=inputs)
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[datum], loss_fn=loss_fn), model_id=model_id, seq_id=1)
    return forward_backward_request_to_proto(req).SerializeToString()


def proto_post(server, body: bytes) -> requests.Response:
    return post(server, "forward_backward", data=body, headers={"Content-Type": "application/x-protobuf"})


def assert_error(resp: requests.Response, status: int, field: str) -> None:
    assert resp.status_code == status, resp.text
    payload = resp.json()
    assert payload["field"] == field, payload
    assert payload["error"]


def test_missing_or_wrong_api_key_is_401(server):
    assert requests.post(f"{server.url}/api/v1/create_session", json={}, timeout=10).status_code == 401
    resp = requests.post(f"{server.url}/api/v1/create_session", json={}, headers={"X-API-Key": "nope"}, timeout=10)
    assert resp.status_code == 401 and "key" in resp.json()["error"].lower()
    assert requests.get(f"{server.url}/api/v1/healthz", timeout=10).status_code == 200


def test_malformed_json_names_body(server):
    resp = post(server, "create_model", data="{not json", headers={"Content-Type": "application/json"})
    assert_error(resp, 400, "body")


def test_missing_field_is_named(server):
    assert_error(post(server, "create_model", json={"session_id": new_session(), "model_seq_id": 0}), 400, "base_model")


def test_unserved_base_model(server):
    body = {"session_id": new_session(), "model_seq_id": 0, "base_model": "meta/unknown", "lora_config": {"rank": 4}}
    assert_error(post(server, "create_model", json=body), 400, "base_model")


def test_zero_rank(server):
    body = {"session_id": new_session(), "model_seq_id": 0, "base_model": server.worker.base_model, "lora_config": {"rank": 0}}
    assert_error(post(server, "create_model", json=body), 400, "lora_config.rank")


def test_unknown_model_id_is_404(server):
    assert_error(post(server, "get_info", json={"model_id": "nope"}), 404, "model_id")
    assert_error(proto_post(server, fwd_bwd_proto("nope", [1, 2], [2, 3], [1.0, 1.0])), 404, "model_id")
    body = {"model_id": "nope", "adam_params": {"learning_rate": 0.1}}
    assert_error(post(server, "optim_step", json=body), 404, "model_id")


def test_token_out_of_vocabulary(server, model_id):
    vocab = server.worker.trainer.vocab_size()
    assert_error(proto_post(server, fwd_bwd_proto(model_id, [1, vocab], [2, 3], [1.0, 1.0])), 400,
                 "data[0].model_input")
    assert_error(proto_post(server, fwd_bwd_proto(model_id, [1, 2], [2, vocab + 5], [1.0, 1.0])), 400,
                 "data[0].loss_fn_inputs.target_tokens")


def test_mismatched_lengths(server, model_id):
    resp = proto_post(server, fwd_bwd_proto(model_id, [1, 2, 3], [2, 3, 4], [1.0, 1.0]))
    assert_error(resp, 400, "data[0].loss_fn_inputs.weights")


def test_unknown_loss_fn(server, model_id):
    assert_error(proto_post(server, fwd_bwd_proto(model_id, [1, 2], [2, 3], [1.0, 1.0], loss_fn="nope")), 400,
                 "loss_fn")


def test_empty_datum_list(server, model_id):
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[], loss_fn="cross_entropy"), model_id=model_id, seq_id=1)
    assert_error(proto_post(server, forward_backward_request_to_proto(req).SerializeToString()), 400, "data")


def test_garbage_protobuf(server):
    assert_error(proto_post(server, b"\xff\xfe\x00garbage"), 400, "body")


def test_bad_optimizer_params(server, model_id):
    body = {"model_id": model_id, "adam_params": {"learning_rate": 0.1, "beta1": 1.5}}
    assert_error(post(server, "optim_step", json=body), 400, "adam_params.beta1")


def test_unknown_future_and_checkpoint(server, model_id):
    assert_error(post(server, "retrieve_future", json={"request_id": "nope"}), 404, "request_id")
    body = {"model_id": model_id, "path": f"tinker://{model_id}/weights/missing", "optimizer": True}
    assert_error(post(server, "load_weights", json=body), 404, "path")
    assert_error(post(server, "load_weights", json={**body, "path": "s3://x"}), 400, "path")


def test_sampling_bad_input(server):
    vocab = server.worker.trainer.vocab_size()
    base = {"base_model": server.worker.base_model, "num_samples": 1, "sampling_params": {"max_tokens": 2}}
    prompt = {"chunks": [{"tokens": [1, vocab + 1], "type": "encoded_text"}]}
    assert_error(post(server, "asample", json={**base, "prompt": prompt}), 400, "prompt")
    ok_prompt = {"chunks": [{"tokens": [1, 2], "type": "encoded_text"}]}
    bad_params = {**base, "prompt": ok_prompt, "sampling_params": {"max_tokens": 0}}
    assert_error(post(server, "asample", json=bad_params), 400, "sampling_params.max_tokens")
    unknown = {**base, "prompt": ok_prompt, "model_path": "tinker://nope/sampler_weights/x"}
    assert_error(post(server, "asample", json=unknown), 404, "model_path")
    assert_error(post(server, "sample", json={"model_id": server.worker.base_model, "prompts": []}), 400, "prompts")
    assert_error(post(server, "sample", json={"model_id": "nope", "prompts": ["hi"]}), 404, "model_id")


def test_oversize_body_is_413(server):
    small = Config(base_model=server.worker.config.base_model, state_dir=server.state_dir, max_body_bytes=1024)
    client = create_app(small, server.worker).test_client()
    resp = client.post("/api/v1/create_session", data=b"x" * 4096, headers={"Content-Type": "application/json"})
    assert resp.status_code == 413 and resp.get_json()["field"] == "body"


def test_plain_json_sample_and_training_still_work_after_bad_input(server, model_id):
    resp = post(server, "sample", json={"model_id": server.worker.base_model, "prompts": ["Hello", "The cat"],
                                        "num_samples": 2, "sampling_params": {"max_tokens": 4, "seed": 1}})
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert len(results) == 2 and all(len(r["completions"]) == 2 for r in results)
    completion = results[0]["completions"][0]
    assert len(completion["tokens"]) == len(completion["logprobs"]) and isinstance(completion["text"], str)
    answer = proto_post(server, fwd_bwd_proto(model_id, [1, 2, 3], [2, 3, 4], [1.0, 1.0, 1.0])).json()
    done = wait_result(server, answer["request_id"])
    assert "loss:sum" in done["metrics"] and len(done["loss_fn_outputs"][0]["logprobs"]["data"]) == 3
