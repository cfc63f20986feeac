"""The one place that picks backends from the config.

    USE_MEGATRON=false (default)          -> HFTrainer (PEFT, in-process)
    USE_MEGATRON=true                     -> MegatronTrainer, a client of the trainer server at
                                             MEGATRON_SERVER_URL (src/trainer_server.py)
    USE_VLLM=false (default)              -> HFSampler (HF generate)
    USE_VLLM=true                         -> in-process vLLM engine with LoRA; HF generate as fallback
    USE_VLLM=true VLLM_BASE_URL=...       -> an external `vllm serve --enable-lora`; HF as fallback
    USE_VLLM=true VLLM_BACKEND=trl ...    -> TRL's VLLMClient: one merged policy pushed over NCCL
"""

from __future__ import annotations

import logging

from .backends import Sampler, Trainer
from .config import Config
from .sampler_fallback import FallbackSampler

log = logging.getLogger(__name__)


def build_trainer(config: Config, base_model: str) -> Trainer:
    if config.use_megatron:
        from .megatron_backend import MegatronTrainer

        return MegatronTrainer(config.megatron_server_url, base_model)
    from .hf_trainer import HFTrainer

    return HFTrainer(base_model, device=config.device, dtype=config.dtype, max_adapters=config.max_adapters)


def build_sampler(config: Config, base_model: str, vocab_size: int | None = None) -> Sampler:
    from .hf_sampler import HFSampler

    hf = HFSampler(base_model, device=config.device, dtype=config.dtype,
                   max_loaded_adapters=config.hf_sampler_adapters)
    if not config.use_vllm:
        return hf
    return _build_vllm_sampler(config, base_model, hf, vocab_size)


def _build_vllm_sampler(config: Config, base_model: str, hf: Sampler, vocab_size: int | None) -> Sampler:
    if config.vllm_backend == "trl":
        # One policy, pushed as merged weights: falling back to HF would sample a different policy.
        from .trl_backend import TRLVLLMSampler

        return TRLVLLMSampler(config.vllm_base_url, vocab_size=vocab_size)
    if config.vllm_backend == "server":
        from .vllm_server_client import VLLMServerSampler

        server = VLLMServerSampler(config.vllm_base_url, max_loaded_adapters=config.vllm_max_loras,
                                   max_lora_rank=config.vllm_max_lora_rank, vocab_size=vocab_size)
        return FallbackSampler(server, hf, retry_s=config.vllm_fallback_retry_s)

    def start_engine() -> Sampler:
        from .vllm_backend import VLLMEngineSampler

        return VLLMEngineSampler(
            base_model, max_loras=config.vllm_max_loras, max_lora_rank=config.vllm_max_lora_rank,
            max_cpu_loras=config.vllm_max_cpu_loras, gpu_memory_utilization=config.vllm_gpu_memory_utilization,
            enforce_eager=config.vllm_enforce_eager, max_model_len=config.vllm_max_model_len,
            enable_lora=config.vllm_enable_lora,
            engine_kwargs={k: v for k, v in (("max_num_seqs", config.vllm_max_num_seqs),
                                             ("max_num_batched_tokens", config.vllm_max_num_batched_tokens))
                           if v is not None})

    return FallbackSampler.start(start_engine, hf, retry_s=config.vllm_fallback_retry_s)
