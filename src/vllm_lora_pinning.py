"""An adapter's host copy in one pinned buffer, not one pinned allocation per tensor.

vLLM's LoRA loader (`LoRAModel.from_lora_tensors`, 0.26 and 0.32) pins each lora_a and lora_b on its own
when CUDA is there: 338 page-locked allocations for a rank-32 adapter of a 24-layer model with lm_head.
The load runs inside the EngineCore loop (`add_lora` is a utility call between steps), so every request
of every adapter waits meanwhile; the seventh and eighth GPU runs' profiles put the pinning at about two
thirds of a 0.3 s load (bench/gpu/lora_load_probe.py measures it alone).

The patch lets vLLM load the tensors unpinned, then moves them into one pinned buffer per dtype, each
tensor becoming a view of it. A view of pinned memory is pinned, so vLLM's own later pass (it pins again
after merging packed layers) finds nothing to do and its copies into the GPU slots stay asynchronous.
Values, shapes and dtypes are unchanged; the buffer lives as long as any of the adapter's tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

LORA_MODEL_MODULE = "vllm.lora.lora_model"
ALIGN_BYTES = 256  # each view starts on its own 256-byte boundary, as a separate allocation would


def patch_lora_model(module: ModuleType, _targets: tuple[str, ...] = ()) -> None:
    """Wrap `module.LoRAModel.from_lora_tensors` (once) so that it pins one buffer per adapter."""
    cls = module.LoRAModel
    load = cls.from_lora_tensors.__func__
    if getattr(load, "tink_one_pinned_buffer", False):
        return

    def from_lora_tensors(klass: type, *args: Any, **kwargs: Any) -> Any:
        if not module.PIN_MEMORY:  # no CUDA: vLLM pins nothing either
            return load(klass, *args, **kwargs)
        module.PIN_MEMORY = False  # read by `load` as it runs; the engine loop loads one adapter at a time
        try:
            model = load(klass, *args, **kwargs)
        finally:
            module.PIN_MEMORY = True
        try:
            pin_together(model.loras.values())
        except Exception as exc:  # e.g. no pinned memory left in one piece: pin as vLLM would have
            log.warning("tink vllm plugin: one pinned buffer for an adapter failed (%s); pinning each tensor", exc)
            for layer in model.loras.values():
                for name in ("lora_a", "lora_b"):
                    tensor = getattr(layer, name)
                    if tensor is not None and tensor.device.type == "cpu" and not tensor.is_pinned():
                        setattr(layer, name, tensor.pin_memory())
        return model

    from_lora_tensors.tink_one_pinned_buffer = True  # type: ignore[attr-defined]
    cls.from_lora_tensors = classmethod(from_lora_tensors)


def pin_together(layers: Iterable[Any], pin_memory: bool = True) -> None:
    """Replace every host `lora_a` / `lora_b` of `layers` by a view of one buffer per dtype (pinned unless
    `pin_memory` is False), holding the same values."""
    import torch

    by_dtype: dict[torch.dtype, list[tuple[Any, str]]] = {}
    for layer in layers:
        for name in ("lora_a", "lora_b"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                by_dtype.setdefault(tensor.dtype, []).append((layer, name))
    for dtype, slots in by_dtype.items():
        align = max(ALIGN_BYTES // torch.empty((), dtype=dtype).element_size(), 1)
        starts, end = [], 0
        for layer, name in slots:
            starts.append(end)
            end += -(-getattr(layer, name).numel() // align) * align
        buffer = torch.empty(end, dtype=dtype, pin_memory=pin_memory)
        for (layer, name), start in zip(slots, starts):
            tensor = getattr(layer, name)
            view = buffer[start:start + tensor.numel()].view(tensor.shape)
            view.copy_(tensor)
            setattr(layer, name, view)
