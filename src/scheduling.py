"""Runs accepted operations asynchronously, in order per model, fairly across models.

Every operation becomes a durable future (see `store.py`) *before* its id is returned.
Training operations go to per-model FIFO queues served by one thread in round-robin over
models: one model's operations never reorder, and a model with a long queue cannot starve
the others. Sampling operations go to a thread pool, so a sampler with its own batching
(vLLM) sees many requests at once.

An operation that has not started yet can be cancelled (`cancel`): it never runs. One that
has started is never interrupted: it finishes and its result is kept.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from .backends import BackendError, UserInputError
from .store import FutureRecord, Store

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What an operation produced: `kind` is `json` or `proto:<MessageName>`."""

    kind: str
    payload: bytes


Operation = Callable[[], Outcome]


@dataclass(frozen=True)
class Joinable:
    """Lets a training operation share one backend pass with other models' (TINK_BATCH_ADAPTERS).

    When such an operation reaches the head of its model's queue, the heads of other models'
    queues with the same `kind` join it, up to `max_members` operations and while the joined pass's
    padded size (its longest sequence x all its sequences) stays within `token_limit(longest)`,
    asked then (the trainer's micro-batch budget moves with free memory). `run_together` gets all
    their `request`s at once: it returns one Outcome, or the exception that fails that operation
    alone, per request, in order.
    """

    kind: str
    rows: int  # sequences
    longest: int  # tokens of the longest sequence
    request: object
    run_together: Callable[[list[object]], list[Outcome | BaseException]]
    max_members: int
    token_limit: Callable[[int], int]


@dataclass(frozen=True)
class _Queued:
    request_id: str
    what: str
    operation: Operation
    joinable: Joinable | None


class OperationObserver(Protocol):
    """Told when operations start and end (the worker's metrics, `src/metrics.py`)."""

    def operation_started(self, operation: str, waited_s: float) -> None: ...

    def operation_finished(self, operation: str, status: str, seconds: float) -> None: ...


@dataclass(frozen=True)
class QueueDepths:
    """Operations accepted and not started (per queue), and running, at one instant."""

    training: int
    sampling: int
    training_models: int  # models with training operations waiting
    longest_training_queue: int
    running: int


class Scheduler:
    def __init__(self, store: Store, sampling_threads: int = 16, observer: OperationObserver | None = None):
        self._store = store
        self._observer = observer
        # request id -> (operation, monotonic time accepted, is training), until it finishes (guarded by _cond)
        self._accepted: dict[str, tuple[str, float, bool]] = {}
        self._cond = threading.Condition()
        self._queues: dict[str, deque[_Queued]] = {}
        self._ready: deque[str] = deque()  # models with queued work, in round-robin order
        self._done_events: dict[str, threading.Event] = {}
        self._waiting: set[str] = set()  # accepted, not started, not cancelled (guarded by _cond)
        # Bumped on every finished future: retrieve_futures long-polls on it (see wait_for_completion).
        self._completions = threading.Condition()
        self._completion_count = 0
        self._stopping = False
        self._sampling = ThreadPoolExecutor(max_workers=sampling_threads, thread_name_prefix="tink-sample")
        self._trainer_thread = threading.Thread(target=self._train_loop, name="tink-train", daemon=True)
        self._trainer_thread.start()

    # ------------------------------------------------------------------ submission

    def submit_training(self, op_name: str, model_id: str, owner: str, operation: Operation,
                        joinable: Joinable | None = None) -> str:
        """Queue `operation` behind every earlier one for `model_id`; return its request id. With
        `joinable`, it may run in one pass with other models' operations (never with its own model's)."""
        request_id = self._accept(op_name, model_id, owner)
        with self._cond:
            queue = self._queues.setdefault(model_id, deque())
            if not queue:
                self._ready.append(model_id)
            queue.append(_Queued(request_id, f"{op_name} on model {model_id}", operation, joinable))
            self._cond.notify()
        return request_id

    def submit_sampling(
        self, op_name: str, owner: str, operation: Operation,
        sampling_session_id: str | None = None, sampler_clone: int = 0,
    ) -> str:
        """Hand `operation` to the sampling pool; with a sampling session, its `retrieve_futures`
        reports it (to the SDK client numbered `sampler_clone`)."""
        request_id = self._accept(op_name, None, owner, sampling_session_id, sampler_clone)
        self._sampling.submit(self._run, request_id, op_name, operation)
        return request_id

    def _accept(
        self, op_name: str, model_id: str | None, owner: str,
        sampling_session_id: str | None = None, sampler_clone: int | None = None,
    ) -> str:
        request_id = f"{op_name}-{uuid.uuid4().hex}"
        with self._cond:
            if self._stopping:
                raise BackendError("the worker is shutting down and accepts no new operations")
            self._done_events[request_id] = threading.Event()
            self._waiting.add(request_id)
            self._accepted[request_id] = (op_name, time.monotonic(), model_id is not None)
        # Durable before acknowledged.
        self._store.add_future(request_id, op_name, model_id, owner, sampling_session_id, sampler_clone)
        return request_id

    # ------------------------------------------------------------------ cancellation

    def cancel(self, request_id: str) -> bool:
        """Cancel an operation that has not started: it never runs, and its future fails as cancelled
        (category `user`). False when it has started or finished (it is not interrupted)."""
        with self._cond:
            if request_id not in self._waiting:
                return False
            self._waiting.discard(request_id)
            self._drop_queued(request_id)
        self._count_finished(request_id, "cancelled")
        self._store.cancel_future(request_id, CANCEL_REASON)
        self._finished(request_id, "cancelled")
        return True

    def _drop_queued(self, request_id: str) -> None:
        """Take a training operation out of its model's queue (caller holds `_cond`). A sampling
        operation stays in the pool, whose thread skips it (`_claim`)."""
        for model_id, queue in self._queues.items():
            kept = deque(entry for entry in queue if entry.request_id != request_id)
            if len(kept) == len(queue):
                continue
            if kept:
                self._queues[model_id] = kept
            else:
                del self._queues[model_id]
                self._ready.remove(model_id)
            return

    # ------------------------------------------------------------------ results

    def wait(self, request_id: str, timeout: float) -> FutureRecord | None:
        """The future's record once finished, or as it stands after `timeout` seconds."""
        event = self._done_events.get(request_id)
        if event is not None:
            event.wait(timeout)
        return self._store.get_future(request_id)

    def completion_count(self) -> int:
        """How many futures have finished in this process (compare with `wait_for_completion`)."""
        with self._completions:
            return self._completion_count

    def wait_for_completion(self, seen: int, timeout: float) -> None:
        """Block until some future finishes after `completion_count()` returned `seen`, or `timeout`."""
        with self._completions:
            self._completions.wait_for(lambda: self._completion_count != seen, timeout)

    def queue_depths(self) -> QueueDepths:
        """How many operations wait in each queue and how many run, now (read by /metrics). Waiting is every
        accepted operation not started yet, one the training thread has taken off its queue but not yet
        claimed included: counted by queue lengths, it would be neither waiting nor running for that moment."""
        with self._cond:
            lengths = [len(queue) for queue in self._queues.values()]
            waiting_training = sum(1 for rid in self._waiting if self._accepted.get(rid, ("", 0.0, True))[2])
            return QueueDepths(training=waiting_training, sampling=len(self._waiting) - waiting_training,
                               training_models=len(lengths), longest_training_queue=max(lengths, default=0),
                               running=len(self._accepted) - len(self._waiting))

    def _count_finished(self, request_id: str, status: str) -> None:
        """Tell the observer once (later calls do nothing). Called before the store shows the outcome,
        so a client that has read its result also finds the operation in /metrics; and told before the
        operation leaves `queue_depths`' running count, in one step, so that no moment shows it neither
        running nor counted (a client waiting for nothing in flight then reads complete counters)."""
        with self._cond:
            accepted = self._accepted.get(request_id)
            if accepted is None:
                return
            if self._observer is not None:
                self._observer.operation_finished(accepted[0], status, time.monotonic() - accepted[1])
            del self._accepted[request_id]

    def _finished(self, request_id: str, status: str) -> None:
        self._count_finished(request_id, status)
        event = self._done_events.pop(request_id, None)
        if event is not None:
            event.set()
        with self._completions:
            self._completion_count += 1
            self._completions.notify_all()

    # ------------------------------------------------------------------ execution

    def _train_loop(self) -> None:
        while True:
            with self._cond:
                while not self._ready and not self._stopping:
                    self._cond.wait()
                if not self._ready:
                    return  # stopping and drained
                model_id = self._ready.popleft()
                head = self._queues[model_id][0]
                served = [model_id, *self._joiners(head.joinable, model_id)]
                entries = []
                for served_id in served:  # each served model goes to the back of the round-robin
                    entries.append(self._queues[served_id].popleft())
                    if self._queues[served_id]:
                        self._ready.append(served_id)
                    else:
                        del self._queues[served_id]
            if len(entries) == 1:
                self._run(head.request_id, head.what, head.operation)
            else:
                self._run_joined(entries)

    def _joiners(self, joinable: Joinable | None, model_id: str) -> list[str]:
        """Models (in round-robin order, taken out of it) whose head operation joins `model_id`'s
        (caller holds `_cond`). Only heads join: no model's operations reorder."""
        if joinable is None:
            return []
        joined, rows, longest = [], joinable.rows, joinable.longest
        for other in list(self._ready):
            if len(joined) + 1 >= joinable.max_members:
                break
            candidate = self._queues[other][0].joinable
            if other == model_id or candidate is None or candidate.kind != joinable.kind:
                continue
            grown = joined_shape(rows, longest, candidate.rows, candidate.longest, joinable.token_limit)
            if grown is None:
                continue
            joined.append(other)
            rows, longest = grown
            self._ready.remove(other)
        return joined

    def _run_joined(self, entries: list[_Queued]) -> None:
        """Run joinable operations as one backend pass; each future gets its own result or error (the
        backend reruns members alone when their joined pass fails: see `Joinable`)."""
        claimed = [entry for entry in entries if self._claim(entry.request_id)]
        if len(claimed) <= 1:
            for entry in claimed:
                self._settle(entry.request_id, entry.what, entry.operation)
            return
        for entry in claimed:
            self._store.mark_running(entry.request_id)
        try:
            results = claimed[0].joinable.run_together([entry.joinable.request for entry in claimed])
            if len(results) != len(claimed):
                raise RuntimeError(f"a joined pass gave {len(results)} results for {len(claimed)} operations")
        # Not run again alone: part of it may have been applied. Each future fails with the cause.
        except BaseException as exc:
            results = [exc] * len(claimed)
        for entry, result in zip(claimed, results):
            self._settle(entry.request_id, entry.what, functools.partial(_outcome_of, result), marked_running=True)

    def _claim(self, request_id: str) -> bool:
        """Move a waiting operation to running; False if it was cancelled meanwhile."""
        with self._cond:
            if request_id not in self._waiting:
                return False
            self._waiting.discard(request_id)
            accepted = self._accepted.get(request_id)
        if accepted is not None and self._observer is not None:
            self._observer.operation_started(accepted[0], time.monotonic() - accepted[1])
        return True

    def _run(self, request_id: str, what: str, operation: Operation) -> None:
        if not self._claim(request_id):
            return  # cancelled before it started; `cancel` answered its future
        self._settle(request_id, what, operation)

    def _settle(self, request_id: str, what: str, operation: Operation, marked_running: bool = False) -> None:
        """Run a claimed operation and record its outcome or error on its future."""
        status = "failed"
        try:
            if not marked_running:
                self._store.mark_running(request_id)
            outcome = operation()
            self._count_finished(request_id, "done")
            self._store.finish_future(request_id, outcome.kind, outcome.payload)
            status = "done"
        except UserInputError as exc:
            self._count_finished(request_id, status)
            self._store.fail_future(request_id, _user_message(exc), "user")
        # BaseException too: anything escaping would kill the training thread (every model's queue
        # would stall) or leave this future `running` for ever; it fails this future only.
        except BaseException as exc:
            log.error("operation %s (%s) failed:\n%s", request_id, what, traceback.format_exc())
            _free_accelerator_memory()
            self._count_finished(request_id, status)
            self._store.fail_future(request_id, _backend_message(what, request_id, exc), "server")
        finally:
            self._finished(request_id, status)

    def shutdown(self, grace_s: float | None = None) -> None:
        """Stop accepting; finish queued work for up to `grace_s` seconds; fail what is left.

        Work failed here (and an operation still running when the process exits, which a
        restart reports as failed) is never lost silently: the client reads the reason.
        """
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._trainer_thread.join(grace_s)
        with self._cond:
            abandoned = [entry.request_id for queue in self._queues.values() for entry in queue]
            self._queues.clear()
            self._ready.clear()
            self._waiting.difference_update(abandoned)
        for request_id in abandoned:
            self._count_finished(request_id, "failed")
            self._store.fail_future(request_id, SHUTDOWN_REASON, "server")
            self._finished(request_id, "failed")
        if abandoned:
            log.warning("shutdown: %d queued operations were not run and are marked failed", len(abandoned))
        self._sampling.shutdown(wait=True, cancel_futures=False)


CANCEL_REASON = (
    "The request was cancelled (cancel_future) before it started; nothing of it was applied."
)

SHUTDOWN_REASON = (
    "The Tink worker shut down before running this operation (its grace period ran out); "
    "nothing of it was applied. Submit it again."
)


def joined_shape(rows: int, longest: int, more_rows: int, more_longest: int,
                 token_limit: Callable[[int], int]) -> tuple[int, int] | None:
    """(rows, longest) of a joined pass grown by one more request, or None where its padded size (all its
    rows x its longest sequence) would pass `token_limit(longest)`."""
    rows, longest = rows + more_rows, max(longest, more_longest)
    return (rows, longest) if rows * longest <= token_limit(longest) else None


def _outcome_of(result: Outcome | BaseException) -> Outcome:
    if isinstance(result, BaseException):
        raise result
    return result


def _user_message(exc: UserInputError) -> str:
    return str(exc)


def _backend_message(what: str, request_id: str, exc: BaseException) -> str:
    """The cause, what it hit, and what to do; other operations are not affected."""
    return (f"{what} failed in the backend: {type(exc).__name__}: {exc}. Only this request failed; "
            f"the worker log has the traceback under {request_id}. Retry it, or report it if it repeats.")


def _free_accelerator_memory() -> None:
    """After a failure (often out-of-memory), release cached blocks so the next request can run."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort only
        pass
