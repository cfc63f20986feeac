"""Keeps sampling alive when vLLM is not: a primary sampler (vLLM) with a fallback (HF generate).

Selected by the registry whenever USE_VLLM=true; VLLM_FALLBACK_RETRY_S sets how often a failed
primary is tried again. A `BackendError` (server unreachable, engine dead, 5xx) switches every
request to the fallback with ONE warning; after `retry_s` the next request probes the primary
(its `health()` first, then the request itself) and, if it answers, switches back with one info
line. A `UserInputError` is the caller's fault and is raised as is: the fallback would refuse it too.

    VLLM_BASE_URL=http://127.0.0.1:8001 VLLM_FALLBACK_RETRY_S=30
    sampler = FallbackSampler(VLLMServerSampler(url), HFSampler(base_model), retry_s=30)
    result = sampler.sample(job)           # vLLM while it answers, HF while it does not
    sampler.health()                       # {"live": True, "active": "vllm-server", ...}
    sampler.close()
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from .backends import (
    AdapterRef,
    AdapterRejectedError,
    BackendError,
    SampleJob,
    Sampler,
    SampleResult,
    TokenSink,
)

log = logging.getLogger(__name__)


class _AlreadyStreamed(Exception):
    """The primary failed after streaming tokens: not a case for a silent switch to the fallback."""

    def __init__(self, cause: BackendError):
        super().__init__(str(cause))
        self.cause = cause


class FallbackSampler:
    """Implements `Sampler`: `primary` while it works, `fallback` while it does not. Thread-safe.

    `primary` is None when it could not even start (`start_error` says why): everything then goes
    to the fallback, and health reports `degraded`, since the sampler that was asked for is not
    the one serving.
    """

    def __init__(self, primary: Sampler | None, fallback: Sampler, retry_s: float = 30.0,
                 start_error: str | None = None, requested: str = "vllm"):
        self.primary, self.fallback, self.retry_s = primary, fallback, retry_s
        self.requested = primary.name if primary is not None else requested
        self.name = self.requested
        self.start_error = start_error
        self._down_since: float | None = None  # monotonic time of the failure; None while primary is live
        self._next_probe = 0.0
        self._reason = ""
        self._lock = threading.Lock()
        self._rejected: dict[str, str] = {}  # adapter name -> why the primary refused it
        self._served: dict[str, int] = {}  # sampler name -> operations it answered
        self._switches = 0  # times the primary failed and sampling moved to the fallback
        self._refusals = 0  # adapter requests the primary refused (each served by the fallback)

    @classmethod
    def start(cls, make_primary: Any, fallback: Sampler, retry_s: float = 30.0) -> FallbackSampler:
        """`make_primary()` with `fallback` behind it; if it raises BackendError (vLLM missing, engine
        failed to start), the fallback alone, reported as degraded with the reason."""
        try:
            return cls(make_primary(), fallback, retry_s)
        except BackendError as exc:
            log.error("vLLM was asked for (USE_VLLM=true) but is not serving; sampling with %s instead, and "
                      "healthz reports degraded: %s", fallback.name, exc)
            return cls(None, fallback, retry_s, start_error=str(exc))

    @property
    def active(self) -> Sampler:
        return self.fallback if self.primary is None or self._down_since is not None else self.primary

    @property
    def looks_inside(self) -> bool:
        """Whether either sampler can capture and steer (src/steering.py's `look_sampler` asks)."""
        return any(getattr(s, "looks_inside", False) for s in (self.primary, self.fallback) if s is not None)

    def sample(self, job: SampleJob, sink: TokenSink | None = None) -> SampleResult:
        if job.look is not None:
            lookers = [s for s in (self.primary, self.fallback) if getattr(s, "looks_inside", False)]
            if len(lookers) == 1:  # e.g. a primary with CUDA graphs or TRL's server: the HF fallback serves it
                only = lookers[0]
                return self._served_by(only, only.sample(job, sink) if sink is not None else only.sample(job))
        if sink is None:
            return self._call(lambda s: s.sample(job))
        streamed = False

        def tracking_sink(index: int, tokens: list[int], logprobs: list[float]) -> None:
            nonlocal streamed
            streamed = True
            sink(index, tokens, logprobs)

        def attempt(sampler: Sampler) -> SampleResult:
            try:
                return sampler.sample(job, tracking_sink)
            except BackendError as exc:
                if streamed:  # the client already has some tokens: a restart would stream them twice
                    raise _AlreadyStreamed(exc) from exc
                raise

        try:
            return self._call(attempt)
        except _AlreadyStreamed as failed:
            self._mark_down(failed.cause)
            raise BackendError(f"{self.primary.name} failed mid-stream ({failed.cause}); retry the request") from None

    def compute_logprobs(self, adapter: AdapterRef | None, tokens: list[int]) -> list[float | None]:
        return self._call(lambda s: s.compute_logprobs(adapter, tokens))

    def health(self) -> dict[str, object]:
        """Which sampler serves now (`active`), whether that is what was asked for (`degraded`, with
        `reason`), adapters the primary refused, and how many operations each sampler answered."""
        down = self._down_since is not None
        with self._lock:
            rejected = dict(self._rejected)
            served = dict(self._served)
        reasons = []
        if self.primary is None:
            reasons.append(f"{self.requested} failed to start: {self.start_error}")
        elif down:
            reasons.append(f"{self.primary.name} is down: {self._reason}")
        if rejected:
            reasons.append(f"{len(rejected)} adapter version(s) refused by {self.requested} are sampled by "
                           f"{self.fallback.name}; the last cause: {list(rejected.values())[-1]}")
        primary_health = None
        if self.primary is not None:
            try:
                primary_health = self.primary.health()
            except Exception as exc:  # health must answer even when the primary cannot
                primary_health = {"live": False, "error": str(exc)}
        active_health = primary_health if self.active is self.primary else self.active.health()
        return {"live": bool(active_health.get("live")), "backend": self.active.name,
                "active": self.active.name, "requested": self.requested,
                "fallback": self.fallback.name, "degraded": bool(reasons), "reason": "; ".join(reasons) or None,
                "primary_down_s": round(time.monotonic() - self._down_since, 1) if down else None,
                "primary_error": self._reason if down else self.start_error,
                "adapters_on_fallback": len(rejected), "served": served, "primary_health": primary_health}

    def events(self) -> dict[str, int]:
        """Counts since start, for /metrics: switches to the fallback and adapter refusals."""
        with self._lock:
            return {"fallback_switches": self._switches, "adapter_refusals": self._refusals}

    def close(self) -> None:
        for sampler in (self.primary, self.fallback):
            if sampler is None:
                continue
            try:
                sampler.close()
            except Exception as exc:  # closing one must not keep the other open
                log.warning("closing sampler %s failed: %s", sampler.name, exc)

    def _call(self, op: Any) -> Any:
        if self._should_try_primary():
            try:
                result = op(self.primary)
            except AdapterRejectedError as exc:  # the primary is fine; only this adapter needs the fallback
                self._warn_rejected(exc)
                return self._served_by(self.fallback, op(self.fallback))
            except BackendError as exc:
                self._mark_down(exc)
            else:
                self._mark_up()
                return self._served_by(self.primary, result)
        return self._served_by(self.fallback, op(self.fallback))

    def _served_by(self, sampler: Sampler, result: Any) -> Any:
        if isinstance(result, SampleResult):
            result.served_by = result.served_by or sampler.name
        with self._lock:
            self._served[sampler.name] = self._served.get(sampler.name, 0) + 1
        return result

    def _should_try_primary(self) -> bool:
        if self.primary is None:
            return False
        with self._lock:
            if self._down_since is None:
                return True
            if time.monotonic() < self._next_probe:
                return False
            self._next_probe = time.monotonic() + self.retry_s  # one probe per period, not one per thread
        try:
            return bool(self.primary.health().get("live"))
        except Exception:
            return False

    def _warn_rejected(self, exc: AdapterRejectedError) -> None:
        """Count the adapter version; log once per distinct cause (each saved version is a new name)."""
        with self._lock:
            self._refusals += 1
            new_cause = exc.cause not in self._rejected.values() or exc.cause is None
            self._rejected[exc.adapter or str(exc)] = exc.cause or str(exc)
        if not new_cause:
            return
        log.error("%s; sampling that adapter with %s (slow), everything else stays on %s; healthz reports "
                  "degraded", exc, self.fallback.name, self.requested)

    def _mark_down(self, exc: BaseException) -> None:
        with self._lock:
            if self._down_since is None:
                self._down_since = time.monotonic()
                self._switches += 1
                self._reason = str(exc)
                log.warning("sampler %s failed (%s); sampling with %s until it answers again (retry every %.0f s)",
                            self.primary.name, exc, self.fallback.name, self.retry_s)
            self._next_probe = time.monotonic() + self.retry_s

    def _mark_up(self) -> None:
        with self._lock:
            if self._down_since is not None:
                log.info("sampler %s is back after %.0f s; sampling with it again", self.primary.name,
                         time.monotonic() - self._down_since)
                self._down_since = None
