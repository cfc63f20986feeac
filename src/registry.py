"""The one place that picks backends from the config.

    USE_MEGATRON=false (default)  -> HFTrainer (PEFT, in-process)
    USE_VLLM=false (default)      -> HFSampler (HF generate)
    USE_VLLM=true                 -> vLLM sampler (see VLLM_README.md), HF generate as fallback
"""

from __future__ import annotations

import logging

from .backends import Sampler, Trainer
from .config import Config, ConfigError

log = logging.getLogger(__name__)


def build_trainer(config: Config, base_model: str) -> Trainer:
    if config.use_megatron:
        raise ConfigError(
            "USE_MEGATRON=true: the Megatron trainer client is not part of this release yet; "
            "unset USE_MEGATRON to train with the in-process PEFT trainer"
        )
    from .hf_trainer import HFTrainer

    return HFTrainer(base_model, device=config.device, dtype=config.dtype, max_adapters=config.max_adapters)


def build_sampler(config: Config, base_model: str) -> Sampler:
    from .hf_sampler import HFSampler

    hf = HFSampler(base_model, device=config.device, dtype=config.dtype,
                   max_loaded_adapters=config.hf_sampler_adapters)
    if not config.use_vllm:
        return hf
    return _build_vllm_sampler(config, base_model, hf)


def _build_vllm_sampler(config: Config, base_model: str, fallback: Sampler) -> Sampler:
    raise ConfigError("USE_VLLM=true is not wired yet")
