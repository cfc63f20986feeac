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

from .backends import BackendError, Sampler, Trainer
from .config import Config
from .memory import DeviceMemory, MemoryPlan, plan_vllm_share, training_reserve
from .sampler_fallback import FallbackSampler

log = logging.getLogger(__name__)


def build_trainer(config: Config, base_model: str) -> Trainer:
    if config.use_megatron:
        from .megatron_backend import MegatronTrainer

        return MegatronTrainer(config.megatron_server_url, base_model)
    from .hf_trainer import HFTrainer

    return HFTrainer(base_model, device=config.device, dtype=config.dtype, max_adapters=config.max_adapters,
                     microbatch_tokens=config.train_microbatch_tokens,
                     gradient_checkpointing=config.gradient_checkpointing)


def build_sampler(config: Config, base_model: str, vocab_size: int | None = None,
                  trainer: Trainer | None = None) -> Sampler:
    """The sampler the config asks for. Build the trainer first and pass it: the HF sampler then
    shares its base weights, and vLLM's share of the GPU is planned around it (src/memory.py)."""
    from .hf_sampler import HFSampler

    shared = trainer.share_base_model() if hasattr(trainer, "share_base_model") else None
    hf = HFSampler(base_model, device=config.device, dtype=config.dtype,
                   max_loaded_adapters=config.hf_sampler_adapters, model=shared)
    if not config.use_vllm:
        return hf
    return _build_vllm_sampler(config, base_model, hf, vocab_size, trainer)


def _build_vllm_sampler(config: Config, base_model: str, hf: Sampler, vocab_size: int | None,
                        trainer: Trainer | None) -> Sampler:
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

        plan = memory_plan(config, trainer)
        log.info("memory plan: %s", plan.describe())
        sampler = VLLMEngineSampler(
            base_model, max_loras=config.vllm_max_loras, max_lora_rank=config.vllm_max_lora_rank,
            max_cpu_loras=config.vllm_max_cpu_loras, gpu_memory_utilization=plan.gpu_memory_utilization,
            enforce_eager=config.vllm_enforce_eager, max_model_len=config.vllm_max_model_len,
            enable_lora=config.vllm_enable_lora, prompt_logprobs=config.vllm_prompt_logprobs,
            logprobs_at_end=config.vllm_logprobs_at_end,
            engine_kwargs={k: v for k, v in (("max_num_seqs", config.vllm_max_num_seqs),
                                             ("max_num_batched_tokens", config.vllm_max_num_batched_tokens))
                           if v is not None})
        sampler.memory_plan = plan
        return sampler

    return FallbackSampler.start(start_engine, hf, retry_s=config.vllm_fallback_retry_s)


def memory_plan(config: Config, trainer: Trainer | None) -> MemoryPlan:
    """vLLM's `gpu_memory_utilization` for an in-process engine (see src/memory.py for the policy)."""
    import torch

    if not torch.cuda.is_available():
        return MemoryPlan(config.vllm_gpu_memory_utilization or 0.1, "cpu")
    torch.cuda.empty_cache()  # blocks cached by this process's allocator are not free for vLLM's process
    memory = DeviceMemory.of(torch.device("cuda", torch.cuda.current_device()))
    budget = getattr(trainer, "budget", None)
    per_token = budget.bytes_per_token[True] if budget is not None else 0.0
    reserve = training_reserve(memory.total, per_token, config.train_microbatch_tokens,
                               config.train_memory_reserve_gb)
    try:
        return plan_vllm_share(memory, reserve, config.vllm_gpu_memory_utilization)
    except ValueError as exc:
        raise BackendError(f"vllm sampler: {exc}") from exc
