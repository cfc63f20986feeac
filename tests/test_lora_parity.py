"""Tinker's LoRA scale (alpha 32 whatever the rank) in training, in the files, and in the sampler.

The tinker-cookbook's `hyperparam_utils` picks one learning rate per model and assumes
`lora_alpha=32` ("LoRA Without Regret": scale 32/rank, so the best learning rate barely depends
on the rank). These tests train rank 8, 32 and 128 at the cookbook's rate and check that they
learn alike, that the same runs with alpha = rank or 2·rank do not (so the check can fail), and
that the saved adapter_config.json carries alpha 32 so PEFT and the sampler apply the trainer's scale.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tinker import types
from transformers import AutoConfig

from src.backends import TINKER_LORA_ALPHA, AdamParams, LoraSpec, TrainDatum
from src.hf_trainer import HFTrainer

RANKS = (8, 32, 128)
STEPS = 6
# Loss after STEPS at each rank, relative to rank 32's. Measured: within 4% with Tinker's alpha;
# 0.2x-2.2x with alpha = rank, 0.4x-1.6x with alpha = 2 * rank.
TOLERANCE = 0.10


def cookbook_lora_lr(model_path) -> float:
    """The tinker-cookbook's rule (hyperparam_utils.get_lr, is_lora=True): 5e-5 x 10 (the LoRA multiplier)
    x (2000 / hidden_size) ** p, with p = 0.781 for Llama (0.0775 for Qwen)."""
    config = AutoConfig.from_pretrained(model_path)
    exponent = {"llama": 0.781, "qwen2": 0.0775, "qwen3": 0.0775}[config.model_type]
    return 5e-5 * 10 * (2000 / config.hidden_size) ** exponent


@pytest.fixture(scope="module")
def trainer(tiny_model_path) -> HFTrainer:
    return HFTrainer(str(tiny_model_path), device="cpu", dtype="float32")


def task() -> list[TrainDatum]:
    """A small supervised task: four fixed 16-token sequences to learn."""
    rng = np.random.default_rng(0)
    data = []
    for _ in range(4):
        seq = rng.integers(3, 512, size=17)
        data.append(TrainDatum(seq[:-1].tolist(), {"target_tokens": seq[1:].astype(np.int64),
                                                   "weights": np.ones(16, np.float32)}))
    return data


def losses_after_training(trainer: HFTrainer, lr: float, alpha_of_rank) -> dict[int, tuple[float, float]]:
    """(first loss, loss after STEPS AdamW steps) per rank, same data and seed, mean per token."""
    data, out = task(), {}
    for rank in RANKS:
        model_id = f"parity-{rank}-{alpha_of_rank(rank)}"
        trainer.create_adapter(model_id, LoraSpec(rank=rank, alpha=alpha_of_rank(rank), seed=0))
        first = trainer.forward_backward(model_id, data, "cross_entropy", None, True).metrics["loss:sum"]
        for _ in range(STEPS):
            trainer.forward_backward(model_id, data, "cross_entropy", None, False)
            trainer.optim_step(model_id, AdamParams(learning_rate=lr))
        last = trainer.forward_backward(model_id, data, "cross_entropy", None, True).metrics["loss:sum"]
        out[rank] = (first / 64, last / 64)
        trainer.delete_adapter(model_id)
    return out


def spread(losses: dict[int, tuple[float, float]]) -> float:
    """How far the ranks' losses after training are from rank 32's, at worst (0: identical)."""
    reference = losses[32][1]
    return max(abs(last / reference - 1) for _, last in losses.values())


def test_cookbook_rate_for_the_tiny_model(tiny_model_path):
    # hidden 128, Llama: 5e-4 x (2000/128) ** 0.781
    assert cookbook_lora_lr(tiny_model_path) == pytest.approx(4.28e-3, rel=1e-2)


def test_ranks_learn_alike_at_the_cookbook_rate(trainer, tiny_model_path):
    losses = losses_after_training(trainer, cookbook_lora_lr(tiny_model_path), lambda rank: None)
    for rank, (first, last) in losses.items():
        assert last < 0.5 * first, (rank, losses)  # every rank learned, not only agreed
    assert spread(losses) < TOLERANCE, losses


@pytest.mark.parametrize("multiple", [1, 2], ids=["alpha=r", "alpha=2r"])
def test_rank_proportional_alpha_does_not(trainer, tiny_model_path, multiple):
    """The same check with PEFT's usual alpha = rank (or 2·rank) fails by far: the scale is the cause."""
    losses = losses_after_training(trainer, cookbook_lora_lr(tiny_model_path), lambda rank: multiple * rank)
    assert spread(losses) > 3 * TOLERANCE, losses


def test_default_spec_is_tinkers_scale(trainer, tmp_path):
    trainer.create_adapter("scale-8", LoraSpec(rank=8, seed=0))
    peft_config = trainer._peft.peft_config[trainer._adapters["scale-8"].peft_name]
    assert peft_config.lora_alpha == TINKER_LORA_ALPHA == 32 and peft_config.r == 8
    trainer.export_adapter("scale-8", tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (written["lora_alpha"], written["r"], written.get("use_rslora", False)) == (32, 8, False)
    trainer.delete_adapter("scale-8")


def test_a_peft_adapter_of_another_scale_loads_as_the_same_function(trainer, tiny_model_path, tmp_path):
    """A PEFT folder saved with alpha = rank computes the same logprobs once loaded (B is rescaled)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    torch.manual_seed(3)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj", "lm_head"]))
    peft.save_pretrained(tmp_path, save_embedding_layers=False)  # LoRA tensors only, as Tink's engines write
    probe = [1, 20, 40, 80, 160, 320, 400]
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), tmp_path)
    with torch.no_grad():
        logits = reference(torch.tensor([probe])).logits[0, :-1].float()
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(probe[1:])[:, None])[:, 0].numpy()

    trainer.create_adapter("foreign", LoraSpec(rank=8, seed=0))  # scale 32/8 = 4, the folder's is 1
    trainer.load_state("foreign", tmp_path, with_optimizer=False)
    np.testing.assert_allclose(trainer.compute_logprobs("foreign", probe), expected, atol=1e-5)
    trainer.delete_adapter("foreign")


def test_saved_adapters_carry_tinkers_alpha_and_the_sampler_matches_the_trainer(service_client, server):
    """Through the SDK: train a rank-8 model a little, save it both ways, and sample from the export."""
    tc = service_client.create_lora_training_client(base_model=server.worker.base_model, rank=8, seed=0).result()
    tokens = [1, 17, 42, 99, 123, 250, 7, 300, 64, 5]
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
    for _ in range(3):  # B moves off zero, so the scale matters to every logprob below
        tc.forward_backward([datum], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    trained = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data

    state_path = tc.save_state("parity-state").result().path
    sampler_path = tc.save_weights_for_sampler("parity-sampler").result().path
    for path in (state_path, sampler_path):
        folder = server.worker.store.get_checkpoint(path)["directory"]
        config = json.loads(open(f"{folder}/adapter_config.json").read())
        assert (config["lora_alpha"], config["r"]) == (TINKER_LORA_ALPHA, 8), path

    sampler = service_client.create_sampling_client(model_path=sampler_path).result()
    sampled = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
    assert sampled[0] is None
    np.testing.assert_allclose(np.asarray(sampled[1:], dtype=np.float32), trained, atol=1e-4)
    base = service_client.create_sampling_client(base_model=server.worker.base_model).result()
    untrained = base.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
    assert np.abs(np.asarray(untrained[1:], dtype=np.float32) - trained).max() > 0.1  # training moved them
