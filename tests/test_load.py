"""Load: many concurrent SDK clients sample and train; no 5xx, no lost futures; latencies reported.

CI runs the short version: 32 clients for 20 s (TINK_LOAD_CLIENTS, TINK_LOAD_SECONDS). The full run
the hardening issue asks for is two minutes:

    TINK_LOAD_SECONDS=120 .venv/bin/python -m pytest tests/test_load.py

All traffic goes to a loopback server built for this module; every loop is bounded in time and
every wait in count. A WSGI middleware in front of the app counts every status the server sent
(so a 5xx the SDK retried away still counts) and records every future id it handed out; at the end
each of those ids must answer `retrieve_future` with a result or a failure. The p50/p99 latencies
are written to the terminal (even under `-q` and output capture) and to `load-latency.json` in the
pytest base temp folder.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pytest
import requests
import tinker
from tinker import types

from .conftest import API_KEY, free_port, serving

CLIENTS = int(os.environ.get("TINK_LOAD_CLIENTS", "32"))
SECONDS = float(os.environ.get("TINK_LOAD_SECONDS", "20"))

# Routes whose 200 answer carries a future id the client will retrieve.
FUTURE_ROUTES = {"create_model", "forward_backward", "forward", "optim_step", "save_weights",
                 "save_weights_for_sampler", "load_weights", "unload_model", "asample"}


@dataclass
class Traffic:
    """What the server answered, as seen on the wire in front of the app."""

    statuses: Counter = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    request_ids: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


class CountingMiddleware:
    """WSGI wrapper: counts every response status and collects the future ids handed out."""

    def __init__(self, app, traffic: Traffic):
        self.app = app
        self.traffic = traffic

    def __call__(self, environ, start_response):
        seen: dict[str, int] = {}

        def record_status(status, headers, exc_info=None):
            seen["status"] = int(status.split()[0])
            return start_response(status, headers, exc_info)

        chunks = self.app(environ, record_status)
        try:
            body = b"".join(chunks)
        finally:
            if hasattr(chunks, "close"):
                chunks.close()
        route = environ.get("PATH_INFO", "").rsplit("/", 1)[-1]
        status = seen.get("status", 0)
        with self.traffic.lock:
            self.traffic.statuses[status] += 1
            if status >= 500:
                self.traffic.server_errors.append(f"{status} {environ.get('PATH_INFO')}: {body[:300]!r}")
            if status == 200 and route in FUTURE_ROUTES:
                self.traffic.request_ids.add(json.loads(body)["request_id"])
        return [body]


@dataclass
class LoadServer:
    url: str
    worker: object
    traffic: Traffic


@pytest.fixture(scope="module")
def load_server(tiny_model_path, tmp_path_factory) -> Iterator[LoadServer]:
    """A loopback server sized for CLIENTS: a long-poll thread per client plus room for their posts."""
    from src.app import create_app
    from src.config import Config
    from src.worker import Worker

    config = Config(base_model=str(tiny_model_path), state_dir=tmp_path_factory.mktemp("load"), api_keys=(API_KEY,),
                    port=free_port(), retrieve_wait_s=5.0, threads=2 * CLIENTS + 8,
                    max_adapters=CLIENTS + 8, max_adapters_per_key=CLIENTS + 8)
    worker = Worker.from_config(config)
    traffic = Traffic()
    with serving(CountingMiddleware(create_app(config, worker), traffic), config) as url:
        yield LoadServer(url=url, worker=worker, traffic=traffic)
    worker.close()


@pytest.fixture
def report(capsys, tmp_path_factory):
    """Write lines to the terminal past pytest's capture (CI logs show them without `-s`)."""

    def write(text: str) -> None:
        with capsys.disabled():
            print(text, flush=True)

    write.json_path = tmp_path_factory.getbasetemp() / "load-latency.json"
    return write


def percentiles(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": round(float(np.percentile(values, 50)) * 1000, 1),
            "p99_ms": round(float(np.percentile(values, 99)) * 1000, 1),
            "max_ms": round(max(values) * 1000, 1)}


def test_concurrent_clients_sample_and_train(load_server, report):
    latencies: dict[str, list[float]] = {"sample": [], "forward_backward": []}
    errors: list[str] = []
    counts = {"submitted": 0, "completed": 0}
    lock = threading.Lock()
    ready = threading.Barrier(CLIENTS, timeout=300)
    deadline: list[float] = []

    def client(i: int) -> None:
        try:
            with tinker.ServiceClient(base_url=load_server.url, api_key=API_KEY) as service:
                run_client(i, service)
        except Exception as exc:  # any failure (a 5xx surfaces here after the SDK's retries) fails the test
            with lock:
                errors.append(f"client {i}: {type(exc).__name__}: {exc}")
            ready.abort()

    def run_client(i: int, service: tinker.ServiceClient) -> None:
        trainer = service.create_lora_training_client(base_model=load_server.worker.base_model, rank=4,
                                                      seed=i).result()
        sampler = trainer.save_weights_and_get_sampling_client().result()
        rng = np.random.default_rng(i)
        if ready.wait() == 0:  # everyone set up: the timed part starts for all clients at once
            deadline.append(time.time() + SECONDS)
        while not deadline:
            time.sleep(0.01)
        while time.time() < deadline[0]:
            tokens = rng.integers(3, 400, size=16).tolist()
            with lock:
                counts["submitted"] += 2
            start = time.perf_counter()
            out = sampler.sample(types.ModelInput.from_ints(tokens), 2,
                                 types.SamplingParams(max_tokens=8, seed=i)).result()
            sample_s = time.perf_counter() - start
            assert len(out.sequences) == 2
            datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 15})
            start = time.perf_counter()
            fb = trainer.forward_backward([datum], "cross_entropy").result()
            fb_s = time.perf_counter() - start
            assert "loss:sum" in fb.metrics
            with lock:
                counts["completed"] += 2
                latencies["sample"].append(sample_s)
                latencies["forward_backward"].append(fb_s)

    started = time.time()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, started + SECONDS + 360 - time.time()))
    hung = sum(t.is_alive() for t in threads)
    assert not errors, errors[:3]
    assert not hung, f"{hung} clients still running after {SECONDS + 360:.0f}s"

    # Every future id the server handed out answers with a result or a failure: none is lost.
    traffic = load_server.traffic
    with traffic.lock:
        issued = sorted(traffic.request_ids)

    def final_state(request_id: str) -> str:
        with requests.Session() as http:
            for _ in range(10):
                resp = http.post(f"{load_server.url}/api/v1/retrieve_future", json={"request_id": request_id},
                                 headers={"X-API-Key": API_KEY}, timeout=30)
                if resp.status_code != 200:
                    return f"lost ({resp.status_code})"
                answer = resp.json()
                if answer.get("type") != "try_again":
                    return "failed" if "error" in answer else "done"
        return "lost (still pending)"

    with ThreadPoolExecutor(8) as pool:
        states = Counter(pool.map(final_state, issued))
    lost = sum(n for state, n in states.items() if state.startswith("lost"))
    failed_futures = load_server.worker.store.failed_futures("server")
    server_errors = sum(n for status, n in traffic.statuses.items() if status >= 500)

    summary = {
        "clients": CLIENTS, "seconds": SECONDS, "operations": counts["completed"],
        "ops_per_s": round(counts["completed"] / SECONDS, 1),
        "statuses": {str(k): v for k, v in sorted(traffic.statuses.items())},
        "http_5xx": server_errors, "futures_issued": len(issued), "futures_done": states.get("done", 0),
        "futures_failed": states.get("failed", 0), "futures_lost": lost,
        "latency": {name: percentiles(values) for name, values in latencies.items() if values},
    }
    report.json_path.write_text(json.dumps(summary, indent=2))
    lines = [f"\nload: {CLIENTS} clients for {SECONDS:.0f}s: {counts['completed']} operations "
             f"({summary['ops_per_s']}/s), {server_errors} HTTP 5xx, {len(issued)} futures issued, "
             f"{states.get('failed', 0)} failed, {lost} lost; statuses {summary['statuses']}"]
    for name, p in summary["latency"].items():
        lines.append(f"  {name:17s} p50 {p['p50_ms']:8.1f} ms   p99 {p['p99_ms']:8.1f} ms   "
                     f"max {p['max_ms']:8.1f} ms   n={p['n']}")
    lines.append(f"  written to {report.json_path}")
    report("\n".join(lines))

    assert server_errors == 0, traffic.server_errors[:3]
    assert lost == 0, states
    assert not failed_futures, failed_futures[:3]
    assert counts["completed"] == counts["submitted"] > 0
    assert len(issued) >= counts["completed"] + 2 * CLIENTS  # each client's create_model and sampler save too
