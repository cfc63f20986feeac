"""Capture and steering on `/v1/completions` and `/v1/chat/completions` (extra body fields, as vLLM's server takes
its extensions), against `/api/v1/sample` on the same worker and the plain HF reference of test_steering.py.

The worker samples with HF (the vLLM engine's hooks are checked against the HF sampler in test_steering_vllm.py);
its model is the tiny model with a chat template (test_openai_api.py's `chat_model_path`)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import requests

from src.steering import SteerSpec, decode_array

from . import test_openai_api, test_steering
from .conftest import API_KEY, OTHER_KEY, RunningServer, free_port, serving
from .test_openai_api import MESSAGES, client, error_of, raw_post
from .test_steering import BAD, HIDDEN, assert_close, direction, reference_generate, residual_rows

chat_model_path = test_openai_api.chat_model_path  # a module fixture: the tiny model with a chat template
reference = test_steering.reference  # a module fixture: the plain HF model

PROMPT = "The cat"
CAPTURE = [{"layer": 0, "site": "resid_post", "reduce": "all"}, {"layer": 1, "site": "mlp_out", "reduce": "mean"}]


def start(model_path, state_dir, sampler=None) -> Iterator[RunningServer]:
    """A real worker on loopback: the configured samplers (HF), or `sampler` behind the HF trainer."""
    from src.app import create_app
    from src.config import Config
    from src.hf_trainer import HFTrainer
    from src.store import Store
    from src.worker import Worker

    config = Config(base_model=str(model_path), state_dir=state_dir, api_keys=(API_KEY, OTHER_KEY), port=free_port(),
                    retrieve_wait_s=5.0, threads=16)
    if sampler is None:
        worker = Worker.from_config(config)
    else:
        worker = Worker(config, HFTrainer(str(model_path), device="cpu", dtype="float32"), sampler,
                        Store(config.database_path))
    with serving(create_app(config, worker), config) as url:
        yield RunningServer(url, worker, state_dir)
    worker.close()


@pytest.fixture(scope="module")
def looking(chat_model_path, tmp_path_factory) -> Iterator[RunningServer]:
    yield from start(chat_model_path, tmp_path_factory.mktemp("oai-look-state"))


def api_sample(url: str, body: dict, key: str = API_KEY) -> requests.Response:
    return requests.post(f"{url}/api/v1/sample", json=body, headers={"X-API-Key": key}, timeout=120)


def completion(looking: RunningServer, **extra) -> dict:
    """One greedy /v1/completions choice of PROMPT on the base model, with its token ids."""
    body = {"model": looking.worker.base_model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0,
            "return_token_ids": True, **extra}
    answer = raw_post(looking, "completions", body)
    assert answer.status_code == 200, answer.text
    return answer.json()["choices"][0]


def chat_kwargs(looking: RunningServer, **extra) -> dict:
    return dict(model=looking.worker.base_model, messages=MESSAGES, max_tokens=6, temperature=1.0, seed=3, n=2,
                extra_body=extra)


# ----------------------------------------------------------------------------- captures


@pytest.mark.parametrize("fmt", ["json", "base64"])
def test_captures_equal_those_of_api_sample_and_the_reference(looking, reference, fmt):
    seeded = {"temperature": 1.0, "seed": 11}
    ours = raw_post(looking, "completions", {"model": looking.worker.base_model, "prompt": PROMPT, "max_tokens": 5,
                                             "n": 2, "return_token_ids": True, "capture": CAPTURE,
                                             "capture_format": fmt, **seeded})
    assert ours.status_code == 200, ours.text
    theirs = api_sample(looking.url, {"model_id": looking.worker.base_model, "prompts": [PROMPT], "num_samples": 2,
                                      "sampling_params": {"max_tokens": 5, **seeded}, "capture": CAPTURE,
                                      "capture_format": fmt})
    assert theirs.status_code == 200, theirs.text
    result = theirs.json()["results"][0]
    choices = ours.json()["choices"]
    assert len(choices) == 2 and len({tuple(c["token_ids"]) for c in choices}) == 2  # two different samples
    for choice, expected in zip(choices, result["completions"]):
        assert choice["token_ids"] == expected["tokens"] and choice["prompt_token_ids"] == result["prompt_tokens"]
        assert [(c["layer"], c["site"], c["reduce"]) for c in choice["captures"]] == \
            [(0, "resid_post", "all"), (1, "mlp_out", "mean")]
        for mine, same in zip(choice["captures"], expected["captures"]):
            np.testing.assert_array_equal(decode_array(mine["values"]), decode_array(same["values"]))
        every = decode_array(choice["captures"][0]["values"])
        assert every.shape == (len(choice["token_ids"]), HIDDEN)
        rows = residual_rows(reference, choice["prompt_token_ids"], choice["token_ids"], 0)
        if fmt == "json":
            assert_close(every, rows)
        else:
            np.testing.assert_allclose(every, rows, rtol=2e-3, atol=2e-3)  # float16 on the wire


def test_no_capture_asked_means_no_captures_key(looking):
    assert "captures" not in completion(looking)
    assert "captures" not in completion(looking, steer=[{"layer": 0, "vector": direction().tolist(), "scale": 0}])


# ----------------------------------------------------------------------------- steering


def test_steering_changes_a_greedy_completion_and_scale_zero_does_not(looking, reference):
    plain = completion(looking)
    steer = {"layer": 0, "vector": direction().tolist(), "scale": 1.0, "positions": "all"}
    steered = completion(looking, steer=[steer])
    expected = reference_generate(reference, plain["prompt_token_ids"], 6, SteerSpec(0, direction()))
    assert steered["token_ids"] == expected != plain["token_ids"]
    assert steered["text"] != plain["text"]
    assert completion(looking, steer=[{**steer, "scale": 0}])["token_ids"] == plain["token_ids"]


def test_a_named_vector_is_the_callers_own(looking):
    vector = direction(5)
    made = requests.post(f"{looking.url}/api/v1/steering_vectors", headers={"X-API-Key": API_KEY}, timeout=60,
                         json={"name": "oai-direction", "layer": 0, "vector": vector.tolist()})
    assert made.status_code == 201, made.text
    vid = made.json()["vector_id"]
    by_id = client(looking).chat.completions.create(**chat_kwargs(looking, steer=[{"vector_id": vid, "scale": 2}]))
    inline = client(looking).chat.completions.create(
        **chat_kwargs(looking, steer=[{"layer": 0, "vector": vector.tolist(), "scale": 2}]))
    plain = client(looking).chat.completions.create(**chat_kwargs(looking))
    assert [c.message.content for c in by_id.choices] == [c.message.content for c in inline.choices]
    assert [c.message.content for c in by_id.choices] != [c.message.content for c in plain.choices]
    body = {"model": looking.worker.base_model, "messages": MESSAGES, "max_tokens": 4,
            "steer": [{"vector_id": vid}]}
    assert error_of(raw_post(looking, "chat/completions", body, key=OTHER_KEY), 400)["param"] == "steer[0].vector_id"


# ----------------------------------------------------------------------------- streaming


def test_streamed_chat_steers_and_sends_captures_in_each_choices_last_chunk(looking):
    look = {"steer": [{"layer": 0, "vector": direction().tolist(), "scale": 1.0}],
            "capture": [{"layer": 1, "reduce": "all"}]}
    whole = client(looking).chat.completions.create(**chat_kwargs(looking, **look, return_token_ids=True))
    plain = client(looking).chat.completions.create(**chat_kwargs(looking))
    assert [c.message.content for c in whole.choices] != [c.message.content for c in plain.choices]
    chunks = list(client(looking).chat.completions.create(**chat_kwargs(looking, **look), stream=True))
    texts: dict[int, str] = {}
    captures: dict[int, list] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            extra = choice.model_extra or {}
            assert ("captures" in extra) == (choice.finish_reason is not None), "only in the choice's last chunk"
            if "captures" in extra:
                captures[choice.index] = extra["captures"]
    assert len(chunks) > 4  # token by token, steering and all
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert captures == {c.index: c.model_extra["captures"] for c in whole.choices}
    for choice in whole.choices:  # one row per generated token
        values = np.array(choice.model_extra["captures"][0]["values"])
        assert values.shape == (len(choice.model_extra["token_ids"]), HIDDEN)


# ----------------------------------------------------------------------------- bad input


def openai_body(path: str, model: str, extra: dict) -> dict:
    """test_steering.BAD's body fields for an OpenAI endpoint: `sampling_params.max_tokens` is `max_tokens`."""
    fields = {k: v for k, v in extra.items() if k != "sampling_params"}
    prompt = {"messages": MESSAGES} if path.startswith("chat") else {"prompt": PROMPT}
    return {"model": model, "max_tokens": 4, **prompt, **fields, **extra.get("sampling_params", {})}


@pytest.mark.parametrize("path", ["completions", "chat/completions"])
@pytest.mark.parametrize("extra,field", BAD, ids=[f for _, f in BAD])
def test_bad_capture_and_steer_fields_are_400_naming_the_field(looking, path, extra, field):
    answer = raw_post(looking, path, {**openai_body(path, looking.worker.base_model, extra), "stream": True})
    error = error_of(answer, 400)  # before the stream starts
    assert error["param"] == field, error
    same = api_sample(looking.url, {"model_id": looking.worker.base_model, "prompts": [PROMPT],
                                    "sampling_params": {"max_tokens": 4, **extra.get("sampling_params", {})},
                                    **{k: v for k, v in extra.items() if k != "sampling_params"}})
    assert same.status_code == 400 and same.json() == {"error": error["message"], "field": field}


@pytest.fixture(scope="module")
def blind(chat_model_path, tmp_path_factory) -> Iterator[RunningServer]:
    """A worker whose sampler cannot look inside: an external vLLM server's client without the HF fallback
    (as VLLM_BACKEND=trl is). Nothing listens at its URL: refused requests never reach it."""
    from src.vllm_server_client import VLLMServerSampler

    sampler = VLLMServerSampler(f"http://127.0.0.1:{free_port()}")
    assert not getattr(sampler, "looks_inside", False)
    yield from start(chat_model_path, tmp_path_factory.mktemp("oai-blind-state"), sampler)


@pytest.mark.parametrize("look", [{"capture": [{"layer": 0}]}, {"steer": [{"layer": 0, "vector": [0.5] * HIDDEN}]}])
def test_a_sampler_that_cannot_look_inside_gives_the_api_sample_400(blind, look):
    expected = api_sample(blind.url, {"model_id": blind.worker.base_model, "prompts": [PROMPT],
                                      "sampling_params": {"max_tokens": 4}, **look})
    assert expected.status_code == 400, expected.text
    assert expected.json()["field"] == "capture" and "vllm-server" in expected.json()["error"]
    for path in ("completions", "chat/completions"):
        for stream in (False, True):
            body = {**openai_body(path, blind.worker.base_model, look), "stream": stream}
            error = error_of(raw_post(blind, path, body), 400)
            assert (error["param"], error["message"]) == ("capture", expected.json()["error"]), (path, stream)
