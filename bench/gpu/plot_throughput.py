"""Plot a GPU run of bench/results/THROUGHPUT_RESULTS.md, before and after side by side.

    python bench/gpu/plot_throughput.py bench/results --png bench/results/throughput_run3.png
    python bench/gpu/plot_throughput.py bench/results --run 4 --png bench/results/throughput_run4.png
    python bench/gpu/plot_throughput.py bench/results --run 5 --png bench/results/throughput_run5.png
    python bench/gpu/plot_throughput.py bench/results --run 6 --png bench/results/throughput_run6.png
    python bench/gpu/plot_throughput.py bench/results --run 7 --png bench/results/throughput_run7.png
    python bench/gpu/plot_throughput.py bench/results --run 8 --png bench/results/throughput_run8.png
    python bench/gpu/plot_throughput.py bench/results --run 9 --png bench/results/throughput_run9.png

Run 3 reads one_gpu_7b_run3.json (bench_one_gpu.py), multi_adapter_gpu.txt (bench/bench_multi_adapter.py's
table) and steering_0.5b.json (bench_steering.py); run 4 reads train_0.5b_gpu.json (bench/bench_train.py),
multi_adapter_gpu.txt and multi_adapter_gpu_run4.txt, and steering_0.5b_run4.json; run 5 reads
train_7b_gpu.json and train_7b_is_gpu.json, sampling_0.5b_run5.txt (bench/bench_sampling.py's lines),
steering_7b_run5.json and multi_adapter_gpu_run5.txt; run 6 reads sampling_0.5b_run6.txt (with the
logprobs-at-end A/B) and steering_0.5b_run6.json; run 7 reads one_gpu_0.5b_run7.json and one_gpu_7b_run7.json
(bench_one_gpu.py: sampling through the SDK against LLM.generate, 1 adapter and 8 mixed); run 8 reads
one_gpu_0.5b_run8.json (with each SDK pass's timeline) and sampling_0.5b_run8.txt (the in-process passes); run 9
reads one_gpu_0.5b_run9.json and one_gpu_7b_run9.json (the reference no longer detokenizes), with run 8's 0.5B SDK
passes beside them. Needs matplotlib
(not a Tink dependency).
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
    parser.add_argument("--run", type=int, default=3, choices=[3, 4, 5, 6, 7, 8, 9])
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if args.run in (4, 5, 6, 7, 8, 9):
        plots = {4: plot_run4, 5: plot_run5, 6: plot_run6, 7: plot_run7, 8: plot_run8, 9: plot_run9}
        plots[args.run](args.folder, plt).savefig(args.png, dpi=110)
        return
    one = json.loads((args.folder / "one_gpu_7b_run3.json").read_text())
    multi = multi_adapter_rows((args.folder / "multi_adapter_gpu.txt").read_text())
    steer = json.loads((args.folder / "steering_0.5b.json").read_text())["engines"]
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.5))

    labelled_bars(axes[0], {"before:\nteacher forcing": one["direct_vllm_teacher_forced"]["tok_s"],
                            "after: Tink\n(SDK, adapter)": one["compute_logprobs"]["tok_s"],
                            "vLLM prefill\n(base model)": one["direct_vllm_prompt_logprobs"]["tok_s"]},
                  ["#bbb", "#2a7", "#468"], "compute_logprobs, 64 x 1,024 tokens, 7B\n(goal: >= 0.5x the prefill)",
                  "scored tokens / s")

    ax = axes[1]
    labels, width = ["one by one", "joined", "1 adapter x 64"], 0.25
    for j, label in enumerate(labels):
        values = [multi[m][j] for m in multi]
        ax.bar([i + (j - 1) * width for i in range(len(multi))], values, width, label=label)
    ax.set_xticks(range(len(multi)), [f"{m} shape" for m in multi])
    ax.set_title("forward_backward, 8 adapters x 8 x 512 tokens\n(goal: joined >= 0.8x 1 adapter)")
    ax.set_ylabel("tokens / s")
    ax.legend()

    passes = [("graphs", "unused", "graphs"), ("eager_unpatched", "unused", "eager\npatch off"),
              ("eager", "unused", "eager\nunused"), ("eager", "mixed", "eager\nhalf steered"),
              ("eager", "steered", "eager\nall steered")]
    labelled_bars(axes[2], {label: steer[e]["passes"][p]["tok_s"] for e, p, label in passes},
                  ["#468", "#bbb", "#2a7", "#8b5", "#c84"], "sampling with look-inside, 0.5B shape\n256 requests x 128 tokens",
                  "tokens / s")
    fig.suptitle("Tink on one H200, vLLM 0.26 (2026-12-02, third run)")
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)


def labelled_bars(ax, bars: dict[str, float], colors: list[str], title: str, ylabel: str) -> None:
    ax.bar(list(bars), list(bars.values()), color=colors)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    for i, v in enumerate(bars.values()):
        ax.text(i, v, f"{v:,.2f}" if v < 10 else f"{v:,.0f}", ha="center", va="bottom")


def plot_run4(folder: Path, plt):
    train = json.loads((folder / "train_0.5b_gpu.json").read_text())
    before, after = multi_adapter_rows((folder / "multi_adapter_gpu.txt").read_text()), \
        multi_adapter_rows((folder / "multi_adapter_gpu_run4.txt").read_text())
    steer = json.loads((folder / "steering_0.5b_run4.json").read_text())["engines"]
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.5))
    labelled_bars(axes[0], {"before: Tink": train["before"]["tink_tok_s"], "before: bare PEFT": train["before"]["bare_tok_s"],
                            "after: Tink": train["after"]["tink_tok_s"], "after: bare PEFT": train["after"]["bare_tok_s"]},
                  ["#bbb", "#468", "#2a7", "#468"],
                  "forward_backward 64 x 512, 0.5B, in-process\n(goal: >= 0.95x bare PEFT)", "tokens / s")
    labelled_bars(axes[1], {f"{name}\n{shape}": rows[shape][1] / rows[shape][2]
                            for name, rows in (("run 3 (H200): per segment", before), ("run 4 (H100): grouped", after))
                            for shape in rows if shape == "0.5b"},
                  ["#bbb", "#2a7"], "8 adapters x 8 x 512 joined, 0.5B\n(joined / 1 adapter; goal >= 0.8)", "ratio")
    axes[1].axhline(0.8, color="#c84", linestyle="--")
    passes = [("graphs_unpatched", "unused", "graphs, V2\npatch off"), ("graphs_static", "unused", "graphs, V1\nstatic unused"),
              ("graphs_static", "mixed", "static\nhalf steered"), ("graphs_static", "steered", "static\nall steered")]
    labelled_bars(axes[2], {label: steer[e]["passes"][p]["tok_s"] for e, p, label in passes},
                  ["#468", "#2a7", "#8b5", "#c84"], "look-inside under CUDA graphs, 0.5B\n256 requests x 128 tokens",
                  "tokens / s")
    fig.suptitle("Tink on one H100, vLLM 0.26 (2026-12-07, fourth run)")
    fig.tight_layout()
    return fig


def sampling_rows(text: str) -> list[tuple[float, float, float]]:
    """(Tink, LLM.generate without logprobs, with logprobs=0) tok/s of each bench_sampling.py run that had both."""
    tink = [float(v) for v in re.findall(r"tink VLLMEngineSampler :\s+([\d.]+)", text)]
    direct = [(float(a), float(b)) for a, b in re.findall(r"direct LLM.generate\s+:\s+([\d.]+) tokens/s; "
                                                           r"with logprobs=0 ([\d.]+)", text)]
    return [(t, *d) for t, d in zip(tink, direct)]


def plot_run5(folder: Path, plt):
    trains = {loss: json.loads((folder / name).read_text())
              for loss, name in (("cross_entropy", "train_7b_gpu.json"), ("importance_sampling", "train_7b_is_gpu.json"))}
    sampling = sampling_rows((folder / "sampling_0.5b_run5.txt").read_text())
    steer = json.loads((folder / "steering_7b_run5.json").read_text())["engines"]
    multi = multi_adapter_rows((folder / "multi_adapter_gpu_run5.txt").read_text())["7b"]
    fig, axes = plt.subplots(1, 4, figsize=(24, 5.5))
    labelled_bars(axes[0], {f"{who}\n{short}": trains[loss][key]
                            for loss, short in (("cross_entropy", "CE"), ("importance_sampling", "IS"))
                            for who, key in (("Tink", "tink_tok_s"), ("bare PEFT", "bare_tok_s"))},
                  ["#2a7", "#468", "#2a7", "#468"], "forward_backward 64 x 512, 7B, in-process\n(goal: >= 0.95x bare PEFT)",
                  "tokens / s")
    labelled_bars(axes[1], {f"{who}\n{label}": row[i] for label, row in zip(("1 ad.", "8 ad."), sampling)
                            for i, who in enumerate(("Tink", "vLLM\nplain", "vLLM\nlogprobs"))},
                  ["#2a7", "#bbb", "#468"] * 2, "sampling 64 x 8 x 256, 0.5B\n(Tink returns logprobs on every sample)",
                  "tokens / s")
    axes[1].set_title("sampling 64 x 8 x 256, 0.5B: Tink vs LLM.generate\nwithout / with logprobs=0 (Tink returns them)")
    passes = [("graphs_unpatched", "unused", "V2, patch off\n(default)"), ("graphs_v1_unpatched", "unused", "V1, patch off"),
              ("graphs_static", "unused", "V1, static\nunused"), ("graphs_static_v2", "unused", "V2, static\nunused"),
              ("graphs_static_v2", "steered", "V2, static\nall steered")]
    labelled_bars(axes[2], {label: steer[e]["passes"][p]["tok_s"] for e, p, label in passes},
                  ["#468", "#bbb", "#8b5", "#2a7", "#c84"],
                  "look-inside under CUDA graphs, 7B\n(goal: unused >= 0.97x the default)", "tokens / s")
    labelled_bars(axes[3], dict(zip(("one by one", "joined", "1 adapter x 64"), multi)), ["#bbb", "#2a7", "#468"],
                  "forward_backward, 8 adapters x 8 x 512, 7B\n(goal: joined >= 0.8x 1 adapter)", "tokens / s")
    fig.suptitle("Tink on one H100, vLLM 0.26 (2026-12-07, fifth run)")
    fig.tight_layout()
    return fig


def at_end_rows(text: str) -> list[tuple[float, float]]:
    """(on, off) tok/s of each bench_sampling.py run with --at-end-ab."""
    return [(float(on), float(off)) for on, off in
            re.findall(r"logprobs_at_end on / off :\s+([\d.]+) / ([\d.]+)", text)]


def plot_run6(folder: Path, plt):
    text = (folder / "sampling_0.5b_run6.txt").read_text()
    direct = [(float(a), float(b)) for a, b in re.findall(r"direct LLM.generate\s+:\s+([\d.]+) tokens/s; "
                                                           r"with logprobs=0 ([\d.]+)", text)]
    steer = json.loads((folder / "steering_0.5b_run6.json").read_text())["engines"]
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.5))
    for ax, label, (on, off), (plain, logprobs) in zip(axes, ("1 adapter", "8 adapters mixed"),
                                                       at_end_rows(text), direct):
        labelled_bars(ax, {"Tink\nper step": off, "Tink\nat the end": on, "vLLM\nno logprobs": plain,
                           "vLLM\nlogprobs=0": logprobs}, ["#bbb", "#2a7", "#468", "#8ab"],
                      f"sampling 64 x 8 x 256, 0.5B, {label}\nTink's logprobs per step vs at the end (VLLM_LOGPROBS_AT_END)",
                      "tokens / s")
    passes = [("graphs_unpatched", "unused", "V2, patch off\n(default)"), ("graphs_static_v2", "unused", "V2, static\nunused"),
              ("graphs_static_v2", "steered", "V2, static\nall steered"), ("graphs_static_v2", "mixed", "V2, static\nhalf steered")]
    labelled_bars(axes[2], {label: steer[e]["passes"][p]["tok_s"] for e, p, label in passes},
                  ["#468", "#2a7", "#c84", "#e96"], "look-inside under CUDA graphs, 0.5B (best of 3; dots: every rep)",
                  "tokens / s")
    for x, (e, p, _) in enumerate(passes):
        reps = steer[e]["passes"][p]["reps_tok_s"]
        axes[2].plot([x] * len(reps), reps, "k.", alpha=0.6)
    fig.suptitle("Tink on one H100, vLLM 0.26 (2026-12-07, sixth run; a slower host than the fifth)")
    fig.tight_layout()
    return fig


def plot_run7(folder: Path, plt):
    """Item 1 through the SDK, as users sample: each shape, 1 adapter and 8 mixed, best pass of each side (a
    shape whose direct reference the budget did not reach shows Tink's bars alone)."""
    return sdk_vs_direct(folder, plt, 7, "* LLM.generate detokenized, Tink does not",
                         "Tink through the SDK vs vLLM's LLM.generate, same batch, one H200 (2026-12-07, seventh run)")


def plot_run9(folder: Path, plt):
    """Item 1 against the fair reference (LLM.generate without detokenizing), both shapes on one H100; at 0.5B
    the eighth run's SDK passes (same card class, before this session's logprob work) beside them."""
    return sdk_vs_direct(folder, plt, 9, "",
                         "Tink through the SDK vs vLLM's LLM.generate (no detokenizing), same batch, one H100 "
                         "(2026-12-07, ninth run)", before={"0.5b": ("one_gpu_0.5b_run8.json", "Tink\n(SDK)\nrun 8")})


def sdk_vs_direct(folder: Path, plt, run: int, caveat: str, title: str,
                  before: dict[str, tuple[str, str]] | None = None):
    """Per shape and row (1 adapter, 8 mixed): Tink's best SDK pass (its passes as dots), `LLM.generate` without
    and with `logprobs=0`, and optionally an earlier run's SDK pass of that shape."""
    fig, axes = plt.subplots(1, 4, figsize=(22, 5.5))
    panels = [(shape, row) for shape in ("7b", "0.5b") for row in ("", "_mixed")]
    for ax, (shape, row) in zip(axes, panels):
        one = json.loads((folder / f"one_gpu_{shape}_run{run}.json").read_text())
        tink = one[f"sample{row}"]
        adapters = f"{tink['adapters']} adapters mixed" if row else "1 adapter"
        bars = {}
        if before and shape in before:
            file, label = before[shape]
            bars[label] = json.loads((folder / file).read_text())[f"sample{row}"]["best_tok_s"]
        tink_at = len(bars)
        bars["Tink\n(SDK)"] = tink["best_tok_s"]
        mark = "*" if caveat else ""
        for key, label in ((f"direct_vllm{row}", "vLLM\nno logprobs"), (f"direct_vllm_logprobs{row}", "vLLM\nlogprobs=0")):
            if key in one:
                bars[label + mark] = one[key]["tok_s"]
        goal = f"goal: >= {0.9 if row else 0.95}x LLM.generate" if len(bars) > tink_at + 1 else "LLM.generate not reached (budget)"
        colors = ["#bbb"] * tink_at + ["#2a7", "#468", "#8ab"]
        labelled_bars(ax, bars, colors[:len(bars)],
                      f"sampling {shape}, {adapters}, best of {len(tink['reps_tok_s'])}\n({goal})", "tokens / s")
        ax.plot([tink_at] * len(tink["reps_tok_s"]), tink["reps_tok_s"], "k.", alpha=0.6)
    fig.suptitle(title + (f"\n{caveat}" if caveat else ""))
    fig.tight_layout()
    return fig


def in_process_passes(text: str) -> list[float]:
    """Every in-process pass (tok/s) listed in sampling_0.5b_run8.txt."""
    return [float(v) for line in re.findall(r"passes \[([\d, ]+)\]", text) for v in line.split(",")]


def plot_run8(folder: Path, plt):
    """Where an SDK pass's seconds go (the worker's timelines) and whether the HTTP path or the engine holds it:
    through the SDK, in-process, and LLM.generate side by side at 0.5B."""
    one = json.loads((folder / "one_gpu_0.5b_run8.json").read_text())
    passes = in_process_passes((folder / "sampling_0.5b_run8.txt").read_text())
    fig, axes = plt.subplots(1, 2, figsize=(16, 5.5))
    ax = axes[0]
    bars = {"Tink\n(SDK)": one["sample"]["best_tok_s"], "Tink\nin-process\n(median)": sorted(passes)[len(passes) // 2],
            "vLLM\nno logprobs*": one["direct_vllm"]["tok_s"], "vLLM\nlogprobs=0*": one["direct_vllm_logprobs"]["tok_s"]}
    labelled_bars(ax, bars, ["#2a7", "#7b5", "#468", "#8ab"],
                  "sampling 0.5B, 1 adapter, 64 x 8 x 256 (* LLM.generate detokenized, Tink does not)", "tokens / s")
    ax.plot([1] * len(passes), passes, "k.", alpha=0.6)
    ax.plot([0] * len(one["sample"]["reps_tok_s"]), one["sample"]["reps_tok_s"], "k.", alpha=0.6)
    ax = axes[1]
    rows = [(f"{label} #{i + 1}", t, row["tokens"] / rate)
            for label, row in (("1 adapter", one["sample"]), ("8 mixed", one["sample_mixed"]))
            for i, (t, rate) in enumerate(zip(row["timelines"], row["reps_tok_s"]))]
    for y, (_, t, seconds) in enumerate(rows):  # each span where it lies in the pass, from the first submit
        spans = (((t["first_arrival_s"], t["arrivals_s"]), "#e94", "requests arriving"),
                 ((seconds - t["tail_s"] - t["running_s"], t["running_s"]), "#2a7", "first start to last finish"),
                 ((seconds - t["tail_s"], t["tail_s"]), "#468", "results back to the client"))
        for offset, (span, color, label) in enumerate(spans):
            ax.broken_barh([span], (y - 0.35 + offset * 0.25, 0.22), color=color, label=label if y == 0 else None)
    ax.set_yticks(range(len(rows)), [name for name, _, _ in rows])
    ax.set_xlabel("seconds from the first submit")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=8)
    ax.set_title("one SDK pass, from the worker's database")
    fig.suptitle("Tink at 0.5B on one H100: the pass is in the engine, not the HTTP path (2026-12-07, eighth run)")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
