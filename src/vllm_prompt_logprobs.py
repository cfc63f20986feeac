"""Prompt logprobs through LoRA adapters in one vLLM pass: the per-token lm_head LoRA fix.

vLLM (0.26 and 0.32) computes a request's prompt logprobs in `GPUModelRunner._get_prompt_logprobs_dict`
(CPUModelRunner inherits it): for each request it slices that request's rows out of the step's hidden
states and calls `compute_logits` on them. With LoRA on, `LogitsProcessorWithLoRA` then adds the lm_head
delta with `punica_wrapper.add_lora_logits`, which indexes adapters *per sampled row* (one per request:
the sampler mapping), not per token. For a slice of prompt rows that mapping is wrong: on GPU the rows
get the adapters of whatever requests share the step (silently wrong logprobs, vllm-project/vllm#51594,
#29955), on CPU the shape mismatch kills the engine. That is why Tink teacher-forced prompt logprobs with
one 1-token request per position.

Model Runner V2 (vLLM 0.26's default on GPU for dense models) has the same flaw in another place:
`PromptLogprobsWorker.compute_prompt_logprobs` runs `compute_logits` on chunks of all the step's rows.

The fix, installed by Tink's vLLM plugin in every vLLM process: while either of those runs,
the punica wrapper's `add_lora_logits` is replaced by `_PerTokenLogitsLoRA`, which finds the rows it is
given inside the step's hidden states (the slice is a view: its offset is its data pointer's distance
from theirs) and applies, per row, the adapter that the step's *token* mapping (`token_lora_indices`, the
one every other LoRA layer of the step uses) gives that row. An adapter without lm_head LoRA has zero
weights in its slot, so its rows get the base logits, as they should. Everywhere else (sampling)
`add_lora_logits` is vLLM's own.

`installed()` tells the sampler whether this process's vLLM runner carries the fix (the plugin patches the
same vLLM in the engine's processes); `VLLMEngineSampler` then asks vLLM for prompt logprobs natively, one
prefill per sequence, instead of teacher forcing (VLLM_README.md, "Logprobs").
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"  # the V1 runner (CPU always; GPU when V2 is off)
V2_MODULE = "vllm.v1.worker.gpu.sample.prompt_logprob"  # Model Runner V2's (GPU default for dense models)
_MARK = "_tink_per_token_prompt_lora"


def installed() -> bool:
    """Whether vLLM's model runners, as imported in this process, compute prompt logprobs per token once
    vLLM has loaded its plugins here, as it does in the engine's processes (False with `VLLM_PLUGINS`
    leaving Tink's plugin out, or without vLLM). V2 counts only where it imports (it needs Triton)."""
    import importlib

    try:
        from vllm.plugins import load_general_plugins

        load_general_plugins()  # what every vLLM process does first; honours VLLM_PLUGINS
        v1 = getattr(importlib.import_module(RUNNER_MODULE), "GPUModelRunner", None)
    except Exception:  # noqa: BLE001 - no vLLM, or one that does not import here: no fix
        return False
    try:
        v2 = getattr(importlib.import_module(V2_MODULE), "PromptLogprobsWorker", None)
    except Exception:  # noqa: BLE001 - no Triton (CPU): V2 never runs here
        v2 = None
    return all(getattr(cls, _MARK, False) for cls in (v1, v2) if cls is not None) and v1 is not None


def patch_runner(module: ModuleType, _targets: tuple = ()) -> None:
    """V1: wrap `GPUModelRunner._get_prompt_logprobs_dict(hidden_states, ...)`, which slices each request's
    rows out of `hidden_states`."""

    def wrapper(original: Any) -> Any:
        def _get_prompt_logprobs_dict(self: Any, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
            punica = _logits_punica(self.get_model()) if self.num_prompt_logprobs else None
            with _per_token(punica, hidden_states):
                return original(self, hidden_states, *args, **kwargs)
        return _get_prompt_logprobs_dict

    _wrap_once(getattr(module, "GPUModelRunner", None), "_get_prompt_logprobs_dict", wrapper)


def patch_v2(module: ModuleType, _targets: tuple = ()) -> None:
    """Model Runner V2: wrap `PromptLogprobsWorker.compute_prompt_logprobs(logits_fn, hidden_states, ...)`,
    which runs `logits_fn` (the model's `compute_logits`) on chunks of the step's rows."""

    def wrapper(original: Any) -> Any:
        def compute_prompt_logprobs(self: Any, logits_fn: Any, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
            model = getattr(logits_fn, "__self__", None)
            punica = _logits_punica(model) if model is not None and self.uses_prompt_logprobs.any() else None
            with _per_token(punica, hidden_states):
                return original(self, logits_fn, hidden_states, *args, **kwargs)
        return compute_prompt_logprobs

    _wrap_once(getattr(module, "PromptLogprobsWorker", None), "compute_prompt_logprobs", wrapper)


def _wrap_once(cls: Any, name: str, wrapper: Any) -> None:
    """Replace `cls.name` by `wrapper(original)` once; on a vLLM without that method, patch nothing (and say so)."""
    if cls is None or getattr(cls, _MARK, False):
        return
    original = getattr(cls, name, None)
    if original is None:
        log.warning("tink vllm plugin: this vLLM's %s has no %s; prompt logprobs of LoRA requests stay "
                    "teacher-forced", cls.__name__, name)
        return
    setattr(cls, name, wrapper(original))
    setattr(cls, _MARK, True)


@contextlib.contextmanager
def _per_token(punica: Any, hidden_states: Any) -> Iterator[None]:
    """Meanwhile, `punica.add_lora_logits` applies each row's own adapter (no-op when `punica` is None)."""
    if punica is None:
        yield
        return
    punica.add_lora_logits = _PerTokenLogitsLoRA(punica.add_lora_logits, hidden_states, punica.token_lora_indices)
    try:
        yield
    finally:
        del punica.add_lora_logits  # the class's method again


_PUNICA_OF: dict[int, Any] = {}  # id(model) -> its logits processor's punica wrapper (None: no LoRA)


def _logits_punica(model: Any) -> Any:
    """The punica wrapper of `model`'s `LogitsProcessorWithLoRA` (found once per model), None without LoRA."""
    key = id(model)
    if key not in _PUNICA_OF:
        modules = model.modules() if hasattr(model, "modules") else ()
        layers = [m for m in modules if type(m).__name__ == "LogitsProcessorWithLoRA"]
        _PUNICA_OF[key] = getattr(layers[0], "punica_wrapper", None) if len(layers) == 1 else None
    return _PUNICA_OF[key]


class _PerTokenLogitsLoRA:
    """`add_lora_logits(y, x, lora_a_stacked, lora_b_stacked, scale)` with each row's adapter taken from the
    step's token mapping. Rows that are not a slice of the step's hidden states go to vLLM's own op."""

    def __init__(self, vllm_add: Any, hidden_states: Any, token_indices: Any):
        self.vllm_add, self.hidden, self.token_indices = vllm_add, hidden_states, token_indices

    def __call__(self, y: Any, x: Any, lora_a_stacked: Any, lora_b_stacked: Any, scale: float, **kwargs: Any) -> Any:
        start = self._row_offset(x)
        if start is None:
            return self.vllm_add(y, x, lora_a_stacked, lora_b_stacked, scale, **kwargs)
        rows = x.reshape(-1, x.shape[-1])
        logits = y.view(-1, y.shape[-1])
        slots = self.token_indices[start:start + len(rows)]
        for slot in slots.unique().tolist():
            if slot < 0:  # no adapter on these rows
                continue
            mine = (slots == slot).nonzero()[:, 0]
            a, b = lora_a_stacked[slot, 0], lora_b_stacked[slot, 0]  # [rank, hidden], [vocab, rank]
            shrunk = (rows.index_select(0, mine).float() @ a.float().T) * scale  # fp32, as vLLM's kernels
            delta = (shrunk.to(b.dtype) @ b.T).to(logits.dtype)
            logits[:, :delta.shape[-1]].index_add_(0, mine, delta)
        return y

    def _row_offset(self, x: Any) -> int | None:
        """The index of x's first row in the step's hidden states, if x is a contiguous slice of them."""
        hidden = self.hidden
        if x.dim() != 2 or hidden.dim() != 2 or x.shape[-1] != hidden.shape[-1] or not x.is_contiguous():
            return None
        if x.dtype != hidden.dtype or x.device != hidden.device:
            return None
        row_bytes = hidden.stride(0) * hidden.element_size()
        distance = x.data_ptr() - hidden.data_ptr()
        if distance < 0 or distance % row_bytes:
            return None
        start = distance // row_bytes
        if start + len(x) > len(hidden) or start + len(x) > len(self.token_indices):
            return None
        return start
