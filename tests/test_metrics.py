"""`GET /metrics`: Prometheus text that the client library's own parser reads, whose counters move by
exactly what the SDK sent to a real worker on loopback (tokens trained = the datums' tokens, tokens
sampled = the tokens the SDK got back), with the queues, futures and sampler state of the moment."""

from __future__ import annotations

import threading
import time

import prometheus_client
import pytest
import requests
import tinker
from prometheus_client.parser import text_string_to_metric_families
from tinker import types

from src.backends import AdapterRejectedError
from src.scheduling import Outcome

from .conftest import API_KEY, free_port, serving

Samples = dict[tuple[str, tuple], float]


def scrape(url: str) -> Samples:
    """Every sample of `/metrics`, by (name, sorted labels); fetched without an API key, as Prometheus does."""
    response = requests.get(f"{url}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def settled(url: str, timeout: float = 10.0) -> Samples:
    """A scrape once no future is pending or running (or after `timeout`): closing a session queues the
    unloading of its models. (The scheduler counts an operation before the store shows its outcome, so
    a finished future is always in the counters; CI once caught the reverse order.)"""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        in_flight = value(samples, "tink_futures", state="pending") + value(samples, "tink_futures", state="running")
        if in_flight == 0 or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def start_worker(tiny_model_path, state_dir, sampler=None):
    """A fresh worker of its own (counts start at zero); `sampler` replaces the configured one."""
    from src.app import create_app
    from src.config import Config
    from src.hf_trainer import HFTrainer
    from src.store import Store
    from src.worker import Worker

    config = Config(base_model=str(tiny_model_path), state_dir=state_dir, api_keys=(API_KEY,), port=free_port(),
                    retrieve_wait_s=5.0, threads=16, device="cpu", dtype="float32")
    if sampler is None:
        worker = Worker.from_config(config)
    else:
        trainer = HFTrainer(str(tiny_model_path), device="cpu", dtype="float32")
        worker = Worker(config, trainer, sampler, Store(config.database_path))
    return worker, serving(create_app(config, worker), config)


@pytest.fixture(scope="module")
def metered(tiny_model_path, tmp_path_factory):
    worker, server = start_worker(tiny_model_path, tmp_path_factory.mktemp("metrics-state"))
    with server as url:
        yield url, worker
    worker.close()


def datum(tokens: list[int]) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})


def test_sdk_traffic_moves_the_counters_by_what_was_sent(metered):
    url, worker = metered
    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    before = scrape(url)
    trainer = service.create_lora_training_client(base_model=worker.base_model, rank=4, seed=0).result()
    data = [datum([1, 40, 41, 97, 12, 300, 5]), datum([1, 33, 34, 35, 36, 37, 38, 39, 300, 301, 302])]
    sent = sum(len(d.model_input.to_ints()) for d in data)  # 6 + 10
    trainer.forward_backward(data, "cross_entropy").result()
    trainer.forward_backward(data[:1], "cross_entropy").result()
    trainer.forward(data, "cross_entropy").result()  # scores only: trains no token
    trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    sampler = trainer.save_weights_and_get_sampling_client().result()
    answer = sampler.sample(types.ModelInput.from_ints([1, 40, 41]), 3,
                            types.SamplingParams(max_tokens=6, temperature=1.0)).result()
    service.close("success").result()
    after = settled(url)

    assert delta(before, after, "tink_tokens_trained_total") == sent + len(data[0].model_input.to_ints())
    assert delta(before, after, "tink_tokens_sampled_total") == sum(len(s.tokens) for s in answer.sequences) > 0
    done = {op: delta(before, after, "tink_operation_duration_seconds_count", operation=op, status="done")
            for op in ("create_model", "forward_backward", "forward", "optim_step", "save_weights_for_sampler",
                       "sample", "unload_model")}
    assert done == {"create_model": 1, "forward_backward": 2, "forward": 1, "optim_step": 1,
                    "save_weights_for_sampler": 1, "sample": 1,
                    "unload_model": 1}  # closing the session unloads its model
    assert delta(before, after, "tink_futures_finished_total", state="done") == sum(done.values())
    assert delta(before, after, "tink_operation_queue_seconds_count", operation="forward_backward") == 2
    assert delta(before, after, "tink_sampler_operations_total", sampler="hf") == 1
    assert value(after, "tink_sampler_adapters_loaded", sampler="hf") == 1  # the one version sampled
    assert value(after, "tink_sampler_live", sampler="hf") == value(after, "tink_sampler_active", sampler="hf") == 1
    assert value(after, "tink_futures", state="pending") == value(after, "tink_futures", state="running") == 0
    # HTTP: one labelled series per route template, never per model or request id
    route = dict(route="/api/v1/forward_backward", method="POST", status="200")
    assert delta(before, after, "tink_http_requests_total", **route) == 3  # the SDK sends forward there too
    assert delta(before, after, "tink_http_request_duration_seconds_count", **route) == 3
    assert delta(before, after, "tink_http_request_duration_seconds_sum", **route) > 0
    assert not any(trainer.model_id in str(labels) for _, labels in after)


def test_errors_are_counted_by_status_under_bounded_labels(metered):
    url, _ = metered
    before = scrape(url)
    bad = requests.post(f"{url}/api/v1/forward_backward", json={"forward_backward_input": 3},
                        headers={"X-API-Key": API_KEY}, timeout=30)
    assert bad.status_code == 400
    assert requests.get(f"{url}/api/v1/healthz", timeout=30).status_code == 200
    assert requests.post(f"{url}/api/v1/forward_backward", json={}, timeout=30).status_code == 401  # no key
    assert requests.get(f"{url}/no/such/path/{'x' * 40}", headers={"X-API-Key": API_KEY}, timeout=30).status_code == 404
    assert requests.request("BREW", f"{url}/api/v1/healthz", timeout=30).status_code == 405
    after = scrape(url)
    assert delta(before, after, "tink_http_requests_total", route="/api/v1/forward_backward", method="POST",
                 status="400") == 1
    assert delta(before, after, "tink_http_requests_total", route="/api/v1/forward_backward", method="POST",
                 status="401") == 1
    assert delta(before, after, "tink_http_requests_total", route="/api/v1/healthz", method="GET", status="200") == 1
    assert delta(before, after, "tink_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert delta(before, after, "tink_http_requests_total", route="unmatched", method="other", status="405") == 1
    assert not any("no/such/path" in str(labels) or "BREW" in str(labels) for _, labels in after)


def test_queue_depth_and_futures_in_flight(metered):
    """Training operations queued behind a running one, on two models: counted per queue, in aggregate."""
    url, worker = metered
    gate, running = threading.Event(), threading.Event()

    def blocked() -> Outcome:
        running.set()
        assert gate.wait(60)
        return Outcome("json", b"{}")

    quick = lambda: Outcome("json", b"{}")  # noqa: E731
    scheduler = worker.scheduler
    first = scheduler.submit_training("metrics_probe", "model-a", "owner", blocked)
    assert running.wait(30)
    queued = [scheduler.submit_training("metrics_probe", "model-a", "owner", quick) for _ in range(2)]
    queued.append(scheduler.submit_training("metrics_probe", "model-b", "owner", quick))
    try:
        during = scrape(url)
        assert value(during, "tink_queue_depth", queue="training") == 3
        assert value(during, "tink_queue_depth", queue="sampling") == 0
        assert value(during, "tink_training_queue_models") == 2
        assert value(during, "tink_training_queue_longest") == 2
        assert value(during, "tink_futures", state="running") == 1
        assert value(during, "tink_futures", state="pending") == 3
    finally:
        gate.set()
    for request_id in [first, *queued]:
        assert scheduler.wait(request_id, 30).status == "done"
    after = scrape(url)
    assert value(after, "tink_queue_depth", queue="training") == 0
    assert value(after, "tink_training_queue_longest") == 0
    assert value(after, "tink_futures", state="running") == 0
    assert delta(during, after, "tink_operation_duration_seconds_count", operation="metrics_probe", status="done") == 4
    assert value(after, "tink_operation_duration_seconds_sum", operation="metrics_probe", status="done") > 0


def test_each_worker_has_its_own_registry(metered, tiny_model_path, tmp_path):
    url, worker = metered
    other, server = start_worker(tiny_model_path, tmp_path / "state")
    try:
        with server as other_url:
            assert value(scrape(url), "tink_tokens_trained_total") > 0  # the first test trained here
            assert value(scrape(other_url), "tink_tokens_trained_total") == 0
    finally:
        other.close()
    assert worker.prometheus.registry is not prometheus_client.REGISTRY
    assert not any(name.startswith("tink_") for name in prometheus_client.REGISTRY._names_to_collectors)


class AdapterRefusingSampler:
    """Fault injection: a healthy primary that refuses every adapter (as vLLM refuses an adapter of modules
    it cannot serve) and samples the base model with the real HF sampler."""

    name = "refusing"

    def __init__(self, inner):
        self._inner = inner

    def sample(self, job, sink=None):
        if job.adapter is not None:
            raise AdapterRejectedError(f"refusing cannot serve {job.adapter.name}", job.adapter.name,
                                       "injected refusal")
        return self._inner.sample(job) if sink is None else self._inner.sample(job, sink)

    def compute_logprobs(self, adapter, tokens):
        return self._inner.compute_logprobs(adapter, tokens)

    def health(self):
        return {"live": True, "backend": self.name, "loaded_adapters": 0}

    def close(self):
        pass


def sample_base_and_adapter(url: str, base_model: str) -> None:
    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    trainer = service.create_lora_training_client(base_model=base_model, rank=4, seed=0).result()
    params = types.SamplingParams(max_tokens=3, temperature=1.0)
    prompt = types.ModelInput.from_ints([1, 40, 41])
    service.create_sampling_client(base_model=base_model).result().sample(prompt, 1, params).result()
    trainer.save_weights_and_get_sampling_client().result().sample(prompt, 1, params).result()
    service.close("success").result()


def test_refused_adapters_and_fallback_switches_are_counted(tiny_model_path, tmp_path):
    from src.hf_sampler import HFSampler
    from src.sampler_fallback import FallbackSampler
    from src.vllm_server_client import VLLMServerSampler

    hf = HFSampler(str(tiny_model_path), device="cpu", dtype="float32")
    refusing = FallbackSampler(AdapterRefusingSampler(HFSampler(str(tiny_model_path), device="cpu")), hf, 600)
    worker, server = start_worker(tiny_model_path, tmp_path / "refusing", refusing)
    try:
        with server as url:
            sample_base_and_adapter(url, worker.base_model)
            samples = scrape(url)
    finally:
        worker.close()
    assert value(samples, "tink_sampler_adapter_refusals_total") == 1
    assert value(samples, "tink_sampler_fallback_switches_total") == 0  # the primary stayed up
    assert value(samples, "tink_sampler_operations_total", sampler="refusing") == 1  # the base model
    assert value(samples, "tink_sampler_operations_total", sampler="hf") == 1  # the refused adapter
    assert value(samples, "tink_sampler_active", sampler="refusing") == 1

    # A vLLM server that is not there (nothing listens on the port): the first sample switches to HF.
    down = VLLMServerSampler(f"http://127.0.0.1:{free_port()}", model=str(tiny_model_path))
    fallback = FallbackSampler(down, HFSampler(str(tiny_model_path), device="cpu", dtype="float32"), 600)
    worker, server = start_worker(tiny_model_path, tmp_path / "down", fallback)
    try:
        with server as url:
            sample_base_and_adapter(url, worker.base_model)
            samples = scrape(url)
    finally:
        worker.close()
    assert value(samples, "tink_sampler_fallback_switches_total") == 1  # once, however many requests follow
    assert value(samples, "tink_sampler_operations_total", sampler="hf") == 2
    assert value(samples, "tink_sampler_live", sampler="vllm-server") == 0
    assert value(samples, "tink_sampler_active", sampler="hf") == 1
    assert value(samples, "tink_sampler_active", sampler="vllm-server") == 0
