"""TRL weight sync (NCCL, vLLM's weight-transfer engine): GPU only, run on the device machine.

Starts `vllm serve`-equivalent with `--weight-transfer-config '{"backend": "nccl"}'` on GPU 0, pushes a
merged LoRA policy from GPU 1 with `TRLVLLMSampler.sync_adapter` and checks that greedy samples then
equal HF+PEFT's. Needs two GPUs: NCCL refuses a communicator with two ranks on one device
("invalid usage" in ncclCommInitRank, seen on nvidia-h100-x1 with vLLM 0.26.0, 2026-11-24).
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


def _two_gpus() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.device_count() >= 2


needs_two_gpus = pytest.mark.skipif(not _two_gpus(), reason="NCCL weight sync needs the server and the trainer "
                                    "on different GPUs (two ranks on one device is invalid NCCL usage)")


@pytest.fixture(scope="module")
def trl_server(tiny_model_path, tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("trl-server") / "server.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_path),
                             "--host", "127.0.0.1", "--port", str(port), "--weight-transfer-config", '{"backend": "nccl"}',
                             "--logprobs-mode", "processed_logprobs", "--max-logprobs", "-1", "--dtype", "bfloat16",
                             "--generation-config", "vllm", "--gpu-memory-utilization", "0.3", "--enforce-eager"],
                            env=dict(os.environ, VLLM_SERVER_DEV_MODE="1", CUDA_VISIBLE_DEVICES="0"), stdout=log, stderr=subprocess.STDOUT,
                            cwd=REPO, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/health", 600, proc)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(60)


@needs_two_gpus
def test_sync_merged_adapter_then_sample(trl_server, tiny_model_path, hf_sampler, vllm_adapters):
    pytest.importorskip("trl.generation.vllm_client")
    from src.trl_backend import TRLVLLMSampler

    sampler = TRLVLLMSampler(trl_server, device="cuda:1")  # the trainer's side of the NCCL group
    prompt, greedy = [1, 40, 41, 97, 12], SamplingParams(max_tokens=6, temperature=0.0)
    before = sampler.sample(SampleJob(prompt, 1, greedy)).sequences[0].tokens
    ref = vllm_adapters["a"]
    sampler.sync_adapter(ref, str(tiny_model_path))
    after = sampler.sample(SampleJob(prompt, 1, greedy, ref)).sequences[0].tokens
    assert after != before
    # bf16 on the server: compare only the first tokens, where the merged policy's argmax is clear.
    assert after[:2] == hf_sampler.sample(SampleJob(prompt, 1, greedy, ref)).sequences[0].tokens[:2]
    sampler.close()
