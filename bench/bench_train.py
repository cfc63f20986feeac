"""forward_backward of one adapter: Tink's HF trainer in-process against a bare PEFT loop, same micro-batches.

The throughput issue's item 3 (goal: >= 0.95x the bare loop). Both sides get the same model, LoRA
targets (every linear layer and lm_head), data, micro-batches and activation checkpointing (the
bare loop copies what the trainer chose), and both score with an fp32 log-softmax over the
vocabulary in row chunks. The bare loop keeps its chunks' logits for backward, as a script would;
so does the trainer on a GPU, unless it checkpoints activations (then it recomputes them in backward,
one chunk at a time). Timings are of
`forward_backward` alone (no optimizer step), best of `--repeats`, the GPU synchronized around each.

`--profile DIR` also runs one step of each under `torch.profiler` and writes the top operators by
GPU and by CPU time, and the GPU's busy fraction (kernel time over wall time): where the gap is.

    .venv/bin/python bench/bench_train.py                                   # CPU smoke: tiny model
    python3 bench/bench_train.py --device cuda --dtype bfloat16 --shape /tmp/b-0.5b/model-0.5b \
        --batch 64 --seq 512 --rank 32 --profile /tmp/prof                  # the issue's 0.5B shape
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_multi_adapter import model_folder  # noqa: E402

from src.backends import LoraSpec, TrainDatum  # noqa: E402
from src.hf_trainer import LOGIT_CHUNK_ELEMENTS, HFTrainer  # noqa: E402

LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(step, device: str, repeats: int) -> list[float]:
    """Seconds of each of `repeats` runs of `step`, after one warm-up run."""
    step()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


class BarePeft:
    """The plain PEFT loop a researcher would write: the model, `get_peft_model`, backward per micro-batch."""

    def __init__(self, folder: str, device: str, dtype: str, rank: int, checkpointing: bool):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device)
        if checkpointing:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            hf.train()  # HF checkpoints only in training mode; these models have no dropout
        config = LoraConfig(r=rank, lora_alpha=32, target_modules=LM_TARGETS, task_type="CAUSAL_LM")
        self.model = get_peft_model(hf, config)
        self.vocab = hf.config.vocab_size

    def forward_backward(self, ids: torch.Tensor, sequences_per_microbatch: int) -> None:
        """Cross-entropy on `ids` (rows of inputs + next token), `backward` once per micro-batch of rows."""
        decoder, head = self.model.base_model.model.model, self.model.base_model.model.lm_head
        rows = max(1, LOGIT_CHUNK_ELEMENTS // self.vocab)  # Tink's chunk size
        for start in range(0, ids.shape[0], sequences_per_microbatch):
            chunk = ids[start: start + sequences_per_microbatch]
            hidden = decoder(input_ids=chunk[:, :-1]).last_hidden_state
            flat, labels = hidden.reshape(-1, hidden.shape[-1]), chunk[:, 1:].reshape(-1)
            loss = 0.0
            for r in range(0, flat.shape[0], rows):
                logits = head(flat[r: r + rows]).float()
                loss = loss + torch.nn.functional.cross_entropy(logits, labels[r: r + rows], reduction="sum")
            loss.backward()


def profile(step, device: str, path: Path) -> dict[str, float]:
    """One run of `step` under torch.profiler: the operator tables to `path`, the GPU's busy fraction back."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    synchronize(device)
    t0 = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        step()
        synchronize(device)
    wall = time.perf_counter() - t0
    table = prof.key_averages()
    sections = []
    if device.startswith("cuda"):
        sections.append(table.table(sort_by="self_cuda_time_total", row_limit=25))
    sections.append(table.table(sort_by="self_cpu_time_total", row_limit=25))
    path.write_text("\n\n".join(sections))
    kernel_us = sum(e.self_device_time_total for e in table if e.device_type.name == "CUDA")
    return {"wall_s": round(wall, 4), "gpu_busy": round(kernel_us / 1e6 / wall, 3) if kernel_us else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="tiny", help="tiny, small, or a model folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--loss", default="cross_entropy", choices=["cross_entropy", "importance_sampling"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpointing", default="auto", choices=["auto", "true", "false"])
    parser.add_argument("--profile", type=Path, help="a folder for torch.profiler tables")
    parser.add_argument("--out", type=Path, help="a JSON file for the results")
    args = parser.parse_args()

    folder = model_folder(args.shape, Path(tempfile.mkdtemp()))
    trainer = HFTrainer(folder, device=args.device, dtype=args.dtype, gradient_checkpointing=args.checkpointing)
    trainer.create_adapter("bench", LoraSpec(rank=args.rank, seed=0))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, min(500, trainer.vocab_size()), (args.batch, args.seq + 1))
    data = []
    for row in ids:
        inputs = {"target_tokens": row[1:]}
        if args.loss == "cross_entropy":
            inputs["weights"] = np.ones(args.seq, np.float32)
        else:  # the RL shape: sampler logprobs and advantages on every token
            inputs.update(logprobs=np.full(args.seq, -2.0, np.float32), advantages=rng.normal(size=args.seq))
        data.append(TrainDatum(row[:-1].tolist(), inputs))

    def tink_step():
        trainer.forward_backward("bench", data, args.loss, None, False)

    tink = timed(tink_step, args.device, args.repeats)
    microbatches, checkpointed = list(trainer._last_microbatches), bool(trainer._last_checkpointed)
    result = {"shape": args.shape, "device": args.device, "dtype": args.dtype, "loss": args.loss,
              "batch": args.batch, "seq": args.seq, "rank": args.rank, "microbatch_tokens": microbatches,
              "checkpointed": checkpointed, "tink_s": [round(t, 4) for t in tink]}
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        result["tink_profile"] = profile(tink_step, args.device, args.profile / "tink.txt")

    trainer = tink_step = None  # the bare loop loads its own copy of the model: at 7B two would not fit beside it
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    bare = BarePeft(folder, args.device, args.dtype, args.rank, checkpointed)
    per_batch = max(1, microbatches[0] // args.seq)
    device_ids = torch.as_tensor(ids, device=args.device)

    def bare_step():
        bare.forward_backward(device_ids, per_batch)

    bare_times = timed(bare_step, args.device, args.repeats)
    result["bare_s"] = [round(t, 4) for t in bare_times]
    if args.profile:
        result["bare_profile"] = profile(bare_step, args.device, args.profile / "bare.txt")
    tokens = args.batch * args.seq
    result["tink_tok_s"] = round(tokens / min(tink), 1)
    result["bare_tok_s"] = round(tokens / min(bare_times), 1)
    result["ratio"] = round(result["tink_tok_s"] / result["bare_tok_s"], 3)
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
