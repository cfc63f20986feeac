"""Keeps vLLM from batching the two kinds of logprob requests that it answers wrongly together.

vLLM 0.32's sampler decides per *batch* which logprobs to return: as soon as one request in the
batch carries `logprob_token_ids`, every request gets only the logprobs of its own ids (and of its
sampled token), so a request asking the top-k (`logprobs=k > 0`) silently gets its sampled token alone
(`Sampler.forward`: "If we have both num_logprobs and logprob_token_ids, prefer logprob_token_ids").
Tink sends both kinds: ids for prompt logprobs and `target_prompt_logprobs` (teacher forcing), top-k
for `topk_prompt_logprobs` and `topk_sample_logprobs`. A gate lets requests of one kind reach the
engine together while the other kind waits; requests asking neither (plain sampling, `logprobs=0`)
are fine with both and pass freely. Turns alternate: while one kind waits, the other admits no newcomers.

    gate = AsyncLogprobGate()                     # one per engine, used on its event loop
    async with gate.admit(request_kind(kwargs)):  # "ids", "topk" or None
        ... submit the request and await its output ...

`LogprobGate` is the same for threads (the HTTP samplers). It can only order this worker's own
requests: other clients of a shared vLLM server may still mix the two kinds in its batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

_OTHER = {"ids": "topk", "topk": "ids"}


def request_kind(kwargs: dict[str, Any]) -> str | None:
    """"ids" for a request with `logprob_token_ids`, "topk" for one asking `logprobs` > 0, None otherwise."""
    if kwargs.get("logprob_token_ids"):
        return "ids"
    return "topk" if (kwargs.get("logprobs") or 0) > 0 else None


class _Turns:
    """The bookkeeping both gates share: which kind holds the engine, how many of it, who waits."""

    def __init__(self) -> None:
        self.active: str | None = None  # the kind in the engine now
        self.last: str | None = None  # the kind whose turn ended last
        self.running = 0
        self.waiting = {"ids": 0, "topk": 0}

    def may_enter(self, kind: str) -> bool:
        other_waits = self.waiting[_OTHER[kind]] > 0
        if self.running == 0:
            return not (other_waits and self.last == kind)  # after a turn, the other kind goes first
        return self.active == kind and not other_waits

    def enter(self, kind: str) -> None:
        self.active, self.running = kind, self.running + 1

    def leave(self) -> None:
        self.running -= 1
        if self.running == 0:
            self.active, self.last = None, self.active


class AsyncLogprobGate:
    """The gate for coroutines on one event loop (the in-process engine's)."""

    def __init__(self) -> None:
        self._turns = _Turns()
        self._changed: asyncio.Condition | None = None  # made on the loop that uses it

    @contextlib.asynccontextmanager
    async def admit(self, kind: str | None) -> AsyncIterator[None]:
        if kind is None:
            yield
            return
        if self._changed is None:
            self._changed = asyncio.Condition()
        turns = self._turns
        async with self._changed:
            turns.waiting[kind] += 1
            try:
                await self._changed.wait_for(lambda: turns.may_enter(kind))
            finally:
                turns.waiting[kind] -= 1
            turns.enter(kind)
        try:
            yield
        finally:
            async with self._changed:
                turns.leave()
                self._changed.notify_all()


class LogprobGate:
    """The gate for threads (the HTTP samplers, called from many worker threads)."""

    def __init__(self) -> None:
        self._turns = _Turns()
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def admit(self, kind: str | None) -> Iterator[None]:
        if kind is None:
            yield
            return
        turns = self._turns
        with self._changed:
            turns.waiting[kind] += 1
            try:
                self._changed.wait_for(lambda: turns.may_enter(kind))
            finally:
                turns.waiting[kind] -= 1
            turns.enter(kind)
        try:
            yield
        finally:
            with self._changed:
                turns.leave()
                self._changed.notify_all()
