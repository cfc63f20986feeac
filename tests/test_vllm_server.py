"""VLLMServerSampler against a real vLLM OpenAI server on loopback, and FallbackSampler around it.

The server is started by the fixture with the command VLLM_README.md documents; the last test stops
and restarts it to prove that sampling falls back to HF and comes back to vLLM.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from src.backends import BackendError, SampleJob, Sampler, SamplingParams, UserInputError
from tests import vllm_fixtures
from tests.conftest import free_port
from tests.vllm_fixtures import GREEDY, LOGPROB_TOL, VLLMServer, assert_same, one, requires_vllm

hf_sampler, vllm_adapters = vllm_fixtures.hf_sampler, vllm_fixtures.vllm_adapters  # session fixtures

pytestmark = [pytest.mark.vllm, requires_vllm]

PROMPT = [1, 40, 41, 97, 12]
LONG = [1, 33, 34, 35, 36, 37, 38, 39, 300, 301]


@pytest.fixture(scope="module")
def vllm_server(tiny_model_path, tmp_path_factory):
    server = VLLMServer(tiny_model_path, free_port(), tmp_path_factory.mktemp("vllm-server") / "server.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(vllm_server):
    from src.vllm_server_client import VLLMServerSampler

    sampler = VLLMServerSampler(vllm_server.url, max_loaded_adapters=2, max_lora_rank=8)
    yield sampler
    sampler.close()




def test_health_and_protocol(client):
    assert isinstance(client, Sampler)
    assert client.health()["live"]


@pytest.mark.parametrize("key", [None, "a", "b"])
def test_greedy_matches_hf(client, hf_sampler, vllm_adapters, key):
    ref = vllm_adapters[key] if key else None
    for prompt in (PROMPT, LONG):
        assert_same(one(client, prompt, ref), one(hf_sampler, prompt, ref))


def test_versions_load_unload_and_reload(client, hf_sampler, vllm_adapters):
    """Three versions through a client that keeps two on the server: the first is unloaded, then reloaded."""
    refs = [vllm_adapters[k] for k in "cde"]
    for ref in refs:
        one(client, PROMPT, ref)
    assert client.loaded_adapters() == [refs[1].name, refs[2].name]
    assert_same(one(client, PROMPT, refs[0]), one(hf_sampler, PROMPT, refs[0]))


def test_concurrent_adapters(client, hf_sampler, vllm_adapters):
    jobs = [(vllm_adapters[k], p) for k in "ab" for p in (PROMPT, LONG)] + [(None, PROMPT)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: one(client, j[1], j[0]), jobs))
    for (ref, prompt), seq in zip(jobs, results):
        assert_same(seq, one(hf_sampler, prompt, ref))


def test_prompt_logprobs_and_greedy_copies(client, hf_sampler, vllm_adapters):
    ref = vllm_adapters["a"]
    result = client.sample(SampleJob(LONG, 2, GREEDY, ref, prompt_logprobs=True))
    assert len(result.sequences) == 2 and result.sequences[0].tokens == result.sequences[1].tokens
    assert result.prompt_logprobs[0] is None
    assert result.prompt_logprobs[1:] == pytest.approx(hf_sampler.compute_logprobs(ref, LONG)[1:], abs=LOGPROB_TOL)


def test_seeded_sampling(client, vllm_adapters):
    job = SampleJob(PROMPT, 4, SamplingParams(max_tokens=12, temperature=1.0, top_k=50, seed=3), vllm_adapters["a"])
    first, again = client.sample(job), client.sample(job)
    assert [s.tokens for s in first.sequences] == [s.tokens for s in again.sequences]
    assert len({tuple(s.tokens) for s in first.sequences}) > 1
    assert all(len(s.logprobs) == len(s.tokens) and max(s.logprobs) <= 0 for s in first.sequences)


@pytest.mark.parametrize("prompt, params, field", [
    ([1, 10**6], GREEDY, "prompt"), ([1, 2], SamplingParams(temperature=5.0), "sampling_params.temperature")])
def test_bad_requests_name_the_field(client, prompt, params, field):
    with pytest.raises(UserInputError) as info:
        client.sample(SampleJob(prompt, 1, params))
    assert info.value.field == field


def test_perplexity_matches_hf(client, hf_sampler, vllm_adapters):
    from src.evaluation import perplexity

    tokens = [1] + [(i * 53 + 7) % 500 + 3 for i in range(150)]
    ref = vllm_adapters["b"]
    ours = perplexity(client, tokens, context_length=48, stride=20, adapter=ref)
    assert ours == pytest.approx(perplexity(hf_sampler, tokens, 48, 20, adapter=ref), rel=1e-3)


def test_unreachable_server_is_a_backend_error():
    from src.vllm_server_client import VLLMServerSampler

    dead = VLLMServerSampler(f"http://127.0.0.1:{free_port()}")
    assert dead.health()["live"] is False
    with pytest.raises(BackendError, match="unreachable"):
        dead.sample(SampleJob(PROMPT, 1, GREEDY))


def test_fallback_to_hf_while_the_server_is_down_and_back(vllm_server, hf_sampler, vllm_adapters, caplog):
    from src.sampler_fallback import FallbackSampler
    from src.vllm_server_client import VLLMServerSampler

    ref = vllm_adapters["a"]
    expected = one(hf_sampler, PROMPT, ref)
    sampler = FallbackSampler(VLLMServerSampler(vllm_server.url, max_lora_rank=8), hf_sampler, retry_s=2.0)
    assert_same(one(sampler, PROMPT, ref), expected)
    assert sampler.health()["active"] == "vllm-server"

    vllm_server.stop()
    with caplog.at_level(logging.WARNING, logger="src.sampler_fallback"):
        for _ in range(3):
            assert_same(one(sampler, PROMPT, ref), expected)  # served by HF, same numbers
    warnings = [r for r in caplog.records if r.name == "src.sampler_fallback" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()
    health = sampler.health()
    assert health["active"] == "hf" and health["live"] and health["primary_error"]
    assert health["degraded"] and "vllm-server is down" in health["reason"]

    vllm_server.start()  # a fresh server: it has none of the adapters the client loaded before
    time.sleep(2.1)
    assert_same(one(sampler, PROMPT, ref), expected)
    assert sampler.health()["active"] == "vllm-server" and not sampler.health()["degraded"]
    assert sampler.primary.loaded_adapters() == [ref.name]
