"""The plain JSON endpoints: `/api/v1/sample` (text prompts, SSE streaming, logprob gap) and
`/api/v1/perplexity`, against a real worker. `test_vllm_worker.py` runs the same checks on vLLM."""

from __future__ import annotations

import json
import time

import pytest
import requests
import tinker
from tinker import types

from .conftest import API_KEY, OTHER_KEY

HEADERS = {"X-API-Key": API_KEY}
PROMPTS = ["The cat", "One two three"]


def post(url: str, path: str, body: dict, key: str = API_KEY, **kw) -> requests.Response:
    return requests.post(f"{url}/api/v1/{path}", json=body, headers={"X-API-Key": key}, timeout=120, **kw)


_OPEN_SESSIONS: list[tinker.ServiceClient] = []  # closing a session unloads its runs: keep them for the trainer


def trained_model(url: str, base_model: str, rank: int = 8) -> str:
    """A training run with one real optim step and a sampler checkpoint, its session left open (the
    trainer scores the run's live weights); returns its model id."""
    tokens = list(range(3, 40))
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    _OPEN_SESSIONS.append(service)
    tc = service.create_lora_training_client(base_model=base_model, rank=rank, seed=11).result()
    tc.forward_backward([datum], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    tc.save_weights_for_sampler("eval").result()
    return tc.model_id


def read_events(resp: requests.Response) -> list[tuple[str, dict]]:
    """Parse a text/event-stream body into (event, data) pairs."""
    events, kind, data = [], None, []
    for line in resp.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: "):
            data.append(line[len("data: "):])
        elif line == "" and kind is not None:
            events.append((kind, json.loads("\n".join(data))))
            kind, data = None, []
    return events


# ---------------------------------------------------------------------------- checks shared with vLLM


def check_gap_is_small(url: str, model_id: str, tolerance: float) -> dict:
    body = {"model_id": model_id, "prompts": PROMPTS, "num_samples": 2, "logprob_gap": True,
            "sampling_params": {"max_tokens": 6, "temperature": 1.0, "seed": 5}}
    resp = post(url, "sample", body)
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    for result in answer["results"]:
        for completion in result["completions"]:
            gap = completion["logprob_gap"]
            assert gap["tokens"] == len(completion["tokens"]) > 0
            assert 0 <= gap["mean_abs"] <= gap["max_abs"] < tolerance, gap
    return answer


def check_stream_matches_final(url: str, model_id: str) -> None:
    body = {"model_id": model_id, "prompts": PROMPTS, "num_samples": 3, "stream": True,
            "sampling_params": {"max_tokens": 8, "temperature": 1.0, "seed": 7}}
    with post(url, "sample", body, stream=True) as resp:
        assert resp.status_code == 200, resp.text
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = read_events(resp)
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and kinds.count("result") == len(PROMPTS) and "error" not in kinds
    streamed: dict[tuple[int, int], dict] = {}
    for kind, data in events:
        if kind == "token":
            seq = streamed.setdefault((data["prompt_index"], data["sample_index"]),
                                      {"tokens": [], "logprobs": [], "text": ""})
            seq["tokens"] += data["tokens"]
            seq["logprobs"] += data["logprobs"]
            seq["text"] += data["text"]
    for kind, data in events:
        if kind == "result":
            for sample_index, completion in enumerate(data["completions"]):
                got = streamed[(data["prompt_index"], sample_index)]
                assert got["tokens"] == completion["tokens"]
                assert got["logprobs"] == pytest.approx(completion["logprobs"], abs=1e-6)
                assert got["text"] == completion["text"]


def check_perplexity_agrees(url: str, model_id: str, rel: float) -> None:
    text = "one two three four five six seven eight nine ten " * 4
    resp = post(url, "perplexity", {"model_id": model_id, "text": text, "context_length": 24, "stride": 10})
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    sampler, trainer = answer["sampler"]["perplexity"], answer["trainer"]["perplexity"]
    assert sampler > 1 and sampler == pytest.approx(trainer, rel=rel)


# ---------------------------------------------------------------------------- HF sampler


@pytest.fixture(scope="module")
def model_id(server) -> str:
    return trained_model(server.url, server.worker.base_model)


def test_logprob_gap_between_hf_sampler_and_trainer_is_tiny(server, model_id):
    answer = check_gap_is_small(server.url, model_id, tolerance=1e-4)
    assert answer["checkpoint"] == f"tinker://{model_id}/sampler_weights/eval"


def test_stream_tokens_add_up_to_the_final_result(server, model_id):
    check_stream_matches_final(server.url, model_id)
    check_stream_matches_final(server.url, server.worker.base_model)


def test_perplexity_sampler_and_trainer_agree(server, model_id):
    check_perplexity_agrees(server.url, model_id, rel=1e-4)
    check_perplexity_agrees(server.url, server.worker.base_model, rel=1e-4)


def test_a_closed_sessions_run_still_samples_but_the_trainer_cannot_score_it(server):
    """Closing the session unloads the run (the SDK: a closed session takes no more operations); its
    sampler checkpoint still answers by run id, and asking for the trainer's side is a 400, not a 500."""
    model_id = trained_model(server.url, server.worker.base_model)
    _OPEN_SESSIONS.pop().close("success").result()
    deadline = time.time() + 60
    while not server.worker.store.get_model(model_id)["unloaded"] and time.time() < deadline:
        time.sleep(0.1)
    body = {"model_id": model_id, "prompts": ["one two"], "max_tokens": 3, "temperature": 0.0}
    resp = post(server.url, "sample", body)
    assert resp.status_code == 200, resp.text
    gap = post(server.url, "sample", {**body, "logprob_gap": True})
    assert gap.status_code == 400 and gap.json()["field"] == "model_id", gap.text
    assert "unloaded" in gap.json()["error"]


def test_perplexity_of_a_trained_adapter_differs_from_base(server, model_id):
    tokens = list(range(3, 40))  # what the adapter was trained on
    body = {"tokens": tokens, "context_length": 16, "stride": 8, "backends": ["sampler"]}
    tuned = post(server.url, "perplexity", {**body, "model_id": model_id}).json()["sampler"]["perplexity"]
    base = post(server.url, "perplexity", {**body, "model_id": server.worker.base_model}).json()
    assert tuned < base["sampler"]["perplexity"] and "trainer" not in base


@pytest.mark.parametrize("body, status, field", [
    ({"text": "a b c"}, 400, "model_id"),
    ({"model_id": "BASE"}, 400, "text"),
    ({"model_id": "BASE", "text": "a b", "tokens": [1, 2]}, 400, "text"),
    ({"model_id": "BASE", "tokens": [1, "x"]}, 400, "tokens"),
    ({"model_id": "BASE", "tokens": [1, 10**9]}, 400, "tokens"),
    ({"model_id": "BASE", "tokens": [1, 2, 3], "context_length": 1}, 400, "context_length"),
    ({"model_id": "BASE", "tokens": [1, 2, 3], "stride": 0}, 400, "stride"),
    ({"model_id": "BASE", "tokens": [1, 2, 3], "context_length": 4, "stride": 9}, 400, "stride"),
    ({"model_id": "BASE", "tokens": [1, 2, 3], "backends": ["gpu"]}, 400, "backends"),
    ({"model_id": "BASE", "tokens": [5]}, 400, "tokens"),
    ({"model_id": "no-such-model", "tokens": [1, 2, 3]}, 404, "model_id"),
])
def test_perplexity_bad_input(server, body, status, field):
    body = {k: server.worker.base_model if v == "BASE" else v for k, v in body.items()}
    resp = post(server.url, "perplexity", body)
    assert resp.status_code == status, resp.text
    assert resp.json()["field"] == field


@pytest.mark.parametrize("extra, field", [
    ({"stream": "yes"}, "stream"),
    ({"logprob_gap": 1}, "logprob_gap"),
    ({"sampling_params": {"max_tokens": -1}}, "sampling_params.max_tokens"),
    ({"sampling_params": "hot"}, "sampling_params"),
    ({"prompts": []}, "prompts"),
])
def test_sample_bad_input_is_refused_before_any_stream(server, extra, field):
    body = {"model_id": server.worker.base_model, "prompts": ["hi"], "stream": True, **extra}
    resp = post(server.url, "sample", body)
    assert resp.status_code == 400 and resp.headers["Content-Type"].startswith("application/json")
    assert resp.json()["field"] == field


def test_other_key_cannot_evaluate_my_model(server, model_id):
    for path, body in [("perplexity", {"model_id": model_id, "tokens": [1, 2, 3]}),
                       ("sample", {"model_id": model_id, "prompts": ["hi"], "stream": True}),
                       ("sample", {"model_id": f"tinker://{model_id}/sampler_weights/eval", "prompts": ["hi"]})]:
        resp = post(server.url, path, body, key=OTHER_KEY)
        assert resp.status_code == 404 and resp.json()["field"] == "model_id", resp.text
