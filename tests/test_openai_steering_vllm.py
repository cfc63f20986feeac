"""Capture and steering on `/v1/completions` when the worker samples with the session's in-process vLLM engine
(HF generate as its fallback, as USE_VLLM=true builds it): the same captures and steered tokens as
`/api/v1/sample` on that worker and, within test_steering_vllm.py's tolerances, as the HF sampler; counted as
vLLM's work; streamed with the captures in each choice's last chunk; one capture per choice of a prompt list.

`/v1/chat/completions` is left out: the tiny model the session's engine serves has no chat template (chat with
capture and steering is covered on the HF sampler, with a templated copy of the model, in
test_openai_steering.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import requests

from src.backends import SampleJob, SamplingParams
from src.steering import CaptureSpec, LookInside, SteerSpec, decode_array
from tests import vllm_fixtures
from tests.vllm_fixtures import requires_vllm

from . import test_vllm_worker
from .conftest import RunningServer
from .test_metrics import delta, scrape
from .test_openai_api import client, raw_post
from .test_openai_steering import CAPTURE, PROMPT, api_sample
from .test_steering import HIDDEN, direction
from .test_steering_vllm import RELATIVE, SAME_ENGINE, assert_same_look

hf_sampler, vllm_engine = vllm_fixtures.hf_sampler, vllm_fixtures.vllm_engine  # session fixtures
vllm_server = test_vllm_worker.vllm_server  # a module fixture: a worker around the session's engine

pytestmark = [pytest.mark.vllm, requires_vllm]

MAX_TOKENS = 6
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
LOOK = LookInside((CaptureSpec(0, "resid_post", "all"), CaptureSpec(1, "mlp_out", "mean")))  # CAPTURE, typed
STEER = {"layer": 0, "vector": direction().tolist(), "scale": 1.0, "positions": "all"}


@pytest.fixture(scope="module")
def looking(vllm_server) -> RunningServer:
    url, worker = vllm_server
    assert worker.sampler.primary.looks_inside, "the session's engine must run eager (VLLM_ENFORCE_EAGER=true)"
    return RunningServer(url, worker, worker.config.state_dir)


def completions(looking: RunningServer, **extra) -> list[dict]:
    """The greedy /v1/completions choices of PROMPT (unless `extra` says otherwise), with token ids."""
    body = {"model": looking.worker.base_model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
            "return_token_ids": True, **extra}
    answer = raw_post(looking, "completions", body)
    assert answer.status_code == 200, answer.text
    return answer.json()["choices"]


def sampled(looking: RunningServer, prompts: list[str], num_samples: int = 1, **look) -> dict:
    """The same greedy request on `/api/v1/sample` of the same worker."""
    answer = api_sample(looking.url, {"model_id": looking.worker.base_model, "prompts": prompts,
                                      "num_samples": num_samples, "sampling_params": {"max_tokens": MAX_TOKENS,
                                                                                      "temperature": 0.0}, **look})
    assert answer.status_code == 200, answer.text
    return answer.json()


def as_sequence(tokens: list[int], captures: list[dict]) -> SimpleNamespace:
    """A completion's tokens and decoded captures, as `assert_same_look` reads a SampledSequence."""
    return SimpleNamespace(tokens=tokens, captures=[decode_array(c["values"]) for c in captures])


def test_captures_agree_with_api_sample_and_hf_and_vllm_served_them(looking, hf_sampler):
    before = scrape(looking.url)
    choices = completions(looking, n=2, capture=CAPTURE)
    theirs = sampled(looking, [PROMPT], num_samples=2, capture=CAPTURE)
    after = scrape(looking.url)
    result = theirs["results"][0]
    reference = hf_sampler.sample(SampleJob(result["prompt_tokens"], 2, GREEDY, look=LOOK))
    assert [c["index"] for c in choices] == [0, 1]
    for choice, expected, hf in zip(choices, result["completions"], reference.sequences, strict=True):
        assert choice["prompt_token_ids"] == result["prompt_tokens"]
        assert [(c["layer"], c["site"], c["reduce"]) for c in choice["captures"]] == \
            [(0, "resid_post", "all"), (1, "mlp_out", "mean")]
        ours = as_sequence(choice["token_ids"], choice["captures"])
        assert ours.captures[0].shape == (len(ours.tokens), HIDDEN) and ours.captures[1].shape == (HIDDEN,)
        assert_same_look(ours, as_sequence(expected["tokens"], expected["captures"]), SAME_ENGINE)
        assert_same_look(ours, hf, RELATIVE)
    # vLLM answered both requests; HF, the fallback that could capture as well, answered neither
    assert theirs["sampler"] == "vllm"
    assert delta(before, after, "tink_sampler_operations_total", sampler="vllm") == 2
    assert delta(before, after, "tink_sampler_operations_total", sampler="hf") == 0
    health = requests.get(f"{looking.url}/api/v1/healthz", timeout=10).json()["sampler"]
    assert (health["active"], health["live"], health["degraded"]) == ("vllm", True, False)
    assert health["primary_health"]["looks_inside"]


def test_steering_changes_a_greedy_completion_as_api_sample_does_and_scale_zero_does_not(looking, hf_sampler):
    [plain] = completions(looking)
    [steered] = completions(looking, steer=[STEER])
    expected = sampled(looking, [PROMPT], steer=[STEER])["results"][0]
    assert steered["token_ids"] == expected["completions"][0]["tokens"] != plain["token_ids"]
    assert steered["text"] == expected["completions"][0]["text"] != plain["text"]
    look = LookInside((), (SteerSpec(0, direction(), 1.0, "all"),))
    job = SampleJob(plain["prompt_token_ids"], 1, GREEDY, look=look)
    assert hf_sampler.sample(job).sequences[0].tokens == steered["token_ids"]
    [zero] = completions(looking, steer=[{**STEER, "scale": 0}])
    assert zero["token_ids"] == plain["token_ids"] and "captures" not in zero


def test_streamed_completion_sends_captures_in_each_choices_last_chunk(looking):
    look = {"steer": [STEER], "capture": [{"layer": 1, "reduce": "all"}]}
    whole = completions(looking, n=2, **look)
    chunks = list(client(looking).completions.create(model=looking.worker.base_model, prompt=PROMPT, n=2,
                                                     max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                                     extra_body=look))
    texts: dict[int, str] = {}
    captures: dict[int, list] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            extra = choice.model_extra or {}
            assert ("captures" in extra) == (choice.finish_reason is not None), "only in the choice's last chunk"
            if "captures" in extra:
                captures[choice.index] = extra["captures"]
    assert len(chunks) > 4  # token by token, steering and all
    assert texts == {c["index"]: c["text"] for c in whole}
    assert set(captures) == {0, 1}
    for choice in whole:
        streamed = as_sequence(choice["token_ids"], captures[choice["index"]])
        assert streamed.captures[0].shape == (len(choice["token_ids"]), HIDDEN)
        assert_same_look(streamed, as_sequence(choice["token_ids"], choice["captures"]), SAME_ENGINE)


def test_each_prompt_of_a_list_has_its_own_captures_in_order(looking):
    prompts = [PROMPT, "Once upon a time", "A dog"]
    choices = completions(looking, prompt=prompts, capture=CAPTURE)  # sampled together, in one vLLM batch
    expected = sampled(looking, prompts, capture=CAPTURE)["results"]  # one after the other
    assert [c["index"] for c in choices] == [0, 1, 2]
    for choice, result in zip(choices, expected, strict=True):
        assert choice["prompt_token_ids"] == result["prompt_tokens"]
        ours = as_sequence(choice["token_ids"], choice["captures"])
        assert ours.captures[0].shape == (len(ours.tokens), HIDDEN)
        assert_same_look(ours, as_sequence(result["completions"][0]["tokens"], result["completions"][0]["captures"]),
                         SAME_ENGINE)
    means = [decode_array(c["captures"][1]["values"]) for c in choices]
    assert not np.allclose(means[0], means[1]) and not np.allclose(means[1], means[2])


def test_a_look_the_engine_cannot_serve_is_counted_as_the_hf_fallbacks(looking, vllm_engine, monkeypatch):
    """A capture the engine could not take (say, CUDA graphs on) goes to the HF fallback, and the worker says so."""
    monkeypatch.setattr(type(vllm_engine), "looks_inside", property(lambda self: False))
    before = scrape(looking.url)
    assert sampled(looking, [PROMPT], capture=CAPTURE)["sampler"] == "hf"
    assert "captures" in completions(looking, capture=CAPTURE)[0]
    after = scrape(looking.url)
    assert delta(before, after, "tink_sampler_operations_total", sampler="hf") == 2
    assert delta(before, after, "tink_sampler_operations_total", sampler="vllm") == 0
    served = requests.get(f"{looking.url}/api/v1/healthz", timeout=30).json()["sampler"]["served"]
    assert served.get("hf", 0) >= 2, served  # healthz counts them where they were served


def test_a_look_while_the_engine_fails_moves_to_the_hf_fallback(looking, vllm_engine, monkeypatch):
    """The engine dies under a capture request: like any request, it is served by the HF fallback (not a 503),
    and health says the engine is down until it answers again."""
    from src.backends import BackendError

    def dead(self, job, sink=None, timeout_s=None):
        raise BackendError("vllm sampler: the engine failed while sampling (EngineDeadError: test)")

    monkeypatch.setattr(type(vllm_engine), "sample", dead)
    answer = sampled(looking, [PROMPT], capture=CAPTURE)
    assert answer["sampler"] == "hf" and answer["results"][0]["completions"][0]["captures"]
    health = requests.get(f"{looking.url}/api/v1/healthz", timeout=30).json()["sampler"]
    assert health["active"] == "hf" and health["degraded"] and "EngineDeadError" in health["reason"]
    monkeypatch.undo()  # the engine answers again: the next probe (retry_s=1) brings it back
    fallback = looking.worker.sampler
    fallback._next_probe = 0.0
    assert sampled(looking, [PROMPT], capture=CAPTURE)["sampler"] == "vllm"
    assert not fallback.health()["degraded"]
