"""Runs accepted operations asynchronously, in order per model, fairly across models.

Every operation becomes a durable future (see `store.py`) *before* its id is returned.
Training operations go to per-model FIFO queues served by one thread in round-robin over
models: one model's operations never reorder, and a model with a long queue cannot starve
the others. Sampling operations go to a thread pool, so a sampler with its own batching
(vLLM) sees many requests at once.
"""

from __future__ import annotations

import logging
import threading
import traceback
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .backends import BackendError, UserInputError
from .store import FutureRecord, Store

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What an operation produced: `kind` is `json` or `proto:<MessageName>`."""

    kind: str
    payload: bytes


Operation = Callable[[], Outcome]


class Scheduler:
    def __init__(self, store: Store, sampling_threads: int = 16):
        self._store = store
        self._cond = threading.Condition()
        self._queues: dict[str, deque[tuple[str, str, Operation]]] = {}
        self._ready: deque[str] = deque()  # models with queued work, in round-robin order
        self._done_events: dict[str, threading.Event] = {}
        self._stopping = False
        self._sampling = ThreadPoolExecutor(max_workers=sampling_threads, thread_name_prefix="tink-sample")
        self._trainer_thread = threading.Thread(target=self._train_loop, name="tink-train", daemon=True)
        self._trainer_thread.start()

    # ------------------------------------------------------------------ submission

    def submit_training(self, op_name: str, model_id: str, owner: str, operation: Operation) -> str:
        """Queue `operation` behind every earlier one for `model_id`; return its request id."""
        request_id = self._accept(op_name, model_id, owner)
        with self._cond:
            queue = self._queues.setdefault(model_id, deque())
            if not queue:
                self._ready.append(model_id)
            queue.append((request_id, f"{op_name} on model {model_id}", operation))
            self._cond.notify()
        return request_id

    def submit_sampling(self, op_name: str, owner: str, operation: Operation) -> str:
        request_id = self._accept(op_name, None, owner)
        self._sampling.submit(self._run, request_id, op_name, operation)
        return request_id

    def _accept(self, op_name: str, model_id: str | None, owner: str) -> str:
        request_id = f"{op_name}-{uuid.uuid4().hex}"
        with self._cond:
            if self._stopping:
                raise BackendError("the worker is shutting down and accepts no new operations")
            self._done_events[request_id] = threading.Event()
        self._store.add_future(request_id, op_name, model_id, owner)  # durable before acknowledged
        return request_id

    # ------------------------------------------------------------------ results

    def wait(self, request_id: str, timeout: float) -> FutureRecord | None:
        """The future's record once finished, or as it stands after `timeout` seconds."""
        event = self._done_events.get(request_id)
        if event is not None:
            event.wait(timeout)
        return self._store.get_future(request_id)

    # ------------------------------------------------------------------ execution

    def _train_loop(self) -> None:
        while True:
            with self._cond:
                while not self._ready and not self._stopping:
                    self._cond.wait()
                if not self._ready:
                    return  # stopping and drained
                model_id = self._ready.popleft()
                request_id, what, operation = self._queues[model_id].popleft()
                if self._queues[model_id]:
                    self._ready.append(model_id)
                else:
                    del self._queues[model_id]
            self._run(request_id, what, operation)

    def _run(self, request_id: str, what: str, operation: Operation) -> None:
        try:
            self._store.mark_running(request_id)
            outcome = operation()
            self._store.finish_future(request_id, outcome.kind, outcome.payload)
        except UserInputError as exc:
            self._store.fail_future(request_id, _user_message(exc), "user")
        # BaseException too: anything escaping would kill the training thread (every model's queue
        # would stall) or leave this future `running` for ever; it fails this future only.
        except BaseException as exc:
            log.error("operation %s (%s) failed:\n%s", request_id, what, traceback.format_exc())
            _free_accelerator_memory()
            self._store.fail_future(request_id, _backend_message(what, request_id, exc), "server")
        finally:
            event = self._done_events.pop(request_id, None)
            if event is not None:
                event.set()

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
            abandoned = [rid for queue in self._queues.values() for rid, _, _ in queue]
            self._queues.clear()
            self._ready.clear()
        for request_id in abandoned:
            self._store.fail_future(request_id, SHUTDOWN_REASON, "server")
            event = self._done_events.pop(request_id, None)
            if event is not None:
                event.set()
        if abandoned:
            log.warning("shutdown: %d queued operations were not run and are marked failed", len(abandoned))
        self._sampling.shutdown(wait=True, cancel_futures=False)


SHUTDOWN_REASON = (
    "The Tink worker shut down before running this operation (its grace period ran out); "
    "nothing of it was applied. Submit it again."
)


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
