"""The two seams of the worker: a `Trainer` and a `Sampler`, and the plain values that cross them.

Backends never see HTTP or protobuf: the app decodes wire types into these dataclasses
(`src/wire.py`), the worker orders and records operations (`src/worker.py`), and a backend
only computes. Every backend module (`hf_trainer`, `hf_sampler`, `vllm_backend`, ...)
implements one of the protocols below; `src/registry.py` picks them from the config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from .steering import LookInside


class BackendError(RuntimeError):
    """A backend could not run an operation for a reason that is not the caller's fault."""


class AdapterRejectedError(BackendError):
    """The sampler is healthy but cannot serve this one adapter (e.g. vLLM has no LoRA support for a
    module it trains). A fallback sampler serves that adapter instead; `cause` is the sampler's own reason."""

    def __init__(self, message: str, adapter: str | None = None, cause: str | None = None):
        super().__init__(message)
        self.adapter, self.cause = adapter, cause


class UserInputError(ValueError):
    """The operation's input is invalid; `field` names the offending field for the 4xx answer."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class NotFoundError(UserInputError):
    """An id (model, checkpoint, future, sampling session) the worker does not know: HTTP 404."""


class GoneError(UserInputError):
    """An id that was live and has ended (an expired session, a run released with it): HTTP 410, which
    the SDK's heartbeat loop reads as "this session has finished"."""


# ----------------------------------------------------------------------------- training


# Tinker's LoRA parametrization ("LoRA Without Regret"): alpha fixed at 32 whatever the rank, so the
# scale is 32/rank and the best learning rate barely depends on the rank. The tinker-cookbook's
# hyperparam_utils assumes it (`lora_alpha=32`); exported adapter_config.json files carry it.
TINKER_LORA_ALPHA = 32
OPTIMIZERS = ("adamw", "dimuon")  # Tinker's optimizer families (OptimizerConfig.type)


@dataclass(frozen=True)
class LoraSpec:
    """What a training client asked for at `create_model` time."""

    rank: int = 32
    alpha: float | None = None  # None: Tinker's fixed TINKER_LORA_ALPHA (the SDK's LoraConfig has no alpha)
    seed: int | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True
    optimizer: str = "adamw"  # Tinker's optimizer_config.type, fixed for the model's lifetime: adamw | dimuon

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise UserInputError(f"lora_config.rank must be > 0, got {self.rank}", "lora_config.rank")
        if self.optimizer not in OPTIMIZERS:
            raise UserInputError(f"optimizer {self.optimizer!r} is not supported; use one of {list(OPTIMIZERS)}",
                                 "optimizer_config.type")
        if not (self.train_attn or self.train_mlp or self.train_unembed):
            raise UserInputError(
                "lora_config needs at least one of train_attn, train_mlp, train_unembed",
                "lora_config",
            )

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else TINKER_LORA_ALPHA

    @property
    def scale(self) -> float:
        """What the adapter's B·A is multiplied by in the forward pass (PEFT's `scaling`)."""
        return self.lora_alpha / self.rank


@dataclass
class TrainDatum:
    """One sequence: the model input tokens and its per-token loss inputs.

    `loss_fn_inputs` keeps the SDK's names (`target_tokens`, `weights`, `logprobs`,
    `advantages`, ...) with arrays of shape [len(tokens)] (or [len(tokens), K]).
    """

    tokens: list[int]
    loss_fn_inputs: dict[str, np.ndarray]


@dataclass
class ForwardBackwardResult:
    """Per-datum outputs (`logprobs`, `elementwise_loss`, ...) and batch metrics (`loss:sum`, ...)."""

    loss_fn_outputs: list[dict[str, np.ndarray]]
    metrics: dict[str, float]


@dataclass(frozen=True)
class AdamParams:
    """The Tinker `AdamParams`, field for field (decoupled weight decay; 0 disables clipping)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass(frozen=True)
class DimuonParams:
    """The Tinker `DimuonParams`, field for field (`src/optimizers.py` has the update rule)."""

    learning_rate: float
    beta1: float = 0.9
    grad_clip_norm: float = 0.0  # <= 0 disables clipping


@runtime_checkable
class Trainer(Protocol):
    """Trains many LoRA adapters on one shared base model.

    Calls for one `model_id` arrive in submission order, one at a time (the worker
    guarantees it); calls for different models may interleave between calls.
    """

    name: str
    base_model: str

    def create_adapter(self, model_id: str, spec: LoraSpec) -> None: ...

    def delete_adapter(self, model_id: str) -> None: ...

    def forward_backward(
        self,
        model_id: str,
        data: list[TrainDatum],
        loss_fn: str,
        loss_fn_config: dict[str, float | str] | None,
        forward_only: bool,
    ) -> ForwardBackwardResult:
        """Run the loss on `data`; unless `forward_only`, add its gradients to the adapter's."""
        ...

    def optim_step(self, model_id: str, params: AdamParams | DimuonParams) -> dict[str, float]:
        """Apply the accumulated gradients with the model's optimizer (AdamW or Dimuon), then zero them."""
        ...

    def save_state(self, model_id: str, directory: Path) -> None:
        """Write adapter (PEFT format) and optimizer state into `directory` (which exists, empty)."""
        ...

    def load_state(self, model_id: str, directory: Path, with_optimizer: bool) -> None: ...

    def export_adapter(self, model_id: str, directory: Path) -> None:
        """Write only the PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`)."""
        ...

    def lora_spec(self, model_id: str) -> LoraSpec: ...

    def has_adapter(self, model_id: str) -> bool: ...

    def vocab_size(self) -> int: ...


# ----------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    # False when the client passed `stop=[]`: then even EOS does not end a sequence.
    stop_at_eos: bool = True


@dataclass(frozen=True)
class AdapterRef:
    """A servable adapter version: a PEFT folder written by `Trainer.export_adapter`.

    `name` is unique per version (the sampler checkpoint's tinker path), so a sampler that
    caches adapters by name never serves stale weights.
    """

    name: str
    path: Path
    rank: int


@dataclass
class SampleJob:
    prompt: list[int]
    num_samples: int
    params: SamplingParams
    adapter: AdapterRef | None = None  # None: the base model
    prompt_logprobs: bool = False
    prompt_logprobs_last_n: int | None = None  # score only the last N prompt tokens
    topk_prompt_logprobs: int = 0  # the k most likely tokens at each scored prompt position
    topk_sample_logprobs: int = 0  # the k most likely tokens at each generated position
    target_prompt_logprobs: TargetIds | None = None  # chosen ids scored at chosen prompt positions
    prompt_alt_tokens_k: int = 0  # draws from the next-token distribution at every prompt position
    look: LookInside | None = None  # activations to capture / steering to apply (src/steering.py)

    @property
    def scores_prompt(self) -> bool:
        """Whether anything is asked about the prompt itself (a forward pass over all of it)."""
        return bool(self.prompt_logprobs or self.topk_prompt_logprobs or self.prompt_alt_tokens_k
                    or self.target_prompt_logprobs is not None)


@dataclass(frozen=True)
class TargetIds:
    """The SDK's `target_prompt_logprobs`: `ids[i, j]` is scored at prompt position i + 1, -1 asks nothing.

    `csr` keeps the request's sparse layout (crow, col indices), so the answer can have the same one.
    """

    ids: np.ndarray  # int64 [len(prompt) - 1, K]
    csr: tuple[list[int], list[int]] | None = None


TopK = list[tuple[int, float]]
"""(token id, logprob) pairs, most likely first (ties by token id); impossible tokens (-inf) left out."""


@dataclass
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str  # "stop" | "length"
    topk_logprobs: list[TopK] | None = None  # per generated token, when the job asked for topk_sample_logprobs
    captures: list[np.ndarray] | None = None  # per `job.look.capture`, float32 (src/steering.py)


@dataclass
class PromptAltTokens:
    """`prompt_alt_tokens_k` draws: row i holds k ids drawn at prompt position i + 1, and their logprobs."""

    tokens: np.ndarray  # int64 [len(prompt) - 1, k]
    logprobs: np.ndarray  # float32 [len(prompt) - 1, k]


@dataclass
class SampleResult:
    sequences: list[SampledSequence]
    # One entry per prompt token; the first is None (no context precedes it).
    prompt_logprobs: list[float | None] | None = None
    # One entry per prompt token, None where not scored (the first one, those before prompt_logprobs_last_n).
    topk_prompt_logprobs: list[TopK | None] | None = None
    target_prompt_logprobs: np.ndarray | None = None  # float32, TargetIds.ids' shape, 0.0 where it had -1
    prompt_alt_tokens: PromptAltTokens | None = None
    extras: dict[str, float] = field(default_factory=dict)
    served_by: str = ""  # the sampler that produced it (set by FallbackSampler: "vllm", "hf", ...)


TokenSink = Callable[[int, list[int], list[float]], None]
"""`sink(sample_index, new_tokens, their_logprobs)`: called as tokens are chosen (streaming).
It may run on a backend thread, so it must be quick and thread-safe (e.g. `queue.put`)."""


def emit_whole(result: SampleResult, sink: TokenSink | None) -> SampleResult:
    """Streaming for backends that only see finished completions: each arrives in one piece."""
    if sink is not None:
        for index, seq in enumerate(result.sequences):
            sink(index, list(seq.tokens), list(seq.logprobs))
    return result


@runtime_checkable
class Sampler(Protocol):
    """Generates from the base model or any saved adapter version. Thread-safe."""

    name: str

    def sample(self, job: SampleJob, sink: TokenSink | None = None) -> SampleResult:
        """All `job.num_samples` completions; with `sink`, each token is also reported as it is chosen."""
        ...

    def health(self) -> dict[str, object]:
        """A JSON-able status for `/api/v1/healthz` (`{"live": bool, ...}`)."""
        ...

    def close(self) -> None: ...
