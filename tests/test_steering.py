"""Capture and steering on the HF sampler and `/api/v1/sample`, and named steering vectors, against a real
worker and an independent reference: a plain HF model run without KV cache, hooked by the test itself.
`test_steering_vllm.py` checks the vLLM engine against the same HF sampler."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from src.backends import AdapterRef, SampleJob, SamplingParams
from src.steering import CaptureSpec, HFHooks, LookInside, SteerSpec, decode_array
from tests import vllm_fixtures
from tests.vllm_fixtures import make_adapter

from .conftest import API_KEY, OTHER_KEY

hf_sampler = vllm_fixtures.hf_sampler  # a session fixture

HIDDEN, LAYERS = 128, 2  # the tiny model (src/tiny_model.py)
PROMPT = [1, 40, 41, 42, 43]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


def post(url: str, path: str, body: dict, key: str = API_KEY) -> requests.Response:
    return requests.post(f"{url}/api/v1/{path}", json=body, headers={"X-API-Key": key}, timeout=120)


def assert_close(actual: np.ndarray, expected: np.ndarray, relative: float = 1e-4) -> None:
    """fp32 agreement: the largest difference within `relative` of the largest value (CPU, fp32)."""
    assert actual.shape == expected.shape
    gap, scale = float(np.abs(actual - expected).max()), float(np.abs(expected).max())
    assert gap <= relative * scale, f"gap {gap:.2e} vs scale {scale:.2e}"


def direction(seed: int = 0, norm: float = 8.0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(HIDDEN).astype(np.float32)
    return v / np.linalg.norm(v) * norm


@pytest.fixture(scope="module")
def reference(tiny_model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()


def reference_generate(model, prompt: list[int], steps: int, steer: SteerSpec | None = None) -> list[int]:
    """Greedy decoding by full recomputation (no KV cache), `steer` added by a hook on whole sequences."""
    tokens = list(prompt)
    handle = None
    if steer is not None:
        def hook(module, args, output):
            mask = torch.tensor([steer.steers(p, len(prompt)) for p in range(output.shape[1])], dtype=output.dtype)
            return output + mask[None, :, None] * torch.as_tensor(steer.vector) * steer.scale
        handle = model.model.layers[steer.layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            for _ in range(steps):
                tokens.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
    finally:
        if handle is not None:
            handle.remove()
    return tokens[len(prompt):]


def residual_rows(model, prompt: list[int], completion: list[int], layer: int) -> np.ndarray:
    """The residual stream after `layer` at the positions that predicted each completion token."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt + completion[:-1]]), output_hidden_states=True)
    return out.hidden_states[layer + 1][0, len(prompt) - 1:].numpy()


# ----------------------------------------------------------------------------- the HF sampler


def test_capture_matches_a_plain_forward(hf_sampler, reference):
    look = LookInside((CaptureSpec(0, "resid_post", "all"), CaptureSpec(0, "resid_post", "mean"),
                       CaptureSpec(0, "resid_post", "last"), CaptureSpec(1, "mlp_out", "all")))
    result = hf_sampler.sample(SampleJob(PROMPT, 2, GREEDY, look=look))
    for seq in result.sequences:
        rows = residual_rows(reference, PROMPT, seq.tokens, 0)
        every, mean, last, mlp = seq.captures
        assert every.shape == (len(seq.tokens), HIDDEN)
        assert_close(every, rows)
        assert_close(mean, rows.mean(0))
        assert_close(last, rows[-1])
        assert mlp.shape == (len(seq.tokens), HIDDEN) and not np.allclose(mlp, 0)


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_steered_generation_matches_full_recomputation(hf_sampler, reference, positions):
    steer = SteerSpec(0, direction(), 1.0, positions)
    plain = hf_sampler.sample(SampleJob(PROMPT, 1, GREEDY)).sequences[0].tokens
    steered = hf_sampler.sample(SampleJob(PROMPT, 1, GREEDY, look=LookInside((), (steer,)))).sequences[0].tokens
    assert steered == reference_generate(reference, PROMPT, GREEDY.max_tokens, steer)
    assert steered != plain  # the direction is strong enough to change the greedy path


def test_scale_zero_changes_nothing(hf_sampler):
    plain = hf_sampler.sample(SampleJob(PROMPT, 2, GREEDY))
    zero = hf_sampler.sample(SampleJob(PROMPT, 2, GREEDY, look=LookInside((), (SteerSpec(1, direction(), 0.0),))))
    assert [s.tokens for s in zero.sequences] == [s.tokens for s in plain.sequences]
    assert [s.logprobs for s in zero.sequences] == [s.logprobs for s in plain.sequences]


def test_concurrent_mixed_requests_equal_each_alone(hf_sampler, tiny_model_path, tmp_path):
    """Steered, unsteered, capturing, two adapters, from 8 threads at once: each as if run alone."""
    adapters = [AdapterRef(f"tinker://run-steer-{k}/sampler_weights/000001",
                           make_adapter(tiny_model_path, tmp_path / str(k), seed=30 + k), rank=8) for k in range(2)]
    capture = (CaptureSpec(1, "resid_post", "all"),)
    jobs = [SampleJob(PROMPT, 2, GREEDY, adapter=adapters[i % 3] if i % 3 < 2 else None,
                      look=LookInside(capture, (SteerSpec(i % 2, direction(i), 1.0),) if i % 2 else ()))
            for i in range(8)]
    alone = [hf_sampler.sample(job) for job in jobs]
    together: list = [None] * len(jobs)

    def run(i: int) -> None:
        together[i] = hf_sampler.sample(jobs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, together):
        for x, y in zip(a.sequences, b.sequences):
            assert x.tokens == y.tokens
            np.testing.assert_array_equal(x.captures[0], y.captures[0])
    assert len({tuple(r.sequences[0].tokens) for r in alone}) > 2  # adapters and steering really differ


def test_capture_under_an_adapter_matches_peft(hf_sampler, tiny_model_path, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = make_adapter(tiny_model_path, tmp_path / "a", seed=40)
    ref = AdapterRef("tinker://run-steer-peft/sampler_weights/000001", path, rank=8)
    seq = hf_sampler.sample(SampleJob(PROMPT, 1, GREEDY, ref, look=LookInside((CaptureSpec(1, "resid_post", "all"),)))
                            ).sequences[0]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(path)).eval()
    # hidden_states[-1] is after the final norm: the last layer's residual comes from a hook instead
    captured = {}
    handle = peft.base_model.model.model.layers[1].register_forward_hook(lambda m, a, o: captured.update(h=o))
    with torch.no_grad():
        peft(input_ids=torch.tensor([PROMPT + seq.tokens[:-1]]))
    handle.remove()
    assert_close(seq.captures[0], captured["h"][0, len(PROMPT) - 1:].numpy())


def test_hooks_leave_other_threads_alone(reference):
    """The HF sampler may share its modules with the trainer: a forward on another thread is untouched."""
    look = LookInside((CaptureSpec(0, "resid_post", "all"),), (SteerSpec(0, direction(), 1.0),))
    ids = torch.tensor([PROMPT])

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return reference(input_ids=ids).logits

    plain, other = forward(), {}
    with HFHooks(reference, look, len(PROMPT)) as hooks:
        thread = threading.Thread(target=lambda: other.update(logits=forward()))
        thread.start()
        thread.join()
        mine = forward()
    assert torch.equal(other["logits"], plain) and not torch.allclose(mine, plain)
    assert len(hooks.rows[0]) == 1  # this thread's forward only
    assert torch.equal(forward(), plain)  # and the hooks are gone


def test_engine_side_running_mean_and_last_drop_rows_past_the_end():
    """The vLLM worker keeps a running sum and the latest rows for mean/last: same answers as keeping all."""
    from src.steering_vllm import RECENT, _Rows

    rng = np.random.default_rng(1)
    first, length, extra = 4, 3 * RECENT, 2
    rows = {p: rng.standard_normal(HIDDEN).astype(np.float32) for p in range(first, first + length + extra)}
    kept = {reduce: _Rows(reduce == "all") for reduce in ("all", "mean", "last")}
    for position, row in rows.items():
        for store in kept.values():
            store.add(position, row)
            if position == first + length:  # a preempted request recomputes positions, old and recent
                store.add(first, rows[first])
                store.add(position - 1, rows[position - 1])
    own = np.stack([rows[p] for p in range(first, first + length)])
    np.testing.assert_array_equal(kept["all"].reduced(first, length, "all"), own)
    assert_close(kept["mean"].reduced(first, length, "mean"), own.mean(0), relative=1e-6)
    np.testing.assert_array_equal(kept["last"].reduced(first, length, "last"), own[-1])
    assert len(kept["mean"].rows) <= RECENT


# ----------------------------------------------------------------------------- /api/v1/sample


def test_api_capture_and_steer(server, tiny_model_path, reference):
    body = {"model_id": str(tiny_model_path), "prompts": ["The cat"], "num_samples": 2,
            "sampling_params": {"max_tokens": 5, "temperature": 0.0},
            "capture": [{"layer": 0, "site": "resid_post", "reduce": "all"}, {"layer": 1}]}
    answer = post(server.url, "sample", body)
    assert answer.status_code == 200, answer.text
    result = answer.json()["results"][0]
    completion = result["completions"][0]
    rows = residual_rows(reference, result["prompt_tokens"], completion["tokens"], 0)
    every, last = completion["captures"]
    assert (every["layer"], every["site"], every["reduce"]) == (0, "resid_post", "all")
    assert (last["layer"], last["site"], last["reduce"]) == (1, "resid_post", "last")
    assert_close(np.array(every["values"]), rows)
    assert len(last["values"]) == HIDDEN

    packed = post(server.url, "sample", {**body, "capture_format": "base64"}).json()["results"][0]["completions"][0]
    values = packed["captures"][0]["values"]
    assert values["dtype"] == "float16" and values["shape"] == [len(completion["tokens"]), HIDDEN]
    np.testing.assert_allclose(decode_array(values), rows, rtol=2e-3, atol=2e-3)

    steer = {"layer": 0, "vector": direction().tolist(), "scale": 1.0}
    steered = post(server.url, "sample", {**body, "capture": [], "steer": [steer]}).json()["results"][0]
    expected = reference_generate(reference, result["prompt_tokens"], 5, SteerSpec(0, direction()))
    assert steered["completions"][0]["tokens"] == expected != completion["tokens"]
    zero = post(server.url, "sample", {**body, "capture": [], "steer": [{**steer, "scale": 0}]}).json()["results"][0]
    assert zero["completions"][0]["tokens"] == completion["tokens"]


def test_api_streams_with_captures(server, tiny_model_path):
    body = {"model_id": str(tiny_model_path), "prompts": ["The cat"], "stream": True,
            "sampling_params": {"max_tokens": 4, "temperature": 0.0}, "capture": [{"layer": 1, "reduce": "all"}]}
    with requests.post(f"{server.url}/api/v1/sample", json=body, headers={"X-API-Key": API_KEY}, stream=True,
                       timeout=120) as answer:
        text = answer.text
    assert "event: token" in text and '"captures"' in text


BAD = [
    ({"capture": [{"layer": LAYERS}]}, "capture[0].layer"),
    ({"capture": [{"layer": -1}]}, "capture[0].layer"),
    ({"capture": [{"layer": 0, "site": "resid_pre"}]}, "capture[0].site"),
    ({"capture": [{"layer": 0, "reduce": "max"}]}, "capture[0].reduce"),
    ({"capture": [{"layer": 0, "reduce": "all"}], "sampling_params": {"max_tokens": 300}}, "capture[0].reduce"),
    ({"capture": {"layer": 0}}, "capture"),
    ({"capture_format": "npy", "capture": [{"layer": 0}]}, "capture_format"),
    ({"steer": [{"layer": 0, "vector": [0.5] * (HIDDEN - 1)}]}, "steer[0].vector"),
    ({"steer": [{"layer": 0, "vector": [0.5] * HIDDEN, "vector_id": "sv-x"}]}, "steer[0].vector"),
    ({"steer": [{"layer": 0, "vector_id": "sv-unknown"}]}, "steer[0].vector_id"),
    ({"steer": [{"layer": 9, "vector": [0.5] * HIDDEN}]}, "steer[0].layer"),
    ({"steer": [{"layer": 0, "vector": [0.5] * HIDDEN, "positions": "middle"}]}, "steer[0].positions"),
    ({"steer": [{"layer": 0, "vector": [0.5] * HIDDEN, "scale": "big"}]}, "steer[0].scale"),
]


@pytest.mark.parametrize("extra,field", BAD, ids=[f for _, f in BAD])
def test_api_bad_input_names_the_field(server, tiny_model_path, extra, field):
    body = {"model_id": str(tiny_model_path), "prompts": ["The cat"],
            "sampling_params": {"max_tokens": 4, "temperature": 0.0}, **extra}
    answer = post(server.url, "sample", body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["field"] == field, answer.json()
    if field == "capture[0].reduce" and "max_tokens" in str(extra):
        assert "TINK_CAPTURE_ALL_MAX_TOKENS" in answer.json()["error"]


# ----------------------------------------------------------------------------- named steering vectors


def test_steering_vectors_upload_use_list_delete(server, tiny_model_path):
    vector = direction(3)
    made = post(server.url, "steering_vectors", {"name": "happy", "layer": 0, "vector": vector.tolist()})
    assert made.status_code == 201, made.text
    record = made.json()
    assert record["layer"] == 0 and record["hidden_size"] == HIDDEN and record["source"] == "upload"
    vid = record["vector_id"]
    headers = {"X-API-Key": API_KEY}
    assert vid in [v["vector_id"] for v in requests.get(f"{server.url}/api/v1/steering_vectors", headers=headers,
                                                        timeout=30).json()["steering_vectors"]]
    got = requests.get(f"{server.url}/api/v1/steering_vectors/{vid}", headers=headers, timeout=30).json()
    np.testing.assert_array_equal(np.array(got["vector"], dtype=np.float32), vector)

    body = {"model_id": str(tiny_model_path), "prompts": ["The cat"], "sampling_params": {"max_tokens": 5,
                                                                                          "temperature": 0.0}}
    by_id = post(server.url, "sample", {**body, "steer": [{"vector_id": vid, "scale": 2.0}]}).json()
    inline = post(server.url, "sample", {**body, "steer": [{"layer": 0, "vector": vector.tolist(), "scale": 2.0}]}).json()
    assert by_id["results"][0]["completions"][0]["tokens"] == inline["results"][0]["completions"][0]["tokens"]

    # another key sees none of it: 404 on read and delete, 400 naming the field when sampling with it
    other = {"X-API-Key": OTHER_KEY}
    assert requests.get(f"{server.url}/api/v1/steering_vectors/{vid}", headers=other, timeout=30).status_code == 404
    assert requests.delete(f"{server.url}/api/v1/steering_vectors/{vid}", headers=other, timeout=30).status_code == 404
    refused = post(server.url, "sample", {**body, "steer": [{"vector_id": vid}]}, key=OTHER_KEY)
    assert refused.status_code == 400 and refused.json()["field"] == "steer[0].vector_id"
    assert vid not in str(requests.get(f"{server.url}/api/v1/steering_vectors", headers=other, timeout=30).json())

    assert requests.delete(f"{server.url}/api/v1/steering_vectors/{vid}", headers=headers, timeout=30).status_code == 200
    assert requests.get(f"{server.url}/api/v1/steering_vectors/{vid}", headers=headers, timeout=30).status_code == 404


def test_steering_vector_from_two_sets_of_prompts(server, tiny_model_path, reference):
    positive, negative = ["happy good day", "good friend sing"], ["sad bad night", "dark bad road"]
    made = post(server.url, "steering_vectors", {"name": "mood", "layer": 1, "positive": positive,
                                                 "negative": negative})
    assert made.status_code == 201, made.text
    vid = made.json()["vector_id"]
    got = requests.get(f"{server.url}/api/v1/steering_vectors/{vid}", headers={"X-API-Key": API_KEY},
                       timeout=30).json()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    captured = {}
    handle = reference.model.layers[1].register_forward_hook(lambda m, a, o: captured.update(h=o))

    def last_state(text: str) -> np.ndarray:
        with torch.no_grad():
            reference(input_ids=torch.tensor([tokenizer.encode(text, add_special_tokens=True)]))
        return captured["h"][0, -1].numpy()

    try:
        expected = (np.mean([last_state(t) for t in positive], 0) - np.mean([last_state(t) for t in negative], 0))
    finally:
        handle.remove()
    assert_close(np.array(got["vector"]), expected)
    assert got["source"] == "mean_difference" and got["layer"] == 1


@pytest.mark.parametrize("body,field", [
    ({"name": "x", "layer": 0, "vector": [1.0] * 3}, "vector"),
    ({"name": "x", "layer": 5, "vector": [1.0] * HIDDEN}, "layer"),
    ({"name": "", "layer": 0, "vector": [1.0] * HIDDEN}, "name"),
    ({"name": "x", "layer": 0}, "vector"),
    ({"name": "x", "layer": 0, "positive": ["a"], "negative": []}, "negative"),
    ({"name": "x", "layer": 0, "positive": "a", "negative": ["b"]}, "positive"),
])
def test_steering_vector_bad_input_names_the_field(server, body, field):
    answer = post(server.url, "steering_vectors", body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["field"] == field


# ----------------------------------------------------------------------------- the chat page in a browser


# the `browser` fixture (headless Chromium) lives in tests/conftest.py


def wait_until(predicate, timeout: float = 60.0, what: str = "the page"):
    deadline = time.time() + timeout
    while not (value := predicate()):
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return value


_LAST_REPLY = """
const replies = document.querySelectorAll('#transcript li.assistant');
const reply = replies[replies.length - 1];
if (!reply) return null;
const svg = reply.querySelector('svg.plot');
return {state: reply.dataset.state, tokens: Number(reply.dataset.tokens), text: reply.querySelector('.body').textContent,
        spans: reply.querySelectorAll('.tok').length, points: svg ? Number(svg.dataset.points) : null,
        values: svg ? JSON.parse(svg.dataset.values) : null, events: window.chatEvents.slice(),
        error: document.getElementById('chat-error').textContent};
"""


def chat_once(driver, message: str) -> dict:
    from selenium.webdriver.common.by import By

    driver.execute_script("window.chatEvents.length = 0;")
    driver.find_element(By.ID, "message").send_keys(message)
    driver.find_element(By.ID, "send").click()
    return wait_until(lambda: (r := driver.execute_script(_LAST_REPLY)) and r["state"] in ("done", "failed") and r,
                      what="the reply")


def test_chat_page_streams_steers_and_plots(server, tiny_model_path, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    vector = direction(7)
    made = post(server.url, "steering_vectors", {"name": "page-direction", "layer": 0, "vector": vector.tolist()})
    assert made.status_code == 201, made.text
    browser.get(f"{server.url}/chat")
    browser.find_element(By.ID, "key-input").send_keys(API_KEY)
    browser.find_element(By.ID, "key-submit").click()
    wait_until(lambda: browser.execute_script("return document.body.dataset.ready === 'true'"), what="the page")

    plain = chat_once(browser, "hello world")
    assert plain["state"] == "done", plain["error"]
    kinds = [e["kind"] for e in plain["events"]]
    tokens = [e for e in plain["events"] if e["kind"] == "token"]
    assert len(tokens) >= 2 and kinds[-1] == "done" and kinds.index("result") > kinds.index("token")
    assert plain["spans"] == len(tokens) and plain["tokens"] == sum(e["tokens"] for e in tokens)
    assert plain["points"] == plain["tokens"] and all(v > 0 for v in plain["values"])  # residual norms
    # the page sent exactly this transcript: the same greedy reply through the plain JSON API
    same = post(server.url, "sample", {"model_id": str(tiny_model_path), "prompts": ["User: hello world\nAssistant:"],
                                       "sampling_params": {"max_tokens": 32, "temperature": 0.0}}).json()
    assert same["results"][0]["completions"][0]["text"] == plain["text"]

    browser.find_element(By.ID, "clear").click()
    Select(browser.find_element(By.ID, "vector")).select_by_visible_text("page-direction (layer 0)")
    scale = browser.find_element(By.ID, "scale")
    scale.clear()
    scale.send_keys("1")
    steered = chat_once(browser, "hello world")
    assert steered["state"] == "done", steered["error"]
    assert steered["text"] != plain["text"] and steered["points"] == steered["tokens"]
    save_screenshot(browser, tmp_path / "chat.png")


def save_screenshot(driver, path: Path) -> None:
    """Into pytest's tmp dir and, where TINK_TEST_ARTIFACTS names a folder, a copy there."""
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 10_000
    if os.environ.get("TINK_TEST_ARTIFACTS"):
        target = Path(os.environ["TINK_TEST_ARTIFACTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)


def test_the_engine_patch_never_takes_a_vllm_engine_down(caplog):
    """On a vLLM whose runner differs (another version), the patch logs and stands aside: no
    AttributeError at import, and a failure while planning a step turns the feature off, not the engine."""
    import types as pytypes

    from src import steering_vllm

    class OtherRunner:  # no _prepare_inputs / _update_states: a vLLM this patch does not know
        def execute_model(self):
            return "served"

    module = pytypes.ModuleType("fake_gpu_model_runner")
    module.GPUModelRunner = OtherRunner
    steering_vllm._patch_runner(module)
    assert not getattr(OtherRunner, "_tink_look_inside", False) and OtherRunner().execute_model() == "served"
    assert "capture/steering unavailable" in caplog.text

    class BrokenRunner:  # planning reads attributes this runner lacks
        pass

    steering_vllm._looking["req-1"] = ({}, 3)
    try:
        steering_vllm._plan_step_safely(steering_vllm._plan_step, BrokenRunner(), {"req-1": 3})
        assert steering_vllm._disabled and steering_vllm._plan is None
        assert "capture/steering turned off" in caplog.text
    finally:
        steering_vllm._looking.pop("req-1", None)
        steering_vllm._disabled = False


def test_model_runner_v2_steps_map_each_looking_request_to_its_rows():
    """vLLM's Model Runner V2 (the GPU default since 0.26) orders each step's requests itself and keeps no
    `extra_args`: the patch notes them in `add_requests` and reads the order, offsets and computed tokens
    from the `InputBatch` that `prepare_inputs` returns. A runner shaped like V2's (the real one needs a GPU
    and Triton) drives the same calls as vLLM's `execute_model`: the plan covers exactly the looking
    request's rows during the forward and is gone after it, in dummy steps too."""
    import types as pytypes

    from src import steering_vllm

    seen = []

    class V2Runner:
        model = torch.nn.Module()

        def get_model(self):
            return self.model

        def add_requests(self, scheduler_output):
            pass

        def prepare_inputs(self, scheduler_output, batch_desc):  # decodes first, as V2 sorts them
            return pytypes.SimpleNamespace(req_ids=["b", "a"], num_reqs=2, num_scheduled_tokens=np.array([1, 5]),
                                           query_start_loc_np=np.array([0, 1, 6]), num_tokens=6,
                                           num_computed_tokens_np=np.array([7, 0]))

        def execute_model(self, scheduler_output, dummy_run=False):
            if not dummy_run:
                self.add_requests(scheduler_output)
                self.prepare_inputs(scheduler_output, None)
            seen.append(steering_vllm._plan)
            return "served"

    module = pytypes.ModuleType("fake_v2_model_runner")
    module.GPUModelRunner = V2Runner
    steering_vllm._patch_runner_v2(module)
    look = LookInside((CaptureSpec(0, "resid_post", "all"),))
    extra = steering_vllm.look_extra_args(look, "tink-1", 1)

    def new(req_id, extra_args):
        return pytypes.SimpleNamespace(req_id=req_id, prompt_token_ids=[1, 2, 3, 4, 5],
                                       sampling_params=pytypes.SimpleNamespace(extra_args=extra_args))

    runner = V2Runner()
    try:
        step = pytypes.SimpleNamespace(scheduled_new_reqs=[new("a", extra), new("b", None)], finished_req_ids=set())
        assert runner.execute_model(step) == "served" and steering_vllm._plan is None
        (part,) = seen[-1]
        assert (part.start, part.end, part.first_position) == (1, 6, 0)
        assert part.request.tink_id == "tink-1" and part.request.prompt_len == 5
        runner.execute_model(None, dummy_run=True)
        assert seen[-1] is None, "a dummy step runs without the last step's plan"
        runner.execute_model(pytypes.SimpleNamespace(scheduled_new_reqs=[], finished_req_ids={"a"}))
        assert "a" not in steering_vllm._looking
        assert not steering_vllm._disabled
    finally:
        steering_vllm._requests.clear()


@pytest.mark.parametrize("setting, eager, runner, static_ready, looks", [
    ("hooks", True, "v1", False, True),     # per-request hooks: an eager engine on the V1 runner
    ("hooks", False, "v1", False, False),   # a CUDA graph or compiled model skips Python hooks
    ("hooks", True, "v2", False, False),    # per-request hooks are verified on V1 only
    ("static", False, "v2", True, True),    # static buffers: CUDA graphs, Model Runner V2 (H100, vLLM 0.26)
    ("static", False, "v1", True, True),
    ("static", False, "v2", False, False),  # the engine did not install the buffers
    ("off", True, "v1", False, False),
])
def test_which_vllm_engines_look_inside(setting, eager, runner, static_ready, looks):
    """What the sampler tells health and the router (a request that looks inside goes elsewhere when False)."""
    import types as pytypes

    from src.vllm_backend import VLLMEngineSampler

    sampler = object.__new__(VLLMEngineSampler)
    sampler.look_inside_setting, sampler._static_look = setting, static_ready
    sampler._args = pytypes.SimpleNamespace(enforce_eager=eager)
    config = pytypes.SimpleNamespace(use_v2_model_runner=runner == "v2")
    sampler._engine = pytypes.SimpleNamespace(vllm_config=config)
    assert sampler.looks_inside is looks
