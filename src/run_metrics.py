"""Per-step series of every training run, recorded as its operations finish, for the dashboard.

A run's steps are its optimizer steps, counted from 1: whatever happens before the n-th
`optim_step` of the run (its `forward_backward`s, the samples drawn from its checkpoints, the
metrics its client reports) belongs to step n, and that `optim_step` closes it. Each series
cell (run, source, name, step) is stored in SQLite (`Store.add_run_metrics`) and folds in every
value of its step, so several forward_backward calls or samples per step make one point:

    loss             loss:sum / weighted tokens (sum of `weights`; else the tokens with a non-zero
                     advantage; else all target tokens), over the step's forward_backward calls
    learning_rate    the optimizer step's
    grad_norm        the gradient norm before clipping, as the trainer computed it
    sampled_tokens   tokens generated from the run's checkpoints in the step (Tinker `asample`)
    sampled_logprob  their mean logprob
    logprob_gap      mean |sampler - trainer| logprob of sampled tokens, when `/api/v1/sample` was
                     asked for `logprob_gap`
    <client names>   what the client posted to `/api/v1/training_runs/<id>/metrics` (last value)

    >>> metrics = RunMetrics(store)
    >>> metrics.client_report("run-1", 3, {"reward/mean": 0.4})
    3
    >>> metrics.series("run-1", max_points=500)["client"]["reward/mean"]
    [[3, 0.4]]

Recording never fails an operation: a metrics write that fails is logged and dropped.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from .auth import ANONYMOUS, Caller
from .backends import SampleJob, SampleResult, TrainDatum, UserInputError
from .store import Store

log = logging.getLogger(__name__)

WORKER, CLIENT = "worker", "client"
# How each worker series reads its cell: "mean" total / weight, "sum" total, "last" the last value.
WORKER_SERIES: dict[str, str] = {
    "loss": "mean", "learning_rate": "last", "grad_norm": "last", "sampled_tokens": "sum",
    "sampled_logprob": "mean", "logprob_gap": "mean",
}
STEP_CLOSER = "learning_rate"  # written by every optim_step: its last step is the run's steps done
MAX_CLIENT_METRICS_PER_REQUEST = 64
MAX_CLIENT_SERIES_PER_RUN = 64  # each one is a chart on the page
MAX_METRIC_NAME_CHARS = 100
MAX_STEP = 10**9


def owner_label(owner: str) -> str:
    """How the page names a key: never the key, a prefix of its fingerprint (as `auth/apikey/me` does)."""
    return ANONYMOUS if owner == ANONYMOUS else f"key-{owner[:12]}"


def _best_effort(record: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(record)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            record(*args, **kwargs)
        except Exception:  # the dashboard must never cost a training step
            log.warning("could not record run metrics (%s)", record.__name__, exc_info=True)

    return wrapper


def weighted_tokens(data: Iterable[TrainDatum]) -> float:
    """The tokens a batch's `loss:sum` is spread over (see the module docstring)."""
    total = 0.0
    for datum in data:
        inputs = datum.loss_fn_inputs
        if "weights" in inputs:
            total += float(np.sum(inputs["weights"]))
        elif "advantages" in inputs:
            total += float(np.count_nonzero(inputs["advantages"]))
        elif "target_tokens" in inputs:
            total += float(np.size(inputs["target_tokens"]))
    return total


class RunMetrics:
    """Writes the series from the worker's operations and reads them back for the dashboard."""

    def __init__(self, store: Store):
        self.store = store

    def steps_done(self, model_id: str) -> int:
        return self.store.last_run_step(model_id, WORKER, STEP_CLOSER)

    def current_step(self, model_id: str) -> int:
        """The step the run is preparing: optimizer steps done + 1."""
        return self.steps_done(model_id) + 1

    # ------------------------------------------------------------------ recording (worker threads)

    @_best_effort
    def forward_backward(self, model_id: str, data: list[TrainDatum], metrics: dict[str, float]) -> None:
        weight = weighted_tokens(data)
        loss = float(metrics.get("loss:sum", math.nan))
        if weight > 0 and math.isfinite(loss):
            self._write(model_id, self.current_step(model_id), {"loss": (loss, weight, loss / weight)})

    @_best_effort
    def optim_step(self, model_id: str, learning_rate: float, metrics: dict[str, float]) -> None:
        """Close the step: its learning rate (always written: it counts the steps) and grad norm."""
        values = {STEP_CLOSER: _last(learning_rate)}
        if "grad_norm:mean" in metrics:
            values["grad_norm"] = _last(metrics["grad_norm:mean"])
        self._write(model_id, self.current_step(model_id), values)

    @_best_effort
    def sampled(self, caller: Caller, job: SampleJob, result: SampleResult) -> None:
        """Tokens and logprobs drawn from one of the caller's runs' checkpoints (not the base model's,
        nor another key's published one: they would mix into a run its owner did not sample)."""
        model_id = _run_of_adapter(job)
        record = self.store.get_model(model_id) if model_id else None
        if record is None or not caller.may_see(record["owner"]):
            return
        tokens = sum(len(seq.tokens) for seq in result.sequences)
        scored = sum(len(seq.logprobs) for seq in result.sequences)
        logprob = sum(float(np.sum(seq.logprobs)) for seq in result.sequences if seq.logprobs)
        values = {"sampled_tokens": (float(tokens), 1.0, float(tokens))}
        if scored:
            values["sampled_logprob"] = (logprob, float(scored), logprob / scored)
        self._write(model_id, self.current_step(model_id), values)

    @_best_effort
    def logprob_gap(self, model_id: str | None, gap: dict[str, float]) -> None:
        """One completion's `evaluation.logprob_gap` against the caller's live run (None: nothing to record)."""
        if model_id is None or not gap.get("tokens"):
            return
        tokens = float(gap["tokens"])
        self._write(model_id, self.current_step(model_id),
                    {"logprob_gap": (gap["mean_abs"] * tokens, tokens, gap["mean_abs"])})

    def client_report(self, model_id: str, step: int | None, metrics: dict[str, float]) -> int:
        """Record a client's scalars at `step` (None: the step in progress); returns the step used.
        A run holds at most MAX_CLIENT_SERIES_PER_RUN names (else a 400 naming `metrics`)."""
        known = self.store.run_metric_names(model_id, CLIENT)
        new = sorted(set(metrics) - known)
        if len(known) + len(new) > MAX_CLIENT_SERIES_PER_RUN:
            raise UserInputError(
                f"run {model_id!r} would have {len(known) + len(new)} client metrics; the limit is "
                f"{MAX_CLIENT_SERIES_PER_RUN} names per run (new here: {', '.join(new[:5])})", "metrics")
        step = self.current_step(model_id) if step is None else step
        self.store.add_run_metrics(model_id, step, CLIENT, {k: (v, 1.0, v) for k, v in metrics.items()})
        return step

    def _write(self, model_id: str, step: int, values: dict[str, tuple[float, float, float]]) -> None:
        self.store.add_run_metrics(model_id, step, WORKER, values)

    # ------------------------------------------------------------------ reading (the dashboard)

    def series(self, model_id: str, max_points: int) -> dict[str, dict[str, list[list[float]]]]:
        """The run's series as {source: {name: [[step, value], ...]}}, decimated to about `max_points`."""
        return group_points(self.store.run_metric_history(model_id, max_points))

    def changes(self, model_ids: list[str], after_seq: int, limit: int) -> list[dict[str, Any]]:
        """Cells of these runs changed after `after_seq`, each with its `value`."""
        return [{**cell, "value": cell_value(cell)} for cell in self.store.run_metric_cells(model_ids, after_seq, limit)]


def cell_value(cell: dict[str, Any]) -> float | None:
    """The number a cell plots; None where it is undefined (a NaN or inf was folded in: SQLite keeps
    NaN as NULL, and JSON has neither)."""
    how = WORKER_SERIES.get(cell["name"], "last") if cell["source"] == WORKER else "last"
    total, weight = cell["total"], cell["weight"]
    if how == "mean":
        value = total / weight if total is not None and weight else None
    else:
        value = total if how == "sum" else cell["last"]
    return value if value is not None and math.isfinite(value) else None


def group_points(cells: Iterable[dict[str, Any]]) -> dict[str, dict[str, list[list[float]]]]:
    grouped: dict[str, dict[str, list[list[float]]]] = {WORKER: {}, CLIENT: {}}
    for cell in sorted(cells, key=lambda c: c["step"]):
        grouped[cell["source"]].setdefault(cell["name"], []).append([cell["step"], cell_value(cell)])
    return grouped


def parse_client_metrics(body: dict[str, Any]) -> tuple[int | None, dict[str, float]]:
    """`{"step": n, "metrics": {"name": number, ...}}` checked, or a 400 naming the field."""
    unknown = sorted(set(body) - {"step", "metrics"})
    if unknown:
        raise UserInputError(f"unknown field {unknown[0]!r}; the body is {{\"step\": n, \"metrics\": {{...}}}}",
                             unknown[0])
    step = body.get("step")
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP):
        raise UserInputError(f"step must be an integer in [0, {MAX_STEP}] (or left out: the step in progress)",
                             "step")
    metrics = body.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        raise UserInputError('metrics must be a non-empty object of name: number, e.g. {"reward/mean": 0.3}',
                             "metrics")
    if len(metrics) > MAX_CLIENT_METRICS_PER_REQUEST:
        raise UserInputError(f"{len(metrics)} metrics exceed the limit of {MAX_CLIENT_METRICS_PER_REQUEST} "
                             "per request", "metrics")
    checked: dict[str, float] = {}
    for name, value in metrics.items():
        field = f"metrics[{json.dumps(name[:MAX_METRIC_NAME_CHARS])}]"
        if not name or len(name) > MAX_METRIC_NAME_CHARS or not name.isprintable():
            raise UserInputError(f"a metric name must be 1 to {MAX_METRIC_NAME_CHARS} printable characters",
                                 field)
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise UserInputError(f"metric {name!r} must be a finite number, got {value!r}", field)
        checked[name] = float(value)
    return step, checked


def _last(value: float | None) -> tuple[float, float, float]:
    number = math.nan if value is None else float(value)
    return number, 1.0, number


def _run_of_adapter(job: SampleJob) -> str | None:
    """The training run whose checkpoint the job samples: adapter names are `tinker://<run>/...@v<n>`."""
    if job.adapter is None or not job.adapter.name.startswith("tinker://"):
        return None
    return job.adapter.name.removeprefix("tinker://").split("/", 1)[0] or None
