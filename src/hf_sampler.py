"""The fallback sampler: HF `generate` on the base model and on any saved LoRA adapter version.

Selected when `USE_VLLM` is unset (or as vLLM's fallback); `TINK_DEVICE`, `TINK_DTYPE` and
`TINK_HF_SAMPLER_ADAPTERS` configure it. One `generate` call serves all `num_samples` of a job.
Token choice happens in our own logits processor rather than in `generate`, for two reasons:
the logprob we report is then exactly that of the distribution the token was drawn from, and
the draw uses a private `torch.Generator`, so a seed reproduces a job even while other threads
use torch's global RNG. What a job asks about its prompt (prompt logprobs, `topk_prompt_logprobs`,
`target_prompt_logprobs`, `prompt_alt_tokens_k`) comes from the one forward pass over the prompt that
also fills the KV cache (`src/prompt_scoring.py`); `topk_sample_logprobs` from the decoder's own step.

    >>> from src.backends import SampleJob, SamplingParams
    >>> from src.tiny_model import ensure_tiny_model
    >>> sampler = HFSampler(str(ensure_tiny_model("/tmp/tiny-llama")))    # device/dtype "auto"
    >>> result = sampler.sample(SampleJob([1, 40, 41], 2, SamplingParams(max_tokens=4, seed=0)))
    >>> [(len(s.tokens), s.stop_reason) for s in result.sequences]
    [(4, 'length'), (4, 'length')]
"""

from __future__ import annotations

import logging
import numbers
import os
import threading
from collections import OrderedDict
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .backends import (
    AdapterRef,
    BackendError,
    SampledSequence,
    SampleJob,
    SampleResult,
    SamplingParams,
    TokenSink,
    TopK,
    UserInputError,
)
from .logprob_options import check_options
from .prompt_scoring import PromptScorer, top_k
from .tensors import LOGIT_CHUNK_ELEMENTS

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class HFSampler:
    """Implements `Sampler`; one lock serialises every use of the model (adapter switching included)."""

    name = "hf"
    looks_inside = True  # capture and steering through forward hooks (src/steering.py)

    def __init__(self, base_model: str, device: str = "auto", dtype: str = "auto", max_loaded_adapters: int = 8,
                 model: torch.nn.Module | None = None):
        """`model`: an already loaded base model to sample from (the trainer's, sharing its weights, see
        `HFTrainer.share_base_model`); else `base_model` is loaded on `device` in `dtype`."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if max_loaded_adapters < 1:
            raise ValueError(f"TINK_HF_SAMPLER_ADAPTERS must be >= 1, got {max_loaded_adapters}")
        if dtype != "auto" and dtype not in _DTYPES:
            raise ValueError(f"TINK_DTYPE={dtype!r} is not supported; use auto, {', '.join(_DTYPES)}")
        self.base_model = base_model
        self.max_loaded_adapters = max_loaded_adapters
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else "cpu" if device == "auto" else device)
        self.dtype = _DTYPES.get(dtype) or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.shares_weights = model is not None
        if model is None:
            try:
                model = AutoModelForCausalLM.from_pretrained(base_model, dtype=self.dtype)
            except (OSError, ValueError) as exc:
                raise BackendError(f"hf sampler could not load base model {base_model!r} ({exc}); set "
                                   "TINK_BASE_MODEL to a Hugging Face model folder or hub id") from exc
        else:
            weight = next(model.parameters())
            self.device, self.dtype = weight.device, weight.dtype
        self._hf = model.to(self.device).eval().requires_grad_(False)
        config = model.config.get_text_config()
        # EOS ids from both configs: instruct checkpoints often list their end-of-turn token
        # only in generation_config.json (Llama 3's <|eot_id|>), and vLLM stops on it too.
        self._eos = tuple(sorted(_ids(config.eos_token_id) | _ids(getattr(model.generation_config, "eos_token_id", None))))
        self._pad = next((t for t in (config.pad_token_id, *self._eos) if isinstance(t, int)), 0)
        # Then a blank generation config: a checkpoint's other defaults (repetition_penalty,
        # suppressed tokens, ...) must not change what a Tinker client asked for.
        self._hf.generation_config = GenerationConfig()
        self._vocab = int(model.get_input_embeddings().num_embeddings)
        try:  # only stop strings need it; a model folder without one still serves everything else
            self._tokenizer = AutoTokenizer.from_pretrained(base_model)
        except (OSError, ValueError) as exc:
            log.warning("hf sampler: no tokenizer for %s (%s); stop strings will be refused", base_model, exc)
            self._tokenizer = None
        self._peft = None  # the PeftModel, made when the first adapter is loaded
        self._adapters: OrderedDict[str, str] = OrderedDict()  # AdapterRef.name -> PEFT name, LRU first
        self._active: str | None = None
        self._serial = 0
        self._lock = threading.Lock()
        self._closed = False
        log.info("hf sampler: %s on %s/%s", base_model, self.device, self.dtype)

    # ------------------------------------------------------------------ Sampler

    def sample(self, job: SampleJob, sink: TokenSink | None = None) -> SampleResult:
        """`job.num_samples` completions of `job.prompt`; token ids, fp32 logprobs and stop reasons, no padding."""
        params = job.params
        self._check_tokens(job.prompt)
        if job.num_samples < 1:
            raise UserInputError(f"num_samples must be >= 1, got {job.num_samples}", "num_samples")
        _check_params(params)
        check_options(job, self._vocab)
        if params.stop_strings and self._tokenizer is None:
            raise BackendError(f"hf sampler has no tokenizer for {self.base_model}, so it cannot match stop strings; "
                               "add the tokenizer files to the model folder or send stop token ids instead")
        with self._lock:
            self._check_open()
            with self._activated(job.adapter), torch.inference_mode(), self._hooks(job) as hooks:
                try:
                    prompt_answers, cache = self._prefix(job, job.num_samples)
                    decoder = _Decoder(job.num_samples, params, self._stop_ids(params), self._tokenizer, self.device,
                                       sink, topk=job.topk_sample_logprobs)
                    ids = torch.tensor([job.prompt], device=self.device).repeat(job.num_samples, 1)
                    generation = GenerationConfig(max_new_tokens=params.max_tokens, do_sample=False, num_beams=1,
                                                  pad_token_id=self._pad, eos_token_id=None, use_cache=True)
                    self._hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                                      generation_config=generation, logits_processor=LogitsProcessorList([decoder]),
                                      stopping_criteria=StoppingCriteriaList([_Done(decoder)]))
                except torch.OutOfMemoryError as exc:
                    raise BackendError(f"hf sampler ran out of memory sampling {job.num_samples} x "
                                       f"{params.max_tokens} tokens from {self.base_model}; ask for fewer samples "
                                       "or tokens, or set USE_VLLM=true") from exc
                sequences = decoder.sequences()
                if hooks is not None:
                    for seq, values in zip(sequences, hooks.captures([len(s.tokens) for s in sequences])):
                        seq.captures = values
        return SampleResult(sequences=sequences, **prompt_answers)

    def compute_logprobs(self, adapter: AdapterRef | None, tokens: list[int]) -> list[float | None]:
        """[None] + [log p(tokens[t] | tokens[:t]) for t >= 1] under `adapter` (None: the base model), fp32."""
        self._check_tokens(tokens)
        job = SampleJob(tokens, 1, SamplingParams(), adapter, prompt_logprobs=True)
        with self._lock:
            self._check_open()
            with self._activated(adapter), torch.inference_mode():
                return self._prefix(job, 1)[0]["prompt_logprobs"]

    def health(self) -> dict[str, object]:
        return {"live": not self._closed, "backend": self.name, "base_model": self.base_model,
                "device": str(self.device), "loaded_adapters": len(self._adapters),
                "base_weights": "shared with the trainer" if self.shares_weights else "own copy"}

    def loaded_adapters(self) -> list[str]:
        """Names of the adapters in memory, least recently used first (the next to be evicted)."""
        with self._lock:
            return list(self._adapters)

    def close(self) -> None:
        """Free the model (and its adapters); later calls fail with BackendError."""
        with self._lock:
            self._closed = True
            self._hf = self._peft = None
            self._adapters.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError(f"hf sampler for {self.base_model} is closed; restart the worker")

    def _check_tokens(self, tokens: list[int]) -> None:
        if not tokens:
            raise UserInputError("prompt must contain at least one token", "prompt")
        bad = [t for t in tokens if not (isinstance(t, numbers.Integral) and 0 <= t < self._vocab)]
        if bad:
            raise UserInputError(f"token id {bad[0]!r} is outside the vocabulary [0, {self._vocab})", "prompt")

    def _stop_ids(self, params: SamplingParams) -> tuple[int, ...]:
        return tuple(set(params.stop_token_ids) | (set(self._eos) if params.stop_at_eos else set()))

    def _prefix(self, job: SampleJob, copies: int) -> tuple[dict[str, object], object | None]:
        """Run prompt[:-1] once: what the job asks about its prompt, and a KV cache repeated `copies` times.

        `generate` then only feeds the last prompt token, so the prompt is processed once per
        job instead of once per sample, and prompt answers cost no extra forward pass.
        """
        scorer = PromptScorer(job, self.device) if job.scores_prompt else None
        prompt = job.prompt
        if len(prompt) == 1:
            return (scorer.fields() if scorer else {}), None
        ids = torch.tensor([prompt[:-1]], device=self.device)
        out = self._hf(input_ids=ids, use_cache=True, logits_to_keep=0 if scorer else 1)
        if scorer is not None:
            logits = out.logits[0]
            rows = max(1, LOGIT_CHUNK_ELEMENTS // logits.shape[-1])
            for start in range(0, len(logits), rows):
                # fp32 before log_softmax: a bf16 logsumexp over a large vocabulary loses ~0.01 nats.
                scorer.add(start, logits[start:start + rows].float())
        answers = scorer.fields() if scorer else {}
        cache = out.past_key_values
        if copies > 1:
            if not hasattr(cache, "batch_repeat_interleave"):
                return answers, None  # an exotic cache: let generate process the prompt per sample
            cache.batch_repeat_interleave(copies)
        return answers, cache

    def _hooks(self, job: SampleJob) -> AbstractContextManager:
        """The job's capture and steering hooks (`HFHooks`) for the prefix pass and `generate`; else nothing."""
        from .steering import HFHooks

        return HFHooks(self._hf, job.look, len(job.prompt)) if job.look is not None else nullcontext()

    def _activated(self, ref: AdapterRef | None) -> AbstractContextManager:
        """Route forward passes through adapter `ref` only (None: through none), loading it if needed."""
        if ref is None:
            return self._peft.disable_adapter() if self._peft is not None else nullcontext()
        peft_name = self._adapters.get(ref.name)
        if peft_name is None:
            peft_name = self._load(ref)
        self._adapters.move_to_end(ref.name)
        if self._active != peft_name:
            self._peft.set_adapter(peft_name)
            self._active = peft_name
        return nullcontext()

    def _load(self, ref: AdapterRef) -> str:
        """Load `ref` from its PEFT folder, then evict least recently used adapters beyond the limit."""
        from peft import PeftModel

        path = Path(ref.path)
        missing = [f for f in ("adapter_config.json", "adapter_model.safetensors") if not (path / f).is_file()]
        if missing:
            raise UserInputError(f"adapter {ref.name!r} has no {missing[0]} in {path}; save the weights again "
                                 "with save_weights_for_sampler", "model_path")
        # A serial name: PEFT names modules after adapters, so dots, slashes and 'lora_' are unsafe.
        peft_name, self._serial = f"s{self._serial}", self._serial + 1
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self._hf, str(path), adapter_name=peft_name,
                                                       is_trainable=False, torch_device=str(self.device))
            else:
                self._peft.load_adapter(str(path), adapter_name=peft_name, is_trainable=False,
                                        torch_device=str(self.device))
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise BackendError(f"hf sampler could not load adapter {ref.name!r} from {path} onto {self.base_model} "
                               f"({exc}); check that it was trained on this base model") from exc
        self._adapters[ref.name] = peft_name
        # Evict only after the new one is in: PEFT cannot delete the last remaining adapter cleanly.
        while len(self._adapters) > self.max_loaded_adapters:
            _, old = self._adapters.popitem(last=False)
            self._peft.delete_adapter(old)
            self._active = None  # PEFT may have switched the active adapter
        return peft_name


def _ids(value: object) -> set[int]:
    """An `eos_token_id` setting (None, an int or a list) as a set."""
    return set(value) if isinstance(value, (list, tuple)) else {value} if isinstance(value, int) else set()


def _check_params(params: SamplingParams) -> None:
    if params.max_tokens < 1:
        raise UserInputError(f"max_tokens must be >= 1, got {params.max_tokens}", "sampling_params.max_tokens")
    if not params.temperature >= 0:
        raise UserInputError(f"temperature must be >= 0, got {params.temperature}", "sampling_params.temperature")
    if not 0 < params.top_p <= 1:
        raise UserInputError(f"top_p must be in (0, 1], got {params.top_p}", "sampling_params.top_p")
    if params.top_k < -1:
        raise UserInputError(f"top_k must be -1 (off) or >= 1, got {params.top_k}", "sampling_params.top_k")
    if any(not s for s in params.stop_strings):
        raise UserInputError("stop strings must not be empty", "sampling_params.stop")


class _Decoder(LogitsProcessor):
    """Chooses every token of a job (greedy or seeded draw) and records its logprob and stop state.

    Placed as `generate`'s only logits processor with greedy search: it returns scores that are
    -inf everywhere except at the chosen token, so `generate` takes exactly that token.
    """

    def __init__(self, rows: int, params: SamplingParams, stop_ids: tuple[int, ...], tokenizer: object,
                 device: torch.device, sink: TokenSink | None = None, topk: int = 0):
        self.params, self.tokenizer, self.sink, self.topk = params, tokenizer, sink, topk
        self.greedy = params.temperature == 0
        warpers: list[LogitsProcessor] = []
        if not self.greedy:  # HF's own warpers, in HF's order: temperature, top-k, top-p
            if params.temperature != 1:
                warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                warpers.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1:
                warpers.append(TopPLogitsWarper(params.top_p))
        self.warpers = LogitsProcessorList(warpers)
        self.generator = torch.Generator(device=device)
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
        self.generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)  # any int: torch takes only 64 bits
        self.stop_ids = torch.tensor(stop_ids, dtype=torch.long, device=device)
        # A stop string of L characters spans at most 4L byte-level tokens; decoding this many
        # trailing tokens each step finds every new match without re-decoding the whole completion.
        self.window = 4 * max((len(s) for s in params.stop_strings), default=0) + 8
        self.tokens: list[torch.Tensor] = []
        self.logprobs: list[torch.Tensor] = []
        self.topk_logprobs: list[list[TopK]] = []  # per step, per row: `topk_sample_logprobs`
        self.history: list[list[int]] = [[] for _ in range(rows)]  # CPU copy, kept only for stop strings
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.end = torch.full((rows,), params.max_tokens, dtype=torch.long, device=device)
        self.stopped = torch.zeros(rows, dtype=torch.bool, device=device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()  # logprobs in fp32 whatever the model's dtype
        live = ~self.done  # rows still generating before this step's token
        if self.greedy:
            logprobs = torch.log_softmax(scores, dim=-1)
            chosen = scores.argmax(dim=-1)
        else:
            logprobs = torch.log_softmax(self.warpers(input_ids, scores), dim=-1)
            chosen = torch.multinomial(logprobs.exp(), 1, generator=self.generator)[:, 0]
        self.tokens.append(chosen)
        self.logprobs.append(logprobs.gather(-1, chosen[:, None])[:, 0])
        if self.topk:  # of the distribution the token was drawn from, like its own logprob
            self.topk_logprobs.append(top_k(logprobs, self.topk))
        hit = torch.isin(chosen, self.stop_ids) if self.stop_ids.numel() else torch.zeros_like(self.done)
        if self.params.stop_strings:
            hit = hit | self._string_hits(chosen.tolist())
        newly = hit & ~self.done
        step = len(self.tokens)
        self.end = torch.where(newly, step, self.end)
        self.stopped |= newly
        self.done |= newly
        if step >= self.params.max_tokens:
            self.done.fill_(True)
        if self.sink is not None:
            for row, token, logprob in zip(live.nonzero()[:, 0].tolist(), chosen[live].tolist(),
                                           self.logprobs[-1][live].tolist()):
                self.sink(row, [token], [logprob])
        return torch.full_like(scores, float("-inf")).scatter_(-1, chosen[:, None], 0.0)

    def _string_hits(self, chosen: list[int]) -> torch.Tensor:
        done = self.done.tolist()
        hits = []
        for row, token in enumerate(chosen):
            self.history[row].append(token)
            tail = "" if done[row] else self.tokenizer.decode(self.history[row][-self.window:],
                                                              skip_special_tokens=True)
            hits.append(any(s in tail for s in self.params.stop_strings))
        return torch.tensor(hits, device=self.done.device)

    def sequences(self) -> list[SampledSequence]:
        """Each row cut after the token that stopped it (or at max_tokens); steps past that are padding."""
        tokens = torch.stack(self.tokens, dim=1).tolist()
        logprobs = torch.stack(self.logprobs, dim=1).tolist()
        out = []
        for row, (t, lp, end, stopped) in enumerate(zip(tokens, logprobs, self.end.tolist(), self.stopped.tolist())):
            topk = [step[row] for step in self.topk_logprobs[:end]] if self.topk else None
            out.append(SampledSequence(tokens=t[:end], logprobs=lp[:end], stop_reason="stop" if stopped else "length",
                                       topk_logprobs=topk))
        return out


class _Done(StoppingCriteria):
    """Tells `generate` which rows the `_Decoder` has finished (it decides, as it sees each token first)."""

    def __init__(self, decoder: _Decoder):
        self.decoder = decoder

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return self.decoder.done.clone()
