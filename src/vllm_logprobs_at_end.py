"""Sampled-token logprobs sent from vLLM's EngineCore once per request, when it ends, not once per step.

vLLM's scheduler hands each request's logprobs of every step to the front end as their own three small
numpy arrays (`LogprobsLists.slice_request`), which the EngineCore encodes and the front end decodes one by
one. With 512 sequences in flight that is ~1,500 arrays a step; on an H100 at the 0.5B shape the front end
(Tink's worker process) spent two thirds of a sampling pass decoding them (py-spy,
bench/results/sampling_0.5b_run5.txt), and `LLM.generate` asked for the same logprobs ran at 0.66x of
itself without them, Tink at 1.00x of it.

A request that only wants its final output (`RequestOutputKind.FINAL_ONLY`) needs its logprobs only then.
For requests Tink marks (`SamplingParams.extra_args[EXTRA_KEY]`: final output only, no stop strings, which
the front end would apply mid-stream), this patch wraps the EngineCore's `Scheduler`: `add_request` notes
the marked ones, and `update_from_output` keeps their steps' slices and sends them with each one's last
output, joined into one `LogprobsLists` of as many positions as tokens (the shape speculative decoding
already sends). The front end's `LogprobsProcessor` appends positions in order whatever their count, so
the final RequestOutput is the same. Unmarked requests (a user's own `vllm serve` with the plugin
installed, `LLM.generate`) are left as they are. Installed in every vLLM process by src/vllm_plugin.py;
any surprise turns it off, logged: later requests get per-step logprobs again, the ones already marked are
still held and joined at their end. A request whose own join failed goes out with its last step's logprobs
only, short of its tokens (Tink's sampler then fails that request, naming both counts: vllm_backend.sampled_logprobs).

The front end's half. vLLM's `LogprobsProcessor` takes a multi-position output one position at a time in
Python (`.tolist()` of each row, `append_logprobs_for_next_position`): for a pass whose 512 requests end
together that is 131k positions on the worker's event-loop thread, ~0.2 s in which no result goes out (py-spy,
bench/results/pyspy_inprocess_0.5b_run8.txt). `patch_logprobs_processor` gives outputs of several positions
a bulk path into the request's `FlatLogprobs` (whole-column `.tolist()` and list `extend`), the same entries
in the same order and the same running `cumulative_logprob`; a single position, dict-style logprobs, a
tokenizer to decode with, or anything it does not expect take vLLM's own path.
"""

from __future__ import annotations

import functools
import logging
import operator
from types import ModuleType
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SCHEDULER_MODULE = "vllm.v1.core.sched.scheduler"  # AsyncScheduler inherits both methods patched
FRONT_END_MODULE = "vllm.v1.engine.logprobs"  # LogprobsProcessor, in the process that owns the AsyncLLM
EXTRA_KEY = "tink_logprobs_at_end"
_PATCHED = "_tink_logprobs_at_end"
_MARKED = "_tink_logprobs_marked"  # on each scheduler: ids of the live requests to hold back
_HELD = "_tink_held_logprobs"  # on each scheduler: request id -> its earlier steps' LogprobsLists
_disabled = False


def patch_scheduler(module: ModuleType, _targets: tuple[str, ...] = ()) -> None:
    """Marks a request as the scheduler takes it (once per request, not per step); while no live request is
    marked, a step costs one dict lookup."""
    scheduler = getattr(module, "Scheduler", None)
    add, update = getattr(scheduler, "add_request", None), getattr(scheduler, "update_from_output", None)
    if add is None or update is None or getattr(scheduler, _PATCHED, False):
        return

    def add_request(self: Any, request: Any, *args: Any, **kwargs: Any):
        out = add(self, request, *args, **kwargs)
        extra = getattr(getattr(request, "sampling_params", None), "extra_args", None)
        if extra and extra.get(EXTRA_KEY) and not _disabled:
            self.__dict__.setdefault(_MARKED, set()).add(request.request_id)
        return out

    def update_from_output(self: Any, *args: Any, **kwargs: Any):
        outputs = update(self, *args, **kwargs)
        if self.__dict__.get(_MARKED):
            try:
                hold_back(self, outputs)
            except Exception:  # never take the engine down for a transport shortcut
                _disable(self)
        return outputs

    scheduler.add_request, scheduler.update_from_output = add_request, update_from_output
    setattr(scheduler, _PATCHED, True)


def hold_back(scheduler: Any, outputs: dict[int, Any]) -> None:
    """Move marked requests' per-step logprobs from `outputs` into the scheduler, and back out, all of them
    at once, into each such request's last output."""
    marked: set[str] = scheduler.__dict__[_MARKED]
    held: dict[str, tuple[list, list, list]] = scheduler.__dict__.setdefault(_HELD, {})
    for batch in outputs.values():
        for out in batch.outputs:
            request_id, step = out.request_id, out.new_logprobs
            if request_id not in marked or step is None:
                continue
            if out.finish_reason is None:
                # The step's arrays themselves, no copy: vLLM 0.26 and 0.32 put each step's logprobs in host
                # arrays of their own (a fresh `.to("cpu")` on GPU, the sampler's new tensors on CPU). Arrays,
                # not the step's LogprobsLists: numpy arrays are not tracked by Python's garbage collector and
                # tuples are (131k alive in a pass of 512 x 256: 0.53 s -> 0.36 s of this side's time on the
                # CI CPU, bench/results/logprob_transport_cpu_run8.txt).
                columns = held.get(request_id)
                if columns is None:
                    columns = held[request_id] = ([], [], [])
                columns[0].append(step.logprob_token_ids)
                columns[1].append(step.logprobs)
                columns[2].append(step.sampled_token_ranks)
                out.new_logprobs = None
                continue
            marked.discard(request_id)
            earlier = held.pop(request_id, None)
            if earlier:
                out.new_logprobs = _joined(earlier, step)
    for request_id in [r for r in marked if r not in scheduler.requests]:  # aborted: no last output will come
        marked.discard(request_id)
        held.pop(request_id, None)


def _joined(earlier: tuple[list, list, list], last: Any) -> Any:
    """One LogprobsLists of every step's positions, in order: the held steps' arrays (token ids, logprobs,
    ranks) and the `last` step's LogprobsLists.

    A step's arrays are as wide as the most top-k logprobs any request of that step's batch asked for, so a
    request's steps differ in width when the batch around it changes. The front end reads a position's
    sampled token and the request's own top-k only (`append_logprobs_for_next_position` zips them with
    1 + num_logprobs ranks), which every step holds: each step is cut to the narrowest one."""
    ids = [*earlier[0], last.logprob_token_ids]
    logprobs = [*earlier[1], last.logprobs]
    width = last.logprobs.shape[1]
    if any(step.shape[1] != width for step in logprobs):  # rare: the batch's widest top-k changed meanwhile
        width = min(step.shape[1] for step in logprobs)
        ids, logprobs = [step[:, :width] for step in ids], [step[:, :width] for step in logprobs]
    return type(last)(np.concatenate(ids), np.concatenate(logprobs),
                      np.concatenate([*earlier[2], last.sampled_token_ranks]), None)


def patch_logprobs_processor(module: ModuleType, _targets: tuple[str, ...] = ()) -> None:
    """Outputs of several positions (each marked request's last one) go into its FlatLogprobs in bulk."""
    processor = getattr(module, "LogprobsProcessor", None)
    flat_class = getattr(module, "FlatLogprobs", None)
    update = getattr(processor, "_update_sample_logprobs", None)
    if update is None or flat_class is None or getattr(processor, _PATCHED, False):
        return

    def _update_sample_logprobs(self: Any, logprobs_lists: Any) -> None:
        if self.tokenizer is None and type(self.logprobs) is flat_class:
            try:
                if bulk_append(self, logprobs_lists):
                    return
            except Exception:  # a shortcut never fails a request: vLLM's loop takes what surprised it
                log.exception("tink vllm plugin: taking joined logprobs in bulk failed; vLLM's loop takes them")
        update(self, logprobs_lists)

    _update_sample_logprobs.vllm_original = update  # vLLM's own loop, for the benchmark's side-by-side
    processor._update_sample_logprobs = _update_sample_logprobs
    setattr(processor, _PATCHED, True)


def bulk_append(processor: Any, logprobs_lists: Any) -> bool:
    """What vLLM's per-position loop appends for `logprobs_lists`, in one go; False (nothing changed) where that
    loop would do something else: one position, a spec-decode layout, or arrays not shaped as expected.
    Everything is computed before the first list grows, so a failure leaves the request's logprobs as they were."""
    token_ids, logprobs, ranks, cu_num_generated = logprobs_lists
    num_logprobs = processor.num_logprobs
    if (cu_num_generated is not None or not isinstance(num_logprobs, int) or num_logprobs < 0
            or getattr(logprobs, "ndim", 0) != 2 or len(logprobs) < 2
            or token_ids.shape != logprobs.shape or ranks.shape != (len(logprobs),)):
        return False
    positions = len(logprobs)
    per_position = min(logprobs.shape[1], 1 + num_logprobs)  # the sampled token, then the top-k
    sampled = logprobs[:, 0].tolist()
    entry_ids = token_ids[:, :per_position].ravel().tolist()
    entry_logprobs = logprobs[:, :per_position].ravel().tolist()
    rank_columns = np.empty((positions, per_position), dtype=np.int64)
    rank_columns[:, 0] = ranks
    rank_columns[:, 1:] = np.arange(1, per_position)  # vLLM's top-k ranks: 1..k
    entry_ranks = rank_columns.ravel().tolist()
    flat = processor.logprobs
    start = len(flat.logprobs)
    flat.start_indices.extend(range(start, start + positions * per_position, per_position))
    flat.end_indices.extend(range(start + per_position, start + (positions + 1) * per_position, per_position))
    flat.token_ids.extend(entry_ids)
    flat.logprobs.extend(entry_logprobs)
    flat.ranks.extend(entry_ranks)
    flat.decoded_tokens.extend([None] * len(entry_ids))
    # one float at a time, in order, as vLLM's loop adds them (the built-in sum() compensates: other bits)
    processor.cumulative_logprob = functools.reduce(operator.add, sampled, processor.cumulative_logprob)
    return True


def _disable(scheduler: Any) -> None:
    """No new request is marked in this process. After the first failure the requests already marked are still
    held and joined at their end (the one being joined when it failed has lost its earlier positions); after a
    second, they are dropped (their final outputs then lack the held positions) rather than the engine stopping."""
    global _disabled
    if _disabled:
        scheduler.__dict__.pop(_MARKED, None)
        scheduler.__dict__.pop(_HELD, None)
    _disabled = True
    log.exception("tink vllm plugin: sending logprobs at the end of each request turned off")
