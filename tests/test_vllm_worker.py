"""The worker with the in-process vLLM sampler (USE_VLLM=true), end to end through the tinker SDK:
every saved version is served with exactly its own weights, tokens stream, and the train-inference
logprob gap and the perplexity of vLLM and the trainer agree."""

from __future__ import annotations

import numpy as np
import pytest
import requests
import tinker
from tinker import types

from src.auth import Caller, fingerprint
from src.backends import SampleJob, SamplingParams
from tests import vllm_fixtures
from tests.vllm_fixtures import requires_vllm

from .conftest import API_KEY, OTHER_KEY, free_port, serving
from .test_metrics import delta, scrape
from .test_sample_api import (
    check_gap_is_small,
    check_perplexity_agrees,
    check_stream_matches_final,
    post,
    read_events,
    trained_model,
)

hf_sampler, vllm_engine = vllm_fixtures.hf_sampler, vllm_fixtures.vllm_engine  # session fixtures

pytestmark = [pytest.mark.vllm, requires_vllm]


@pytest.fixture(scope="module")
def vllm_server(tiny_model_path, tmp_path_factory, vllm_engine, hf_sampler):
    """A worker whose sampler is the session's vLLM engine (HF generate as its fallback)."""

    from src.app import create_app
    from src.config import Config
    from src.hf_trainer import HFTrainer
    from src.sampler_fallback import FallbackSampler
    from src.store import Store
    from src.worker import Worker

    state = tmp_path_factory.mktemp("vllm-state")
    config = Config(base_model=str(tiny_model_path), state_dir=state, api_keys=(API_KEY, OTHER_KEY), port=free_port(),
                    retrieve_wait_s=5.0, threads=16, use_vllm=True, max_lora_rank=8, device="cpu", dtype="float32")
    trainer = HFTrainer(str(tiny_model_path), device="cpu", dtype="float32")
    worker = Worker(config, trainer, FallbackSampler(vllm_engine, hf_sampler, retry_s=1.0), Store(config.database_path))
    with serving(create_app(config, worker), config) as url:
        yield url, worker
    # not worker.close(): the engine belongs to the whole session. Its checkpoint sweeper must stop before the
    # store closes, or a sweep due later fails on the closed database (seen at interpreter exit in CI's log).
    worker._expiry_sweeper.stop()
    worker.scheduler.shutdown(10)
    worker.store.close()


def hf_reference(worker, hf_sampler, path: str, prompt: list[int], scored: list[int]):
    """HF generate's greedy completion and HF's logprobs of `scored` for the checkpoint at `path`."""
    adapter = worker.adapter_for(Caller(fingerprint(API_KEY), admin=False), path)
    greedy = hf_sampler.sample(SampleJob(prompt, 1, SamplingParams(max_tokens=10, temperature=0.0), adapter))
    return greedy.sequences[0], hf_sampler.compute_logprobs(adapter, scored)


def test_health_names_the_live_vllm_sampler(vllm_server):
    url, _ = vllm_server
    health = requests.get(f"{url}/api/v1/healthz", timeout=10).json()
    assert health["sampler"]["active"] == "vllm" and health["sampler"]["live"]


def test_a_steps_sampling_operations_reach_the_engine_together(vllm_server, vllm_engine):
    """With the default TINK_SAMPLING_THREADS, the 40 prompts of a step are batched by vLLM together
    (the former default of 16 threads let at most 16 operations into the engine at once)."""
    _, worker = vllm_server
    caller = Caller(fingerprint(API_KEY), admin=False)
    vllm_engine.peak_operations_in_flight = 0
    params = SamplingParams(max_tokens=48, temperature=1.0, seed=1)
    ids = [worker.sample(caller, SampleJob([1, 40 + i, 41, 42], 2, params)) for i in range(40)]
    assert all(worker.scheduler.wait(rid, 120).status == "done" for rid in ids)
    assert vllm_engine.peak_operations_in_flight > 16
    assert worker.health()["sampler"]["primary_health"]["peak_operations_in_flight"] > 16


def test_each_saved_version_is_served_with_its_own_weights(vllm_server, hf_sampler):
    url, worker = vllm_server
    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    tc = service.create_lora_training_client(base_model=worker.base_model, rank=8, seed=3).result()
    tokens = [1] + list(range(40, 70))
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
    prompt, scored = tokens[:4], tokens[:20]
    loads_before = scrape(url)
    versions = []
    for step in range(3):  # train, then serve each new version right after its save (the RL loop)
        tc.forward_backward([datum], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
        path = tc.save_weights_for_sampler(f"v{step}").result().path
        sampler = service.create_sampling_client(model_path=path).result()
        out = sampler.sample(types.ModelInput.from_ints(prompt), 2, types.SamplingParams(max_tokens=10,
                                                                                           temperature=0.0)).result()
        logprobs = sampler.compute_logprobs(types.ModelInput.from_ints(scored)).result()
        versions.append((path, out, logprobs))
    for path, out, logprobs in versions:
        reference, reference_lps = hf_reference(worker, hf_sampler, path, prompt, scored)
        assert [list(s.tokens) for s in out.sequences] == [reference.tokens] * 2
        np.testing.assert_allclose(out.sequences[0].logprobs, reference.logprobs, atol=1e-4)
        np.testing.assert_allclose(logprobs[1:], reference_lps[1:], atol=1e-4)
    # Training moved the weights, so each version scored the same tokens differently.
    assert not np.allclose(versions[0][2][1:], versions[-1][2][1:], atol=1e-3)
    # Each hot update's load into the engine is counted and timed for Prometheus.
    loads_after = scrape(url)
    assert delta(loads_before, loads_after, "tink_sampler_adapter_load_seconds_count", sampler="vllm") == 3
    assert delta(loads_before, loads_after, "tink_sampler_adapter_load_seconds_sum", sampler="vllm") > 0


def test_logprob_gap_vllm_vs_trainer(vllm_server):
    url, worker = vllm_server
    check_gap_is_small(url, trained_model(url, worker.base_model), tolerance=1e-4)


def test_stream_from_vllm_arrives_token_by_token(vllm_server):
    url, worker = vllm_server
    model_id = trained_model(url, worker.base_model)
    check_stream_matches_final(url, model_id)
    body = {"model_id": model_id, "prompts": ["The cat"], "stream": True,
            "sampling_params": {"max_tokens": 12, "temperature": 1.0, "seed": 1, "stop": []}}
    with post(url, "sample", body, stream=True) as resp:
        tokens = [e for e in read_events(resp) if e[0] == "token"]
    assert len(tokens) > 1  # not one lump at the end


def test_perplexity_vllm_vs_trainer(vllm_server):
    url, worker = vllm_server
    check_perplexity_agrees(url, trained_model(url, worker.base_model), rel=1e-3)
    check_perplexity_agrees(url, worker.base_model, rel=1e-3)
