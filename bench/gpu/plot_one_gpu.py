"""Plot the one-GPU benchmark (bench_one_gpu.py): throughput against the bare libraries, and GPU memory.

    python bench/gpu/plot_one_gpu.py bench/results/one_gpu --png bench/results/one_gpu.png

Reads <prefix>_<shape>.json and, where present, <prefix>_<shape>_direct_logprobs.json (direct vLLM
measured with and without per-token logprobs) and trl_grpo_<shape>.json beside it (bench_trl_grpo.py).
Needs matplotlib (not a Tink dependency).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SHAPES = ("0.5b", "7b")


def load(prefix: str) -> dict[str, dict]:
    out = {}
    for shape in SHAPES:
        path = Path(f"{prefix}_{shape}.json")
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        extra = Path(f"{prefix}_{shape}_direct_logprobs.json")
        if extra.exists():
            data.update({k: v for k, v in json.loads(extra.read_text()).items() if k.startswith("direct")})
        trl = path.with_name(f"trl_grpo_{shape}.json")
        if trl.exists():
            data["trl"] = json.loads(trl.read_text())
        out[shape] = data
    return out


def plot(results: dict[str, dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (sample_ax, train_ax, step_ax, memory_ax) = plt.subplots(1, 4, figsize=(20, 4.6))
    shapes = list(results)
    x = range(len(shapes))
    width = 0.27

    def bars(ax, series, title, unit):
        for i, (label, key) in enumerate(series):
            values = [(results[s].get(key[0]) or {}).get(key[1], 0) if isinstance(key, tuple) else results[s].get(key, 0)
                      for s in shapes]
            placed = [xi + (i - (len(series) - 1) / 2) * width for xi in x]
            ax.bar(placed, values, width, label=label)
            for px, v in zip(placed, values):
                ax.text(px, v, f"{v / 1000:.1f}k", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x), [f"{s} shape" for s in shapes])
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.legend(fontsize=8)

    bars(sample_ax, [("Tink via SDK (logprobs)", ("sample", "tok_s")),
                     ("LLM.generate + logprobs", ("direct_vllm_logprobs", "tok_s")),
                     ("LLM.generate, no logprobs", ("direct_vllm", "tok_s"))],
         "sampling 64 prompts x 8 x 256, lm_head LoRA r=32", "tokens/s")
    bars(train_ax, [("Tink forward_backward via SDK", "train_tok_s"), ("bare PEFT loop", ("bare_peft", "tok_s"))],
         "training 64 x 512 tokens (same micro-batches)", "tokens/s")

    for i, shape in enumerate(shapes):
        step = results[shape].get("grpo_full_step")
        if step:
            bottom = 0.0
            for j, (label, key) in enumerate((("sample", "sample_s"), ("forward_backward", "forward_backward_s"),
                                              ("optim_step + save", None))):
                value = step[key] if key else step["optim_step_s"] + step["save_s"]
                step_ax.bar(i - 0.18, value, 0.34, bottom=bottom, color=f"C{j}", label=f"Tink: {label}" if i == 0 else None)
                bottom += value
            step_ax.text(i - 0.18, bottom, f"{bottom:.1f} s", ha="center", va="bottom", fontsize=8)
        trl = results[shape].get("trl", {}).get("step_s_best")
        if trl:
            step_ax.bar(i + 0.18, trl, 0.34, color="C4", label="TRL GRPOTrainer (colocated vLLM)" if i == 0 else None)
            step_ax.text(i + 0.18, trl, f"{trl:.1f} s", ha="center", va="bottom", fontsize=8)
    step_ax.set_xticks(list(x), [f"{s} shape" for s in shapes])
    step_ax.set_ylabel("seconds")
    step_ax.set_title("one GRPO step: 64 x 8 x 256 sampled, trained on")
    step_ax.legend(fontsize=8)

    for i, shape in enumerate(shapes):
        plan = results[shape]["health_at_start"]["sampler"]["primary_health"]["memory_plan"]
        parts = [("trainer (before vLLM)", plan["in_use_before_vllm_gib"]), ("vLLM share", plan["vllm_gib"]),
                 ("kept for training", plan["training_reserve_gib"])]
        bottom = 0.0
        for j, (label, gib) in enumerate(parts):
            memory_ax.bar(i, gib, 0.5, bottom=bottom, color=f"C{j}", label=label if i == 0 else None)
            bottom += gib
        peak = results[shape]["gpu_mib_peak_train"] / 1024
        memory_ax.plot([i - 0.3, i + 0.3], [peak, peak], "k--", label="peak during the step" if i == 0 else None)
    memory_ax.axhline(plan["total_gib"], color="grey", lw=0.8)
    memory_ax.set_xticks(list(x), [f"{s} shape" for s in shapes])
    memory_ax.set_ylabel("GiB")
    memory_ax.set_title("one H200: the memory plan (defaults)")
    memory_ax.set_ylim(0, plan["total_gib"] * 1.3)
    memory_ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.suptitle("Tink on one GPU with the defaults (USE_VLLM=true), random-weight Qwen2.5-7B / 0.5B Llama shapes")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prefix", help="e.g. bench/results/one_gpu")
    parser.add_argument("--png", required=True)
    args = parser.parse_args()
    plot(load(args.prefix), Path(args.png))


if __name__ == "__main__":
    main()
