"""Many adapters in one pass (TINK_BATCH_ADAPTERS): the joined pass equals each request alone.

In-process on the HF trainer (fp32, CPU): gradients, logprobs and losses of a joined pass against
the same requests run one by one, for adapters of different ranks, target modules, losses and
lengths, with mixed micro-batches and activation checkpointing. Through a real worker and the SDK:
concurrent clients end with the adapters of a sequential run, a bad request fails alone, and each
model's operations keep their order.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
import tinker
import torch
from tinker import types

from src.backends import AdamParams, LoraSpec, TrainDatum, UserInputError
from src.config import Config, ConfigError
from src.hf_trainer import HFTrainer
from src.multi_adapter import AdapterPass, RowRouting, segments_of
from src.scheduling import Joinable, Outcome, Scheduler
from src.store import Store

from .conftest import API_KEY, free_port, serving

_ids = itertools.count()
RTOL = 1e-5


@pytest.fixture(scope="module")
def trainer(tiny_model_path) -> HFTrainer:
    return HFTrainer(str(tiny_model_path), device="cpu", dtype="float32", gradient_checkpointing="false")


def new_model(trainer: HFTrainer, rank: int = 4, **switches) -> str:
    """An adapter with random A and B (a fresh one has B = 0, which would hide A's gradient)."""
    model_id = f"joined{next(_ids)}.x"
    trainer.create_adapter(model_id, LoraSpec(rank=rank, seed=next(_ids), **switches))
    generator = torch.Generator().manual_seed(next(_ids))
    with torch.no_grad():
        for p in trainer.adapter_parameters(model_id):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model_id


def ce_datum(rng: np.random.Generator, length: int) -> TrainDatum:
    tokens = rng.integers(1, 500, length).tolist()
    return TrainDatum(tokens, {"target_tokens": rng.integers(1, 500, length),
                               "weights": rng.uniform(0, 1, length).astype(np.float32)})


def is_datum(rng: np.random.Generator, length: int) -> TrainDatum:
    tokens = rng.integers(1, 500, length).tolist()
    return TrainDatum(tokens, {"target_tokens": rng.integers(1, 500, length),
                               "logprobs": rng.uniform(-8, -4, length).astype(np.float32),
                               "advantages": rng.normal(0, 1, length).astype(np.float32)})


def grads(trainer: HFTrainer, model_id: str) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in trainer.adapter_parameters(model_id)]


def clear_grads(trainer: HFTrainer, model_id: str) -> None:
    for p in trainer.adapter_parameters(model_id):
        p.grad = None


def assert_close(a, b, rtol: float = RTOL, atol: float = 1e-7) -> None:
    """Equal up to float rounding: <= `rtol` relative to the tensor's own scale (+ `atol`)."""
    a, b = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a), torch.as_tensor(
        np.asarray(b) if not isinstance(b, torch.Tensor) else b)
    scale = float(b.abs().max()) if b.numel() else 0.0
    assert float((a - b).abs().max()) <= rtol * max(scale, 1e-12) + atol, (a, b)


def assert_same_result(joined, alone) -> None:
    assert joined.metrics.keys() == alone.metrics.keys()
    for key in alone.metrics:
        assert joined.metrics[key] == pytest.approx(alone.metrics[key], rel=RTOL)
    assert len(joined.loss_fn_outputs) == len(alone.loss_fn_outputs)
    for j, a in zip(joined.loss_fn_outputs, alone.loss_fn_outputs):
        assert j.keys() == a.keys()
        for key in a:
            assert_close(j[key], a[key])


def run_alone_then_joined(trainer: HFTrainer, passes: list[AdapterPass], forward_only: bool = False):
    """Each pass alone (its gradient kept), then all joined from no gradient: (alone, joined) results and grads."""
    alone, alone_grads = [], []
    for p in passes:
        clear_grads(trainer, p.model_id)
        alone.append(trainer.forward_backward(p.model_id, p.data, p.loss_fn, p.loss_fn_config, forward_only))
        alone_grads.append(grads(trainer, p.model_id))
        clear_grads(trainer, p.model_id)
    joined = trainer.forward_backward_many(passes, forward_only)
    return alone, alone_grads, joined, [grads(trainer, p.model_id) for p in passes]


def assert_joined_equals_alone(trainer: HFTrainer, passes: list[AdapterPass], forward_only: bool = False) -> None:
    alone, alone_grads, joined, joined_grads = run_alone_then_joined(trainer, passes, forward_only)
    for a, j, ag, jg in zip(alone, joined, alone_grads, joined_grads):
        assert not isinstance(j, Exception), j
        assert_same_result(j, a)
        for x, y in zip(jg, ag):
            if forward_only:
                assert x is None and y is None
            else:
                assert x is not None and float(y.abs().max()) > 0  # a gradient that says something
                assert_close(x, y)


def mixed_passes(trainer: HFTrainer, rng: np.random.Generator) -> list[AdapterPass]:
    """Different ranks, target modules (lm_head or not), losses, lengths and datum counts."""
    return [
        AdapterPass(new_model(trainer, rank=2), [ce_datum(rng, n) for n in (5, 17, 9)], "cross_entropy", None),
        AdapterPass(new_model(trainer, rank=8, train_unembed=False), [is_datum(rng, n) for n in (12, 3)],
                    "importance_sampling", None),
        AdapterPass(new_model(trainer, rank=4, train_attn=False), [ce_datum(rng, 30)], "cross_entropy", None),
        AdapterPass(new_model(trainer, rank=16), [is_datum(rng, n) for n in (7, 7, 21, 2)], "ppo",
                    {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    ]


@pytest.fixture
def lora_paths(monkeypatch) -> dict[str, list[torch.nn.Module]]:
    """The layers each routed LoRA path served, one entry per call: "grouped" (`grouped_lora_sum`, all of a
    layer's segments at once) and "sliced" (`lora_delta`, one segment; also the split lm_head's path)."""
    import src.multi_adapter as multi_adapter

    seen: dict[str, list[torch.nn.Module]] = {"grouped": [], "sliced": []}

    def counted(path: str, real):
        def run(layer, *args):
            seen[path].append(layer)
            return real(layer, *args)
        return run

    monkeypatch.setattr(multi_adapter, "grouped_lora_sum", counted("grouped", multi_adapter.grouped_lora_sum))
    monkeypatch.setattr(multi_adapter, "lora_delta", counted("sliced", multi_adapter.lora_delta))
    return seen


def routed_layers(trainer: HFTrainer, part: str = "") -> set[int]:
    """ids of the LoRA layers whose rows the hooks route (every lora.Linear but a split lm_head), named with `part`."""
    from peft.tuners.lora import Linear

    head = trainer._hf.get_output_embeddings() if trainer._split_head else None
    return {id(m) for name, m in trainer._peft.named_modules() if isinstance(m, Linear) and m is not head
            and part in name}


def test_segments_are_runs_of_one_owner():
    assert [(s.owner, s.start, s.stop) for s in segments_of("aabccc")] == [("a", 0, 2), ("b", 2, 3), ("c", 3, 6)]
    assert segments_of([]) == []


def test_joined_pass_equals_each_model_alone(trainer, lora_paths):
    """Unequal row counts and ranks: every layer takes the per-segment path."""
    assert_joined_equals_alone(trainer, mixed_passes(trainer, np.random.default_rng(0)))
    assert not lora_paths["grouped"]
    assert {id(layer) for layer in lora_paths["sliced"]} >= routed_layers(trainer)


def test_alike_segments_run_grouped_and_equal_alone_with_checkpointing(trainer, monkeypatch, lora_paths):
    """The common case, each user sending the same micro-batch shape (rows and rank): every routed layer runs
    all segments as one grouped product, in forward and again when checkpointing recomputes it in backward.
    Results and gradients equal each adapter alone (to RTOL: a joined batch pads differently, ~2e-6 in fp32
    on either path) and the per-segment path's to 1e-6. Rank 12's scale 32/12 is not a power of two, so
    scaling at another point than PEFT's would show here."""
    rng = np.random.default_rng(10)
    passes = [AdapterPass(new_model(trainer, rank=12), [ce_datum(rng, n) for n in (7, 19)], "cross_entropy", None),
              AdapterPass(new_model(trainer, rank=12), [is_datum(rng, n) for n in (12, 4)], "importance_sampling",
                          None),
              AdapterPass(new_model(trainer, rank=12), [ce_datum(rng, n) for n in (25, 1)], "cross_entropy", None)]
    monkeypatch.setattr(trainer, "gradient_checkpointing", "true")
    alone, alone_grads, joined, joined_grads = run_alone_then_joined(trainer, passes)
    assert trainer.memory_report()["last_checkpointed"] is True
    assert len(trainer.memory_report()["last_microbatch_tokens"]) == 1
    grouped = [id(layer) for layer in lora_paths["grouped"]]
    assert set(grouped) == routed_layers(trainer) and len(grouped) == 2 * len(set(grouped))
    assert not {id(layer) for layer in lora_paths["sliced"]} & routed_layers(trainer)

    for p in passes:
        clear_grads(trainer, p.model_id)
    monkeypatch.setattr(RowRouting, "_groupable", lambda self, layer, output: None)  # the per-segment path
    sliced = trainer.forward_backward_many(passes, False)
    sliced_grads = [grads(trainer, p.model_id) for p in passes]
    assert len(lora_paths["grouped"]) == len(grouped)
    for a, j, s, ag, jg, sg in zip(alone, joined, sliced, alone_grads, joined_grads, sliced_grads):
        assert not isinstance(j, Exception), j
        assert_same_result(j, a)
        for jo, so in zip(j.loss_fn_outputs, s.loss_fn_outputs):
            assert_close(jo["logprobs"], so["logprobs"], rtol=1e-6, atol=0)
        for x, y, z in zip(jg, ag, sg):
            assert float(y.abs().max()) > 0
            assert_close(x, y)
            assert_close(x, z, rtol=1e-6, atol=0)


def test_layers_some_adapters_lack_take_the_per_segment_path(trainer, lora_paths):
    """Equal rows and ranks, but one adapter without attention LoRA: attention layers take the per-segment
    path (that adapter's rows get no delta there), MLP layers the grouped one, and the pass equals alone."""
    rng = np.random.default_rng(11)
    passes = [AdapterPass(new_model(trainer, rank=4, **switches), [ce_datum(rng, n) for n in (9, 14)],
                          "cross_entropy", None)
              for switches in ({}, {"train_attn": False}, {})]
    assert_joined_equals_alone(trainer, passes)
    grouped, sliced = ({id(layer) for layer in lora_paths[path]} for path in ("grouped", "sliced"))
    attention, mlp = routed_layers(trainer, "self_attn"), routed_layers(trainer, "mlp")
    assert attention and mlp and attention | mlp == routed_layers(trainer)
    assert grouped == mlp and sliced & routed_layers(trainer) == attention


def test_forward_only_joined_equals_alone(trainer):
    assert_joined_equals_alone(trainer, mixed_passes(trainer, np.random.default_rng(1)), forward_only=True)


def test_mixed_microbatches_with_checkpointing_and_chunked_logits(trainer, monkeypatch):
    """Micro-batches of a few rows that straddle adapters, activation checkpointing (recomputed in backward,
    where the rows must be routed again) and logit chunks of a few tokens."""
    monkeypatch.setattr("src.hf_trainer.LOGIT_CHUNK_ELEMENTS", 512 * 5)
    passes = mixed_passes(trainer, np.random.default_rng(2))
    alone, alone_grads = [], []
    for p in passes:
        clear_grads(trainer, p.model_id)
        alone.append(trainer.forward_backward(p.model_id, p.data, p.loss_fn, p.loss_fn_config, False))
        alone_grads.append(grads(trainer, p.model_id))
        clear_grads(trainer, p.model_id)
    monkeypatch.setattr(trainer, "microbatch_tokens", 40)
    monkeypatch.setattr(trainer, "gradient_checkpointing", "true")
    joined = trainer.forward_backward_many(passes, False)
    assert trainer.memory_report()["last_checkpointed"] is True
    assert len(trainer.memory_report()["last_microbatch_tokens"]) > 3
    for p, a, j, ag in zip(passes, alone, joined, alone_grads):
        assert_same_result(j, a)
        for x, y in zip(grads(trainer, p.model_id), ag):
            assert_close(x, y)


def test_joined_pass_adds_to_pending_gradients(trainer):
    """Gradients accumulate per model as if each request ran alone after the earlier ones."""
    rng = np.random.default_rng(3)
    a, b = new_model(trainer), new_model(trainer, rank=8)
    first = {m: [ce_datum(rng, 6)] for m in (a, b)}
    second = {m: [ce_datum(rng, 11), ce_datum(rng, 4)] for m in (a, b)}
    expected = {}
    for m in (a, b):
        trainer.forward_backward(m, first[m], "cross_entropy", None, False)
        trainer.forward_backward(m, second[m], "cross_entropy", None, False)
        expected[m] = grads(trainer, m)
        clear_grads(trainer, m)
        trainer.forward_backward(m, first[m], "cross_entropy", None, False)
    trainer.forward_backward_many([AdapterPass(m, second[m], "cross_entropy", None) for m in (a, b)], False)
    for m in (a, b):
        for x, y in zip(grads(trainer, m), expected[m]):
            assert_close(x, y)


def test_a_bad_request_fails_alone_and_keeps_its_gradients(trainer):
    rng = np.random.default_rng(4)
    good, bad, unknown = new_model(trainer), new_model(trainer), "no-such-model"
    trainer.forward_backward(bad, [ce_datum(rng, 5)], "cross_entropy", None, False)
    pending = grads(trainer, bad)
    bad_datum = TrainDatum([1, 2, 3], {"target_tokens": np.array([1, 2, 9999]), "weights": np.ones(3)})
    good_data = [ce_datum(rng, 8)]
    expected = trainer.forward_backward(good, good_data, "cross_entropy", None, True)
    results = trainer.forward_backward_many([
        AdapterPass(good, good_data, "cross_entropy", None),
        AdapterPass(bad, [ce_datum(rng, 4), bad_datum], "cross_entropy", None),
        AdapterPass(unknown, good_data, "cross_entropy", None),
    ], False)
    assert isinstance(results[1], UserInputError) and results[1].field == "data[1].loss_fn_inputs.target_tokens"
    assert isinstance(results[2], UserInputError) and results[2].field == "model_id"
    assert_same_result(results[0], expected)
    for x, y in zip(grads(trainer, bad), pending):
        assert torch.equal(x, y)  # bit-identical: nothing of the failed request was added


def test_a_failed_joined_pass_reruns_each_alone(trainer, monkeypatch):
    """An error only the joined pass hits (here: a forced out-of-memory error on a joined micro-batch of one
    datum) puts every pending gradient back as it was and runs each member alone, each with its own result."""
    rng = np.random.default_rng(5)
    monkeypatch.setattr(trainer, "microbatch_tokens", 1)  # one datum per micro-batch: nothing left to shrink
    models = [new_model(trainer) for _ in range(3)]
    data = {m: [ce_datum(rng, 6), ce_datum(rng, 9)] for m in models}
    for m in models:
        trainer.forward_backward(m, [ce_datum(rng, 5)], "cross_entropy", None, False)
    pending = {m: grads(trainer, m) for m in models}
    expected, own = {}, {}
    for m in models:
        clear_grads(trainer, m)
        expected[m] = trainer.forward_backward(m, data[m], "cross_entropy", None, False)
        own[m] = grads(trainer, m)
        for p, g in zip(trainer.adapter_parameters(m), pending[m]):
            p.grad = g.clone()
    joined_tries = []
    real_logprobs = HFTrainer._target_logprobs

    def out_of_memory_when_routed(self, tokens, targets, routing=None, **options):
        if routing is not None:
            joined_tries.append(len(tokens))
            raise torch.OutOfMemoryError("forced by the test")
        return real_logprobs(self, tokens, targets, **options)

    monkeypatch.setattr(HFTrainer, "_target_logprobs", out_of_memory_when_routed)
    results = trainer.forward_backward_many([AdapterPass(m, data[m], "cross_entropy", None) for m in models], False)
    assert joined_tries == [1]  # the joined pass was tried, failed on one datum, and was given up
    for m, result in zip(models, results):
        assert not isinstance(result, Exception), result
        assert_same_result(result, expected[m])
        for x, p, o in zip(grads(trainer, m), pending[m], own[m]):
            assert torch.equal(x, o + p)  # exactly what running alone after the pending ones gives


def test_optimizer_steps_after_a_joined_pass_match_alone(trainer):
    """Two models trained for 3 steps with joined passes end with the weights of training each alone."""
    rng = np.random.default_rng(6)
    data = [[ce_datum(rng, n) for n in (4, 9)], [is_datum(rng, n) for n in (13, 2, 6)]]
    losses = ["cross_entropy", "importance_sampling"]
    alone = [new_model(trainer, rank=4), new_model(trainer, rank=8)]
    joined = [new_model(trainer, rank=4), new_model(trainer, rank=8)]
    with torch.no_grad():
        for a, j in zip(alone, joined):
            for pa, pj in zip(trainer.adapter_parameters(a), trainer.adapter_parameters(j)):
                pj.copy_(pa)
    for _ in range(3):
        for m, d, loss in zip(alone, data, losses):
            trainer.forward_backward(m, d, loss, None, False)
            trainer.optim_step(m, AdamParams(learning_rate=1e-2))
        trainer.forward_backward_many([AdapterPass(m, d, loss, None) for m, d, loss in zip(joined, data, losses)],
                                      False)
        for m in joined:
            trainer.optim_step(m, AdamParams(learning_rate=1e-2))
    for a, j in zip(alone, joined):
        for pa, pj in zip(trainer.adapter_parameters(a), trainer.adapter_parameters(j)):
            torch.testing.assert_close(pj, pa, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- through a real worker and the SDK


@dataclass
class JoiningServer:
    url: str
    worker: object
    joined_sizes: list[int]  # models in each joined pass the trainer ran


@pytest.fixture(scope="module")
def joining_server(tiny_model_path, tmp_path_factory) -> Iterator[JoiningServer]:
    """A real worker with TINK_BATCH_ADAPTERS=true behind waitress; the trainer's joined passes are
    counted by a wrapper that calls the real method."""
    from src.app import create_app
    from src.config import Config
    from src.worker import Worker

    config = Config(base_model=str(tiny_model_path), state_dir=tmp_path_factory.mktemp("joined"),
                    api_keys=(API_KEY,), port=free_port(), retrieve_wait_s=2.0, threads=32, dtype="float32",
                    batch_adapters=True, max_adapters_per_key=64)
    worker = Worker.from_config(config)
    sizes: list[int] = []
    real = worker.trainer.forward_backward_many

    def counted(passes, forward_only):
        sizes.append(len(passes))
        return real(passes, forward_only)

    worker.trainer.forward_backward_many = counted
    with serving(create_app(config, worker), config) as url:
        yield JoiningServer(url, worker, sizes)
    worker.close()


@pytest.fixture(scope="module")
def sdk(joining_server):
    client = tinker.ServiceClient(base_url=joining_server.url, api_key=API_KEY)
    yield client
    client.close("success").result()


def sdk_datum(rng: np.random.Generator, length: int, loss_fn: str) -> types.Datum:
    tokens = rng.integers(1, 500, length + 1).tolist()
    inputs: dict = {"target_tokens": tokens[1:]}
    if loss_fn == "cross_entropy":
        inputs["weights"] = rng.uniform(0, 1, length).round(3).tolist()
    else:
        inputs["logprobs"] = rng.uniform(-8, -4, length).round(3).tolist()
        inputs["advantages"] = rng.normal(0, 1, length).round(3).tolist()
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def wait_for(condition, what: str) -> None:
    deadline = time.time() + 60
    while not condition():
        assert time.time() < deadline, what
        time.sleep(0.02)


@contextmanager
def trainer_held(server: JoiningServer, sdk, queued: int) -> Iterator[None]:
    """Keep the trainer busy with a blocker's `forward` until `queued` operations submitted in the block wait
    in the queues, so that they meet there."""
    scheduler = server.worker.scheduler
    blocker = sdk.create_lora_training_client(base_model=server.worker.base_model, rank=2, seed=0).result()
    with server.worker.trainer._lock:
        blocked = blocker.forward([sdk_datum(np.random.default_rng(0), 3, "cross_entropy")], "cross_entropy")
        wait_for(lambda: scheduler.queue_depths().running == 1 and scheduler.queue_depths().training == 0,
                 "the blocker never started")
        yield
        wait_for(lambda: scheduler.queue_depths().training == queued, f"{queued} operations never queued")
    blocked.result()


def adapter_weights(server: JoiningServer, model_id: str) -> list[torch.Tensor]:
    return [p.detach().clone() for p in server.worker.trainer.adapter_parameters(model_id)]


def test_concurrent_clients_end_as_sequential_ones_and_keep_order(joining_server, sdk):
    """Four models trained one request at a time, and four twins whose fwd_bwd, optim_step, fwd_bwd are all
    queued at once (so other models' fwd_bwd join in one pass while each model's three stay in order)."""
    base, rng = joining_server.worker.base_model, np.random.default_rng(7)
    ranks, losses = [2, 4, 8, 4], ["cross_entropy", "importance_sampling", "cross_entropy", "importance_sampling"]
    data = [[sdk_datum(rng, n, loss) for n in lengths]
            for loss, lengths in zip(losses, [(5, 17), (9,), (30, 3, 11), (12, 12)])]
    adam = types.AdamParams(learning_rate=5e-2)

    def clients():
        return [sdk.create_lora_training_client(base_model=base, rank=r, seed=100 + i).result()
                for i, r in enumerate(ranks)]

    sequential, concurrent = clients(), clients()
    expected = []
    for tc, d, loss in zip(sequential, data, losses):
        first = tc.forward_backward(d, loss).result()
        tc.optim_step(adam).result()
        expected.append((first, tc.forward_backward(d, loss).result()))
    before = len(joining_server.joined_sizes)
    with trainer_held(joining_server, sdk, queued=3 * len(concurrent)):
        futures = [(tc.forward_backward(d, loss), tc.optim_step(adam), tc.forward_backward(d, loss))
                   for tc, d, loss in zip(concurrent, data, losses)]
    got = [(first.result(), second.result()) for first, _, second in futures]
    assert joining_server.joined_sizes[before:] == [4, 4]  # each model's first, then its second fwd_bwd
    for (e1, e2), (g1, g2) in zip(expected, got):
        for e, g in ((e1, g1), (e2, g2)):
            assert g.metrics["loss:sum"] == pytest.approx(e.metrics["loss:sum"], rel=RTOL)
            for eo, go in zip(e.loss_fn_outputs, g.loss_fn_outputs):
                assert_close(go["logprobs"].data, eo["logprobs"].data)
    for s, c in zip(sequential, concurrent):
        for ws, wc in zip(adapter_weights(joining_server, s.model_id), adapter_weights(joining_server, c.model_id)):
            torch.testing.assert_close(wc, ws, rtol=1e-4, atol=1e-6)


def test_requests_join_only_while_they_fit_one_microbatch(joining_server, sdk):
    """Three models' requests of 2 x 20 tokens wait together while a micro-batch holds 80 tokens: two join
    (2 x 2 x 20 = 80) and the third runs alone (joined, it would only add a micro-batch, saving no pass)."""
    worker = joining_server.worker
    rng = np.random.default_rng(11)
    clients = [sdk.create_lora_training_client(base_model=worker.base_model, rank=4, seed=20 + i).result()
               for i in range(3)]
    data = [[sdk_datum(rng, 20, "cross_entropy") for _ in range(2)] for _ in clients]
    saved, worker.trainer.microbatch_tokens = worker.trainer.microbatch_tokens, 80
    try:
        assert worker.joiner.token_limit(20) == 80  # the trainer's budget, under TINK_BATCH_ADAPTERS_MAX_TOKENS
        before = len(joining_server.joined_sizes)
        with trainer_held(joining_server, sdk, queued=3):
            futures = [tc.forward_backward(d, "cross_entropy") for tc, d in zip(clients, data)]
        losses = [f.result().metrics["loss:sum"] for f in futures]
    finally:
        worker.trainer.microbatch_tokens = saved
    assert joining_server.joined_sizes[before:] == [2]
    assert all(np.isfinite(losses))


def test_a_bad_request_in_a_joined_pass_fails_alone(joining_server, sdk, monkeypatch):
    """A datum that fails late (inside the pass: an injected loss error) fails its own request only; the others
    in the same pass get their results, and the bad model's pending gradients stay bit-identical."""
    import src.hf_trainer

    base, rng = joining_server.worker.base_model, np.random.default_rng(8)
    good = [sdk.create_lora_training_client(base_model=base, rank=4, seed=i).result() for i in range(2)]
    bad = sdk.create_lora_training_client(base_model=base, rank=4, seed=9).result()
    data = [sdk_datum(rng, 6, "cross_entropy") for _ in range(3)]
    bad.forward_backward([data[2]], "cross_entropy").result()  # pending gradients of the bad model
    pending = [p.grad.clone() for p in joining_server.worker.trainer.adapter_parameters(bad.model_id)]
    expected = [tc.forward([d], "cross_entropy").result() for tc, d in zip(good, data)]
    poison = sdk_datum(rng, 7, "cross_entropy")
    poison_tokens = poison.model_input.to_ints()
    real_loss = src.hf_trainer.microbatch_loss

    def loss_failing_on_poison(loss_fn, logprobs, batch, config, metrics):
        if any(d.tokens == poison_tokens for d in batch):
            raise RuntimeError("simulated bad datum found inside the pass")
        return real_loss(loss_fn, logprobs, batch, config, metrics)

    monkeypatch.setattr(src.hf_trainer, "microbatch_loss", loss_failing_on_poison)
    before = len(joining_server.joined_sizes)
    with trainer_held(joining_server, sdk, queued=3):
        futures = [tc.forward_backward([d], "cross_entropy") for tc, d in zip(good, data)]
        failing = bad.forward_backward([data[0], poison], "cross_entropy")
    results = [f.result() for f in futures]
    with pytest.raises(Exception, match="simulated bad datum"):
        failing.result()
    assert joining_server.joined_sizes[before:] == [3]
    for e, g in zip(expected, results):
        assert g.metrics["loss:sum"] == pytest.approx(e.metrics["loss:sum"], rel=RTOL)
    for p, g in zip(joining_server.worker.trainer.adapter_parameters(bad.model_id), pending):
        assert torch.equal(p.grad, g)


# ----------------------------------------------------------------------------- the scheduler and the settings


def test_scheduler_joins_only_queue_heads_within_limits_and_keeps_turns(tmp_path):
    """Heads of other models' queues join (same kind, up to 3 operations, while the longest sequence times
    all sequences stays within the limit); a model's later operations wait their turn; one member's error
    fails that future only."""
    store = Store(tmp_path / "s.sqlite3")
    sched = Scheduler(store, sampling_threads=2)
    gate, ran = threading.Event(), []

    def together(requests):
        ran.append(list(requests))
        return [UserInputError("bad datum", "data[0]") if r == "b1" else Outcome("json", b"{}") for r in requests]

    def alone(name: str, wait: bool = False):
        def run() -> Outcome:
            if wait:
                gate.wait(10)
            ran.append(name)
            return Outcome("json", b"{}")
        return run

    limits_asked = []

    def token_limit(longest: int) -> int:
        limits_asked.append(longest)
        return 100

    def fb(model: str, name: str, rows: int = 2, longest: int = 5) -> str:
        joinable = Joinable("forward_backward", rows, longest, name, together, max_members=3, token_limit=token_limit)
        return sched.submit_training("forward_backward", model, "o", alone(name), joinable)

    ids = [sched.submit_training("create_model", "z", "o", alone("z0", wait=True))]  # holds the trainer thread
    ids += [fb("a", "a1"), sched.submit_training("optim_step", "a", "o", alone("a2")), fb("a", "a3")]
    ids += [fb("b", "b1"), fb("e", "e1", rows=1, longest=40), fb("b", "b2"), fb("c", "c1", rows=19), fb("d", "d1")]
    gate.set()
    records = {rid: sched.wait(rid, 10) for rid in ids}
    # e1 alone is 40 tokens, but joined to a1 + b1 (4 rows) its 40-token sequence pads them: 5 x 40 > 100.
    # c1 is too large to join anything ((19 + 2) x 5 > 100); a3 waits for a2, then joins b2.
    assert ran == ["z0", ["a1", "b1", "d1"], "e1", "c1", "a2", ["b2", "a3"]]
    assert 40 in limits_asked  # the limit is asked with the joined pass's longest sequence
    failed = [r for r in records.values() if r.status != "done"]
    assert [(r.category, r.error) for r in failed] == [("user", "bad datum")]
    sched.shutdown()


def test_batching_settings_are_read_and_checked(tmp_path):
    environ = {"TINK_BATCH_ADAPTERS": "true", "TINK_BATCH_ADAPTERS_MAX_MODELS": "4",
               "TINK_BATCH_ADAPTERS_MAX_TOKENS": "2048"}
    config = Config.from_env(environ, dotenv_path=tmp_path / "none.env")
    assert (config.batch_adapters, config.batch_adapters_max_models, config.batch_adapters_max_tokens) == (True, 4, 2048)
    assert Config.from_env({}, dotenv_path=tmp_path / "none.env").batch_adapters is False
    with pytest.raises(ConfigError, match="TINK_BATCH_ADAPTERS_MAX_MODELS"):
        Config.from_env({"TINK_BATCH_ADAPTERS_MAX_MODELS": "0"}, dotenv_path=tmp_path / "none.env")


def test_peft_mixed_batches_give_alone_gradients_without_checkpointing(trainer):
    """What src/multi_adapter.py's docstring says of PEFT 0.21.2: `adapter_names=` is refused while the PeftModel
    says it trains; flagged as evaluating, it runs with grad and its gradients equal each adapter's alone."""
    rng = np.random.default_rng(9)
    models = [new_model(trainer, rank=4), new_model(trainer, rank=8)]
    names = [trainer._adapters[m].peft_name for m in models]
    ids = torch.as_tensor(rng.integers(1, 500, (4, 9)))
    owners = [names[0], names[1], names[0], names[1]]

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return logits.float().log_softmax(-1)[..., 7].sum()

    alone = {}
    for m, name in zip(models, names):
        clear_grads(trainer, m)
        trainer._activated(trainer._adapters[m])
        rows = [i for i, owner in enumerate(owners) if owner == name]
        loss_of(trainer._peft(input_ids=ids[rows]).logits).backward()
        alone[m] = grads(trainer, m)
        clear_grads(trainer, m)
    # Tink's PEFT wrappers keep the training flag get_peft_model gave them (the model's modules are in eval
    # mode), and that flag alone makes PEFT refuse.
    with pytest.raises(ValueError, match="training mode"):
        trainer._peft(input_ids=ids, adapter_names=owners)
    for m in models:
        for p in trainer.adapter_parameters(m):
            p.requires_grad_(True)  # PEFT marks only the active adapter trainable
    wrappers = (trainer._peft, trainer._peft.base_model)  # PeftModel, LoraModel; the HF model itself is in eval
    assert [w.training for w in wrappers] == [True, True] and not trainer._peft.base_model.model.training
    for w in wrappers:
        w.training = False
    try:
        loss_of(trainer._peft(input_ids=ids, adapter_names=owners).logits).backward()
    finally:
        for w in wrappers:
            w.training = True
    for m in models:
        for x, y in zip(grads(trainer, m), alone[m]):
            assert_close(x, y)
        clear_grads(trainer, m)
