"""Where vLLM's adapter load spends its time (issue 11: an adapter load inside the engine loop stalls every
request; the seventh and eighth runs' profiles showed ~0.5 s at 7B and ~0.6 s at 0.5B).

vLLM loads a LoRA into host memory (`LoRAModel.from_local_checkpoint(device="cpu")`), one `pin_memory()` per
tensor when CUDA is there, then copies it into a GPU slot when a batch needs it. This writes a rank-r adapter
of a bench shape (every linear layer and lm_head, as Tink's default adapter, random bf16 values) and times, each
in a fresh process so the pinned-memory cache starts cold:

- `load`: vLLM's own `from_local_checkpoint`, three times in a row (the first is what a new version pays);
- `load_unpinned`: the same with vLLM's `PIN_MEMORY` off;
- `parts`: reading the file (safetensors), the process's first pinned allocation (CUDA's set-up), then pinning
  each tensor alone and pinning one buffer of the same bytes.

    PYTHONPATH=.:/tmp/site python3 bench/gpu/lora_load_probe.py --shape 0.5b --out /tmp/lora_load_0.5b.json
    python bench/gpu/lora_load_probe.py --shape tiny --out /tmp/lora_load_tiny.json   # CPU: the harness only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_one_gpu import SHAPES  # noqa: E402 (after the path it is found on)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def module_shapes(shape: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of every LoRA-wrapped linear of `shape`, by PEFT module name."""
    hidden, heads, kv = shape["hidden_size"], shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = hidden // heads
    per_layer = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, kv * head_dim),
                 "self_attn.v_proj": (hidden, kv * head_dim), "self_attn.o_proj": (hidden, hidden),
                 "mlp.gate_proj": (hidden, shape["intermediate_size"]), "mlp.up_proj": (hidden, shape["intermediate_size"]),
                 "mlp.down_proj": (shape["intermediate_size"], hidden)}
    modules = {f"model.layers.{i}.{name}": dims for i in range(shape["num_hidden_layers"])
               for name, dims in per_layer.items()}
    modules["lm_head"] = (hidden, shape["vocab_size"])
    return modules


def write_adapter(folder: Path, shape: dict, rank: int) -> int:
    """A PEFT-format adapter (the file names and keys Tink's trainer writes); returns its bytes."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    tensors = {}
    for name, (fan_in, fan_out) in module_shapes(shape).items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, fan_in, dtype=torch.bfloat16) * 0.01
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(fan_out, rank, dtype=torch.bfloat16) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGETS), lora_dropout=0.0).save_pretrained(str(folder))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def time_load(folder: str, vocab: int, pinned: bool, repeats: int = 3) -> dict:
    """vLLM's host-side load of the adapter, as its LoRA worker manager calls it."""
    import torch
    import vllm.lora.lora_model as lora_model
    from vllm.lora.peft_helper import PEFTHelper

    lora_model.PIN_MEMORY = lora_model.PIN_MEMORY and pinned
    helper = PEFTHelper.from_local_dir(folder, max_position_embeddings=4096)
    seconds = []
    for i in range(repeats):
        start = time.perf_counter()
        loaded = lora_model.LoRAModel.from_local_checkpoint(folder, set(TARGETS), helper, lora_model_id=i + 1,
                                                            device="cpu", dtype=torch.bfloat16, model_vocab_size=vocab)
        seconds.append(round(time.perf_counter() - start, 4))
        pinned_now = next(iter(loaded.loras.values())).lora_a.is_pinned()
        del loaded
    return {"seconds": seconds, "pin_memory": lora_model.PIN_MEMORY, "tensors_pinned": pinned_now}


def time_parts(folder: str) -> dict:
    """The load's pieces: the file read, a pin per tensor, and one pinned buffer holding the same bytes."""
    import torch
    from safetensors.torch import load_file

    start = time.perf_counter()
    tensors = load_file(str(Path(folder) / "adapter_model.safetensors"))
    read_s = time.perf_counter() - start
    if not torch.cuda.is_available():
        return {"read_s": round(read_s, 4), "tensors": len(tensors), "cuda": False}
    start = time.perf_counter()  # the process's first pinned allocation sets CUDA up: apart, not in either way
    torch.empty(1, pin_memory=True)
    first_pin_s = time.perf_counter() - start
    start = time.perf_counter()
    each = [t.pin_memory() for t in tensors.values()]
    pin_each_s = time.perf_counter() - start
    total = sum(t.numel() for t in tensors.values())
    start = time.perf_counter()
    flat = torch.empty(total, dtype=torch.bfloat16, pin_memory=True)
    offset = 0
    for t in tensors.values():
        flat[offset:offset + t.numel()].copy_(t.reshape(-1))
        offset += t.numel()
    pin_one_s = time.perf_counter() - start
    del each, flat
    return {"read_s": round(read_s, 4), "tensors": len(tensors), "first_pin_s": round(first_pin_s, 4),
            "pin_each_s": round(pin_each_s, 4), "pin_one_buffer_s": round(pin_one_s, 4), "cuda": True}


def in_fresh_process(call: str) -> dict:
    """Run one part in its own interpreter: pinned host memory is cached per process."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import lora_load_probe as p; "
            f"print('RESULT', json.dumps(p.{call}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": (out.stderr or out.stdout)[-2000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(Path(tmp) / "adapter")
        size = write_adapter(Path(folder), shape, args.rank)
        vocab = shape["vocab_size"]
        result = {"shape": args.shape, "rank": args.rank, "adapter_mb": round(size / 2**20, 1),
                  "tensors": 2 * len(module_shapes(shape)),
                  "load": in_fresh_process(f"time_load({folder!r}, {vocab}, True)"),
                  "load_unpinned": in_fresh_process(f"time_load({folder!r}, {vocab}, False)"),
                  "parts": in_fresh_process(f"time_parts({folder!r})")}
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
