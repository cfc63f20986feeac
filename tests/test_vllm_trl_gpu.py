"""TRL weight sync (NCCL, vLLM's weight-transfer engine): GPU only, run on the device machine.

Starts `vllm serve`-equivalent with `--weight-transfer-config '{"backend": "nccl"}'`, pushes a merged
LoRA policy with `TRLVLLMSampler.sync_adapter` and checks that greedy samples then equal HF+PEFT's.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from src.backends import SampleJob, SamplingParams
from tests import vllm_fixtures
from tests.conftest import free_port
from tests.vllm_fixtures import REPO, requires_vllm, wait_http

hf_sampler, vllm_adapters = vllm_fixtures.hf_sampler, vllm_fixtures.vllm_adapters  # session fixtures

pytestmark = [pytest.mark.vllm, pytest.mark.gpu, requires_vllm]


@pytest.fixture(scope="module")
def trl_server(tiny_model_path, tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("trl-server") / "server.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_path),
                             "--host", "127.0.0.1", "--port", str(port), "--weight-transfer-config", '{"backend": "nccl"}',
                             "--logprobs-mode", "processed_logprobs", "--max-logprobs", "-1", "--dtype", "bfloat16",
                             "--generation-config", "vllm", "--gpu-memory-utilization", "0.3", "--enforce-eager"],
                            env=dict(os.environ, VLLM_SERVER_DEV_MODE="1"), stdout=log, stderr=subprocess.STDOUT,
                            cwd=REPO, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/health", 600, proc)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(60)


def test_sync_merged_adapter_then_sample(trl_server, tiny_model_path, hf_sampler, vllm_adapters):
    pytest.importorskip("trl.generation.vllm_client")
    from src.trl_backend import TRLVLLMSampler

    sampler = TRLVLLMSampler(trl_server, device="cuda:0")
    prompt, greedy = [1, 40, 41, 97, 12], SamplingParams(max_tokens=6, temperature=0.0)
    before = sampler.sample(SampleJob(prompt, 1, greedy)).sequences[0].tokens
    ref = vllm_adapters["a"]
    sampler.sync_adapter(ref, str(tiny_model_path))
    after = sampler.sample(SampleJob(prompt, 1, greedy, ref)).sequences[0].tokens
    assert after != before
    # bf16 on the server: compare only the first tokens, where the merged policy's argmax is clear.
    assert after[:2] == hf_sampler.sample(SampleJob(prompt, 1, greedy, ref)).sequences[0].tokens[:2]
    sampler.close()
