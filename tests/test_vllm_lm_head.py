"""lm_head LoRA (Tinker's default `train_unembed=True`) served by vLLM on Qwen2 and Qwen3, checked against HF + PEFT.

vLLM's `Qwen2ForCausalLM` refuses lm_head LoRA unless Tink's vLLM plugin (src/vllm_plugin.py) is
installed; `Qwen3ForCausalLM` (and Llama, tests/test_vllm_backend.py) accept it natively. Qwen3 is
built with tied embeddings, as Qwen3-0.6B and Qwen2.5-0.5B are. One engine per family (~40 s each on
2 CPU cores), closed before the next one starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from src.backends import AdapterRef, SampleJob, SamplingParams
from src.tiny_model import ensure_tiny_model
from tests.vllm_fixtures import LOGPROB_TOL, assert_same, make_adapter, requires_vllm

pytestmark = [pytest.mark.vllm, requires_vllm]

PROMPTS = [[1, 40, 41, 97, 12], [1, 200, 7], [1, 33, 34, 35, 36, 37, 38, 39, 300, 301]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
RANDOM = SamplingParams(max_tokens=16, temperature=1.0, seed=3)  # processed logprobs == raw ones at T=1


def lm_head_only_adapter(model_path: Path, out: Path, seed: int, rank: int = 8) -> Path:
    """A PEFT folder with LoRA on lm_head alone: whatever it changes, only the lm_head path can carry."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["lm_head"],
                                                  lora_dropout=0.0, task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * (0.5 if "lora_B" in name else 0.1))
    peft_model.save_pretrained(out, save_embedding_layers=False)
    return out


@pytest.fixture(scope="module", params=[("qwen2", False), ("qwen3", True)], ids=["qwen2", "qwen3-tied"])
def family(request, tmp_path_factory):
    """(vLLM engine, HF sampler, adapters) on a tiny model of one family; the engine is closed afterwards."""
    from src.hf_sampler import HFSampler
    from src.vllm_backend import VLLMEngineSampler

    name, tied = request.param
    root = tmp_path_factory.mktemp(f"lm-head-{name}")
    model = ensure_tiny_model(root / f"tiny-{name}", family=name, tied=tied)
    adapters = {"all": AdapterRef(f"tinker://run-{name}/sampler_weights/000001",
                                  make_adapter(model, root / "all", seed=1), rank=8),
                "lm_head": AdapterRef(f"tinker://run-{name}/sampler_weights/000002",
                                      lm_head_only_adapter(model, root / "lm_head", seed=2), rank=8)}
    engine = VLLMEngineSampler(str(model), max_loras=4, max_lora_rank=8, max_cpu_loras=4,
                               gpu_memory_utilization=0.1, max_model_len=512, dtype="float32")
    hf = HFSampler(str(model), device="cpu", dtype="float32", max_loaded_adapters=4)
    yield engine, hf, adapters
    engine.close()
    hf.close()


def test_the_model_is_of_the_family_under_test(family):
    engine, _, _ = family
    config = json.loads((Path(engine.base_model) / "config.json").read_text())
    name = Path(engine.base_model).name.removeprefix("tiny-")
    assert config["architectures"] == [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[name]]
    assert config["tie_word_embeddings"] == (name == "qwen3")


@pytest.mark.parametrize("key", ["all", "lm_head"])
def test_greedy_tokens_and_logprobs_match_hf(family, key):
    engine, hf, adapters = family
    for prompt in PROMPTS:
        job = SampleJob(prompt, 1, GREEDY, adapters[key])
        assert_same(engine.sample(job).sequences[0], hf.sample(job).sequences[0])


@pytest.mark.parametrize("key", ["all", "lm_head"])
def test_sampled_and_prompt_logprobs_match_hf(family, key):
    """Sampled at T=1, each token's logprob is that of the adapter's own distribution (fp32, <= 1e-4)."""
    engine, hf, adapters = family
    ref = adapters[key]
    for prompt in PROMPTS:
        sampled = engine.sample(SampleJob(prompt, 1, RANDOM, ref)).sequences[0]
        tokens = prompt + sampled.tokens
        theirs = hf.compute_logprobs(ref, tokens)
        assert sampled.logprobs == pytest.approx(theirs[len(prompt):], abs=LOGPROB_TOL)
        assert engine.compute_logprobs(ref, tokens)[1:] == pytest.approx(theirs[1:], abs=LOGPROB_TOL)


def test_the_lm_head_delta_is_applied(family):
    """The lm_head-only adapter moves the logprobs far beyond the tolerance: vLLM did not drop it."""
    engine, hf, adapters = family
    tokens = PROMPTS[2]
    base = engine.compute_logprobs(None, tokens)[1:]
    adapted = engine.compute_logprobs(adapters["lm_head"], tokens)[1:]
    assert max(abs(a - b) for a, b in zip(base, adapted)) > 100 * LOGPROB_TOL
    assert adapted == pytest.approx(hf.compute_logprobs(adapters["lm_head"], tokens)[1:], abs=LOGPROB_TOL)
