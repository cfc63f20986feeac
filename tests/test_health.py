"""healthz tells the truth: a vLLM that was asked for and is not serving makes the worker `degraded`."""

from __future__ import annotations

import pytest
import requests

from src.app import create_app
from src.config import Config
from src.worker import Worker

from .conftest import API_KEY, free_port, serving


@pytest.fixture(scope="module")
def vllm_that_cannot_start(tiny_model_path, tmp_path_factory):
    """USE_VLLM=true with a setting vLLM refuses at start (a context longer than the model's): the engine
    never runs, as when it asks for more GPU memory than is free."""
    config = Config(base_model=str(tiny_model_path), state_dir=tmp_path_factory.mktemp("state"), api_keys=(API_KEY,),
                    port=free_port(), use_vllm=True, vllm_max_model_len=1 << 20, vllm_gpu_memory_utilization=0.1)
    worker = Worker.from_config(config)
    with serving(create_app(config, worker), config) as url:
        yield url
    worker.close()


def test_health_is_degraded_with_the_reason(vllm_that_cannot_start):
    health = requests.get(f"{vllm_that_cannot_start}/api/v1/healthz", timeout=10).json()
    assert health["status"] == "degraded"
    sampler = health["sampler"]
    assert (sampler["requested"], sampler["active"], sampler["degraded"]) == ("vllm", "hf", True)
    assert "failed to start" in sampler["reason"] or "cannot be imported" in sampler["reason"]
    assert health["reasons"] == [sampler["reason"]]


def test_each_answer_names_the_sampler_that_served_it(vllm_that_cannot_start):
    headers = {"X-API-Key": API_KEY}
    base = requests.get(f"{vllm_that_cannot_start}/api/v1/get_server_capabilities", headers=headers,
                        timeout=10).json()["supported_models"][0]["model_name"]
    answer = requests.post(f"{vllm_that_cannot_start}/api/v1/sample", headers=headers, timeout=60,
                           json={"model_id": base, "prompts": ["hello"], "sampling_params": {"max_tokens": 4}}).json()
    assert answer.get("sampler") == "hf", answer
    health = requests.get(f"{vllm_that_cannot_start}/api/v1/healthz", timeout=10).json()
    assert health["sampler"]["served"] == {"hf": 1}


def test_a_healthy_worker_reports_ok_and_one_base_copy(server):
    health = requests.get(f"{server.url}/api/v1/healthz", timeout=10).json()
    assert (health["status"], health["reasons"]) == ("ok", [])
    assert health["sampler"]["base_weights"] == "shared with the trainer"
    assert health["memory"]["trainer"]["microbatch"]["cap_tokens"] == 16384
