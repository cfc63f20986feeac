"""The worker's whole configuration, read once from the environment and `.env`.

Nothing else in Tink reads `os.environ`: every knob is a field here with its default,
and CONFIGURATION.md documents each one. Tests build a `Config` directly.

    >>> cfg = Config.from_env()                 # process env wins over .env
    >>> cfg = Config(base_model="/models/tiny")  # explicit, for tests
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


def default_home() -> Path:
    return Path(os.environ.get("TINK_HOME", Path.home() / ".cache" / "tink")).expanduser()


# Env var name → Config field. Kept explicit so CONFIGURATION.md and the code agree.
PROMPT_LOGPROBS_MODES = ("auto", "native", "teacher_forced")  # VLLM_PROMPT_LOGPROBS (src/vllm_backend.py)

_ENV_FIELDS: dict[str, str] = {
    "TINK_HOST": "host",
    "TINK_PORT": "port",
    "TINK_STATE_DIR": "state_dir",
    "TINK_BASE_MODEL": "base_model",
    "TINK_DEVICE": "device",
    "TINK_DTYPE": "dtype",
    "TINK_API_KEYS": "api_keys",
    "TINK_API_KEYS_FILE": "api_keys_file",
    "TINK_ADMIN_KEYS": "admin_keys",
    "TINK_MAX_ADAPTERS_PER_KEY": "max_adapters_per_key",
    "TINK_SHUTDOWN_GRACE_S": "shutdown_grace_s",
    "TINK_THREADS": "threads",
    "TINK_SAMPLING_THREADS": "sampling_threads",
    "TINK_RETRIEVE_WAIT_S": "retrieve_wait_s",
    "TINK_MAX_ADAPTERS": "max_adapters",
    "TINK_MAX_LORA_RANK": "max_lora_rank",
    "TINK_MAX_BODY_BYTES": "max_body_bytes",
    "TINK_MAX_DATUMS": "max_datums",
    "TINK_MAX_TOKENS_PER_DATUM": "max_tokens_per_datum",
    "TINK_MAX_TOKENS_PER_REQUEST": "max_tokens_per_request",
    "TINK_MAX_SAMPLE_TOKENS": "max_sample_tokens",
    "TINK_MAX_NUM_SAMPLES": "max_num_samples",
    "TINK_MAX_TOPK_LOGPROBS": "max_topk_logprobs",
    "TINK_CAPTURE_ALL_MAX_TOKENS": "capture_all_max_tokens",
    "TINK_HF_SAMPLER_ADAPTERS": "hf_sampler_adapters",
    "TINK_TRAIN_MICROBATCH_TOKENS": "train_microbatch_tokens",
    "TINK_GRADIENT_CHECKPOINTING": "gradient_checkpointing",
    "TINK_TRAIN_MEMORY_RESERVE_GB": "train_memory_reserve_gb",
    "TINK_BATCH_ADAPTERS": "batch_adapters",
    "TINK_BATCH_ADAPTERS_MAX_MODELS": "batch_adapters_max_models",
    "TINK_BATCH_ADAPTERS_MAX_TOKENS": "batch_adapters_max_tokens",
    "USE_VLLM": "use_vllm",
    "USE_MEGATRON": "use_megatron",
    "VLLM_BACKEND": "vllm_backend",
    "VLLM_BASE_URL": "vllm_base_url",
    "VLLM_ENABLE_LORA": "vllm_enable_lora",
    "VLLM_MAX_LORAS": "vllm_max_loras",
    "VLLM_MAX_LORA_RANK": "vllm_max_lora_rank",
    "VLLM_MAX_CPU_LORAS": "vllm_max_cpu_loras",
    "VLLM_GPU_MEMORY_UTILIZATION": "vllm_gpu_memory_utilization",
    "VLLM_MAX_MODEL_LEN": "vllm_max_model_len",
    "VLLM_ENFORCE_EAGER": "vllm_enforce_eager",
    "VLLM_PROMPT_LOGPROBS": "vllm_prompt_logprobs",
    "VLLM_LOGPROBS_AT_END": "vllm_logprobs_at_end",
    "VLLM_FALLBACK_RETRY_S": "vllm_fallback_retry_s",
    "VLLM_MAX_NUM_SEQS": "vllm_max_num_seqs",
    "VLLM_MAX_NUM_BATCHED_TOKENS": "vllm_max_num_batched_tokens",
    "MEGATRON_SERVER_URL": "megatron_server_url",
    "TINK_CHECKPOINT_SWEEP_S": "checkpoint_sweep_s",
    "TINK_SESSION_EXPIRY_S": "session_expiry_s",
    "TINK_DOWNLOAD_URL_TTL_S": "download_url_ttl_s",
    "TINK_URL_SIGNING_SECRET": "url_signing_secret",
    "TINK_PUBLIC_URL": "public_url",
}

EMBEDDED_MODEL = "tiny"  # TINK_BASE_MODEL value that selects the locally built default model


@dataclass
class Config:
    # --- service
    host: str = "127.0.0.1"
    port: int = 8000
    state_dir: Path = field(default_factory=lambda: default_home() / "state")
    api_keys: tuple[str, ...] = ()  # empty (and no file/admin keys): no key check, single user
    api_keys_file: Path | None = None
    admin_keys: tuple[str, ...] = ()
    shutdown_grace_s: float = 30.0  # SIGTERM: time to finish queued work before failing the rest
    threads: int = 256  # WSGI threads; each waiting retrieve_future holds one (a GRPO step has 64+ in flight)
    # Concurrent sampling operations handed to the sampler; None: 256 with vLLM (each operation waits on
    # the engine, which batches them: fewer threads cap the batch), 16 with HF (it runs one at a time).
    sampling_threads: int | None = None
    retrieve_wait_s: float = 20.0  # long-poll of retrieve_future before answering try_again
    # A client session not heard from (heartbeat or operation) this long is expired by the sweep (every
    # TINK_CHECKPOINT_SWEEP_S): its runs are saved and unloaded, so a killed client frees its adapters. 0: never.
    session_expiry_s: float = 900.0
    # --- checkpoints
    checkpoint_sweep_s: float = 60.0  # how often expired checkpoints (TTL) are removed; also once at start
    download_url_ttl_s: int = 900  # lifetime of a signed download link (external_weights_urls)
    url_signing_secret: str | None = None  # HMAC key of download links; None: random per process start
    public_url: str | None = None  # base of download links (behind a proxy); None: the address the client used
    # --- model
    base_model: str = EMBEDDED_MODEL
    device: str = "auto"
    dtype: str = "auto"
    # --- limits (each violation is a 4xx naming the field)
    max_adapters: int = 64
    max_adapters_per_key: int = 16
    max_lora_rank: int = 256
    max_body_bytes: int = 64 * 1024 * 1024
    max_datums: int = 4096
    max_tokens_per_datum: int = 32768
    max_tokens_per_request: int = 1 << 20
    max_sample_tokens: int = 32768
    max_num_samples: int = 1024
    max_topk_logprobs: int = 20  # top-k widths, prompt_alt_tokens_k, distinct target ids (vLLM's max_logprobs)
    hf_sampler_adapters: int = 8
    capture_all_max_tokens: int = 256  # most max_tokens of a request capturing with reduce "all"
    # --- trainer memory (see src/memory.py)
    train_microbatch_tokens: int = 16384  # most (padded) tokens in one forward pass; fewer if memory is short
    gradient_checkpointing: str = "auto"  # auto | true | false
    train_memory_reserve_gb: float | None = None  # GPU memory kept for training when vLLM shares the GPU
    # --- many adapters in one pass (see src/multi_adapter.py)
    # Off by default: exact, but not faster on CPU (bench/bench_multi_adapter.py); not yet measured on a GPU.
    batch_adapters: bool = False  # waiting forward_backward / forward requests of different models share a pass
    batch_adapters_max_models: int = 8  # most models (requests) in one joined pass
    batch_adapters_max_tokens: int = 65536  # most tokens (all datums of all joined requests) in one joined pass
    # --- backends
    use_vllm: bool = False
    use_megatron: bool = False
    vllm_backend: str = "engine"  # engine | server | trl  (server implied by VLLM_BASE_URL)
    vllm_base_url: str | None = None
    vllm_enable_lora: bool = True
    vllm_max_loras: int = 4
    vllm_max_lora_rank: int = 64
    vllm_max_cpu_loras: int | None = None
    vllm_gpu_memory_utilization: float | None = None  # None: the memory plan on GPU, 0.1 on CPU
    vllm_max_model_len: int | None = None
    vllm_enforce_eager: bool | None = None  # None: True on CPU
    vllm_prompt_logprobs: str = "auto"  # auto | native | teacher_forced (src/vllm_prompt_logprobs.py)
    vllm_logprobs_at_end: bool = True  # sampled logprobs once per request (src/vllm_logprobs_at_end.py)
    vllm_fallback_retry_s: float = 30.0
    vllm_max_num_seqs: int | None = None  # None: vLLM's offline (LLM class) default for the device
    vllm_max_num_batched_tokens: int | None = None
    megatron_server_url: str | None = None

    @property
    def sampling_concurrency(self) -> int:
        if self.sampling_threads is not None:
            return self.sampling_threads
        return 256 if self.use_vllm else 16

    @property
    def database_path(self) -> Path:
        return self.state_dir / "tink.sqlite3"

    @property
    def checkpoint_dir(self) -> Path:
        return self.state_dir / "checkpoints"

    def all_user_keys(self) -> tuple[str, ...]:
        from .auth import read_keys_file

        from_file = read_keys_file(self.api_keys_file) if self.api_keys_file else ()
        return self.api_keys + from_file

    def resolved_base_model(self) -> str:
        """The path or hub id to load; builds the embedded tiny model on first use."""
        if self.base_model != EMBEDDED_MODEL:
            return self.base_model
        from .tiny_model import ensure_tiny_model

        return str(ensure_tiny_model(default_home() / "models" / "tiny-llama"))

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, dotenv_path: str | os.PathLike | None = None
    ) -> Config:
        """Read every field from `environ` (default: os.environ) over the `.env` file, if any."""
        from dotenv import dotenv_values

        values: dict[str, str] = {}
        dotenv_file = dotenv_path or os.environ.get("TINK_DOTENV", ".env")
        if Path(dotenv_file).is_file():
            values.update({k: v for k, v in dotenv_values(dotenv_file).items() if v is not None})
        values.update(os.environ if environ is None else environ)

        kwargs: dict[str, object] = {}
        types = {f.name: f.type for f in fields(cls)}
        for env_name, attr in _ENV_FIELDS.items():
            raw = values.get(env_name)
            if raw is None or raw.strip() == "":
                continue
            kwargs[attr] = _parse(env_name, raw.strip(), str(types[attr]))
        if "vllm_base_url" in kwargs and "vllm_backend" not in kwargs:
            kwargs["vllm_backend"] = "server"  # a server URL alone means: use that server
        config = cls(**kwargs)  # type: ignore[arg-type]
        config.validate()
        return config

    def validate(self) -> None:
        if self.vllm_prompt_logprobs not in PROMPT_LOGPROBS_MODES:
            raise ConfigError("VLLM_PROMPT_LOGPROBS must be auto, native or teacher_forced, "
                              f"got {self.vllm_prompt_logprobs!r}")
        if self.vllm_backend not in ("engine", "server", "trl"):
            raise ConfigError(f"VLLM_BACKEND must be engine, server or trl, got {self.vllm_backend!r}")
        if self.vllm_backend == "server" and not self.vllm_base_url:
            raise ConfigError("VLLM_BACKEND=server needs VLLM_BASE_URL (e.g. http://127.0.0.1:8001)")
        if self.use_megatron and not self.megatron_server_url:
            raise ConfigError("USE_MEGATRON=true needs MEGATRON_SERVER_URL (e.g. http://127.0.0.1:8100)")
        if self.api_keys_file is not None and not self.api_keys_file.is_file():
            raise ConfigError(f"TINK_API_KEYS_FILE={self.api_keys_file} does not exist")
        from .memory import CHECKPOINTING_MODES

        if self.gradient_checkpointing not in CHECKPOINTING_MODES:
            raise ConfigError(f"TINK_GRADIENT_CHECKPOINTING must be auto, true or false, got "
                              f"{self.gradient_checkpointing!r}")
        if self.train_microbatch_tokens < 1:
            raise ConfigError(f"TINK_TRAIN_MICROBATCH_TOKENS must be >= 1, got {self.train_microbatch_tokens}")
        if self.batch_adapters_max_models < 1 or self.batch_adapters_max_tokens < 1:
            raise ConfigError("TINK_BATCH_ADAPTERS_MAX_MODELS and TINK_BATCH_ADAPTERS_MAX_TOKENS must be >= 1, got "
                              f"{self.batch_adapters_max_models} and {self.batch_adapters_max_tokens}")
        if self.vllm_gpu_memory_utilization is not None and not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError("VLLM_GPU_MEMORY_UTILIZATION must be in (0, 1], got "
                              f"{self.vllm_gpu_memory_utilization}")
        if not self.checkpoint_sweep_s > 0:
            raise ConfigError(f"TINK_CHECKPOINT_SWEEP_S must be > 0 seconds, got {self.checkpoint_sweep_s}")
        if self.session_expiry_s < 0:
            raise ConfigError(f"TINK_SESSION_EXPIRY_S must be >= 0 seconds (0: never), got {self.session_expiry_s}")
        if self.download_url_ttl_s < 10:
            raise ConfigError(f"TINK_DOWNLOAD_URL_TTL_S must be >= 10 seconds, got {self.download_url_ttl_s}")
        if self.public_url is not None and not self.public_url.startswith(("http://", "https://")):
            raise ConfigError(f"TINK_PUBLIC_URL must start with http:// or https://, got {self.public_url!r}")
        from .logprob_options import MAX_TOPK_LOGPROBS

        if not 1 <= self.max_topk_logprobs <= MAX_TOPK_LOGPROBS:
            raise ConfigError(f"TINK_MAX_TOPK_LOGPROBS must be between 1 and {MAX_TOPK_LOGPROBS}, got "
                              f"{self.max_topk_logprobs}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"TINK_PORT must be a port number, got {self.port}")


def _parse(env_name: str, raw: str, type_name: str) -> object:
    try:
        if "bool" in type_name:
            lowered = raw.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if "tuple" in type_name:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if "Path" in type_name:
            return Path(raw).expanduser()
        if "int" in type_name:
            return int(raw)
        if "float" in type_name:
            return float(raw)
        return raw
    except ValueError as exc:
        raise ConfigError(f"{env_name}={raw!r} is not valid: {exc}") from None
