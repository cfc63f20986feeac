"""Capture and steering inside vLLM's engine: the model-runner side of src/steering.py.

The model runs in vLLM's worker process, so a request's `LookInside` travels in its
`SamplingParams.extra_args` (`look_extra_args`), as NNsight's vLLM integration does, and the captured
rows wait in that process until the sampler fetches them with one `collective_rpc("tink_take_captures")`.
Tink's vLLM plugin (src/vllm_plugin.py) calls `install()` in every vLLM process; it patches two methods:

* `GPUModelRunner._prepare_inputs` (CPUModelRunner inherits it): right after vLLM lays out a step's
  flat token batch, `_plan_step` maps each looking request to its slice `[start, end)` of that batch and
  the absolute position of its first token (`num_computed_tokens`), the same per-token -> request map
  the attention metadata's `query_start_loc` encodes. Requests that ask nothing are not in the plan.
* `GPUModelRunner.execute_model`: clears the plan after the step, so a warm-up or dummy forward never
  reuses it; `_update_states` notes new looking requests and forgets finished ones that only steered.

vLLM's Model Runner V2 (`vllm.v1.worker.gpu.model_runner`, the GPU default for dense models since 0.26) is
patched the same way at its own seams: `add_requests` notes the requests, `prepare_inputs` returns the
step's `InputBatch` (order, offsets, computed tokens), `execute_model` ends the step. The static hooks pass
the GPU tests on both runners (H100, vLLM 0.26, CUDA graphs); an eager engine with per-request hooks asks
for V1 (src/vllm_backend.py) unless VLLM_USE_V2_MODEL_RUNNER is set.

Forward hooks on the decoder layers (and their attention / MLP blocks for those sites) are installed the
first time a looking request arrives, and return at once while the step's plan is empty: a batch of
requests that ask nothing runs the model as before. Within a batch each request's steering and capture
touch only its own rows, so steered, unsteered and differently-adapted requests do not affect each other.

vLLM's Llama-style layers return `(hidden, residual)` with the residual add deferred into the next
layer's fused norm: the residual stream after the layer is their sum. Steering adds to `hidden`
(equivalent), capturing reads the sum. These hooks need an eager engine (`enforce_eager`, the default on
CPU): a CUDA graph replays kernels without calling Python. With TINK_LOOK_INSIDE=static the model gets
src/steering_static.py's hooks at load instead (fixed tensor operations on persistent buffers, which
torch.compile traces and CUDA graphs replay); `_plan_step` then fills those buffers for the step and
`execute_model` reads the captured rows after the forward. A steered request carries a `cache_salt`
derived from its steering, so its prompt's KV blocks are never shared with other requests' through the
prefix cache (a request that only captures needs no salt: the rows it reads are always recomputed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from .steering import SITES, LookInside, reduce_rows
from .steering_static import PendingCaptures, StaticLook

log = logging.getLogger(__name__)

EXTRA_KEY = "tink_look"


def look_extra_args(look: LookInside, tink_id: str, n: int) -> dict[str, Any]:
    """`SamplingParams.extra_args` for a request with `look`; `n`: its vLLM `n` (children are told apart)."""
    return {EXTRA_KEY: {"id": tink_id, "n": n, "salt": cache_salt(look), **look.to_wire()}}


def cache_salt(look: LookInside) -> str | None:
    """A prefix-cache salt for a steered request (same steering, same salt); None when it steers nothing."""
    if not any(s.scale for s in look.steer):
        return None
    return "tink-steer-" + hashlib.sha256(json.dumps(look.to_wire()["steer"]).encode()).hexdigest()[:32]


def request_cache_salt(sampling_kwargs: dict[str, Any]) -> str | None:
    """The salt `look_extra_args` chose for these vLLM `SamplingParams` keywords (None: share the cache)."""
    return ((sampling_kwargs.get("extra_args") or {}).get(EXTRA_KEY) or {}).get("salt")


RECENT = 8  # rows a mean/last capture keeps: covers steps scheduled past a sample's end (async scheduling)


class _Rows:
    """One capture's rows by absolute position. `all` keeps every row; `mean` and `last` keep a float64
    running sum and the latest `RECENT` rows only, so a long generation holds O(hidden) per capture."""

    def __init__(self, keep_all: bool):
        self.keep_all = keep_all
        self.rows: dict[int, np.ndarray] = {}  # every row (all) or the latest RECENT (mean, last)
        self.total: np.ndarray | None = None
        self.count = 0
        self.newest = -1

    def add(self, position: int, row: np.ndarray) -> None:
        if self.keep_all:
            self.rows[position] = row  # a recomputed position (after preemption) overwrites
            return
        if position in self.rows:
            self.total += row - self.rows[position]
        elif position <= self.newest:
            return  # recomputed after it left the window: the same value, already counted
        else:
            self.total = row.astype(np.float64) if self.total is None else self.total + row
            self.count, self.newest = self.count + 1, position
        self.rows[position] = row
        while len(self.rows) > RECENT:
            del self.rows[min(self.rows)]

    def reduced(self, first: int, length: int, reduce: str) -> np.ndarray:
        """Over positions [first, first + length): the sample's own rows."""
        if self.keep_all or length == 0 or self.total is None:
            positions = [p for p in sorted(self.rows) if first <= p < first + length]
            values = np.stack([self.rows[p] for p in positions]) if positions else np.zeros((0, 0), np.float32)
            return reduce_rows(values.astype(np.float32), reduce)
        extra = [p for p in self.rows if p >= first + length]
        if reduce == "last":
            return self.rows[first + length - 1].astype(np.float32)
        total = self.total - sum((self.rows[p] for p in extra), np.zeros_like(self.total))
        return (total / (self.count - len(extra))).astype(np.float32)


@dataclass
class _RequestLook:
    """One vLLM request's instructions and what it captured so far (rows by absolute token position)."""

    tink_id: str
    index: int  # the sample index among the request's n children
    look: LookInside
    prompt_len: int
    rows: list[_Rows] = field(default_factory=list)
    newest: int = -1  # the last position a static capture read (src/steering_static.py)


@dataclass
class _Slice:
    request: _RequestLook
    start: int  # first row of the request in the step's flat token batch
    end: int
    first_position: int  # absolute position of its first row


_lock = threading.Lock()
_requests: dict[str, _RequestLook] = {}  # vLLM's internal request id -> its instructions
_plan: list[_Slice] | None = None  # the current step's looking requests; None: nobody looks
# Live vLLM request ids that look inside -> their wire instructions and prompt length, as they arrived;
# while empty, steps skip planning.
_looking: dict[str, tuple[dict[str, Any], int]] = {}
_disabled = False  # set when this vLLM's internals are not what the patch reads: the engine serves on
_hooked: set[int] = set()  # id() of the models that carry the hooks
_pending: PendingCaptures | None = None  # a static step's captures, read after its forward
STATIC_ATTR = "_tink_static_look"  # the runner's StaticLook, when TINK_LOOK_INSIDE=static


def install() -> dict[str, Any]:
    """{module name: patch(module, targets)} for the plugin's post-import hook (see src/vllm_plugin.py)."""
    return {"vllm.v1.worker.gpu_model_runner": _patch_runner, "vllm.v1.worker.worker_base": _patch_worker,
            "vllm.v1.worker.cpu_model_runner": _patch_loader, "vllm.v1.worker.gpu.model_runner": _patch_runner_v2}


def _patch_runner(module: ModuleType, _targets: tuple = ()) -> None:
    """Never breaks the engine: on a vLLM whose runner lacks what this reads, it logs and patches nothing
    (requests that look inside then fail with a clear error; the rest are served as before)."""
    found = _runner_to_patch(module, "_prepare_inputs", "execute_model", "_update_states")
    if found is None:
        return
    runner, (prepare, execute, update) = found

    def _update_states(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any):
        _note_requests(scheduler_output)
        return update(self, scheduler_output, *args, **kwargs)

    # Only the scheduler output is read (its per-request token counts): the other arguments differ across
    # vLLM versions. While no live request looks inside, a step costs one empty-set check.
    def _prepare_inputs(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any):
        out = prepare(self, scheduler_output, *args, **kwargs)
        if _looking and not _disabled:
            _plan_step_safely(_plan_step, self, scheduler_output.num_scheduled_tokens)
        return out

    runner._prepare_inputs, runner._update_states = _prepare_inputs, _update_states
    runner.execute_model = _ending_the_step(execute)
    runner._tink_look_inside = True
    _patch_loader(module)


def _runner_to_patch(module: ModuleType, *names: str) -> tuple[type, tuple[Any, ...]] | None:
    """The module's not yet patched `GPUModelRunner` and its methods by name; None (logged if a method is
    missing, as on a vLLM this patch does not know) when there is nothing to patch."""
    runner = getattr(module, "GPUModelRunner", None)
    if runner is None or getattr(runner, "_tink_look_inside", False):
        return None
    try:
        return runner, tuple(getattr(runner, name) for name in names)
    except AttributeError as exc:
        log.warning("capture/steering unavailable in this vLLM (%s): its model runner %s has no %s",
                    vllm_version(), runner.__module__, exc)
        return None


def _ending_the_step(execute: Any) -> Any:
    """`execute_model` that clears the step's plan after it, so a warm-up or dummy forward never reuses it,
    and hands a static step's captured rows to their requests."""
    def execute_model(self: Any, *args: Any, **kwargs: Any):
        global _plan, _pending
        try:
            return execute(self, *args, **kwargs)
        finally:
            _plan, pending, _pending = None, _pending, None
            static = getattr(self, STATIC_ATTR, None)
            if static is not None and pending is not None:
                _collect_safely(static, pending)
    return execute_model


def _patch_runner_v2(module: ModuleType, _targets: tuple = ()) -> None:
    """vLLM's Model Runner V2 (`vllm.v1.worker.gpu.model_runner`, the GPU default for dense models since
    0.26): no persistent batch, and each step's order is fixed by `prepare_inputs`, which returns it as an
    `InputBatch` (request ids, scheduled tokens, token offsets, tokens computed before the step); the runner
    keeps no `extra_args`, so `add_requests` notes them. Its dummy and warm-up steps also pass through
    `execute_model`, without a looking request. Run on a GPU with the static hooks (VLLM_README.md)."""
    found = _runner_to_patch(module, "add_requests", "prepare_inputs", "execute_model")
    if found is None:
        return
    runner, (add, prepare, execute) = found

    def add_requests(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any):
        out = add(self, scheduler_output, *args, **kwargs)
        _note_requests(scheduler_output)
        return out

    def prepare_inputs(self: Any, *args: Any, **kwargs: Any):
        batch = prepare(self, *args, **kwargs)
        if _looking and not _disabled:
            _plan_step_safely(_plan_step_v2, self, batch)
        return batch

    runner.add_requests, runner.prepare_inputs = add_requests, prepare_inputs
    runner.execute_model = _ending_the_step(execute)
    runner._tink_look_inside = True
    _patch_loader(module)


def _patch_loader(module: ModuleType, _targets: tuple = ()) -> None:
    """TINK_LOOK_INSIDE=static: the persistent-buffer hooks go in right after the model loads, before vLLM
    compiles it (src/steering_static.py). Patched on each runner class that defines its own load_model."""
    for name in ("GPUModelRunner", "CPUModelRunner"):
        runner = getattr(module, name, None)
        if runner is None or "load_model" not in vars(runner) or vars(runner).get("_tink_static_loader"):
            continue
        load = runner.load_model

        def load_model(self: Any, *args: Any, _load: Any = load, **kwargs: Any):
            out = _load(self, *args, **kwargs)
            if static_mode() and getattr(self, STATIC_ATTR, None) is None:
                try:
                    setattr(self, STATIC_ATTR, StaticLook.for_runner(self))
                except Exception:
                    _disable("installing the static capture/steering buffers")
            return out

        runner.load_model, runner._tink_static_loader = load_model, True


def static_mode() -> bool:
    from .vllm_plugin import look_inside_setting

    return look_inside_setting() == "static"


def _collect_safely(static: StaticLook, pending: PendingCaptures) -> None:
    try:
        static.collect(pending)
    except Exception:
        _disable("reading the step's static captures")


def _patch_worker(module: ModuleType, _targets: tuple = ()) -> None:
    module.WorkerBase.tink_take_captures = take_captures
    module.WorkerBase.tink_look_state = look_state


def look_state(worker: Any) -> dict[str, bool]:
    """Worker RPC: whether this worker's model carries the static buffers, and whether an error turned
    capture and steering off here (the sampler's health reports it)."""
    return {"static": getattr(getattr(worker, "model_runner", None), STATIC_ATTR, None) is not None,
            "disabled": _disabled}


def _note_requests(scheduler_output: Any) -> None:
    """Track which live requests look inside (new ones carry it in their sampling params; n > 1 children
    are requests of their own) and forget the finished."""
    try:
        for new in getattr(scheduler_output, "scheduled_new_reqs", ()) or ():
            extra = getattr(getattr(new, "sampling_params", None), "extra_args", None) or {}
            if EXTRA_KEY in extra:
                _looking[new.req_id] = (extra[EXTRA_KEY], len(new.prompt_token_ids))
        finished = scheduler_output.finished_req_ids or ()
        for req_id in finished:
            _looking.pop(req_id, None)
        _forget_finished(finished)
    except Exception:  # never take the engine down for an inspection feature
        _disable("reading the scheduler output")


def _plan_step_safely(plan_step: Any, runner: Any, step: Any) -> None:
    """`plan_step(runner, step)` (V1's or V2's); a failure turns the feature off, not the engine."""
    try:
        plan_step(runner, step)
    except Exception:
        _disable("mapping the step's tokens to requests")


def _disable(what: str) -> None:
    global _disabled, _plan
    _disabled, _plan = True, None
    log.exception("capture/steering turned off in this vLLM engine (%s): %s failed", vllm_version(), what)


def vllm_version() -> str:
    try:
        import vllm

        return f"vLLM {vllm.__version__}"
    except Exception:
        return "vLLM ?"


def _plan_step(runner: Any, num_scheduled_tokens: dict[str, int]) -> None:
    """V1: the step's flat batch holds each request's scheduled tokens in `input_batch` order."""
    batch = runner.input_batch
    plan, start = [], 0
    for i, req_id in enumerate(batch.req_ids[:batch.num_reqs]):
        count = int(num_scheduled_tokens[req_id])
        if req_id in _looking:
            plan.append(_Slice(_looking_request(req_id), start, start + count, int(batch.num_computed_tokens_cpu[i])))
        start += count
    _use_plan(runner, plan, start)


def _plan_step_v2(runner: Any, batch: Any) -> None:
    """Model Runner V2: `batch` is the step's `InputBatch`, its requests in the flat batch's order."""
    counts = [int(c) for c in batch.num_scheduled_tokens[:batch.num_reqs]]
    starts = getattr(batch, "query_start_loc_np", None)
    starts = [int(x) for x in (starts[:batch.num_reqs] if starts is not None else np.cumsum([0] + counts[:-1]))]
    plan = [_Slice(_looking_request(req_id), start, start + count, int(computed))
            for req_id, start, count, computed in zip(batch.req_ids, starts, counts, batch.num_computed_tokens_np)
            if req_id in _looking]
    _use_plan(runner, plan, int(batch.num_tokens))


def _looking_request(req_id: str) -> _RequestLook:
    """The request's instructions and rows so far (kept across preemption: its rows are not read twice)."""
    return _requests.get(req_id) or _register(req_id, *_looking[req_id])


def _use_plan(runner: Any, plan: list[_Slice], num_tokens: int) -> None:
    global _plan, _pending
    static = getattr(runner, STATIC_ATTR, None)
    if static is not None:  # the hooks only read buffers: fill them; no Python plan for the forward
        _pending = static.apply(plan, num_tokens) if plan else None
        return
    if plan:
        _ensure_hooks(runner.get_model())
    _plan = plan or None


def _register(req_id: str, wire: dict[str, Any], prompt_len: int) -> _RequestLook:
    # vLLM names the children of an n > 1 request "{index}_{parent id}".
    match = re.match(r"(\d+)_", req_id) if wire["n"] > 1 else None
    look = LookInside.from_wire(wire)
    request = _RequestLook(wire["id"], int(match.group(1)) if match else 0, look, prompt_len,
                           [_Rows(spec.reduce == "all") for spec in look.capture])
    with _lock:
        _requests[req_id] = request
    return request


def _forget_finished(request_ids: Any) -> None:
    """Drop finished requests that captured nothing (those that did wait for `take_captures`)."""
    with _lock:
        for req_id in request_ids or ():
            request = _requests.get(req_id)
            if request is not None and not request.look.capture:
                del _requests[req_id]


def take_captures(worker: Any, tink_id: str, lengths: list[int]) -> list[list[Any]]:
    """Worker RPC: forget `tink_id`'s requests; per sample index, per capture, `[shape, float32 bytes]`
    reduced over its first `lengths[index]` rows (rows past a sample's end, from a step scheduled before
    its stop was known, are dropped)."""
    with _lock:
        mine = {key: r for key, r in _requests.items() if r.tink_id == tink_id}
        for key in mine:
            del _requests[key]
    answer: list[list[Any]] = [[] for _ in lengths]
    for request in mine.values():
        if request.index >= len(lengths):
            continue
        end = lengths[request.index]
        for spec, rows in zip(request.look.capture, request.rows):
            reduced = np.ascontiguousarray(rows.reduced(request.prompt_len - 1, end, spec.reduce), dtype=np.float32)
            answer[request.index].append([list(reduced.shape), reduced.tobytes()])
    return answer


def unpack_captures(packed: list[list[Any]]) -> list[np.ndarray]:
    """`take_captures`' `[shape, bytes]` pairs of one sample as float32 arrays."""
    return [np.frombuffer(data, dtype=np.float32).reshape(shape).copy() for shape, data in packed]


# ----------------------------------------------------------------------------- hooks


def _ensure_hooks(model: Any) -> None:
    if id(model) in _hooked:
        return
    _hooked.add(id(model))
    layers = getattr(getattr(model, "model", model), "layers", None)
    for index, layer in enumerate(layers or ()):
        if not hasattr(layer, "mlp"):  # a pipeline stage's placeholder for another rank's layer
            continue
        layer.register_forward_hook(_resid_hook(index))
        layer.self_attn.register_forward_hook(_site_hook(index, "attn_out"))
        layer.mlp.register_forward_hook(_site_hook(index, "mlp_out"))


def _mask(request: _RequestLook, spec: Any, first: int, count: int) -> Any:
    import torch

    return torch.tensor([spec.steers(p, request.prompt_len) for p in range(first, first + count)])


def _record(request: _RequestLook, capture_index: int, first: int, rows: Any) -> None:
    skip = max(0, request.prompt_len - 1 - first)  # only positions that predict a generated token
    values = rows[skip:].float().cpu().numpy()
    store = request.rows[capture_index]
    for offset, row in enumerate(values):
        store.add(first + skip + offset, row)


def _resid_hook(layer: int) -> Any:
    def hook(module: Any, args: Any, output: Any) -> Any:
        plan = _plan
        if plan is None:
            return None
        hidden, residual = output if isinstance(output, tuple) else (output, None)
        steered = False
        for part in plan:
            request, count = part.request, part.end - part.start
            for spec in request.look.steer:
                if spec.layer != layer or not spec.scale:
                    continue
                mask = _mask(request, spec, part.first_position, count).to(hidden.device, hidden.dtype)
                if bool(mask.any()):
                    if not steered:
                        hidden, steered = hidden.clone(), True
                    delta = hidden.new_tensor(spec.vector) * spec.scale
                    hidden[part.start:part.end] += mask[:, None] * delta
            for i, spec in enumerate(request.look.capture):
                if spec.layer == layer and spec.site == "resid_post":
                    rows = hidden[part.start:part.end]
                    if residual is not None:
                        rows = rows + residual[part.start:part.end]
                    _record(request, i, part.first_position, rows)
        if not steered:
            return None
        return (hidden, residual) if isinstance(output, tuple) else hidden
    return hook


def _site_hook(layer: int, site: str) -> Any:
    assert site in SITES

    def hook(module: Any, args: Any, output: Any) -> None:
        plan = _plan
        if plan is None:
            return
        values = output[0] if isinstance(output, tuple) else output
        for part in plan:
            for i, spec in enumerate(part.request.look.capture):
                if spec.layer == layer and spec.site == site:
                    _record(part.request, i, part.first_position, values[part.start:part.end])
    return hook
