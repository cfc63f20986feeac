"""The reference GRPO step: TRL's `GRPOTrainer` with colocated vLLM, on the one-GPU benchmark's shape and batch.

bench_one_gpu.py times Tink's full GRPO step through the SDK (sample 64 prompts x 8 x 256 tokens, then
forward_backward on those 512 sequences, optim_step, save for the sampler). This runs the same step the
way TRL users do on one GPU: `GRPOTrainer(use_vllm=True, vllm_mode="colocate")`, LoRA r=32 on the same
modules (except lm_head: TRL 1.16 refuses LoRA there, as it computes logprobs from `lm_head.weight`;
Tink's adapter has it, which costs Tink slightly more), 8 generations of 256 tokens for 64 prompts per optimizer step, activation
checkpointing, bf16, no KL term (beta=0, as Tink's importance-sampling loss has none), TRL's defaults
for the rest. Each step's wall time comes from a trainer callback; the first step also warms up.

    setsid python3 bench/gpu/bench_trl_grpo.py --shape 7b --out /tmp/trl-7b > /tmp/trl-7b.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_one_gpu import SHAPES, GpuMemory, Recorder, build_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def distinct_tokens_reward(completion_ids, **_):
    """Any reward with spread across a group will do: the step's cost does not depend on its meaning."""
    return [float(len(set(ids))) for ids in completion_ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="7b")
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", help="an existing model folder (default: build the shape under --out)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--microbatch", type=int, default=32, help="sequences per forward/backward pass")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = Recorder(out / f"bench_trl_grpo_{args.shape}.json")
    rec["args"] = vars(args)
    gpu = GpuMemory()
    model = Path(args.model) if args.model else out / f"model-{args.shape}"
    build_model(model, SHAPES[args.shape])
    try:
        run(args, model, rec, gpu)
    except Exception as exc:
        rec.error("trl", exc)
        raise
    finally:
        (out / "DONE").write_text("1")


def run(args, model: Path, rec: Recorder, gpu: GpuMemory) -> None:
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback

    rec["versions"] = {"trl": trl.__version__, "torch": torch.__version__}
    tokenizer = AutoTokenizer.from_pretrained(model)
    rng = random.Random(0)
    # the same kind of prompt as the Tink run: 32 random ids of the tiny tokenizer, as text for TRL
    texts = [tokenizer.decode([rng.randrange(3, 500) for _ in range(32)]) for _ in range(args.prompts * args.steps)]
    rec["prompt_tokens_mean"] = sum(len(tokenizer(t).input_ids) for t in texts) / len(texts)
    completions = args.prompts * args.samples
    config = trl.GRPOConfig(
        output_dir=str(Path(args.out) / "trl"), report_to="none", save_strategy="no", logging_steps=1, seed=0,
        max_steps=args.steps, learning_rate=1e-5, bf16=True, gradient_checkpointing=True, beta=0.0,
        per_device_train_batch_size=args.microbatch, gradient_accumulation_steps=completions // args.microbatch,
        num_generations=args.samples, max_completion_length=args.max_tokens, temperature=1.0,
        use_vllm=True, vllm_mode="colocate")
    peft_config = LoraConfig(r=32, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM")

    steps: list[dict] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            torch.cuda.synchronize()
            gpu.mark()
            self.started = time.time()

        def on_step_end(self, *_, **__):
            torch.cuda.synchronize()
            steps.append({"step_s": round(time.time() - self.started, 2), "gpu_mib_peak": gpu.peak()})
            rec["steps"] = steps

    t0 = time.time()
    trainer = trl.GRPOTrainer(model=str(model), reward_funcs=distinct_tokens_reward, args=config,
                              train_dataset=Dataset.from_dict({"prompt": texts}), peft_config=peft_config,
                              callbacks=[StepClock()])
    rec["init_s"] = round(time.time() - t0, 1)
    rec["gpu_mib_after_init"] = gpu.used_mib()
    trainer.train()
    rec["log_history"] = trainer.state.log_history
    rec["torch_max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    rec["step_s_best"] = min(s["step_s"] for s in steps[1:] or steps)
    rec["completion_tokens_per_step"] = [entry.get("completions/mean_length", 0) * completions
                                         for entry in trainer.state.log_history if "completions/mean_length" in entry]
    print(json.dumps(rec.data, indent=1, default=str)[:4000])


if __name__ == "__main__":
    main()
