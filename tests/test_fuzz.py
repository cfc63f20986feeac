"""Property: random datums either train or are rejected with a 4xx naming a field; never a 5xx."""

from __future__ import annotations

import json
import math

import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import API_KEY, new_session

HEADERS = {"X-API-Key": API_KEY}
_model: dict[str, str] = {}

token = st.one_of(st.integers(0, 511), st.integers(-5, 2**40))
number = st.one_of(st.floats(-10, 10), st.sampled_from([math.nan, math.inf, -math.inf]), st.integers(-3, 3))


@st.composite
def datum(draw):
    n = draw(st.integers(0, 12))
    tokens = draw(st.lists(token, min_size=n, max_size=n))
    m = draw(st.sampled_from([n, n, n, max(n - 1, 0), n + 1]))  # mostly matching lengths
    inputs = {"target_tokens": {"data": draw(st.lists(token, min_size=m, max_size=m)), "dtype": "int64"}}
    for name in draw(st.sets(st.sampled_from(["weights", "logprobs", "advantages"]))):
        inputs[name] = {"data": draw(st.lists(number, min_size=m, max_size=m)), "dtype": "float32"}
    return {"model_input": {"chunks": [{"tokens": tokens, "type": "encoded_text"}]}, "loss_fn_inputs": inputs}


def model_id(server) -> str:
    if "id" not in _model:
        created = requests.post(f"{server.url}/api/v1/create_model", headers=HEADERS, timeout=30, json={
            "session_id": new_session(), "model_seq_id": 0, "base_model": server.worker.base_model,
            "lora_config": {"rank": 2}}).json()
        requests.post(f"{server.url}/api/v1/retrieve_future", headers=HEADERS, timeout=30,
                      json={"request_id": created["request_id"]})
        _model["id"] = created["model_id"]
    return _model["id"]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.lists(datum(), min_size=0, max_size=3),
       loss_fn=st.sampled_from(["cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "bogus"]))
def test_random_datums_train_or_get_4xx(server, data, loss_fn):
    body = {"model_id": model_id(server), "forward_backward_input": {"loss_fn": loss_fn, "data": data}}
    # json.dumps writes NaN/Infinity literals, as JavaScript and Python clients can.
    resp = requests.post(f"{server.url}/api/v1/forward_backward", data=json.dumps(body), timeout=60,
                         headers={**HEADERS, "Content-Type": "application/json"})
    assert resp.status_code < 500, resp.text
    if resp.status_code != 200:
        assert 400 <= resp.status_code < 500 and resp.json()["field"], resp.text
        return
    answer = requests.post(f"{server.url}/api/v1/retrieve_future", headers=HEADERS, timeout=60,
                           json={"request_id": resp.json()["request_id"]}).json()
    assert answer.get("category") != "server", answer
