"""Plot the third GPU run (bench/results/THROUGHPUT_RESULTS.md): compute_logprobs before/after, joined
multi-adapter passes, and what looking inside costs on the vLLM engine.

    python bench/gpu/plot_throughput.py bench/results --png bench/results/throughput_run3.png

Reads one_gpu_7b_run3.json (bench_one_gpu.py), multi_adapter_gpu.txt (bench/bench_multi_adapter.py's table)
and steering_0.5b.json (bench_steering.py) from the folder. Needs matplotlib (not a Tink dependency).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def multi_adapter_rows(text: str) -> dict[str, list[float]]:
    """{model: [one by one, joined, 1 adapter] tok/s} of the forward_backward rows."""
    rows = {}
    for line in text.splitlines():
        match = re.match(r"(model-\S+).*forward_backward\s+([\d,]+)\s+([\d,]+)\s+\S+\s+([\d,]+)", line)
        if match:
            rows[match[1].removeprefix("model-")] = [float(v.replace(",", "")) for v in match.groups()[1:]]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--png", type=Path, required=True)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    one = json.loads((args.folder / "one_gpu_7b_run3.json").read_text())
    multi = multi_adapter_rows((args.folder / "multi_adapter_gpu.txt").read_text())
    steer = json.loads((args.folder / "steering_0.5b.json").read_text())["engines"]
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.5))

    ax = axes[0]
    bars = {"before:\nteacher forcing": one["direct_vllm_teacher_forced"]["tok_s"],
            "after: Tink\n(SDK, adapter)": one["compute_logprobs"]["tok_s"],
            "vLLM prefill\n(base model)": one["direct_vllm_prompt_logprobs"]["tok_s"]}
    ax.bar(list(bars), list(bars.values()), color=["#bbb", "#2a7", "#468"])
    ax.set_title("compute_logprobs, 64 x 1,024 tokens, 7B\n(goal: >= 0.5x the prefill)")
    ax.set_ylabel("scored tokens / s")
    for i, v in enumerate(bars.values()):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom")

    ax = axes[1]
    labels, width = ["one by one", "joined", "1 adapter x 64"], 0.25
    for j, label in enumerate(labels):
        values = [multi[m][j] for m in multi]
        ax.bar([i + (j - 1) * width for i in range(len(multi))], values, width, label=label)
    ax.set_xticks(range(len(multi)), [f"{m} shape" for m in multi])
    ax.set_title("forward_backward, 8 adapters x 8 x 512 tokens\n(goal: joined >= 0.8x 1 adapter)")
    ax.set_ylabel("tokens / s")
    ax.legend()

    ax = axes[2]
    passes = [("graphs", "unused", "graphs"), ("eager_unpatched", "unused", "eager\npatch off"),
              ("eager", "unused", "eager\nunused"), ("eager", "mixed", "eager\nhalf steered"),
              ("eager", "steered", "eager\nall steered")]
    values = [steer[e]["passes"][p]["tok_s"] for e, p, _ in passes]
    ax.bar([label for _, _, label in passes], values, color=["#468", "#bbb", "#2a7", "#8b5", "#c84"])
    ax.set_title("sampling with look-inside, 0.5B shape\n256 requests x 128 tokens")
    ax.set_ylabel("tokens / s")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom")
    fig.suptitle("Tink on one H200, vLLM 0.26 (2026-12-02, third run)")
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)


if __name__ == "__main__":
    main()
