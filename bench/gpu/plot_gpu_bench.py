"""Plot and tabulate bench/gpu/bench_h100.py's gpu_bench.json.

    python3 bench/gpu/plot_gpu_bench.py bench/results/gpu_bench.json \
        --png bench/results/gpu_bench.png --md /tmp/table.md

The PNG has four panels (sampling tokens/s, forward_backward tokens/s, hot-update latency, RL step
time); the Markdown is the results table used in bench/results/GPU_RESULTS.md. Needs matplotlib
for the PNG only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SAMPLING_ROWS = [
    ("tink_http_default_1", "Tink HTTP (SDK, 8 clients), 1 adapter, default engine limits"),
    ("tink_http_default_8", "Tink HTTP (SDK, 8 clients), 8 adapters mixed, default engine limits"),
    ("tink_inproc_default_1", "Tink VLLMEngineSampler in-process, 1 adapter, default limits"),
    ("tink_inproc_default_8", "Tink VLLMEngineSampler in-process, 8 adapters, default limits"),
    ("tink_http_tuned_1", "Tink HTTP (SDK, 8 clients), 1 adapter, LLM-class limits"),
    ("tink_http_tuned_8", "Tink HTTP (SDK, 8 clients), 8 adapters mixed, LLM-class limits"),
    ("tink_inproc_tuned_1", "Tink VLLMEngineSampler in-process, 1 adapter, LLM-class limits"),
    ("tink_inproc_tuned_8", "Tink VLLMEngineSampler in-process, 8 adapters, LLM-class limits"),
    ("direct_1", "vLLM LLM.generate, 1 adapter"),
    ("direct_8", "vLLM LLM.generate, 8 adapters mixed"),
    ("direct_base", "vLLM LLM.generate, base model (no adapter)"),
    ("hf_1", "HF generate + PEFT (HFSampler), 1 adapter"),
    ("hf_8", "HF generate + PEFT (HFSampler), 8 adapters"),
]


def fmt(x, digits=0):
    if x is None:
        return "—"
    return f"{x:,.{digits}f}"


def table(d: dict) -> str:
    m, mach = d.get("model", {}), d.get("machine", {})
    v = mach.get("versions", {})
    s, r = d.get("sampling", {}), d.get("ratios", {})
    lines = [
        f"| machine | {mach.get('gpu', '?')} ({mach.get('gpu_memory_gib', '?')} GiB), driver {mach.get('driver', '?')}, "
        f"{mach.get('cpus', '?')} CPUs |",
        "|---|---|",
        f"| software | Python {mach.get('host_python')}, torch {mach.get('torch')} (CUDA {mach.get('cuda')}), vLLM {v.get('vllm')}, "
        f"transformers {v.get('transformers')}, peft {v.get('peft')}, tinker {v.get('tinker')}, trl {v.get('trl')}, "
        f"Tink {v.get('tink_commit')} |",
        f"| measured | {d.get('date', '?')} |",
        f"| model | {m.get('family')} {m.get('params_M')}M params (hidden {m.get('hidden')}, {m.get('layers')} layers, "
        f"{m.get('heads')}/{m.get('kv_heads')} heads, vocab {m.get('vocab')}), bf16, {m.get('weights')}; "
        f"{m.get('tokenizer')}; LoRA r={m.get('lora', {}).get('rank')} on {', '.join(m.get('lora', {}).get('targets', []))} |",
    ]
    w = d.get("workload", {}).get("sampling", {})
    lines += ["", f"Sampling: {w.get('prompts')} prompts x {w.get('prompt_tokens')} tokens, n={w.get('n')}, "
              f"{w.get('max_tokens')} new tokens each (EOS ignored), temperature 1 (HF: first {w.get('hf_prompts')} prompts).",
              "", "| sampler | tokens/s | vs direct vLLM (same adapters) |", "|---|---|---|"]
    for key, label in SAMPLING_ROWS:
        if key not in s:
            continue
        adapters = "8" if key.endswith("_8") else "1"
        direct = (s.get(f"direct_{adapters}") or {}).get("tokens_per_s")
        rate = s[key].get("tokens_per_s")
        lines.append(f"| {label} | {fmt(rate)} | {fmt(rate / direct, 3) + 'x' if rate and direct else '—'} |")
    eng = d.get("engines", {})
    if eng:
        lines += ["", "Scheduler limits (max_num_seqs / max_num_batched_tokens): " + ", ".join(
            f"{k} {x.get('max_num_seqs')}/{x.get('max_num_batched_tokens')}" for k, x in eng.items())]
    hot = d.get("hot_update", {})
    if hot:
        lines += ["", "| hot update (optim_step returned -> first token of the new version) | median s | min / max s |",
                  "|---|---|---|"]
        for key, x in hot.items():
            lines.append(f"| {key} | {fmt(x.get('median_s'), 3)} | {fmt(x.get('min_s'), 3)} / {fmt(x.get('max_s'), 3)} |")
    fb = d.get("forward_backward", {})
    if fb:
        wf = d.get("workload", {}).get("forward_backward", {})
        lines += ["", f"forward_backward: {wf.get('sequences')} sequences x {wf.get('tokens_each')} tokens, cross_entropy.",
                  "", "| trainer | tokens/s (best) | tokens/s (median) | vs bare PEFT |", "|---|---|---|---|"]
        peft = (fb.get("bare_peft") or {}).get("tokens_per_s")
        for key, label in (("tink_http", "Tink through the SDK (HTTP worker, HFTrainer)"),
                           ("tink_inproc", "Tink HFTrainer in-process"), ("bare_peft", "bare PEFT loop")):
            if key in fb:
                rate = fb[key].get("tokens_per_s")
                lines.append(f"| {label} | {fmt(rate)} | {fmt(fb[key].get('tokens_per_s_median'))} | "
                             f"{fmt(rate / peft, 3) + 'x' if rate and peft else '—'} |")
    rl, trl = d.get("rl_step", {}), d.get("trl", {})
    if rl or trl:
        lines += ["", "| one GRPO step (64 prompts x 8 samples x 256 tokens) | median s | sample s | train s | steps |",
                  "|---|---|---|---|---|"]
        for key, x in rl.items():
            steps = x.get("steps", [])[1:] or x.get("steps", [])
            mid = lambda k, steps=steps: sorted(st[k] for st in steps)[len(steps) // 2] if steps else None  # noqa: E731
            lines.append(f"| Tink ({key} engine limits) | {fmt(x.get('step_s_median'), 2)} | {fmt(mid('sample_s'), 2)} | "
                         f"{fmt(mid('train_s'), 2)} | {', '.join(str(st['step_s']) for st in x.get('steps', []))} |")
        if trl:
            lines.append(f"| TRL GRPOTrainer + colocated vLLM | {fmt(trl.get('step_s_median'), 2)} | — | — | "
                         f"{', '.join(str(st['step_s']) for st in trl.get('steps', []))} |")
    goals = r.get("goals", {})
    lines += ["", "| goal | target | measured |", "|---|---|---|"]
    for label, key, target in (
            ("sampling, Tink HTTP / direct vLLM, 1 adapter (default / tuned limits)", "tink_http_%s_1_vs_direct",
             f">= {goals.get('sampling_vs_direct')}"),
            ("sampling, Tink HTTP / direct vLLM, 8 adapters (default / tuned limits)", "tink_http_%s_8_vs_direct",
             f">= {goals.get('sampling_vs_direct')}")):
        lines.append(f"| {label} | {target} | {fmt(r.get(key % 'default'), 3)} / {fmt(r.get(key % 'tuned'), 3)} |")
    lines.append(f"| forward_backward, Tink HTTP / bare PEFT | >= {goals.get('fwd_bwd_vs_peft')} | "
                 f"{fmt(r.get('fwd_bwd_http_vs_peft'), 3)} (in-process {fmt(r.get('fwd_bwd_inproc_vs_peft'), 3)}) |")
    lines.append(f"| hot update, median s (default / tuned) | <= {goals.get('hot_update_s')} | "
                 f"{fmt(r.get('hot_update_http_default_median_s'), 3)} / {fmt(r.get('hot_update_http_tuned_median_s'), 3)} |")
    lines.append(f"| RL step, TRL time / Tink time (default / tuned) | > 1 | "
                 f"{fmt(r.get('rl_step_default_speedup_vs_trl'), 2)} / {fmt(r.get('rl_step_tuned_speedup_vs_trl'), 2)} |")
    if d.get("errors"):
        lines += ["", "Failed steps: " + "; ".join(f"{e['step']}: {e['error'][:300]}" for e in d["errors"])]
    return "\n".join(lines) + "\n"


def plot(d: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    s = d.get("sampling", {})
    keys = [k for k, _ in SAMPLING_ROWS if k in s]
    ax = axes[0][0]
    colors = ["tab:blue" if k.startswith("tink_http") else "tab:cyan" if k.startswith("tink_inproc") else
              "tab:green" if k.startswith("direct") else "tab:gray" for k in keys]
    ax.barh(range(len(keys)), [s[k]["tokens_per_s"] for k in keys], color=colors)
    ax.set_yticks(range(len(keys)), [k.replace("tink_", "") for k in keys], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s")
    w = d.get("workload", {}).get("sampling", {})
    ax.set_title(f"sampling ({w.get('prompts')} prompts x n={w.get('n')} x {w.get('max_tokens')} tokens)")
    for i, k in enumerate(keys):
        ax.text(s[k]["tokens_per_s"], i, f" {s[k]['tokens_per_s']:,.0f}", va="center", fontsize=7)

    fb = d.get("forward_backward", {})
    ax = axes[0][1]
    fkeys = [k for k in ("tink_http", "tink_inproc", "bare_peft") if k in fb]
    ax.bar(fkeys, [fb[k]["tokens_per_s"] for k in fkeys], color=["tab:blue", "tab:cyan", "tab:gray"][: len(fkeys)])
    ax.set_ylabel("tokens/s")
    wf = d.get("workload", {}).get("forward_backward", {})
    ax.set_title(f"forward_backward ({wf.get('sequences')} x {wf.get('tokens_each')} tokens, cross_entropy)")
    for i, k in enumerate(fkeys):
        ax.text(i, fb[k]["tokens_per_s"], f"{fb[k]['tokens_per_s']:,.0f}", ha="center", va="bottom", fontsize=8)

    hot = d.get("hot_update", {})
    ax = axes[1][0]
    hkeys = list(hot)
    ax.bar(hkeys, [hot[k]["median_s"] for k in hkeys], color="tab:purple")
    ax.axhline(d.get("ratios", {}).get("goals", {}).get("hot_update_s", 0.5), color="red", ls="--", label="goal")
    ax.set_ylabel("seconds (median)")
    ax.set_title("hot update: optim_step returned -> first token of new version")
    ax.legend()
    for i, k in enumerate(hkeys):
        ax.text(i, hot[k]["median_s"], f"{hot[k]['median_s']:.3f}", ha="center", va="bottom", fontsize=8)

    ax = axes[1][1]
    rl, trl = d.get("rl_step", {}), d.get("trl", {})
    labels, values = [], []
    for k, x in rl.items():
        if x.get("step_s_median"):
            labels.append(f"Tink {k}")
            values.append(x["step_s_median"])
    if trl.get("step_s_median"):
        labels.append("TRL GRPOTrainer")
        values.append(trl["step_s_median"])
    ax.bar(labels, values, color=["tab:blue"] * (len(values) - (1 if trl.get("step_s_median") else 0)) +
           (["tab:orange"] if trl.get("step_s_median") else []))
    ax.set_ylabel("seconds per step (median)")
    ax.set_title(f"one GRPO step: sample {w.get('prompts')}x{w.get('n')}x{w.get('max_tokens')}, score, fwd/bwd, optim")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    m = d.get("model", {})
    fig.suptitle(f"Tink GPU benchmark — {d.get('machine', {}).get('gpu', '?')}, {m.get('family')} {m.get('params_M')}M, "
                 f"LoRA r=32, vLLM {d.get('machine', {}).get('versions', {}).get('vllm')} — {d.get('date', '')}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json")
    p.add_argument("--png", default=None)
    p.add_argument("--md", default=None)
    args = p.parse_args()
    data = json.loads(Path(args.json).read_text())
    text = table(data)
    print(text)
    if args.md:
        Path(args.md).write_text(text)
    if args.png:
        plot(data, Path(args.png))
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
