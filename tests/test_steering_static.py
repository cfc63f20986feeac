"""The static look-inside buffers (src/steering_static.py) on a toy model shaped like vLLM's decoder layers
(each returns `(hidden, residual)`): which rows a step steers and captures, and that a step leaves nothing
behind for the next, even when writing it fails. No vLLM needed; tests/test_steering_vllm.py runs them in
real engines, eager and compiled."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from src.steering import CaptureSpec, LookInside, SteerSpec
from src.steering_static import StaticLook
from src.steering_vllm import _RequestLook, _Rows, _Slice

HIDDEN, TOKENS, REQUESTS = 8, 32, 4


class Layer(torch.nn.Module):
    """vLLM-style: the residual add is deferred, so the stream after the layer is hidden + residual."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.self_attn, self.mlp = torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Linear(HIDDEN, HIDDEN)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        residual = hidden + residual
        attn = self.self_attn(residual)
        return self.mlp(attn), residual + attn


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([Layer(0), Layer(1)])

    @torch.no_grad()  # as vLLM runs its model (inference mode)
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The residual stream after each layer."""
        hidden, residual, streams = x, torch.zeros_like(x), []
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
            streams.append(hidden + residual)
        return streams


@pytest.fixture
def toy() -> tuple[Model, StaticLook]:
    model = Model()
    return model, StaticLook(list(enumerate(model.layers)), HIDDEN, TOKENS, REQUESTS, torch.float32, "cpu")


def request(prompt_len: int, look: LookInside) -> _RequestLook:
    return _RequestLook("tink-1", 0, look, prompt_len, [_Rows(spec.reduce == "all") for spec in look.capture])


def test_a_step_steers_only_its_requests_rows_and_positions(toy):
    model, static = toy
    x = torch.randn(10, HIDDEN)
    plain = model(x)
    vector = np.arange(HIDDEN, dtype=np.float32)
    # rows 0-5: a prefill of 6 prompt tokens, steered on the prompt; rows 6-9: another request, decoding
    prefill = request(6, LookInside((), (SteerSpec(0, vector, 2.0, "prompt"),)))
    decode = request(3, LookInside((), (SteerSpec(0, vector, 1.0, "prompt"),)))  # past its prompt: no rows
    pending = static.apply([_Slice(prefill, 0, 6, 0), _Slice(decode, 6, 10, 3)], 10)
    steered = model(x)
    static.collect(pending)
    layer0 = steered[0] - plain[0]
    assert torch.allclose(layer0[:6], torch.from_numpy(vector * 2.0).expand(6, -1), atol=1e-5)
    assert torch.equal(layer0[6:], torch.zeros(4, HIDDEN))
    assert not torch.equal(steered[1][:6], plain[1][:6])  # the next layer sees it
    assert all(torch.equal(a, b) for a, b in zip(model(x), plain)), "the step left steering behind"


def test_a_step_captures_the_rows_that_predict_new_tokens_once(toy):
    model, static = toy
    look = LookInside((CaptureSpec(1, "resid_post", "all"), CaptureSpec(0, "mlp_out", "all")))
    prefill = request(4, look)
    x = torch.randn(6, HIDDEN)
    pending = static.apply([_Slice(prefill, 0, 4, 0)], 6)  # only position 3 predicts a generated token
    streams = model(x)
    static.collect(pending)
    assert sorted(prefill.rows[0].rows) == [3]
    np.testing.assert_allclose(prefill.rows[0].rows[3], streams[1][3].numpy(), atol=1e-6)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp  # called bare: the hooks would fire
    with torch.no_grad():
        mlp_out = torch.nn.functional.linear(torch.nn.functional.linear(x[3], attn.weight, attn.bias), mlp.weight,
                                             mlp.bias)
    np.testing.assert_allclose(prefill.rows[1].rows[3], mlp_out.numpy(), atol=1e-6)
    # recomputed from position 2 (say, after preemption): positions 2 and 3 were read, 4 is new
    pending = static.apply([_Slice(prefill, 1, 4, 2)], 6)
    streams = model(x)
    static.collect(pending)
    assert sorted(prefill.rows[0].rows) == [3, 4]
    np.testing.assert_allclose(prefill.rows[0].rows[4], streams[1][3].numpy(), atol=1e-6)
    assert torch.equal(static.rows, torch.zeros(REQUESTS, dtype=torch.long))


def test_a_step_that_cannot_be_written_leaves_nothing_behind(toy):
    model, static = toy
    x = torch.randn(TOKENS, HIDDEN)
    plain = model(x)
    steer = LookInside((CaptureSpec(0, "resid_post", "all"),), (SteerSpec(1, np.ones(HIDDEN, np.float32), 1.0),))
    parts = [_Slice(request(1, steer), i, i + 1, 0) for i in range(REQUESTS + 1)]  # more capture rows than buffered
    with pytest.raises(RuntimeError, match="capture rows"):
        static.apply(parts, REQUESTS + 1)
    assert all(torch.equal(a, b) for a, b in zip(model(x), plain))
