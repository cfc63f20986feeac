"""Memory safety of the trainer and the GPU plan: checkpointing, OOM retries, the vLLM share, one base copy."""

from __future__ import annotations

import pytest
import torch

from src.backends import BackendError
from src.hf_sampler import HFSampler
from src.hf_trainer import HFTrainer
from src.memory import (
    DeviceMemory,
    GiB,
    MicrobatchBudget,
    activation_bytes_per_token,
    plan_vllm_share,
    training_reserve,
)

from .test_hf_trainer import BATCH, assert_same, grads, new_adapter

GRAD_TOL = dict(rtol=1e-6, atol=1e-7)  # fp32: checkpointing and retries change no arithmetic


@pytest.fixture(scope="module")
def trainer(tiny_model_path) -> HFTrainer:
    return HFTrainer(str(tiny_model_path), dtype="float32")


def run(trainer: HFTrainer, model_id: str):
    return trainer.forward_backward(model_id, BATCH, "cross_entropy", None, False)


def count_layer_calls(trainer: HFTrainer, monkeypatch) -> list[int]:
    """Count forward runs of decoder layer 0 (a checkpointed layer runs again in backward)."""
    calls = [0]
    layer = trainer._checkpoint_layers[0]
    original = type(layer).forward

    def counting(self, *args, **kwargs):
        if self is layer:
            calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(layer), "forward", counting)
    return calls


def test_checkpointing_recomputes_and_gives_the_same_gradients(trainer, monkeypatch):
    """Checkpointing makes layers and logits again in backward; without it a GPU keeps the log-softmax,
    a CPU (no memory budget) still recomputes the logits. Same gradients every way."""
    plain, checkpointed, recomputed = (new_adapter(trainer, seed=3) for _ in range(3))
    calls = count_layer_calls(trainer, monkeypatch)
    head_calls = [0]
    head = trainer._hf.get_output_embeddings()
    hook = head.register_forward_hook(lambda *_: head_calls.__setitem__(0, head_calls[0] + 1))
    try:
        monkeypatch.setattr(trainer, "keep_logits", True)  # as on a GPU
        run(trainer, plain)
        assert calls[0] == 1 and trainer.memory_report()["last_checkpointed"] is False
        assert head_calls[0] == 1, "without checkpointing, backward keeps the logits' log-softmax"
        trainer.gradient_checkpointing = "true"
        try:
            calls[0] = head_calls[0] = 0
            out = run(trainer, checkpointed)
        finally:
            trainer.gradient_checkpointing = "auto"
        assert calls[0] == 2, "a checkpointed layer runs forward again during backward"
        assert head_calls[0] == 2, "with checkpointing, the logits are made again in backward"
        assert trainer.memory_report()["last_checkpointed"] is True
        monkeypatch.setattr(trainer, "keep_logits", False)  # as on CPU
        calls[0] = head_calls[0] = 0
        run(trainer, recomputed)
        assert (calls[0], head_calls[0]) == (1, 2) and trainer.memory_report()["last_checkpointed"] is False
    finally:
        hook.remove()
    assert out.metrics["loss:sum"] > 0
    assert_same(grads(trainer, plain), grads(trainer, checkpointed), **GRAD_TOL)
    assert_same(grads(trainer, plain), grads(trainer, recomputed), **GRAD_TOL)
    assert not any(layer.training for layer in trainer._checkpoint_layers), "layers go back to eval mode"


def test_forward_only_never_checkpoints(trainer, monkeypatch):
    model_id = new_adapter(trainer)
    calls = count_layer_calls(trainer, monkeypatch)
    trainer.gradient_checkpointing = "true"
    try:
        trainer.forward_backward(model_id, BATCH, "cross_entropy", None, True)
    finally:
        trainer.gradient_checkpointing = "auto"
    assert calls[0] == 1 and all(g is None for g in grads(trainer, model_id))


def fail_with_oom(trainer: HFTrainer, monkeypatch, when) -> list[int]:
    """Make a micro-batch fail with a CUDA-style OOM whenever `when(batch_size)` is true. Under grad it
    fails in backward, at layer 0's LoRA gradient, after later layers' gradients have accumulated (the
    partial state a real OOM leaves); without grad it fails in forward."""
    attempts = [0]
    original = HFTrainer._target_logprobs

    def flaky(self, tokens, targets, *args, **options):
        attempts[0] += 1
        out = original(self, tokens, targets, *args, **options)
        if not when(len(tokens)):
            return out
        if not torch.is_grad_enabled():
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        layer0 = next(p for n, p in self._peft.named_parameters()
                      if p.requires_grad and "layers.0." in n and f".{self._active}." in n)
        handle = []

        def boom(grad):
            handle[0].remove()
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")

        handle.append(layer0.register_hook(boom))
        return out

    monkeypatch.setattr(HFTrainer, "_target_logprobs", flaky)
    return attempts


def test_oom_retries_with_smaller_microbatches_and_the_same_gradients(trainer, monkeypatch):
    reference, retried = new_adapter(trainer, seed=5), new_adapter(trainer, seed=5)
    run(trainer, reference)
    expected = run(trainer, reference)  # the second call accumulates onto pending gradients
    run(trainer, retried)
    before = trainer.budget.bytes_per_token[False]
    attempts = fail_with_oom(trainer, monkeypatch, lambda size: size > 1)
    out = run(trainer, retried)  # fails while micro-batches hold several datums, then succeeds
    assert attempts[0] > len(BATCH), "it retried"
    assert trainer.budget.bytes_per_token[False] > before and trainer.budget.ceiling[False] < 16384, "it shrank"
    assert out.metrics["loss:sum"] == pytest.approx(expected.metrics["loss:sum"], rel=1e-6)
    # smaller micro-batches sum the same terms in another order: fp32 rounding only (LoRA scale 32/r makes
    # these gradients several times larger than at scale 1, hence atol 1e-5)
    assert_same(grads(trainer, reference), grads(trainer, retried), rtol=1e-5, atol=1e-5)
    trainer.budget.bytes_per_token[False] = before
    trainer.budget.ceiling[False] = None


def test_oom_that_persists_fails_the_call_and_keeps_pending_gradients(trainer, monkeypatch):
    model_id = new_adapter(trainer, seed=6)
    run(trainer, model_id)
    pending = grads(trainer, model_id)
    before = dict(trainer.budget.bytes_per_token)
    fail_with_oom(trainer, monkeypatch, lambda size: True)
    with pytest.raises(BackendError) as failure:
        run(trainer, model_id)
    message = str(failure.value)
    assert "TINK_GRADIENT_CHECKPOINTING" in message and "pending gradients are unchanged" in message
    assert_same(pending, grads(trainer, model_id))  # bit for bit
    trainer.budget.bytes_per_token.update(before)
    trainer.budget.ceiling.update({False: None, True: None})


def test_budget_on_cpu_is_the_cap_and_packs_datums(trainer):
    assert trainer.budget.tokens(False) == trainer.microbatch_tokens == 16384
    assert not trainer.budget.should_checkpoint("auto", 10_000)
    assert trainer.budget.should_checkpoint("true", 1) and not trainer.budget.should_checkpoint("false", 1)


def test_gpu_budget_follows_free_memory(monkeypatch):
    budget = MicrobatchBudget(torch.device("cuda", 0), 16384, {False: 4 << 20, True: 256 << 10})
    budget._on_gpu = True
    free = [40 * GiB]
    monkeypatch.setattr(DeviceMemory, "of", classmethod(lambda cls, device: DeviceMemory(free[0], 80 * GiB)))
    assert budget.tokens(True) == 16384  # capped
    assert budget.tokens(False) == int(0.45 * 40 * GiB // (4 << 20))  # nothing measured yet: half the memory
    budget.bytes_per_token[False], budget.measured[False] = 4 << 20, True  # as observe() leaves it
    assert budget.tokens(False) == int(0.9 * 40 * GiB // (4 << 20))  # 9216
    budget.measured[False] = False
    assert not budget.should_checkpoint("auto", 512)
    assert budget.should_checkpoint("auto", 10_000), "the longest sequence would not fit without it"
    free[0] = 10 * GiB
    assert budget.should_checkpoint("auto", 512), "a plain micro-batch would be under 4096 tokens"
    budget.shrink(True, 8192)
    assert budget.tokens(True) == 4096  # half the micro-batch that failed


def test_activation_estimate_at_7b_shape():
    from transformers import Qwen2Config

    config = Qwen2Config(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, vocab_size=152064)
    plain = activation_bytes_per_token(config, 2, False)
    checkpointed = activation_bytes_per_token(config, 2, True)
    assert 10 << 20 < plain < 14 << 20  # MiB per token: 64 x 512 tokens cannot fit on any GPU without checkpointing
    # measured on an H200 at this shape (bf16, r=32 everywhere): 583 KiB/token checkpointed, before the 10 % margin
    assert 583 << 10 < checkpointed < 700 << 10


def test_vllm_share_is_free_memory_minus_the_training_reserve():
    total, free = 140 * GiB, 124 * GiB  # an H200 after a 7B trainer loaded
    reserve = training_reserve(total, 470 << 10, 16384)
    assert reserve == int(0.15 * total)  # 21 GiB: more than one checkpointed micro-batch + adapter state
    plan = plan_vllm_share(DeviceMemory(free, total), reserve)
    assert plan.source == "plan" and plan.vllm_gib == pytest.approx(103, abs=0.01)
    assert plan.gpu_memory_utilization == pytest.approx(103 / 140)
    assert "VLLM_GPU_MEMORY_UTILIZATION" in plan.describe()
    assert training_reserve(total, 0, 16384, reserve_gb=30) == 30 * GiB
    override = plan_vllm_share(DeviceMemory(free, total), reserve, override=0.5)
    assert (override.gpu_memory_utilization, override.source) == (0.5, "VLLM_GPU_MEMORY_UTILIZATION")
    with pytest.raises(ValueError, match="TINK_TRAIN_MEMORY_RESERVE_GB"):
        plan_vllm_share(DeviceMemory(22 * GiB, total), reserve)


def test_hf_sampler_shares_the_trainers_base_weights(tiny_model_path):
    trainer = HFTrainer(str(tiny_model_path), dtype="float32")
    shared = HFSampler(str(tiny_model_path), model=trainer.share_base_model())
    own = HFSampler(str(tiny_model_path), dtype="float32")
    trainer_weights = {p.data_ptr() for p in trainer._hf.parameters()}
    assert {p.data_ptr() for p in shared._hf.parameters()} <= trainer_weights
    assert shared.health()["base_weights"] == "shared with the trainer"
    from src.backends import SampleJob, SamplingParams

    job = SampleJob([1, 40, 41], 2, SamplingParams(max_tokens=6, temperature=0.0))
    before = shared.sample(job).sequences
    model_id = new_adapter(trainer, seed=1)  # PEFT now wraps the trainer's layers ...
    trainer.forward_backward(model_id, BATCH, "cross_entropy", None, False)
    from src.backends import AdamParams

    trainer.optim_step(model_id, AdamParams(learning_rate=0.1))  # ... and its adapter is no longer zero
    after = shared.sample(job).sequences
    assert [s.tokens for s in after] == [s.tokens for s in before] == [s.tokens for s in own.sample(job).sequences]
    assert [s.logprobs for s in after] == [s.logprobs for s in own.sample(job).sequences]
