"""Dimuon, Tinker's Muon-style LoRA optimizer (`src/optimizers.py`): the math, both trainers, the SDK.

Covers: Newton–Schulz orthogonalisation (singular values near 1, zero stays zero); the damped
preconditioner; one step's geometry (each factor moves the adapted weight by a direction whose
singular values all equal the rank-corrected learning rate); HFTrainer training, refusals and an
exact save/load resume; the SDK end to end (create with DimuonOptimizerConfig, loss falls, resume
with the optimizer state, weights-only resume gets AdamW); 400s naming the field over plain HTTP;
and the Megatron engine (TP=2 and DP=2 on CPU, gloo) stepping like HFTrainer and resuming exactly.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import requests
import torch
from tinker import types

from src.backends import AdamParams, DimuonParams, LoraSpec, TrainDatum, UserInputError
from src.hf_trainer import HFTrainer
from src.optimizers import (
    DAMPING,
    Dimuon,
    damped_inverse_sqrt,
    msign_rows,
    rank_lr_factor,
)

from .conftest import API_KEY, new_session
from .test_trainer_server import (  # noqa: F401 (fixtures used by name)
    LOGPROB_TOL,
    gqa_adapter,
    gqa_model_path,
    make_data,
    megatron_server,
)

# ----------------------------------------------------------------------------- the math


@pytest.mark.parametrize("shape", [(4, 515), (8, 128), (32, 128), (128, 256), (16, 16)])
def test_newton_schulz_gives_singular_values_near_one(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    out = msign_rows(x)
    values = torch.linalg.svdvals(out)
    assert values.min() > 0.999 and values.max() < 1.001, values
    u, _, vh = torch.linalg.svd(x, full_matrices=False)  # and it is U·Vᵀ, not just any orthogonal matrix
    torch.testing.assert_close(out, u @ vh, atol=2e-3, rtol=0)


def test_newton_schulz_orthogonalises_ill_conditioned_and_keeps_the_null_space():
    torch.manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(8, 8))
    v, _ = torch.linalg.qr(torch.randn(64, 6))
    x = (u[:, :6] * torch.logspace(0, -2.5, 6)) @ v.T  # rank 6 of 8, condition number ~300
    values = torch.linalg.svdvals(msign_rows(x))
    assert values[:6].min() > 0.99 and values[:6].max() < 1.001, values
    assert values[6:].max() < 1e-4, values  # directions the input lacks stay out
    assert torch.count_nonzero(msign_rows(torch.zeros(4, 32))) == 0


def test_damped_inverse_sqrt():
    torch.manual_seed(2)
    a = torch.randn(8, 40)
    gram = a @ a.T
    p = damped_inverse_sqrt(gram)
    torch.testing.assert_close(p @ (gram + DAMPING * torch.eye(8)) @ p, torch.eye(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(damped_inverse_sqrt(torch.zeros(3, 3)), DAMPING ** -0.5 * torch.eye(3))


def test_one_step_moves_the_adapted_weight_by_the_learning_rate_in_every_direction():
    """beta1 = 0, A and B well-conditioned: scale·B·ΔA and scale·ΔB·A each have r singular values η."""
    torch.manual_seed(3)
    rank, n, m, scale, lr = 4, 48, 40, 32 / 4, 0.01
    a = torch.nn.Parameter(torch.randn(rank, n) / math.sqrt(n))
    b = torch.nn.Parameter(torch.randn(m, rank) * 0.5)
    g = torch.randn(m, n)  # the loss's gradient with respect to the adapted weight
    (scale * (b @ a) * g).sum().backward()
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt = Dimuon([(a, b)], scale, rank)
    opt.param_groups[0].update(lr=lr, beta1=0.0)
    opt.step()
    eta = lr * rank_lr_factor(rank)
    assert rank_lr_factor(32) == 1.0 and rank_lr_factor(4) == pytest.approx(8 ** 0.175)
    for delta in (scale * b0 @ (a.detach() - a0), scale * (b.detach() - b0) @ a0):
        values = torch.linalg.svdvals(delta)
        np.testing.assert_allclose(values[:rank].numpy(), eta, rtol=2e-3)
        assert values[rank:].max() < 1e-6 * eta
    # It descends: the first-order change of the loss is negative.
    assert float((scale * (b.detach() @ a.detach() - b0 @ a0) * g).sum()) < 0


def test_dimuon_takes_lora_pairs_only():
    with pytest.raises(ValueError, match="LoRA pairs"):
        Dimuon([(torch.zeros(4, 8), torch.zeros(8, 2))], 1.0, 4)
    with pytest.raises(ValueError, match="LoRA pairs"):
        Dimuon([(torch.zeros(4), torch.zeros(8, 4))], 1.0, 4)


# ----------------------------------------------------------------------------- HFTrainer


@pytest.fixture(scope="module")
def trainer(tiny_model_path) -> HFTrainer:
    return HFTrainer(str(tiny_model_path), device="cpu", dtype="float32")


def task(seed: int = 0, n: int = 4) -> list[TrainDatum]:
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(n):
        seq = rng.integers(3, 512, size=17)
        data.append(TrainDatum(seq[:-1].tolist(), {"target_tokens": seq[1:].astype(np.int64),
                                                   "weights": np.ones(16, np.float32)}))
    return data


def test_hf_dimuon_reduces_loss_and_clips(trainer):
    data = task()
    trainer.create_adapter("dm-train", LoraSpec(rank=8, seed=0, optimizer="dimuon"))
    first = trainer.forward_backward("dm-train", data, "cross_entropy", None, True).metrics["loss:sum"]
    for _ in range(8):
        trainer.forward_backward("dm-train", data, "cross_entropy", None, False)
        metrics = trainer.optim_step("dm-train", DimuonParams(learning_rate=0.05))
    last = trainer.forward_backward("dm-train", data, "cross_entropy", None, True).metrics["loss:sum"]
    assert last < 0.2 * first, (first, last)
    assert metrics["step:max"] == 8.0 and metrics["learning_rate:mean"] == 0.05 and metrics["grad_norm:mean"] > 0
    # Clipping scales the gradient before the momentum; the orthogonalised step cannot tell the
    # size, but the reported norm is the unclipped one, as with AdamW.
    trainer.forward_backward("dm-train", data, "cross_entropy", None, False)
    clipped = trainer.optim_step("dm-train", DimuonParams(learning_rate=0.0, grad_clip_norm=1e-3))
    assert clipped["grad_norm:mean"] > 1e-3
    trainer.delete_adapter("dm-train")


def test_hf_refuses_the_other_family_naming_the_field(trainer):
    trainer.create_adapter("dm-kind", LoraSpec(rank=4, seed=0, optimizer="dimuon"))
    trainer.create_adapter("adam-kind", LoraSpec(rank=4, seed=0))
    trainer.forward_backward("dm-kind", task(n=1), "cross_entropy", None, False)
    before = [p.detach().clone() for p in trainer.adapter_parameters("dm-kind")]
    with pytest.raises(UserInputError) as err:
        trainer.optim_step("dm-kind", AdamParams(learning_rate=1e-3))
    assert err.value.field == "adam_params" and "dimuon" in str(err.value)
    with pytest.raises(UserInputError) as err:
        trainer.optim_step("adam-kind", DimuonParams(learning_rate=1e-3))
    assert err.value.field == "optimizer_params"
    with pytest.raises(UserInputError) as err:
        trainer.optim_step("dm-kind", DimuonParams(learning_rate=-1.0))
    assert err.value.field == "optimizer_params.learning_rate"
    with pytest.raises(UserInputError) as err:
        trainer.optim_step("dm-kind", DimuonParams(learning_rate=1e-3, beta1=1.0))
    assert err.value.field == "optimizer_params.beta1"
    assert all(torch.equal(x, y) for x, y in zip(before, trainer.adapter_parameters("dm-kind")))  # untouched
    trainer.delete_adapter("dm-kind")
    trainer.delete_adapter("adam-kind")


def test_hf_save_and_load_resume_bit_identically(trainer, tmp_path):
    first, second = task(1), task(2)
    step = DimuonParams(learning_rate=0.03, beta1=0.8)
    spec = LoraSpec(rank=8, seed=0, optimizer="dimuon")
    trainer.create_adapter("dm-a", spec)
    for _ in range(2):
        trainer.forward_backward("dm-a", first, "cross_entropy", None, False)
        trainer.optim_step("dm-a", step)
    trainer.save_state("dm-a", tmp_path)
    saved = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    assert saved["optimizer"] == "dimuon" and saved["step"] == 2
    assert all(set(moments) == {"momentum_buffer"} for moments in saved["state"].values())
    assert json.loads((tmp_path / "tink_state.json").read_text())["lora_spec"]["optimizer"] == "dimuon"
    trainer.forward_backward("dm-a", second, "cross_entropy", None, False)
    trainer.optim_step("dm-a", step)
    expected = [p.detach().clone() for p in trainer.adapter_parameters("dm-a")]

    for with_optimizer in (True, False):
        model_id = f"dm-b-{with_optimizer}"
        trainer.create_adapter(model_id, LoraSpec(rank=8, seed=5, optimizer="dimuon"))
        trainer.load_state(model_id, tmp_path, with_optimizer=with_optimizer)
        trainer.forward_backward(model_id, second, "cross_entropy", None, False)
        metrics = trainer.optim_step(model_id, step)
        got = [p.detach() for p in trainer.adapter_parameters(model_id)]
        if with_optimizer:  # the momentum came back: the very same third step, bit for bit
            assert metrics["step:max"] == 3.0
            assert all(torch.equal(x, y) for x, y in zip(got, expected))
        else:  # a fresh momentum: another step, so the check above can tell them apart
            assert metrics["step:max"] == 1.0
            assert max(float((x - y).abs().max()) for x, y in zip(got, expected)) > 1e-4
        trainer.delete_adapter(model_id)

    trainer.create_adapter("adam-from-dm", LoraSpec(rank=8, seed=0))  # Dimuon state cannot become AdamW state
    with pytest.raises(UserInputError) as err:
        trainer.load_state("adam-from-dm", tmp_path, with_optimizer=True)
    assert err.value.field == "path" and "dimuon" in str(err.value)
    trainer.load_state("adam-from-dm", tmp_path, with_optimizer=False)  # the weights alone are fine
    for model_id in ("dm-a", "adam-from-dm"):
        trainer.delete_adapter(model_id)


# ----------------------------------------------------------------------------- the SDK, end to end


def sft(tokens: list[int]) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})


DATA = [sft([1, 17, 42, 99, 123, 250, 7, 300, 64, 5]), sft([1, 8, 8, 31, 400, 2, 90, 61])]


def mean_loss(client) -> float:
    out = client.forward(DATA, "cross_entropy").result()
    return out.metrics["loss:sum"] / sum(len(d.loss_fn_inputs["weights"].data) for d in DATA)


def test_sdk_dimuon_trains_and_resumes(service_client, server):
    tc = service_client.create_lora_training_client(base_model=server.worker.base_model, rank=8, seed=0,
                                                    optimizer=types.DimuonOptimizerConfig()).result()
    assert tc.get_info().optimizer_config.type == "dimuon"
    step = types.DimuonParams(learning_rate=0.05, beta1=0.9)
    first = mean_loss(tc)
    for _ in range(6):
        tc.forward_backward(DATA, "cross_entropy")
        tc.optim_step(step).result()
    assert mean_loss(tc) < 0.3 * first

    path = tc.save_state("dimuon-resume").result().path
    tc.forward_backward(DATA, "cross_entropy")
    assert tc.optim_step(step).result().metrics["step:max"] == 7.0
    continued = tc.forward(DATA, "cross_entropy").result()

    resumed = service_client.create_training_client_from_state_with_optimizer(path).result()
    assert resumed.get_info().optimizer_config.type == "dimuon"
    resumed.forward_backward(DATA, "cross_entropy")
    assert resumed.optim_step(step).result().metrics["step:max"] == 7.0
    again = resumed.forward(DATA, "cross_entropy").result()
    for ours, theirs in zip(again.loss_fn_outputs, continued.loss_fn_outputs):
        np.testing.assert_array_equal(ours["logprobs"].data, theirs["logprobs"].data)

    # Weights only: a new model with the SDK's default optimizer (AdamW), as LoadWeightsRequest says.
    fresh = service_client.create_training_client_from_state(path).result()
    assert fresh.get_info().optimizer_config.type == "adamw"
    fresh.forward_backward(DATA, "cross_entropy")
    fresh.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    # ... or the optimizer the client names for the new weights-only model.
    chosen = service_client.create_training_client_from_state(path, optimizer=types.DimuonOptimizerConfig()).result()
    assert chosen.get_info().optimizer_config.type == "dimuon"
    chosen.forward_backward(DATA, "cross_entropy")
    chosen.optim_step(step).result()


# ----------------------------------------------------------------------------- HTTP: 400s naming the field


def post(server, path: str, body: dict) -> requests.Response:
    return requests.post(f"{server.url}/api/v1/{path}", json=body, headers={"X-API-Key": API_KEY}, timeout=60)


def created(server, optimizer: dict | None) -> str:
    body = {"session_id": new_session(), "model_seq_id": 0, "base_model": server.worker.base_model,
            "lora_config": {"rank": 4}, **({"optimizer_config": optimizer} if optimizer else {})}
    resp = post(server, "create_model", body)
    assert resp.status_code == 200, resp.text
    return resp.json()["model_id"]


@pytest.fixture(scope="module")
def http_models(server) -> dict[str, str]:
    return {"dimuon": created(server, {"type": "dimuon", "version": 1}), "adamw": created(server, None)}


@pytest.mark.parametrize("model, body, field", [
    ("dimuon", {"adam_params": {"learning_rate": 1e-3}}, "adam_params"),
    ("adamw", {"optimizer_params": {"type": "dimuon", "learning_rate": 1e-3}}, "optimizer_params"),
    ("dimuon", {"optimizer_params": {"type": "dimuon", "learning_rate": -1}}, "optimizer_params.learning_rate"),
    ("dimuon", {"optimizer_params": {"type": "dimuon"}}, "optimizer_params.learning_rate"),
    ("dimuon", {"optimizer_params": {"type": "dimuon", "learning_rate": "fast"}}, "optimizer_params.learning_rate"),
    ("dimuon", {"optimizer_params": {"type": "dimuon", "learning_rate": 1e-3, "beta1": 1.0}},
     "optimizer_params.beta1"),
    ("dimuon", {"optimizer_params": {"type": "dimuon", "learning_rate": 1e-3, "beta1": -0.1}},
     "optimizer_params.beta1"),
    ("dimuon", {"optim_params": {"type": "dimuon", "learning_rate": 1e-3, "grad_clip_norm": "big"}},
     "optim_params.grad_clip_norm"),
    ("dimuon", {"optimizer_params": {"type": "dimuon", "learning_rate": 1e-3, "damping": 1e-4}},
     "optimizer_params.damping"),
    ("dimuon", {"optimizer_params": {"type": "lion", "learning_rate": 1e-3}}, "optimizer_params.type"),
], ids=["adam-to-dimuon", "dimuon-to-adam", "lr-negative", "lr-missing", "lr-string", "beta1-one",
        "beta1-negative", "clip-string", "unknown-field", "unknown-family"])
def test_bad_dimuon_steps_are_400_naming_the_field(server, http_models, model, body, field):
    resp = post(server, "optim_step", {"model_id": http_models[model], **body})
    assert resp.status_code == 400, resp.text
    assert resp.json()["field"] == field, resp.json()


def test_dimuon_lr_nan_is_400(server, http_models):
    body = json.dumps({"model_id": http_models["dimuon"],
                       "optimizer_params": {"type": "dimuon", "learning_rate": float("nan")}})
    resp = requests.post(f"{server.url}/api/v1/optim_step", data=body, timeout=60,
                         headers={"X-API-Key": API_KEY, "Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.json()["field"] == "optimizer_params.learning_rate", resp.text


@pytest.mark.parametrize("optimizer, field", [
    ({"type": "dimuon", "version": 2}, "optimizer_config.version"),
    ({"type": "dimuon", "version": 1, "damping": 0.1}, "optimizer_config.damping"),
    ({"type": "lion"}, "optimizer_config.type"),
])
def test_bad_optimizer_configs_are_400_naming_the_field(server, optimizer, field):
    resp = post(server, "create_model", {"session_id": new_session(), "model_seq_id": 0,
                                         "base_model": server.worker.base_model, "optimizer_config": optimizer})
    assert resp.status_code == 400 and resp.json()["field"] == field, resp.text


def test_get_info_reports_the_optimizer(server, http_models):
    for kind, model_id in http_models.items():
        info = post(server, "get_info", {"model_id": model_id}).json()
        assert info["optimizer_config"]["type"] == kind


# ----------------------------------------------------------------------------- Megatron (CPU, gloo)


@pytest.fixture(scope="module")
def gqa_trainer(gqa_model_path) -> HFTrainer:  # noqa: F811 (fixtures)
    return HFTrainer(str(gqa_model_path), device="cpu", dtype="float32")


DIMUON_SPEC = LoraSpec(rank=4, seed=0, optimizer="dimuon")  # Tinker's alpha: scale 32/4; the adapter's is 8/4


def test_megatron_dimuon_steps_like_hf(megatron_server, gqa_trainer, gqa_adapter, tmp_path):  # noqa: F811 (fixtures)
    client, local = megatron_server.client, gqa_trainer
    model_id = f"dm-{megatron_server.info['tensor_parallel']}"
    probe = [4, 8, 15, 16, 23, 42, 108, 300]
    data = make_data(seed=1, n=5, length=12, vocab=515)
    results = {}
    for name, trainer in (("megatron", client), ("hf", local)):
        trainer.create_adapter(model_id, DIMUON_SPEC)
        trainer.load_state(model_id, gqa_adapter, with_optimizer=False)  # B rescaled from scale 2 to 8
        loaded = np.asarray(trainer.compute_logprobs(model_id, probe))
        for clip in (0.0, 0.5):  # two steps: the second uses the momentum, clipped
            trainer.forward_backward(model_id, data, "cross_entropy", None, False)
            metrics = trainer.optim_step(model_id, DimuonParams(learning_rate=0.05, beta1=0.9, grad_clip_norm=clip))
        export = tmp_path / name
        export.mkdir()
        trainer.export_adapter(model_id, export)
        results[name] = (loaded, np.asarray(trainer.compute_logprobs(model_id, probe)), metrics,
                         json.loads((export / "adapter_config.json").read_text()))
    (loaded_m, after_m, metrics_m, config_m), (loaded_h, after_h, metrics_h, config_h) = results.values()
    np.testing.assert_allclose(loaded_m, loaded_h, atol=LOGPROB_TOL)
    np.testing.assert_allclose(after_m, after_h, atol=LOGPROB_TOL)
    assert np.abs(after_m - loaded_m).max() > 1e-2  # it moved
    assert metrics_m["grad_norm:mean"] == pytest.approx(metrics_h["grad_norm:mean"], rel=1e-4)
    assert config_m["lora_alpha"] == config_h["lora_alpha"] == 32 and config_m["r"] == 4


def test_megatron_dimuon_resumes_exactly(megatron_server, gqa_adapter, tmp_path):  # noqa: F811 (fixtures)
    client = megatron_server.client
    first, second = make_data(seed=2, n=4, length=10, vocab=515), make_data(seed=3, n=4, length=10, vocab=515)
    probe = [9, 99, 199, 299, 399, 499]
    step = DimuonParams(learning_rate=0.03, beta1=0.8)
    client.create_adapter("dm-resume-a", DIMUON_SPEC)
    client.load_state("dm-resume-a", gqa_adapter, with_optimizer=False)
    client.forward_backward("dm-resume-a", first, "cross_entropy", None, False)
    client.optim_step("dm-resume-a", step)
    client.save_state("dm-resume-a", tmp_path)
    from safetensors.torch import load_file

    moments = load_file(str(tmp_path / "optimizer.safetensors"))
    assert moments and all(k.endswith(".momentum_buffer") for k in moments)
    client.forward_backward("dm-resume-a", second, "cross_entropy", None, False)
    client.optim_step("dm-resume-a", step)
    expected = client.compute_logprobs("dm-resume-a", probe)

    for with_optimizer in (True, False):
        model_id = f"dm-resume-b-{with_optimizer}"
        client.create_adapter(model_id, LoraSpec(rank=4, seed=99, optimizer="dimuon"))
        client.load_state(model_id, tmp_path, with_optimizer=with_optimizer)
        client.forward_backward(model_id, second, "cross_entropy", None, False)
        client.optim_step(model_id, step)
        got = client.compute_logprobs(model_id, probe)
        if with_optimizer:
            np.testing.assert_array_equal(got, expected)
        else:
            assert np.abs(got - expected).max() > 1e-4

    client.create_adapter("adam-resume", LoraSpec(rank=4, seed=0))
    with pytest.raises(UserInputError) as err:
        client.load_state("adam-resume", tmp_path, with_optimizer=True)
    assert err.value.field == "path"
    with pytest.raises(UserInputError) as err:
        client.optim_step("adam-resume", step)
    assert err.value.field == "optimizer_params"
