"""How one GPU is shared: vLLM's share beside the trainer, and how many tokens a training micro-batch may hold.

The policy (USE_VLLM=true with the in-process engine on the trainer's GPU), chosen because Tink
trains and samples *at the same time* for many users:

1. The trainer loads first (one copy of the base weights; the HF fallback sampler shares it).
2. `plan_vllm_share` then gives vLLM what is free minus a training reserve (`TINK_TRAIN_MEMORY_RESERVE_GB`,
   default: the larger of 15 % of the GPU and one full micro-batch with activation checkpointing
   plus 4 GiB for adapters and optimizer state). vLLM's `gpu_memory_utilization` is that share
   over the GPU's total (vLLM reads it as "this instance may use this fraction of the device").
   `VLLM_GPU_MEMORY_UTILIZATION` overrides the plan.
3. At every `forward_backward` the trainer sizes its micro-batches from the memory actually free
   then (`MicrobatchBudget`), checkpoints activations when that budget is small, and halves the
   budget and retries if an out-of-memory error still happens.

vLLM's sleep mode (release KV cache while training, as TRL and verl colocate) was not chosen: a
sleeping engine serves nobody, and a shared worker samples for some users while it trains for
others. The plan is logged at start and shown in `/api/v1/healthz` under `memory`.

    >>> plan = plan_vllm_share(DeviceMemory(free=124 * GiB, total=140 * GiB), reserve=21 * GiB)
    >>> round(plan.gpu_memory_utilization, 3), plan.source
    (0.736, 'plan')
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

GiB = 1 << 30
MIN_RESERVE_FRACTION = 0.15  # of the GPU, kept for training when vLLM shares it
ADAPTER_STATE_RESERVE = 4 * GiB  # LoRA weights, gradients and AdamW moments of the adapters in use
USABLE_FRACTION = 0.9  # of the memory free at a step that one micro-batch may plan to use
CHECKPOINT_BELOW_TOKENS = 4096  # auto checkpointing: on when a micro-batch without it would be smaller
CHECKPOINTING_MODES = ("auto", "true", "false")  # TINK_GRADIENT_CHECKPOINTING


@dataclass(frozen=True)
class DeviceMemory:
    free: int
    total: int

    @classmethod
    def of(cls, device: torch.device | str) -> DeviceMemory | None:
        """Free and total bytes of a CUDA device (None elsewhere); torch's cached-but-unused blocks count as free."""
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return cls(free=free + cached, total=total)

    def describe(self) -> str:
        return f"{(self.total - self.free) / GiB:.1f} of {self.total / GiB:.1f} GiB in use"


@dataclass(frozen=True)
class MemoryPlan:
    """vLLM's share of the GPU and why: logged at start, reported by healthz."""

    gpu_memory_utilization: float
    source: str  # "plan" | "VLLM_GPU_MEMORY_UTILIZATION" | "cpu"
    total_gib: float | None = None
    in_use_before_vllm_gib: float | None = None  # the trainer's base weights and CUDA context, mostly
    training_reserve_gib: float | None = None
    vllm_gib: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def describe(self) -> str:
        if self.source == "cpu":
            return f"vLLM on CPU: gpu_memory_utilization={self.gpu_memory_utilization} (a fraction of RAM there)"
        if self.source != "plan":
            return (f"gpu_memory_utilization={self.gpu_memory_utilization} from VLLM_GPU_MEMORY_UTILIZATION "
                    f"({self.in_use_before_vllm_gib:.1f} of {self.total_gib:.1f} GiB in use before vLLM starts)")
        return (f"GPU {self.total_gib:.1f} GiB: {self.in_use_before_vllm_gib:.1f} GiB in use before vLLM (trainer), "
                f"{self.training_reserve_gib:.1f} GiB kept for training -> vLLM gets {self.vllm_gib:.1f} GiB "
                f"(gpu_memory_utilization={self.gpu_memory_utilization:.3f}); set VLLM_GPU_MEMORY_UTILIZATION "
                "or TINK_TRAIN_MEMORY_RESERVE_GB to change it")


def plan_vllm_share(memory: DeviceMemory, reserve: int, override: float | None = None) -> MemoryPlan:
    """vLLM's `gpu_memory_utilization` when it starts on a GPU where `memory` is what is free now.

    vLLM refuses to start unless `utilization x total` is free, so the share is what is free
    minus `reserve`, never more. Raises ValueError when that leaves vLLM less than 5 % of the GPU.
    """
    in_use = (memory.total - memory.free) / GiB
    total = memory.total / GiB
    if override is not None:
        return MemoryPlan(override, "VLLM_GPU_MEMORY_UTILIZATION", total, in_use)
    share = memory.free - reserve
    if share < 0.05 * memory.total:
        raise ValueError(f"only {memory.free / GiB:.1f} GiB of {total:.1f} GiB are free after the trainer loaded, and "
                         f"{reserve / GiB:.1f} GiB are kept for training: too little for vLLM. Lower "
                         "TINK_TRAIN_MEMORY_RESERVE_GB, set VLLM_GPU_MEMORY_UTILIZATION, or run vLLM on another GPU "
                         "(VLLM_BASE_URL)")
    return MemoryPlan(share / memory.total, "plan", total, in_use, reserve / GiB, share / GiB)


def training_reserve(total: int, checkpointed_bytes_per_token: float, microbatch_tokens: int,
                     reserve_gb: float | None = None) -> int:
    """Bytes kept for training beside vLLM: `reserve_gb` if set, else max(15 % of the GPU, one full
    checkpointed micro-batch + adapter state)."""
    if reserve_gb is not None:
        return int(reserve_gb * GiB)
    one_microbatch = checkpointed_bytes_per_token * microbatch_tokens + ADAPTER_STATE_RESERVE
    return int(max(MIN_RESERVE_FRACTION * total, one_microbatch))


def activation_bytes_per_token(config: Any, dtype_bytes: int, checkpointing: bool) -> float:
    """An upper estimate of the training memory one token costs in a decoder-only transformer.

    Without checkpointing every layer keeps ~18 hidden-sized and ~4 MLP-sized activations per token
    (inputs of the projections and norms, attention output, gate/up/activation products), plus the
    fp32 copies of the inputs of its seven LoRA-wrapped projections (PEFT runs LoRA in fp32 on a
    bf16 model), and the fp32 log-softmax over the vocabulary that the loss keeps for backward; with
    checkpointing a layer keeps only its input, one layer at a time is recomputed, and so are the
    logits, one chunk at a time (`HFTrainer`'s fixed cost). Measured on an H200 (bf16, r=32, every
    projection and lm_head, 10 % margin included): Qwen2.5-7B's shape 641 KiB/token checkpointed; a 0.5B
    Llama 2,600 KiB/token plain. The measured peak of each micro-batch replaces this estimate
    (`MicrobatchBudget.observe`).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, layers = text.hidden_size, text.num_hidden_layers
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
    per_layer = (18 * hidden + 4 * intermediate) * dtype_bytes + (6 * hidden + intermediate) * 4
    if checkpointing:
        return layers * hidden * dtype_bytes + per_layer
    return layers * per_layer + 2 * hidden * dtype_bytes + 4 * getattr(text, "vocab_size", 0)


class MicrobatchBudget:
    """The most padded tokens one training micro-batch may hold now, learned from what each one used.

    On CPU (or without CUDA) the budget is the configured cap alone. On a GPU it is the memory free
    at the step (torch's own cache included) divided by the bytes a token costs, first estimated
    from the model's shape and then measured from each micro-batch's peak.
    """

    def __init__(self, device: torch.device, cap_tokens: int, estimate: dict[bool, float], fixed_bytes: int = 0):
        self.device, self.cap_tokens, self.fixed_bytes = device, cap_tokens, fixed_bytes
        self.bytes_per_token = dict(estimate)  # checkpointing on/off -> bytes
        self.measured = {False: False, True: False}
        self.ceiling: dict[bool, int | None] = {False: None, True: None}  # set by out-of-memory errors
        self._start = 0
        self._on_gpu = device.type == "cuda" and torch.cuda.is_available()

    def tokens(self, checkpointing: bool, cautious: bool = True) -> int:
        """The budget now. `cautious`: while the cost per token is still an estimate (nothing measured
        yet in this mode), plan with half the memory, so the first micro-batch does not run out."""
        limit = min(self.cap_tokens, self.ceiling[checkpointing] or self.cap_tokens)
        memory = DeviceMemory.of(self.device) if self._on_gpu else None
        if memory is None:
            return limit
        fraction = USABLE_FRACTION / 2 if cautious and not self.measured[checkpointing] else USABLE_FRACTION
        usable = fraction * memory.free - self.fixed_bytes
        return int(min(limit, max(1, usable // self.bytes_per_token[checkpointing])))

    def should_checkpoint(self, mode: str, longest_sequence: int) -> bool:
        """`mode` "true"/"false" as set; "auto": on when, without it, a micro-batch would be smaller than
        CHECKPOINT_BELOW_TOKENS (or the cap) or could not hold the longest sequence."""
        if mode != "auto":
            return mode == "true"
        if not self._on_gpu:
            return False
        without = self.tokens(False, cautious=False)  # the estimate itself: caution must not bias the choice
        return without < min(self.cap_tokens, max(CHECKPOINT_BELOW_TOKENS, longest_sequence))

    def start(self) -> None:
        if self._on_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)

    def observe(self, checkpointing: bool, tokens: int) -> None:
        """Record what a finished micro-batch of `tokens` padded tokens used at its peak."""
        if not self._on_gpu or tokens <= 0:
            return
        used = torch.cuda.max_memory_allocated(self.device) - self._start - self.fixed_bytes
        measured = max(used, 0) / tokens * 1.1  # 10 % margin: later batches fragment the cache
        if not self.measured[checkpointing] or measured > self.bytes_per_token[checkpointing]:
            self.bytes_per_token[checkpointing] = max(measured, 1.0)
        self.measured[checkpointing] = True

    def shrink(self, checkpointing: bool, failed_tokens: int) -> None:
        """After a micro-batch of `failed_tokens` ran out of memory: at most half that from now on, and
        twice the bytes per token in the estimate (the memory free may differ next time)."""
        self.ceiling[checkpointing] = max(1, failed_tokens // 2)
        self.bytes_per_token[checkpointing] *= 2
        self.measured[checkpointing] = True

    def as_dict(self) -> dict[str, Any]:
        return {"cap_tokens": self.cap_tokens, "ceiling_after_oom": {("checkpointed" if k else "plain"): v
                                                                      for k, v in self.ceiling.items()},
                "kib_per_token": {("checkpointed" if k else "plain"): round(v / 1024, 1)
                                                                 for k, v in self.bytes_per_token.items()},
                "measured": {("checkpointed" if k else "plain"): v for k, v in self.measured.items()}}
