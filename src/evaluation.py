"""Evaluation on the sampler and the trainer side by side: sliding-window perplexity and the
train-inference logprob gap that RL users watch (|Δ logprob| of the same tokens, sampler vs trainer).

    perplexity(sampler, tokens, context_length=512, stride=256, adapter=ref)     # through vLLM / HF
    perplexity(trainer_logprobs(trainer, model_id), tokens, 512, 256)            # through the trainer
    logprob_gap(sampled_logprobs, trainer_logprobs_of_the_same_tokens)           # {"mean", "max"}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .backends import AdapterRef, UserInputError

LogprobFn = Callable[[list[int]], Sequence[float | None]]


def perplexity(logprob_fn: Callable[[list[int]], Sequence[float | None]] | Any, tokens: Sequence[int],
               context_length: int, stride: int, adapter: AdapterRef | None = None) -> float:
    """Sliding-window perplexity of `tokens`, as in HF's "Perplexity of fixed-length models".

    Windows of at most `context_length` tokens start every `stride` tokens; each window scores only
    the tokens the previous window did not (at least one token of context always precedes a scored
    token), so every token after the first is scored exactly once. `logprob_fn(window)` returns
    [None, logp(window[1] | window[:1]), ...]; a sampler with `compute_logprobs(adapter, tokens)`
    (`HFSampler`, `VLLMEngineSampler`, `VLLMServerSampler`) may be passed instead. Returns
    exp(mean negative logprob) in float64.
    """
    if context_length < 2:
        raise UserInputError(f"context_length must be >= 2, got {context_length}", "context_length")
    if not 1 <= stride <= context_length:
        raise UserInputError(f"stride must be in [1, context_length], got {stride}", "stride")
    if len(tokens) < 2:
        raise UserInputError("perplexity needs at least two tokens", "tokens")
    if hasattr(logprob_fn, "compute_logprobs"):
        sampler = logprob_fn
        logprob_fn = lambda window: sampler.compute_logprobs(adapter, window)  # noqa: E731
    total, count, scored_to = 0.0, 0, 1  # tokens[:scored_to] are already scored (token 0 never is)
    for begin in range(0, len(tokens), stride):
        end = min(begin + context_length, len(tokens))
        logprobs = logprob_fn(list(tokens[begin:end]))
        for pos in range(max(scored_to, begin + 1), end):
            total -= float(logprobs[pos - begin])
            count += 1
        scored_to = end
        if end == len(tokens):
            break
    return math.exp(total / count)



def trainer_logprobs(trainer: Any, model_id: str | None) -> LogprobFn:
    """`logprob_fn` over a trainer's `compute_logprobs`, in the samplers' [None, lp1, ...] layout."""

    def logprob_fn(window: list[int]) -> list[float | None]:
        return [None, *np.asarray(trainer.compute_logprobs(model_id, window), dtype=np.float64).tolist()]

    return logprob_fn


def logprob_gap(sampled: Sequence[float], reference: Sequence[float]) -> dict[str, float]:
    """Mean and max |sampled - reference| over the tokens both scored (the RL train-inference mismatch)."""
    a = np.asarray(sampled, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{a.shape} sampled logprobs vs {b.shape} reference logprobs")
    if a.size == 0:
        return {"mean_abs": 0.0, "max_abs": 0.0, "tokens": 0}
    diff = np.abs(a - b)
    return {"mean_abs": float(diff.mean()), "max_abs": float(diff.max()), "tokens": int(a.size)}
