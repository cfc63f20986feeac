"""End-to-end: the official `tinker` SDK drives a real Tink server on loopback."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
import torch
from safetensors.numpy import load_file
from tinker import types
from transformers import AutoTokenizer

from .conftest import API_KEY


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


def sft_datum(tokenizer, prompt: str, answer: str) -> types.Datum:
    """Next-token prediction on `answer` only (weights 0 on the prompt)."""
    p = [tokenizer.bos_token_id] + tokenizer.encode(prompt)
    a = tokenizer.encode(answer) + [tokenizer.eos_token_id]
    tokens = p + a
    weights = [0.0] * (len(p) - 1) + [1.0] * len(a)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )


def adapter_tensors(server, tinker_path: str) -> dict[str, np.ndarray]:
    record = server.worker.store.get_checkpoint(tinker_path)
    return load_file(f"{record['directory']}/adapter_model.safetensors")


def test_capabilities_list_the_served_model(service_client, server):
    caps = tinker.RestClient(base_url=server.url, api_key=API_KEY).get_server_capabilities().result()
    names = [m.model_name for m in caps.supported_models]
    assert server.worker.base_model in names


def test_supervised_loss_falls(service_client, server, tokenizer):
    tc = service_client.create_lora_training_client(base_model=server.worker.base_model, rank=8, seed=0).result()
    info = tc.get_info()
    assert info.model_data.tokenizer_id == server.worker.base_model
    assert tc.get_tokenizer().encode("hello world") == tokenizer.encode("hello world")
    data = [sft_datum(tokenizer, "Question: say yes.", " yes yes yes"),
            sft_datum(tokenizer, "Question: say no.", " no no no")]
    losses = []
    for _ in range(6):
        fb = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=2e-2))
        out = fb.result()
        opt.result()
        total_weight = sum(sum(d.loss_fn_inputs["weights"].data) for d in data)
        losses.append(out.metrics["loss:sum"] / total_weight)
        assert [len(o["logprobs"].data) for o in out.loss_fn_outputs] == [len(d.model_input.to_ints()) for d in data]
    assert losses[-1] < 0.7 * losses[0], losses


def test_forward_matches_forward_backward_and_custom_loss(service_client, server, tokenizer):
    tc = service_client.create_lora_training_client(base_model=server.worker.base_model, rank=4, seed=1).result()
    data = [sft_datum(tokenizer, "The cat", " sat on the mat")]
    fwd = tc.forward(data, "cross_entropy").result()
    fb = tc.forward_backward(data, "cross_entropy").result()
    np.testing.assert_allclose(fwd.loss_fn_outputs[0]["logprobs"].data, fb.loss_fn_outputs[0]["logprobs"].data,
                               rtol=1e-5, atol=1e-6)

    def neg_weighted_logprob(batch, logprobs_list):
        loss = sum((-lp * torch.tensor(d.loss_fn_inputs["weights"].data)).sum() for d, lp in zip(batch, logprobs_list))
        return loss, {"custom:sum": float(loss)}

    custom = tc.forward_backward_custom(data, neg_weighted_logprob).result()
    assert custom.metrics["loss:sum"] == pytest.approx(fb.metrics["loss:sum"], rel=1e-5)
    # The surrogate the SDK sends (weights = -dC/dlogprobs) has the same value for this linear loss.
    assert custom.metrics["surrogate_loss:sum"] == pytest.approx(fb.metrics["loss:sum"], rel=1e-5)


def test_rl_step_raises_logprob_of_rewarded_tokens(service_client, server, tokenizer):
    tc = service_client.create_lora_training_client(base_model=server.worker.base_model, rank=8, seed=2).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = [tokenizer.bos_token_id] + tokenizer.encode("Answer:")
    result = sampler.sample(types.ModelInput.from_ints(prompt), num_samples=4,
                            sampling_params=types.SamplingParams(max_tokens=6, temperature=1.0, seed=3)).result()
    assert len(result.sequences) == 4
    data, rewarded = [], []
    for i, seq in enumerate(result.sequences):
        assert len(seq.logprobs) == len(seq.tokens)
        advantage = 1.0 if i == 0 else -1.0 / 3
        full = prompt + list(seq.tokens)
        n_prompt = len(prompt) - 1
        data.append(types.Datum(
            model_input=types.ModelInput.from_ints(full[:-1]),
            loss_fn_inputs={
                "target_tokens": full[1:],
                "logprobs": [0.0] * n_prompt + list(seq.logprobs),
                "advantages": [0.0] * n_prompt + [advantage] * len(seq.tokens),
            },
        ))
        if i == 0:
            rewarded = (full, n_prompt)
    before = tc.forward(data[:1], "importance_sampling").result().loss_fn_outputs[0]["logprobs"].data
    for _ in range(3):
        tc.forward_backward(data, "importance_sampling").result()
        tc.optim_step(types.AdamParams(learning_rate=2e-2)).result()
    after = tc.forward(data[:1], "importance_sampling").result().loss_fn_outputs[0]["logprobs"].data
    n_prompt = rewarded[1]
    assert sum(after[n_prompt:]) > sum(before[n_prompt:]) + 0.1


def test_sampling_client_from_saved_weights(service_client, server, tokenizer):
    tc = service_client.create_lora_training_client(base_model=server.worker.base_model, rank=4, seed=3).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints([tokenizer.bos_token_id] + tokenizer.encode("Hello"))
    greedy = types.SamplingParams(max_tokens=5, temperature=0.0)
    a = sampler.sample(prompt, 1, greedy).result()
    b = sampler.sample(prompt, 1, greedy).result()
    assert list(a.sequences[0].tokens) == list(b.sequences[0].tokens)
    assert a.sequences[0].stop_reason in ("length", "stop")
    logprobs = sampler.compute_logprobs(prompt).result()
    assert logprobs[0] is None and len(logprobs) == prompt.length
    assert all(lp is not None and lp < 0 for lp in logprobs[1:])

    # The persistent path: save_weights_for_sampler(name) + create_sampling_client(model_path).
    saved = tc.save_weights_for_sampler("named-sampler").result()
    assert saved.path.endswith("/sampler_weights/named-sampler")
    by_path = service_client.create_sampling_client(model_path=saved.path).result()
    c = by_path.sample(prompt, 1, greedy).result()
    assert list(c.sequences[0].tokens) == list(a.sequences[0].tokens)
    base = service_client.create_sampling_client(base_model=server.worker.base_model).result()
    assert len(base.sample(prompt, 2, types.SamplingParams(max_tokens=3, seed=1)).result().sequences) == 2


def test_save_and_load_state_restores_adapter_and_optimizer(service_client, server, tokenizer):
    tc = service_client.create_lora_training_client(base_model=server.worker.base_model, rank=4, seed=4).result()
    data = [sft_datum(tokenizer, "One two", " three four")]
    adam = types.AdamParams(learning_rate=1e-2)

    def step():
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(adam).result()

    step()
    a = tc.save_state("state-a").result().path
    step()
    b = tc.save_state("state-b").result().path
    tc.load_state_with_optimizer(a).result()
    a_again = tc.save_state("state-a-again").result().path
    for name, tensor in adapter_tensors(server, a).items():
        np.testing.assert_array_equal(tensor, adapter_tensors(server, a_again)[name])
    step()  # same step from the restored weights AND moments must land exactly where `b` did
    c = tc.save_state("state-c").result().path
    for name, tensor in adapter_tensors(server, b).items():
        np.testing.assert_array_equal(tensor, adapter_tensors(server, c)[name])

    # A new training client from the saved state carries the same weights.
    tc2 = service_client.create_training_client_from_state_with_optimizer(b).result()
    d = tc2.save_state("state-d").result().path
    for name, tensor in adapter_tensors(server, b).items():
        np.testing.assert_array_equal(tensor, adapter_tensors(server, d)[name])


def test_two_training_clients_do_not_touch_each_other(service_client, server, tokenizer):
    a = service_client.create_lora_training_client(base_model=server.worker.base_model, rank=4, seed=5).result()
    b = service_client.create_lora_training_client(base_model=server.worker.base_model, rank=4, seed=6).result()
    b_before = b.save_weights_for_sampler("b-before").result().path
    data = [sft_datum(tokenizer, "Red blue", " green")]
    for _ in range(2):
        a.forward_backward(data, "cross_entropy")
        a.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    b_after = b.save_weights_for_sampler("b-after").result().path
    for name, tensor in adapter_tensors(server, b_before).items():
        np.testing.assert_array_equal(tensor, adapter_tensors(server, b_after)[name])
    a_path = a.save_weights_for_sampler("a-after").result().path
    changed = [not np.array_equal(t, adapter_tensors(server, b_after)[n])
               for n, t in adapter_tensors(server, a_path).items() if "lora_B" in n]
    assert any(changed)


def test_unknown_model_fails_clearly(service_client):
    with pytest.raises(Exception) as info:
        service_client.create_lora_training_client(base_model="no-such/model", rank=4).result()
    assert "base_model" in str(info.value) or "not served" in str(info.value)

