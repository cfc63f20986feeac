"""What a sample request asks about its prompt, computed the same way by every sampler.

Row `r` of every prompt answer is about prompt position `r + 1`, scored with the context
`prompt[:r + 1]` (position 0 has none). A job may ask for:

- `prompt_logprobs`: log p(prompt[r + 1]) for each row;
- `topk_prompt_logprobs=k`: the k most likely tokens of each row;
- `target_prompt_logprobs`: the logprobs of ids the client names per row;
- `prompt_alt_tokens_k=k`: k independent draws per row at the request's temperature.

`prompt_logprobs_last_n` limits the first two to the last N positions. The HF sampler runs
`PromptScorer` over its logits; the vLLM samplers ask one 1-token request per row (teacher forcing)
and put the answers together with `assemble`. Both give the SDK's layout:

    >>> scorer = PromptScorer(job, device="cpu")          # job: a SampleJob
    >>> for start in range(0, rows, chunk):
    ...     scorer.add(start, logits[start:start + chunk])  # fp32 logits of rows start..
    >>> fields = scorer.fields()   # {"prompt_logprobs": [None, ...], "topk_prompt_logprobs": ...}

Numbers. Everything is in fp32 from the raw logits: top-k and target logprobs are the model's
(temperature 1), like `prompt_logprobs`. Alternative draws follow Tink's rule for sampled tokens:
drawn from softmax(logits / T), reported with that distribution's logprob (the model's own at T = 0,
where every draw is the most likely token). Ties in a top-k list go to the lower token id.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .backends import PromptAltTokens, SampleJob, TopK


def first_scored_row(job: SampleJob) -> int:
    """The first row `prompt_logprobs` and `topk_prompt_logprobs` answer (`prompt_logprobs_last_n`)."""
    rows = len(job.prompt) - 1
    return rows - job.prompt_logprobs_last_n if job.prompt_logprobs_last_n else 0


def target_rows(job: SampleJob) -> list[int]:
    """Rows of `target_prompt_logprobs` that name at least one id (the others are not scored)."""
    if job.target_prompt_logprobs is None:
        return []
    return np.flatnonzero((job.target_prompt_logprobs.ids >= 0).any(axis=1)).tolist()


def target_ids(job: SampleJob) -> list[int]:
    """Every distinct id `target_prompt_logprobs` names, ascending."""
    if job.target_prompt_logprobs is None:
        return []
    ids = job.target_prompt_logprobs.ids
    return np.unique(ids[ids >= 0]).tolist()


def alt_seed(seed: int | None, row: int) -> int | None:
    """The seed of one row's draws: distinct per row (else every row reuses the same noise), None stays None."""
    return None if seed is None else (seed * 1_000_003 + row + 1) & 0x7FFF_FFFF_FFFF_FFFF


def top_entries(logprobs: Mapping[int, float], k: int) -> TopK:
    """The `k` best of a {token id: logprob} map, most likely first, ties by token id; -inf / NaN left out."""
    finite = [(int(t), float(lp)) for t, lp in logprobs.items() if math.isfinite(lp)]
    return sorted(finite, key=lambda e: (-e[1], e[0]))[:k]


def top_k(scores: torch.Tensor, k: int, offset: torch.Tensor | None = None) -> list[TopK]:
    """Each row's `k` best tokens by `scores` ([rows, V]), as (id, score - offset) pairs, ties by token id.

    `offset` ([rows]) turns logits into logprobs (their logsumexp) without materialising a
    log_softmax. A tie across the k-th place is resolved exactly (rare: that row is re-sorted).
    """
    k = min(k, scores.shape[-1])
    width = min(k + 1, scores.shape[-1])
    values, ids = scores.topk(width, dim=-1)
    shift = torch.zeros(len(scores), device=scores.device) if offset is None else offset
    rows: list[TopK] = []
    for r, (row_values, row_ids) in enumerate(zip(values.tolist(), ids.tolist())):
        if width > k and math.isfinite(row_values[k - 1]) and row_values[k - 1] == row_values[k]:  # lowest ids win
            tied = torch.nonzero(scores[r] == row_values[k - 1])[:, 0].tolist()
            above = [t for t, v in zip(row_ids, row_values) if v > row_values[k - 1]]
            row_ids = above + tied[:k - len(above)]
            row_values = scores[r, row_ids].tolist()
        base = float(shift[r])
        rows.append(top_entries({t: v - base for t, v in zip(row_ids[:k], row_values[:k])}, k))
    return rows


class PromptScorer:
    """Collects a job's prompt answers from its logits, a chunk of rows at a time (the HF sampler's path).

    `add` must see every row once, in order, as fp32 logits of the rows' next-token distributions.
    """

    def __init__(self, job: SampleJob, device: torch.device | str):
        self.job = job
        self.rows = len(job.prompt) - 1
        self.first = first_scored_row(job)
        self.targets = torch.tensor(np.asarray(job.prompt[1:]), dtype=torch.long, device=device)
        self.logprobs: list[float] = []
        self.topk: list[TopK] = []
        self.target_values: list[torch.Tensor] = []
        self.alt_tokens: list[torch.Tensor] = []
        self.alt_logprobs: list[torch.Tensor] = []
        self.generator: torch.Generator | None = None
        if job.prompt_alt_tokens_k and job.params.temperature > 0:
            self.generator = torch.Generator(device=device)
            seed = alt_seed(job.params.seed, 0)
            self.generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)

    def add(self, start: int, logits: torch.Tensor) -> None:
        """Score rows `start .. start + len(logits)` from their fp32 logits."""
        job, end = self.job, start + len(logits)
        lse = logits.logsumexp(-1)
        if job.prompt_logprobs:
            picked = logits.gather(-1, self.targets[start:end, None])[:, 0]
            self.logprobs.extend((picked - lse).tolist())
        if job.topk_prompt_logprobs and end > self.first:
            skip = max(self.first - start, 0)  # rows before prompt_logprobs_last_n are not asked for
            self.topk.extend(top_k(logits[skip:], job.topk_prompt_logprobs, lse[skip:]))
        if job.target_prompt_logprobs is not None:
            ids = torch.as_tensor(job.target_prompt_logprobs.ids[start:end], device=logits.device)
            values = logits.gather(-1, ids.clamp(min=0)) - lse[:, None]
            self.target_values.append(torch.where(ids >= 0, values, torch.zeros_like(values)))
        if job.prompt_alt_tokens_k:
            self._draw(logits, lse)

    def _draw(self, logits: torch.Tensor, lse: torch.Tensor) -> None:
        k, temperature = self.job.prompt_alt_tokens_k, self.job.params.temperature
        if temperature == 0:  # greedy: every draw is the most likely token, with the model's logprob
            best = logits.argmax(-1, keepdim=True)
            tokens = best.expand(-1, k)
            logprobs = (logits.gather(-1, best) - lse[:, None]).expand(-1, k)
        else:
            tempered = torch.log_softmax(logits / temperature, dim=-1)
            tokens = torch.multinomial(tempered.exp(), k, replacement=True, generator=self.generator)
            logprobs = tempered.gather(-1, tokens)
        self.alt_tokens.append(tokens.cpu())
        self.alt_logprobs.append(logprobs.cpu())

    def fields(self) -> dict[str, Any]:
        """The answers as `SampleResult` keyword arguments (only those the job asked for)."""
        job, out = self.job, {}
        if job.prompt_logprobs:
            out["prompt_logprobs"] = [None, *self.logprobs]
        if job.topk_prompt_logprobs:
            out["topk_prompt_logprobs"] = [None] * (1 + self.first) + self.topk
        if job.target_prompt_logprobs is not None:
            shape = job.target_prompt_logprobs.ids.shape
            values = torch.cat(self.target_values).cpu() if self.target_values else torch.zeros(shape)
            out["target_prompt_logprobs"] = values.numpy().astype(np.float32)
        if job.prompt_alt_tokens_k:
            k = job.prompt_alt_tokens_k
            tokens = torch.cat(self.alt_tokens) if self.alt_tokens else torch.zeros(0, k, dtype=torch.long)
            logprobs = torch.cat(self.alt_logprobs) if self.alt_logprobs else torch.zeros(0, k)
            out["prompt_alt_tokens"] = PromptAltTokens(tokens.numpy().astype(np.int64),
                                                       logprobs.numpy().astype(np.float32))
        return out


def assemble(job: SampleJob, logprobs: Mapping[int, float] | None = None,
             topk: Mapping[int, TopK] | None = None, targets: Mapping[int, Mapping[int, float]] | None = None,
             alternatives: Mapping[int, list[tuple[int, float]]] | None = None) -> dict[str, Any]:
    """`SampleResult` keyword arguments from per-row answers (row -> value), as the vLLM samplers get them.

    `targets[row]` maps each id asked at that row to its logprob; `alternatives[row]` holds the k draws.
    """
    rows, out = len(job.prompt) - 1, {}
    if job.prompt_logprobs:
        first = first_scored_row(job)
        out["prompt_logprobs"] = [None] * (1 + first) + [logprobs[r] for r in range(first, rows)]
    if job.topk_prompt_logprobs:
        first = first_scored_row(job)
        out["topk_prompt_logprobs"] = [None] * (1 + first) + [topk[r] for r in range(first, rows)]
    if job.target_prompt_logprobs is not None:
        ids = job.target_prompt_logprobs.ids
        values = np.zeros(ids.shape, dtype=np.float32)
        for r in target_rows(job):
            values[r] = [targets[r][int(t)] if t >= 0 else 0.0 for t in ids[r]]
        out["target_prompt_logprobs"] = values
    if job.prompt_alt_tokens_k:
        draws = [alternatives[r] for r in range(rows)]
        shape = (rows, job.prompt_alt_tokens_k)
        out["prompt_alt_tokens"] = PromptAltTokens(
            np.array([[t for t, _ in row] for row in draws], dtype=np.int64).reshape(shape),
            np.array([[lp for _, lp in row] for row in draws], dtype=np.float32).reshape(shape))
    return out
