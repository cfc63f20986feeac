"""The live dashboard: the per-step series a real worker records as the SDK trains, the JSON the
page polls (ownership, deltas, decimation), client metrics and their errors, and the page itself
in headless Chromium (skipped only where Debian's `chromium` / `chromium-driver` are absent)."""

from __future__ import annotations

import math
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import tinker
from tinker import types
from transformers import AutoTokenizer

from src.run_metrics import MAX_CLIENT_METRICS_PER_REQUEST, MAX_CLIENT_SERIES_PER_RUN, owner_label
from src.store import Store

from .conftest import ADMIN_KEY, API_KEY, OTHER_KEY, RunningServer, free_port, serving

LEARNING_RATE = 2e-2


@pytest.fixture(scope="module")
def board(tiny_model_path, tmp_path_factory) -> Iterator[RunningServer]:
    """A worker of its own, so the runs a key sees are exactly this module's."""
    from src.app import create_app
    from src.config import Config
    from src.worker import Worker

    state = tmp_path_factory.mktemp("dashboard-state")
    config = Config(base_model=str(tiny_model_path), state_dir=state, api_keys=(API_KEY, OTHER_KEY),
                    admin_keys=(ADMIN_KEY,), port=free_port(), retrieve_wait_s=5.0, threads=16)
    worker = Worker.from_config(config)
    with serving(create_app(config, worker), config) as url:
        yield RunningServer(url=url, worker=worker, state_dir=state)
    worker.close()


@pytest.fixture(scope="module")
def sdk(board) -> Iterator[tinker.ServiceClient]:
    client = tinker.ServiceClient(base_url=board.url, api_key=API_KEY)
    yield client
    client.close("success").result()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


SAY_YES = ("Question: say yes.", " yes yes yes")


def sft_batch(tokenizer, pairs=(SAY_YES, ("Question: say no.", " no no"))) -> list[types.Datum]:
    data = []
    for prompt, answer in pairs:
        p = [tokenizer.bos_token_id] + tokenizer.encode(prompt)
        tokens = p + tokenizer.encode(answer) + [tokenizer.eos_token_id]
        weights = [0.0] * (len(p) - 1) + [1.0] * (len(tokens) - len(p))
        data.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                                loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights}))
    return data


def weight_sum(data: list[types.Datum]) -> float:
    return float(sum(sum(d.loss_fn_inputs["weights"].data) for d in data))


def train_step(tc, data, learning_rate: float = LEARNING_RATE) -> tuple[float, float]:
    """One forward_backward + optim_step; (loss per weighted token, grad norm) as the SDK saw them."""
    fb = tc.forward_backward(data, "cross_entropy").result()
    opt = tc.optim_step(types.AdamParams(learning_rate=learning_rate)).result()
    return fb.metrics["loss:sum"] / weight_sum(data), opt.metrics["grad_norm:mean"]


def call(board, method: str, path: str, key: str | None = API_KEY, **kwargs) -> requests.Response:
    headers = {"X-API-Key": key} if key is not None else {}
    return requests.request(method, f"{board.url}{path}", headers=headers, timeout=30, **kwargs)


def report(board, model_id: str, body, key: str = API_KEY) -> requests.Response:
    return call(board, "POST", f"/api/v1/training_runs/{model_id}/metrics", key, json=body)


def state(board, key: str = API_KEY, **params) -> dict:
    resp = call(board, "GET", "/api/v1/dashboard/state", key, params=params)
    assert resp.status_code == 200, resp.text
    return resp.json()


def steps_of(points: list[list[float]]) -> list[int]:
    return [int(p[0]) for p in points]


@pytest.fixture(scope="module")
def trained(board, sdk, tokenizer) -> dict:
    """A run trained three steps through the SDK, then sampled once from its checkpoint, with a
    client metric at each of its steps; what the SDK saw along the way."""
    tc = sdk.create_lora_training_client(base_model=board.worker.base_model, rank=4, seed=0).result()
    data = sft_batch(tokenizer)
    losses, norms = [], []
    for step in (1, 2, 3):
        loss, norm = train_step(tc, data)
        losses.append(loss)
        norms.append(norm)
        assert report(board, tc.model_id, {"step": step, "metrics": {"reward/mean": step / 10}}).status_code == 200
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints([tokenizer.bos_token_id] + tokenizer.encode("Hello"))
    sequences = sampler.sample(prompt, 3, types.SamplingParams(max_tokens=5, temperature=1.0)).result().sequences
    return {"model_id": tc.model_id, "tc": tc, "data": data, "losses": losses, "norms": norms,
            "sequences": sequences}


# ---------------------------------------------------------------------------- the JSON endpoints


def test_state_has_the_run_and_series_of_every_step(board, trained):
    model_id = trained["model_id"]
    answer = state(board, runs=model_id, full=model_id)
    (run,) = [r for r in answer["runs"] if r["model_id"] == model_id]
    assert run["steps"] == 3 and run["rank"] == 4 and run["base_model"] == board.worker.base_model
    assert run["owner"] == owner_label(board.worker.store.get_model(model_id)["owner"])
    assert run["checkpoints"] == 1 and run["last_sampler_checkpoint"].startswith(f"tinker://{model_id}/")
    assert run["last_loss"] == pytest.approx(trained["losses"][-1], rel=1e-5)
    assert run["last_activity"] >= run["created_at"] and not run["unloaded"]

    series = answer["series"][model_id]
    worker, client = series["worker"], series["client"]
    assert steps_of(worker["loss"]) == [1, 2, 3]
    assert [p[1] for p in worker["loss"]] == pytest.approx(trained["losses"], rel=1e-5)
    assert trained["losses"][-1] < trained["losses"][0]
    assert worker["learning_rate"] == [[1, LEARNING_RATE], [2, LEARNING_RATE], [3, LEARNING_RATE]]
    assert [p[1] for p in worker["grad_norm"]] == pytest.approx(trained["norms"], rel=1e-5)
    # The sample after the third step belongs to the fourth, which it prepares.
    tokens = sum(len(s.tokens) for s in trained["sequences"])
    mean_logprob = sum(sum(s.logprobs) for s in trained["sequences"]) / tokens
    assert worker["sampled_tokens"] == [[4, tokens]]
    assert worker["sampled_logprob"][0][0] == 4
    assert worker["sampled_logprob"][0][1] == pytest.approx(mean_logprob, rel=1e-4)
    assert client == {"reward/mean": [[1, 0.1], [2, 0.2], [3, 0.3]]}
    assert answer["cursor"] > 0

    worker_state = answer["worker"]
    assert worker_state["base_model"] == board.worker.base_model and worker_state["status"] == "ok"
    assert worker_state["trainer"]["name"] == board.worker.trainer.name
    assert worker_state["sampler"]["live"] and "memory" in worker_state
    assert set(worker_state["queues"]) == {"training_queued", "training_running", "sampling_queued",
                                           "sampling_running"}

    alone = call(board, "GET", f"/api/v1/training_runs/{model_id}/metrics").json()
    assert alone["steps"] == 3 and alone["series"] == series


def test_a_key_sees_only_its_runs_and_an_admin_sees_all(board, trained):
    model_id = trained["model_id"]
    other = state(board, OTHER_KEY, runs=model_id, full=model_id)
    assert model_id not in [r["model_id"] for r in other["runs"]]
    assert other["series"] == {} and other["changes"] == []
    admin = state(board, ADMIN_KEY, runs=model_id, full=model_id)
    assert model_id in [r["model_id"] for r in admin["runs"]]
    assert steps_of(admin["series"][model_id]["worker"]["loss"]) == [1, 2, 3]


def test_a_poll_gets_only_what_changed_since_its_cursor(board, sdk, tokenizer):
    tc = sdk.create_lora_training_client(base_model=board.worker.base_model, rank=4, seed=1).result()
    data = sft_batch(tokenizer)
    train_step(tc, data)
    train_step(tc, data)
    cursor = state(board, runs=tc.model_id, full=tc.model_id)["cursor"]
    assert state(board, cursor=cursor, runs=tc.model_id)["changes"] == []

    loss, norm = train_step(tc, data)
    answer = state(board, cursor=cursor, runs=tc.model_id)
    assert answer["series"] == {} and answer["cursor"] > cursor
    changed = {(c[0], c[1], c[2], c[3]): c[4] for c in answer["changes"]}
    assert set(changed) == {(tc.model_id, "worker", name, 3) for name in ("loss", "learning_rate", "grad_norm")}
    assert changed[(tc.model_id, "worker", "loss", 3)] == pytest.approx(loss, rel=1e-5)
    assert changed[(tc.model_id, "worker", "grad_norm", 3)] == pytest.approx(norm, rel=1e-5)
    # Changes come only for the runs asked for.
    assert state(board, cursor=cursor)["changes"] == []


def test_a_cursor_the_worker_never_gave_gets_whole_series(board, trained):
    model_id = trained["model_id"]
    answer = state(board, cursor=2**40, runs=model_id)
    assert answer["cursor"] < 2**40 and answer["changes"] == []
    assert steps_of(answer["series"][model_id]["worker"]["loss"]) == [1, 2, 3]


def test_an_unloaded_run_is_listed_and_keeps_its_series(board, sdk, tokenizer):
    from .api import result

    tc = sdk.create_lora_training_client(base_model=board.worker.base_model, rank=4, seed=5).result()
    loss, _ = train_step(tc, sft_batch(tokenizer))
    unload = call(board, "POST", "/api/v1/unload_model", json={"model_id": tc.model_id}).json()
    assert result(board.url, unload["request_id"])["type"] == "unload_model"
    (run,) = [r for r in state(board)["runs"] if r["model_id"] == tc.model_id]
    assert run["unloaded"] and run["steps"] == 1 and run["last_loss"] == pytest.approx(loss, rel=1e-5)
    series = call(board, "GET", f"/api/v1/training_runs/{tc.model_id}/metrics").json()["series"]["worker"]
    assert series["loss"] == [[1, pytest.approx(loss, rel=1e-5)]]
    assert call(board, "GET", f"/api/v1/training_runs/{tc.model_id}/metrics", OTHER_KEY).status_code == 404


def test_the_logprob_gap_of_plain_sampling_is_a_series(board, trained):
    model_id = trained["model_id"]
    before = call(board, "GET", f"/api/v1/training_runs/{model_id}/metrics").json()["series"]["worker"]
    assert "logprob_gap" not in before
    resp = call(board, "POST", "/api/v1/sample", json={
        "model_id": model_id, "prompts": ["Hello there"], "num_samples": 2, "logprob_gap": True,
        "sampling_params": {"max_tokens": 4, "temperature": 1.0}})
    assert resp.status_code == 200, resp.text
    gaps = [c["logprob_gap"] for c in resp.json()["results"][0]["completions"] if "logprob_gap" in c]
    expected = sum(g["mean_abs"] * g["tokens"] for g in gaps) / sum(g["tokens"] for g in gaps)
    series = call(board, "GET", f"/api/v1/training_runs/{model_id}/metrics").json()["series"]["worker"]
    assert series["logprob_gap"] == [[4, pytest.approx(expected, rel=1e-6, abs=1e-9)]]
    # Evaluation samples are not training samples: the sampled-token series is unchanged.
    assert series["sampled_tokens"] == before["sampled_tokens"]


def test_long_series_are_decimated_and_keep_their_last_step(board, sdk):
    tc = sdk.create_lora_training_client(base_model=board.worker.base_model, rank=4, seed=2).result()
    for step in range(1, 41):
        assert report(board, tc.model_id, {"step": step, "metrics": {"score": step * 1.5}}).status_code == 200
    points = call(board, "GET", f"/api/v1/training_runs/{tc.model_id}/metrics",
                  params={"max_points": 10}).json()["series"]["client"]["score"]
    assert steps_of(points) == [1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 40]
    assert all(value == step * 1.5 for step, value in points)
    whole = state(board, runs=tc.model_id, full=tc.model_id, max_points=100)["series"][tc.model_id]
    assert steps_of(whole["client"]["score"]) == list(range(1, 41))
    # A far-off step number thins nothing out: steps are counted, not their numbers.
    assert report(board, tc.model_id, {"step": 10**9, "metrics": {"score": 0.0}}).status_code == 200
    points = call(board, "GET", f"/api/v1/training_runs/{tc.model_id}/metrics",
                  params={"max_points": 50}).json()["series"]["client"]["score"]
    assert steps_of(points) == [*range(1, 41), 10**9]


def test_a_metric_without_step_goes_to_the_step_in_progress(board, trained):
    resp = report(board, trained["model_id"], {"metrics": {"eval/accuracy": 0.5, "kl": 1}})
    assert resp.status_code == 200 and resp.json() == {"model_id": trained["model_id"], "step": 4, "recorded": 2}
    client = call(board, "GET", f"/api/v1/training_runs/{trained['model_id']}/metrics").json()["series"]["client"]
    assert client["eval/accuracy"] == [[4, 0.5]] and client["kl"] == [[4, 1.0]]


def test_the_demo_reports_its_mean_reward_per_step(board):
    from src.demo import run_loop

    rewards = run_loop(board.url, API_KEY, steps=3, quiet=True)
    (run,) = [r for r in state(board)["runs"] if r["session_id"] and r["rank"] == 16]
    answer = call(board, "GET", f"/api/v1/training_runs/{run['model_id']}/metrics").json()
    points = answer["series"]["client"]["reward/mean"]
    # Each reward is filed under the step in progress; an iteration whose group rewards were all equal
    # trains nothing, and the next reward then replaces it in the same step.
    assert points[-1][1] == pytest.approx(rewards[-1])
    assert all(any(math.isclose(v, r) for r in rewards) for _, v in points)
    assert len(points) <= len(rewards) and points[-1][0] <= answer["steps"] + 1
    assert len({step for step, _ in points}) == len(points), "one reward per step: a later one replaces it"
    assert steps_of(answer["series"]["worker"]["sampled_tokens"]) == steps_of(points)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("body", "field"), [
    ({"step": 1}, "metrics"),
    ({"metrics": {}}, "metrics"),
    ({"metrics": [0.3]}, "metrics"),
    ({"metrics": {"reward/mean": "0.3"}}, 'metrics["reward/mean"]'),
    ({"metrics": {"reward/mean": True}}, 'metrics["reward/mean"]'),
    ({"metrics": {"reward/mean": None}}, 'metrics["reward/mean"]'),
    ({"metrics": {"": 1.0}}, 'metrics[""]'),
    ({"metrics": {"x" * 101: 1.0}}, f'metrics["{"x" * 100}"]'),
    ({"metrics": {f"m{i}": 1.0 for i in range(MAX_CLIENT_METRICS_PER_REQUEST + 1)}}, "metrics"),
    ({"step": -1, "metrics": {"a": 1.0}}, "step"),
    ({"step": "3", "metrics": {"a": 1.0}}, "step"),
    ({"step": 2.5, "metrics": {"a": 1.0}}, "step"),
    ({"step": True, "metrics": {"a": 1.0}}, "step"),
    ({"steps": 3, "metrics": {"a": 1.0}}, "steps"),
    ([1, 2], "body"),
])
def test_bad_metric_bodies_are_400_naming_the_field(board, trained, body, field):
    resp = report(board, trained["model_id"], body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["field"] == field


def test_non_finite_metric_values_are_400(board, trained):
    resp = requests.post(f"{board.url}/api/v1/training_runs/{trained['model_id']}/metrics",
                         data='{"metrics": {"reward/mean": NaN}}',
                         headers={"X-API-Key": API_KEY, "Content-Type": "application/json"}, timeout=30)
    assert resp.status_code == 400 and resp.json()["field"] == 'metrics["reward/mean"]'
    resp = requests.post(f"{board.url}/api/v1/training_runs/{trained['model_id']}/metrics", data="not json",
                         headers={"X-API-Key": API_KEY, "Content-Type": "application/json"}, timeout=30)
    assert resp.status_code == 400 and resp.json()["field"] == "body"


def test_a_run_holds_a_bounded_number_of_client_series(board, sdk):
    tc = sdk.create_lora_training_client(base_model=board.worker.base_model, rank=4, seed=3).result()
    many = {f"metric/{i}": float(i) for i in range(MAX_CLIENT_SERIES_PER_RUN)}
    assert report(board, tc.model_id, {"step": 1, "metrics": many}).status_code == 200
    assert report(board, tc.model_id, {"step": 2, "metrics": many}).status_code == 200  # the same names again
    resp = report(board, tc.model_id, {"step": 2, "metrics": {"one/more": 1.0}})
    assert resp.status_code == 400 and resp.json()["field"] == "metrics"
    assert str(MAX_CLIENT_SERIES_PER_RUN) in resp.json()["error"]


@pytest.mark.parametrize(("params", "field"), [
    ({"cursor": "abc"}, "cursor"), ({"cursor": "-1"}, "cursor"),
    ({"max_points": "1"}, "max_points"), ({"max_points": "100000"}, "max_points"),
])
def test_bad_poll_parameters_are_400(board, params, field):
    resp = call(board, "GET", "/api/v1/dashboard/state", params=params)
    assert resp.status_code == 400 and resp.json()["field"] == field


def test_data_needs_a_key_and_other_keys_runs_are_404(board, trained):
    model_id = trained["model_id"]
    metrics_path = f"/api/v1/training_runs/{model_id}/metrics"
    for method, path in (("GET", "/api/v1/dashboard/state"), ("GET", metrics_path), ("POST", metrics_path)):
        for key in (None, "tml-not-a-key"):
            resp = call(board, method, path, key, json={"metrics": {"a": 1.0}})
            assert resp.status_code == 401 and resp.json()["field"] == "X-API-Key"
    for method in ("GET", "POST"):
        for key, run in ((OTHER_KEY, model_id), (API_KEY, "no-such-run:train:0")):
            resp = call(board, method, f"/api/v1/training_runs/{run}/metrics", key, json={"metrics": {"a": 1.0}})
            assert resp.status_code == 404 and resp.json()["field"] == "model_id"
    # The other key's attempt recorded nothing.
    client = call(board, "GET", metrics_path).json()["series"]["client"]
    assert "a" not in client


def test_the_page_and_its_files_are_served_without_a_key(board):
    root = requests.get(f"{board.url}/", allow_redirects=False, timeout=10)
    assert root.status_code == 302 and root.headers["Location"].endswith("/dashboard")
    page = requests.get(f"{board.url}/dashboard", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    assert "/dashboard/static/vendor/uPlot.iife.min.js" in page.text
    for name in ("dashboard.js", "dashboard.css", "vendor/uPlot.iife.min.js", "vendor/uPlot.min.css",
                 "vendor/uPlot.LICENSE"):
        resp = requests.get(f"{board.url}/dashboard/static/{name}", timeout=10)
        assert resp.status_code == 200 and len(resp.content) > 500, name
    assert "MIT License" in requests.get(f"{board.url}/dashboard/static/vendor/uPlot.LICENSE", timeout=10).text
    # Only what is under src/dashboard/static is served (the traversal is not normalised away by the client).
    escape = requests.Request("GET", f"{board.url}/dashboard/static/..%2F..%2Fapp.py").prepare()
    assert requests.Session().send(escape, timeout=10).status_code == 404


# ---------------------------------------------------------------------------- storage


def test_a_database_from_before_the_table_gets_it_and_keeps_its_data(tmp_path):
    path = tmp_path / "tink.db"
    store = Store(path)
    store.add_model("old-run", "owner", None, "base", {"rank": 4}, None)
    store.close()
    with sqlite3.connect(path) as db:  # as written by a Tink without the dashboard
        db.executescript("DROP TABLE run_metrics; DROP INDEX IF EXISTS checkpoints_model;")
    store = Store(path)
    assert store.get_model("old-run")["lora"] == {"rank": 4}
    store.add_run_metrics("old-run", 1, "worker", {"loss": (6.0, 3.0, 2.0)})
    store.add_run_metrics("old-run", 1, "worker", {"loss": (2.0, 1.0, 2.0)})
    (cell,) = store.run_metric_cells(["old-run"], 0, 10)
    assert (cell["total"], cell["weight"], cell["seq"]) == (8.0, 4.0, 2)
    store.close()


# ---------------------------------------------------------------------------- the page in a browser


# the `browser` fixture (headless Chromium) lives in tests/conftest.py


def wait_for(predicate, timeout: float = 30.0, what: str = "the page"):
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


# Read in one script: the page rebuilds its rows on every poll, so element handles go stale.
_PAGE_STATE = """
const id = arguments[0];
const row = [...document.querySelectorAll('#runs tbody tr')].find((r) => r.dataset.run === id);
const charts = {};
for (const chart of document.querySelectorAll('#panels .chart')) {
  if (chart.dataset.run !== id) continue;
  charts[chart.dataset.series] = {points: Number(chart.dataset.points), last: chart.querySelector('.last').textContent,
                                  canvas: chart.querySelector('canvas') !== null};
}
return {row: row ? [...row.cells].map((td) => td.textContent) : null, charts};
"""


def page_state(driver, model_id: str) -> dict:
    """The run's row cells (None until listed) and its charts: {series: {points, last, canvas}}."""
    return driver.execute_script(_PAGE_STATE, model_id)


def shows_points(driver, model_id: str, expected: dict[str, int]) -> bool:
    charts = page_state(driver, model_id)["charts"]
    return all(s in charts and charts[s]["points"] == n and charts[s]["canvas"] for s, n in expected.items())


def test_the_page_shows_the_run_and_updates_without_reload(board, sdk, tokenizer, browser, tmp_path):
    from selenium.webdriver.common.by import By

    # Sample from the latest weights, report how often they say " yes" as the reward, then one SFT
    # step towards " yes yes yes" (at this rate the tiny model's loss falls and its reward rises).
    tc = sdk.create_lora_training_client(base_model=board.worker.base_model, rank=8, seed=4).result()
    data = sft_batch(tokenizer, [SAY_YES])
    (yes,) = tokenizer.encode(" yes")
    prompt = types.ModelInput.from_ints([tokenizer.bos_token_id] + tokenizer.encode(SAY_YES[0]))

    def rl_step() -> None:
        sampler = tc.save_weights_and_get_sampling_client().result()
        sequences = sampler.sample(prompt, 4, types.SamplingParams(max_tokens=6, temperature=1.0)).result().sequences
        reward = sum(s.tokens.count(yes) / 6 for s in sequences) / len(sequences)
        assert report(board, tc.model_id, {"metrics": {"reward/mean": reward}}).status_code == 200
        train_step(tc, data, learning_rate=2e-3)

    for _ in range(6):
        rl_step()

    browser.get(f"{board.url}/")  # redirected to /dashboard, which asks for a key
    assert browser.current_url.endswith("/dashboard")
    form = wait_for(lambda: browser.find_element(By.ID, "key-form").is_displayed(), what="the key form")
    assert form and not browser.find_element(By.ID, "main").is_displayed()
    browser.find_element(By.ID, "key-input").send_keys("tml-wrong-key")
    browser.find_element(By.ID, "key-submit").click()
    wait_for(lambda: "refused" in browser.find_element(By.ID, "key-error").text or
             "invalid" in browser.find_element(By.ID, "key-error").text, what="the refused-key message")
    browser.find_element(By.ID, "key-input").send_keys(API_KEY)
    browser.find_element(By.ID, "key-submit").click()
    wait_for(lambda: browser.find_element(By.ID, "main").is_displayed(), what="the dashboard after the key")
    assert not browser.find_element(By.ID, "key-form").is_displayed()

    row = wait_for(lambda: page_state(browser, tc.model_id)["row"], what="the run's row")
    assert row[1] == owner_label(board.worker.store.get_model(tc.model_id)["owner"])
    assert row[3:5] == ["8", "6"] and row[6] == "6"  # rank, steps, checkpoints
    series = ("worker:loss", "worker:learning_rate", "worker:grad_norm", "worker:sampled_tokens",
              "worker:sampled_logprob", "client:reward/mean")
    wait_for(lambda: shows_points(browser, tc.model_id, dict.fromkeys(series, 6)), what="six points per plot")
    assert browser.find_element(By.ID, "status").text == "ok"
    facts = browser.find_element(By.ID, "worker-facts").text
    assert board.worker.base_model in facts and board.worker.trainer.name in facts

    browser.execute_script("window.tinkNotReloaded = true;")
    rl_step()
    wait_for(lambda: shows_points(browser, tc.model_id, dict.fromkeys(series, 7)), what="a seventh point per plot")
    assert browser.execute_script("return window.tinkNotReloaded === true;")
    wait_for(lambda: page_state(browser, tc.model_id)["row"][4] == "7", what="the steps cell to read 7")
    shown = float(page_state(browser, tc.model_id)["charts"]["worker:loss"]["last"])
    loss_points = call(board, "GET", f"/api/v1/training_runs/{tc.model_id}/metrics").json()["series"]["worker"]["loss"]
    assert math.isclose(shown, loss_points[-1][1], rel_tol=1e-3)
    assert loss_points[-1][1] < 0.5 * loss_points[0][1]  # it learns

    # The merged export (POST /api/v1/export) of the run's newest sampler checkpoint, from its button.
    panel = browser.find_element(By.CSS_SELECTOR, f'.panel[data-run="{tc.model_id}"]')
    panel.find_element(By.CSS_SELECTOR, ".actions button").click()
    message = wait_for(lambda: (lambda t: t if t.startswith(("exported to ", "export failed")) else None)(
        panel.find_element(By.CSS_SELECTOR, ".actions span").text), timeout=120, what="the export's answer")
    assert message.startswith("exported to "), message
    directory = Path(message.removeprefix("exported to "))
    assert directory.is_relative_to(board.state_dir) and (directory / "config.json").is_file()

    save_screenshot(browser, tmp_path / "dashboard.png")


def save_screenshot(driver, path: Path) -> None:
    """Into pytest's tmp dir and, where TINK_TEST_ARTIFACTS names a folder, a copy there."""
    driver.set_window_size(1440, 800)
    time.sleep(0.5)
    height, frame = driver.execute_script("return [document.documentElement.scrollHeight, "
                                          "window.outerHeight - window.innerHeight];")
    driver.set_window_size(1440, int(height) + int(frame))  # the whole page, no scroll bar
    time.sleep(0.5)  # the charts re-fit their row after a resize
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 10_000
    if os.environ.get("TINK_TEST_ARTIFACTS"):
        target = Path(os.environ["TINK_TEST_ARTIFACTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
