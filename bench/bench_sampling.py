"""Sampling throughput: Tink's vLLM sampler vs direct `vllm.LLM.generate` vs HF generate; adapter hot-update latency.

Same model, same adapters, same batch for all three. Tink's number includes everything a worker does
per request (validation, thread hand-off to the engine loop, result conversion), with every job
submitted concurrently from its own thread, as the worker's HTTP threads do.

    .venv/bin/python bench/bench_sampling.py                        # the tiny model, 4 adapters, CPU
    .venv/bin/python bench/bench_sampling.py --model /models/Qwen3-0.6B --max-tokens 256 --gpu-mem 0.5

Prints tokens/s for each, the ratios (goal: Tink >= 0.95x direct vLLM), and the hot-update latency:
from a new adapter version written to disk (what `save_weights_for_sampler` returns after) to its
first sampled token. `--flat-ab K` also times Tink's sampler K times each with vLLM's FlatLogprobs on
and off, alternating, on the same engine; `--at-end-ab K` the same for sending sampled logprobs once per
request (src/vllm_logprobs_at_end.py) against once per step. `--reps K` reports the best of K passes for Tink and for
`LLM.generate` (which is timed with and without per-token logprobs: Tink always returns them, as the
Tinker API does). `--pyspy FILE` records one more, unmeasured pass of Tink's sampler under py-spy
(this process and its engine core).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.backends import AdapterRef, SampleJob, SamplingParams  # noqa: E402


def make_jobs(args, adapters: list[AdapterRef]) -> list[SampleJob]:
    prompts = [[1] + [(17 * i + 5 * j) % 400 + 3 for j in range(args.prompt_len - 1)] for i in range(args.prompts)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=0, stop_at_eos=False)
    return [SampleJob(p, args.n, params, a) for a in adapters for p in prompts]


def count(results) -> int:
    return sum(len(s.tokens) for r in results for s in r.sequences)


def bench_tink(args, jobs, model: str) -> tuple[float, float, object]:
    from src.vllm_backend import VLLMEngineSampler

    max_loras = args.max_loras or len({j.adapter.name for j in jobs}) + 1
    sampler = VLLMEngineSampler(model, max_loras=max_loras, max_lora_rank=args.rank,
                                gpu_memory_utilization=args.gpu_mem, max_model_len=args.max_model_len)
    with ThreadPoolExecutor(len(jobs)) as pool:
        list(pool.map(sampler.sample, jobs[:len(jobs) // 4 or 1]))  # warm-up: adapters loaded, kernels ready
        rates = []
        for _ in range(args.reps):
            start = time.perf_counter()
            tokens = count(pool.map(sampler.sample, jobs))
            rates.append(tokens / (time.perf_counter() - start))
        report_passes("tink passes", rates)
        if args.flat_ab:
            from src import vllm_backend

            switch_ab(sampler, jobs, pool, vllm_backend, "FLAT_LOGPROBS", args.flat_ab)
        if args.at_end_ab:
            switch_ab(sampler, jobs, pool, sampler, "logprobs_at_end", args.at_end_ab)
        if args.pyspy:
            with py_spy(args.pyspy):
                count(pool.map(sampler.sample, jobs))
    return max(rates), tokens, sampler


def report_passes(what: str, rates: list[float]) -> None:
    if len(rates) > 1:
        print(f"{what:<23}: {[round(r) for r in rates]} tokens/s (the best is reported)")


@contextmanager
def py_spy(path: str, pid: int | None = None):
    """`py-spy record` of this process (or `pid`) and its children (the engine core) while the block runs."""
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid or os.getpid()), "--subprocesses", "--nonblocking",
                            "--rate", "100", "--format", "raw", "--output", path],
                           stdout=subprocess.DEVNULL, stderr=open(path + ".log", "w"))
    time.sleep(2)  # attached before the pass starts
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()


def switch_ab(sampler, jobs, pool, holder, name: str, passes: int) -> None:
    """The same batch with the switch `holder.name` on and off, alternating, `passes` each."""
    rates: dict[bool, list[float]] = {True: [], False: []}
    shipped = getattr(holder, name)
    for _ in range(passes):
        for on in (False, True):
            setattr(holder, name, on)
            start = time.perf_counter()
            tokens = count(pool.map(sampler.sample, jobs))
            rates[on].append(tokens / (time.perf_counter() - start))
    setattr(holder, name, shipped)
    best = {on: max(r) for on, r in rates.items()}
    print(f"{name} on / off : {best[True]:10.1f} / {best[False]:.1f} tokens/s (best of {passes}), "
          f"ratio {best[True] / best[False]:.3f}; all: on {[round(r) for r in rates[True]]}, "
          f"off {[round(r) for r in rates[False]]}")


def bench_direct(args, jobs, model: str) -> dict[str, float]:
    from vllm import LLM
    from vllm import SamplingParams as VSamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest
    from vllm.platforms import current_platform

    cpu = current_platform.is_cpu()
    gpu_mem = args.gpu_mem or (0.1 if cpu else 0.9)  # VLLMEngineSampler's defaults
    names = sorted({j.adapter.name for j in jobs})
    max_loras = args.max_loras or len(names) + 1
    llm = LLM(model=model, enable_lora=True, max_loras=max_loras, max_lora_rank=args.rank,
              max_cpu_loras=max_loras, gpu_memory_utilization=gpu_mem, enforce_eager=cpu,
              max_model_len=args.max_model_len, dtype="float32" if cpu else "auto",
              logprobs_mode="processed_logprobs", generation_config="vllm", seed=0)
    loras = {n: LoRARequest(n, i + 1, str(j.adapter.path)) for i, n in enumerate(names) for j in jobs
             if j.adapter.name == n}
    prompts = [TokensPrompt(prompt_token_ids=j.prompt) for j in jobs]
    requests = [loras[j.adapter.name] for j in jobs]
    rates = {}
    for logprobs in (None, 0):  # without, then with the sampled tokens' logprobs
        params = [VSamplingParams(n=j.num_samples, max_tokens=j.params.max_tokens, temperature=1.0, seed=0,
                                  ignore_eos=True, logprobs=logprobs, detokenize=False) for j in jobs]
        warm = len(jobs) // 4 or 1
        llm.generate(prompts[:warm], params[:warm], lora_request=requests[:warm], use_tqdm=False)
        passes = []
        for _ in range(args.reps):
            start = time.perf_counter()
            outs = llm.generate(prompts, params, lora_request=requests, use_tqdm=False)
            tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
            passes.append(tokens / (time.perf_counter() - start))
        key = "logprobs" if logprobs == 0 else "plain"
        report_passes(f"direct passes, {key}", passes)
        rates[key] = max(passes)
    del llm
    return rates


def bench_hf(args, jobs, model: str) -> float:
    from src.hf_sampler import HFSampler

    sampler = HFSampler(model, max_loaded_adapters=len(jobs))
    subset = jobs[: max(1, len(jobs) // args.hf_fraction)]  # HF is slow: time a fraction of the batch
    sampler.sample(subset[0])
    start = time.perf_counter()
    with ThreadPoolExecutor(len(subset)) as pool:
        tokens = count(pool.map(sampler.sample, subset))
    rate = tokens / (time.perf_counter() - start)
    sampler.close()
    return rate


def hot_update_latency(sampler, model: str, root: Path, rank: int, rounds: int = 3) -> list[float]:
    """Seconds from a new version's files being on disk to its first sampled token coming back."""
    from tests.vllm_fixtures import make_adapter

    out = []
    for version in range(rounds):
        path = make_adapter(Path(model), root / f"hot-{version}", seed=100 + version, rank=rank)
        ref = AdapterRef(f"tinker://bench/sampler_weights/{version:06d}", path, rank)
        start = time.perf_counter()
        sampler.sample(SampleJob([1, 40, 41], 1, SamplingParams(max_tokens=1, temperature=0.0), ref))
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: build the tiny Llama)")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per adapter")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--gpu-mem", type=float, default=None, help="VLLM_GPU_MEMORY_UTILIZATION (RAM share on CPU)")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--max-loras", type=int, default=None,
                        help="adapter slots of both engines (default: the adapters + 1; a worker's VLLM_MAX_LORAS)")
    parser.add_argument("--hf-fraction", type=int, default=4, help="time HF on 1/this of the batch")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-direct", action="store_true")
    parser.add_argument("--flat-ab", type=int, default=0, help="passes of Tink with FlatLogprobs on and off")
    parser.add_argument("--at-end-ab", type=int, default=0,
                        help="passes of Tink with logprobs sent at each request's end (VLLM_LOGPROBS_AT_END) and per step")
    parser.add_argument("--reps", type=int, default=1, help="timed passes of Tink and of LLM.generate (best reported)")
    parser.add_argument("--pyspy", default=None, help="py-spy raw profile of one more pass of Tink's sampler")
    args = parser.parse_args()
    import torch

    if torch.cuda.is_available():  # two engines, one after the other: the second's forked core can die at
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # CUDA init (seen hanging on an H100)

    from src.tiny_model import ensure_tiny_model
    from tests.vllm_fixtures import make_adapter

    root = Path(tempfile.mkdtemp(prefix="tink-bench-"))
    model = args.model or str(ensure_tiny_model(root / "tiny-llama"))
    adapters = [AdapterRef(f"tinker://bench-{i}/sampler_weights/000001",
                           make_adapter(Path(model), root / f"adapter-{i}", seed=i, rank=args.rank), args.rank)
                for i in range(args.adapters)]
    jobs = make_jobs(args, adapters)
    print(f"workload: {len(jobs)} jobs ({args.adapters} adapters x {args.prompts} prompts), n={args.n}, "
          f"{args.max_tokens} new tokens each, prompt {args.prompt_len} tokens")

    tink, tokens, sampler = bench_tink(args, jobs, model)
    print(f"tink VLLMEngineSampler : {tink:10.1f} tokens/s  ({tokens} tokens)")
    latencies = hot_update_latency(sampler, model, root, args.rank)
    print("adapter hot-update     : " + ", ".join(f"{s * 1000:.0f} ms" for s in latencies)
          + "  (new version on disk -> first token back)")
    sampler.close()

    if not args.skip_direct:
        direct = bench_direct(args, jobs, model)
        print(f"direct LLM.generate    : {direct['plain']:10.1f} tokens/s; with logprobs=0 {direct['logprobs']:.1f}")
        print(f"ratio tink / direct    : {tink / direct['plain']:10.3f}  (goal >= 0.95); "
              f"{tink / direct['logprobs']:.3f} against LLM.generate with the same logprobs")
    if not args.skip_hf:
        hf = bench_hf(args, jobs, model)
        print(f"HF generate (HFSampler): {hf:10.1f} tokens/s")
        print(f"ratio vLLM / HF        : {tink / hf:10.2f}x")


if __name__ == "__main__":
    main()
