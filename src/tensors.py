"""Tensor helpers shared by the trainer engines, the samplers and the losses (which cannot import a trainer)."""

from __future__ import annotations

import torch

# Logits are made this many elements at a time (256 MiB in fp32), so a 150k vocabulary never needs a
# [batch, length, vocab] tensor: the trainer's loss, the HF sampler's prompt scoring and top-k answers.
LOGIT_CHUNK_ELEMENTS = 1 << 26


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, the host not waiting for the copy. To a GPU it goes from pinned memory
    with non_blocking=True: a plain copy would wait for the GPU's queued work, so the next micro-batch's
    forward could not be launched while the last one's backward runs. On a CPU, or where CUDA is not
    available, a plain `.to` (no pinning; the tensor itself when it is already there)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
