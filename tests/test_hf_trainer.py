"""HFTrainer on the real tiny Llama: training, gradient accumulation, isolation, files, validation."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from src.backends import AdamParams, LoraSpec, TrainDatum, Trainer, UserInputError
from src.hf_trainer import HFTrainer

_ids = itertools.count()


@pytest.fixture(scope="session")
def trainer(tiny_model_path) -> HFTrainer:
    # fp32 on every device, so the exactness checks below hold on a GPU too (auto would pick bf16).
    return HFTrainer(str(tiny_model_path), dtype="float32")


def new_adapter(trainer: HFTrainer, seed: int | None = 0, rank: int = 4) -> str:
    model_id = f"m{next(_ids)}.x"  # a dot on purpose: model_ids are not valid PEFT adapter names
    trainer.create_adapter(model_id, LoraSpec(rank=rank, seed=seed))
    return model_id


def datum(tokens: list[int], weight: float = 1.0) -> TrainDatum:
    targets = np.array(tokens[1:] + [2], dtype=np.int64)
    return TrainDatum(tokens, {"target_tokens": targets, "weights": np.full(len(tokens), weight, np.float32)})


BATCH = [datum([1, 5, 9, 12, 40]), datum([1, 7, 3]), datum([1, 100, 200, 300, 17, 8, 9])]


def tensors(trainer: HFTrainer, model_id: str) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.adapter_parameters(model_id)]


def grads(trainer: HFTrainer, model_id: str) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in trainer.adapter_parameters(model_id)]


def assert_same(a: list, b: list, **tol) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **tol) if tol else assert_equal(x, y)


def assert_equal(x: torch.Tensor, y: torch.Tensor) -> None:
    assert torch.equal(x, y)


def test_implements_trainer(trainer):
    assert isinstance(trainer, Trainer)
    assert (trainer.name, trainer.vocab_size()) == ("hf-peft", 512)


def test_loss_falls_with_cross_entropy(trainer):
    model_id = new_adapter(trainer)
    losses = []
    for _ in range(6):
        result = trainer.forward_backward(model_id, BATCH, "cross_entropy", None, False)
        losses.append(result.metrics["loss:sum"])
        metrics = trainer.optim_step(model_id, AdamParams(learning_rate=1e-2))
    assert losses[-1] < 0.7 * losses[0], losses
    assert metrics["step:max"] == 6 and metrics["grad_norm:mean"] > 0
    out = result.loss_fn_outputs
    assert [o["logprobs"].shape for o in out] == [(5,), (3,), (7,)]
    assert all(o["logprobs"].dtype == np.float32 for o in out)
    np.testing.assert_allclose(sum(o["elementwise_loss"].sum() for o in out), losses[-1], rtol=1e-5)


def test_logprobs_match_compute_logprobs_and_base(trainer):
    model_id = new_adapter(trainer)
    d = BATCH[2]
    fwd = trainer.forward_backward(model_id, [d], "cross_entropy", None, True).loss_fn_outputs[0]["logprobs"]
    direct = trainer.compute_logprobs(model_id, d.tokens + [2])
    np.testing.assert_allclose(fwd, direct, rtol=1e-5, atol=1e-5)
    # A fresh LoRA has B = 0: it computes exactly the base model.
    np.testing.assert_allclose(direct, trainer.compute_logprobs(None, d.tokens + [2]), rtol=1e-6, atol=1e-6)


def test_gradients_accumulate_across_calls(trainer):
    split, whole = new_adapter(trainer, seed=3), new_adapter(trainer, seed=3)
    trainer.forward_backward(split, BATCH[:1], "cross_entropy", None, False)
    trainer.forward_backward(split, BATCH[1:], "cross_entropy", None, False)
    trainer.forward_backward(whole, BATCH, "cross_entropy", None, False)
    assert_same(grads(trainer, split), grads(trainer, whole), rtol=1e-4, atol=1e-5)
    params = AdamParams(learning_rate=1e-3)
    trainer.optim_step(split, params), trainer.optim_step(whole, params)
    assert_same(tensors(trainer, split), tensors(trainer, whole), rtol=1e-4, atol=1e-5)
    assert all(g is None for g in grads(trainer, split))


def test_microbatches_give_the_same_result(trainer):
    a, b = new_adapter(trainer, seed=4), new_adapter(trainer, seed=4)
    one = trainer.forward_backward(a, BATCH, "cross_entropy", None, False)
    trainer.microbatch_tokens = 6  # one datum per forward pass
    try:
        many = trainer.forward_backward(b, BATCH, "cross_entropy", None, False)
    finally:
        trainer.microbatch_tokens = 16384
    assert one.metrics["loss:sum"] == pytest.approx(many.metrics["loss:sum"], rel=1e-6)
    assert_same(grads(trainer, a), grads(trainer, b), rtol=1e-4, atol=1e-5)


def test_chunked_logits_give_the_same_result(trainer, monkeypatch):
    a, b = new_adapter(trainer, seed=8), new_adapter(trainer, seed=8)
    one = trainer.forward_backward(a, BATCH, "cross_entropy", None, False)
    monkeypatch.setattr("src.hf_trainer.LOGIT_CHUNK_ELEMENTS", 3 * trainer.vocab_size())  # 3 rows a chunk
    many = trainer.forward_backward(b, BATCH, "cross_entropy", None, False)
    for x, y in zip(one.loss_fn_outputs, many.loss_fn_outputs):
        np.testing.assert_allclose(x["logprobs"], y["logprobs"], rtol=1e-6, atol=1e-6)
    assert_same(grads(trainer, a), grads(trainer, b), rtol=1e-4, atol=1e-5)


def test_forward_only_leaves_no_gradient(trainer):
    model_id = new_adapter(trainer)
    trainer.forward_backward(model_id, BATCH, "cross_entropy", None, True)
    assert all(g is None for g in grads(trainer, model_id))


def test_adapters_train_independently(trainer):
    a, b = new_adapter(trainer, seed=1), new_adapter(trainer, seed=2)
    trainer.forward_backward(b, BATCH[:1], "cross_entropy", None, False)  # B has pending gradients
    b_weights, b_grads = tensors(trainer, b), grads(trainer, b)
    for _ in range(2):
        trainer.forward_backward(a, BATCH, "cross_entropy", None, False)
        trainer.optim_step(a, AdamParams(learning_rate=1e-2, weight_decay=0.1))
    assert_same(tensors(trainer, b), b_weights)
    assert_same(grads(trainer, b), b_grads)
    assert trainer.lora_spec(b).seed == 2


def test_seed_makes_init_reproducible(trainer):
    same = [new_adapter(trainer, seed=7), new_adapter(trainer, seed=7)]
    unseeded = [new_adapter(trainer, seed=None), new_adapter(trainer, seed=None)]
    assert_same(tensors(trainer, same[0]), tensors(trainer, same[1]))
    assert not torch.equal(tensors(trainer, unseeded[0])[0], tensors(trainer, unseeded[1])[0])


def train_steps(trainer: HFTrainer, model_id: str, steps: int) -> None:
    for _ in range(steps):
        trainer.forward_backward(model_id, BATCH, "cross_entropy", None, False)
        trainer.optim_step(model_id, AdamParams(learning_rate=1e-2, weight_decay=0.01))


def test_save_load_round_trip(trainer, tmp_path):
    original, restored = new_adapter(trainer, seed=5), new_adapter(trainer, seed=6)
    train_steps(trainer, original, 2)
    trainer.save_state(original, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "tink_state.json"]
    assert json.loads((tmp_path / "tink_state.json").read_text())["step"] == 2

    trainer.load_state(restored, tmp_path, with_optimizer=True)
    assert_same(tensors(trainer, restored), tensors(trainer, original))
    opt_a = trainer._adapters[original].optimizer
    opt_b = trainer._adapters[restored].optimizer
    for pa, pb in zip(trainer.adapter_parameters(original), trainer.adapter_parameters(restored)):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a.state[pa][key], opt_b.state[pb][key])
    train_steps(trainer, original, 1), train_steps(trainer, restored, 1)
    assert_same(tensors(trainer, restored), tensors(trainer, original))

    trainer.load_state(restored, tmp_path, with_optimizer=False)  # weights only: a fresh AdamW
    assert not trainer._adapters[restored].optimizer.state
    assert trainer.optim_step(restored, AdamParams())["step:max"] == 1


def test_optimizer_follows_the_spec(trainer, tmp_path):
    from src.optimizers import Dimuon

    adam, dimuon = new_adapter(trainer), "dimuon.x"
    trainer.create_adapter(dimuon, LoraSpec(rank=4, seed=0, optimizer="dimuon"))
    assert isinstance(trainer._adapters[adam].optimizer, torch.optim.AdamW)
    assert isinstance(trainer._adapters[dimuon].optimizer, Dimuon)
    train_steps(trainer, adam, 1)
    trainer.save_state(adam, tmp_path)
    assert torch.load(tmp_path / "optimizer.pt", weights_only=True)["optimizer"] == "adamw"
    with pytest.raises(UserInputError) as err:  # AdamW moments cannot seed Dimuon
        trainer.load_state(dimuon, tmp_path, with_optimizer=True)
    assert err.value.field == "path"
    trainer.delete_adapter(dimuon)


def test_load_rejects_a_different_rank(trainer, tmp_path):
    small, big = new_adapter(trainer, rank=4), new_adapter(trainer, rank=8)
    trainer.save_state(small, tmp_path)
    before = tensors(trainer, big)
    with pytest.raises(UserInputError) as err:
        trainer.load_state(big, tmp_path, with_optimizer=True)
    assert err.value.field == "path"
    assert_same(tensors(trainer, big), before)


def test_exported_adapter_loads_in_peft(trainer, tiny_model_path, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_id = new_adapter(trainer, seed=9)
    train_steps(trainer, model_id, 2)
    trainer.export_adapter(model_id, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_path) and config["r"] == 4
    assert config["lora_alpha"] == 32  # Tinker's scale, so PEFT applies the trainer's 32/4

    tokens = [1, 5, 9, 12, 40, 77, 2]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_path)), tmp_path)
    with torch.no_grad():
        logits = peft_model(input_ids=torch.tensor([tokens])).logits[0, :-1].float()
    expected = logits.log_softmax(-1).gather(-1, torch.tensor(tokens[1:])[:, None]).squeeze(-1)
    np.testing.assert_allclose(trainer.compute_logprobs(model_id, tokens), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_grad_clipping(trainer):
    model_id = new_adapter(trainer)
    trainer.forward_backward(model_id, BATCH, "cross_entropy", None, False)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads(trainer, model_id)])).item()
    seen = []
    optimizer = trainer._adapters[model_id].optimizer
    hook = optimizer.register_step_pre_hook(lambda opt, *_: seen.append(
        torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in opt.param_groups[0]["params"]])).item()))
    try:
        metrics = trainer.optim_step(model_id, AdamParams(grad_clip_norm=norm / 10))
        trainer.forward_backward(model_id, BATCH, "cross_entropy", None, False)
        unclipped = trainer.optim_step(model_id, AdamParams(grad_clip_norm=0.0))
    finally:
        hook.remove()
    assert metrics["grad_norm:mean"] == pytest.approx(norm, rel=1e-5)  # reported before clipping
    assert seen[0] == pytest.approx(norm / 10, rel=1e-3)
    assert seen[1] == pytest.approx(unclipped["grad_norm:mean"], rel=1e-5)


@pytest.mark.parametrize("case, field", [
    ("empty", "data"),
    ("token", "data[1].model_input"),
    ("target", "data[2].loss_fn_inputs.target_tokens"),
    ("length", "data[0].loss_fn_inputs.weights"),
    ("missing", "data[0].loss_fn_inputs.weights"),
    ("model", "model_id"),
])
def test_bad_inputs_name_the_field(trainer, case, field):
    model_id = new_adapter(trainer)
    data = [TrainDatum(list(d.tokens), dict(d.loss_fn_inputs)) for d in BATCH]
    if case == "empty":
        data = []
    elif case == "token":
        data[1].tokens[1] = 512
    elif case == "target":
        data[2].loss_fn_inputs["target_tokens"] = np.full(7, 9999)
    elif case == "length":
        data[0].loss_fn_inputs["weights"] = np.ones(4, np.float32)
    elif case == "missing":
        del data[0].loss_fn_inputs["weights"]
    elif case == "model":
        model_id = "no-such-model"
    with pytest.raises(UserInputError) as err:
        trainer.forward_backward(model_id, data, "cross_entropy", None, False)
    assert err.value.field == field
    if case != "model":
        assert all(g is None for g in grads(trainer, model_id))


def test_delete_adapter(trainer):
    model_id = new_adapter(trainer)
    trainer.forward_backward(model_id, BATCH[:1], "cross_entropy", None, False)
    trainer.delete_adapter(model_id)
    assert not trainer.has_adapter(model_id)
    with pytest.raises(UserInputError) as err:
        trainer.optim_step(model_id, AdamParams())
    assert err.value.field == "model_id"
    assert trainer.compute_logprobs(None, [1, 5, 9])  # the base model still works


def test_bf16_logprobs_are_fp32(tiny_model_path):
    bf16 = HFTrainer(str(tiny_model_path), dtype="bfloat16")
    bf16.create_adapter("a", LoraSpec(rank=4, seed=0))
    out = bf16.forward_backward("a", BATCH, "cross_entropy", None, False)
    assert out.loss_fn_outputs[0]["logprobs"].dtype == np.float32
    assert all(p.grad is not None and p.dtype == torch.float32 for p in bf16.adapter_parameters("a"))
    bf16.delete_adapter("a")  # the last one: the base model must still answer
    assert len(bf16.compute_logprobs(None, [1, 5, 9])) == 2
