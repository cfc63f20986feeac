"""src/vllm_lora_pinning.py: an adapter's host copy as views of one buffer per dtype, through vLLM's own loader."""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("vllm")

import vllm.lora.lora_model as lora_model  # noqa: E402 (after the skip)
from vllm.lora.peft_helper import PEFTHelper  # noqa: E402

from src import vllm_lora_pinning  # noqa: E402
from src.vllm_lora_pinning import ALIGN_BYTES, patch_lora_model, pin_together  # noqa: E402

pytestmark = pytest.mark.vllm

MODULES = ("q_proj", "k_proj", "down_proj")


def adapter_tensors(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A PEFT adapter's tensors (odd sizes, so that views need the alignment padding)."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for i, module in enumerate(MODULES):
        fan_in, fan_out = 24 + i, 40 + 3 * i
        prefix = f"base_model.model.model.layers.0.self_attn.{module}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(4, fan_in, generator=generator, dtype=dtype)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, 4, generator=generator, dtype=dtype)
    return tensors


def load(tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16):
    helper = PEFTHelper.from_dict({"r": 4, "lora_alpha": 8, "target_modules": list(MODULES)})
    return lora_model.LoRAModel.from_lora_tensors(1, tensors, helper, device="cpu", dtype=dtype)


class Layer:
    def __init__(self, lora_a, lora_b):
        self.lora_a, self.lora_b = lora_a, lora_b


def storage_of(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def test_pin_together_makes_aligned_views_of_one_buffer_per_dtype_with_the_same_values():
    tensors = list(adapter_tensors().values())
    layers = [Layer(tensors[0], tensors[1]), Layer(tensors[2].bfloat16(), tensors[3].bfloat16()),
              Layer(tensors[4], None)]
    before = [(layer.lora_a.clone(), None if layer.lora_b is None else layer.lora_b.clone()) for layer in layers]

    pin_together(layers, pin_memory=False)

    for layer, (a, b) in zip(layers, before):
        assert torch.equal(layer.lora_a, a) and layer.lora_a.dtype == a.dtype and layer.lora_a.is_contiguous()
        assert (layer.lora_b is None) == (b is None) and (b is None or torch.equal(layer.lora_b, b))
        for view in (layer.lora_a, layer.lora_b):
            if view is not None:
                assert (view.data_ptr() - storage_of(view)) % ALIGN_BYTES == 0
    fp32 = [layers[0].lora_a, layers[0].lora_b, layers[2].lora_a]
    assert len({storage_of(t) for t in fp32}) == 1
    assert len({storage_of(t) for t in (layers[1].lora_a, layers[1].lora_b)}) == 1
    assert storage_of(layers[1].lora_a) != storage_of(fp32[0])
    # writes through one view (vLLM scales lora_b in place) leave its neighbours alone
    layers[0].lora_b *= 2
    assert torch.equal(layers[0].lora_a, before[0][0]) and torch.equal(layers[2].lora_a, before[2][0])


def test_patched_loader_asks_vllm_for_no_pin_and_regroups_what_it_loaded(monkeypatch):
    """With pinning on (a CUDA host), vLLM's own per-tensor pin must not run (on this CPU it would fail), the
    flag comes back, and the adapter's tensors end as views of one buffer holding vLLM's values."""
    expected = load(adapter_tensors())  # vLLM as shipped (no pinning on a CPU)
    monkeypatch.setattr(lora_model.LoRAModel, "from_lora_tensors", lora_model.LoRAModel.from_lora_tensors)
    patch_lora_model(lora_model)
    patch_lora_model(lora_model)  # the plugin registers in every process, maybe twice: one wrap
    assert getattr(lora_model.LoRAModel.from_lora_tensors.__func__, "tink_one_pinned_buffer", False)
    monkeypatch.setattr(lora_model, "PIN_MEMORY", True)
    monkeypatch.setattr(vllm_lora_pinning, "pin_together", functools.partial(pin_together, pin_memory=False))

    loaded = load(adapter_tensors())

    assert lora_model.PIN_MEMORY is True
    assert loaded.loras.keys() == expected.loras.keys()
    storages = set()
    for name, layer in loaded.loras.items():
        assert torch.equal(layer.lora_a, expected.loras[name].lora_a)
        assert torch.equal(layer.lora_b, expected.loras[name].lora_b)
        assert layer.lora_a.dtype == torch.bfloat16
        storages |= {storage_of(layer.lora_a), storage_of(layer.lora_b)}
    assert len(storages) == 1


def test_patched_loader_pins_each_tensor_when_one_buffer_fails(monkeypatch):
    monkeypatch.setattr(lora_model.LoRAModel, "from_lora_tensors", lora_model.LoRAModel.from_lora_tensors)
    patch_lora_model(lora_model)
    monkeypatch.setattr(lora_model, "PIN_MEMORY", True)
    pinned = []

    def no_buffer(layers):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(vllm_lora_pinning, "pin_together", no_buffer)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self.shape) or self.clone())

    loaded = load(adapter_tensors())

    assert len(pinned) == 2 * len(MODULES) == 2 * len(loaded.loras)
    assert lora_model.PIN_MEMORY is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host memory needs CUDA")
def test_on_a_gpu_host_the_adapter_is_pinned_as_one_buffer(monkeypatch):
    monkeypatch.setattr(lora_model.LoRAModel, "from_lora_tensors", lora_model.LoRAModel.from_lora_tensors)
    expected = load(adapter_tensors())
    patch_lora_model(lora_model)
    monkeypatch.setattr(lora_model, "PIN_MEMORY", True)

    loaded = load(adapter_tensors())

    for name, layer in loaded.loras.items():
        assert layer.lora_a.is_pinned() and layer.lora_b.is_pinned()
        assert torch.equal(layer.lora_b, expected.loras[name].lora_b)
        assert torch.equal(layer.lora_b.cuda(non_blocking=True).cpu(), expected.loras[name].lora_b)
    assert len({storage_of(t) for layer in loaded.loras.values() for t in (layer.lora_a, layer.lora_b)}) == 1
