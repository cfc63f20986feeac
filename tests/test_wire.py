"""Wire round trips through the tinker SDK's own encoders and decoders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from src.backends import ForwardBackwardResult, SampledSequence, SampleResult, UserInputError
from src.wire import (
    FWD_BWD_KIND,
    SAMPLE_KIND,
    decode_forward_backward_json,
    decode_forward_backward_proto,
    encode_forward_backward_output,
    encode_sample_response,
    proto_result_to_json,
    sample_job_from_request,
)


def test_forward_backward_request_round_trip_dense_sparse_and_config():
    weights = torch.zeros(4, 3)
    weights[1, 2] = 0.5
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([5, 6, 7, 8]),
        loss_fn_inputs={
            "target_tokens": [6, 7, 8, 9],
            "advantages": np.array([0.0, 1.0, -1.0, 2.0], dtype=np.float32),
            "weights": weights,  # 2-D: the SDK sends it as sparse CSR
        },
    )
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=[datum], loss_fn="ppo", loss_fn_config={"clip_low_threshold": 0.8, "mode": "x"}),
        model_id="m1", seq_id=3)
    msg = forward_backward_request_to_proto(req)
    msg.forward_only = True
    call = decode_forward_backward_proto(msg.SerializeToString())
    assert (call.model_id, call.seq_id, call.loss_fn, call.forward_only) == ("m1", 3, "ppo", True)
    assert call.loss_fn_config == {"clip_low_threshold": pytest.approx(0.8), "mode": "x"}
    d = call.data[0]
    assert d.tokens == [5, 6, 7, 8]
    np.testing.assert_array_equal(d.loss_fn_inputs["target_tokens"], [6, 7, 8, 9])
    assert d.loss_fn_inputs["target_tokens"].dtype == np.int64
    np.testing.assert_allclose(d.loss_fn_inputs["advantages"], [0, 1, -1, 2])
    np.testing.assert_array_equal(d.loss_fn_inputs["weights"], weights.numpy())


def test_forward_backward_json_form_matches_proto_form():
    body = {"model_id": "m", "forward_backward_input": {
        "loss_fn": "cross_entropy",
        "data": [{"model_input": {"chunks": [{"tokens": [1, 2], "type": "encoded_text"}]},
                  "loss_fn_inputs": {"target_tokens": {"data": [2, 3], "dtype": "int64"},
                                     "weights": {"data": [1.0, 0.5], "dtype": "float32"}}}]}}
    call = decode_forward_backward_json(body, forward_only=False)
    assert call.data[0].tokens == [1, 2]
    np.testing.assert_allclose(call.data[0].loss_fn_inputs["weights"], [1.0, 0.5])
    with pytest.raises(UserInputError) as info:
        decode_forward_backward_json({"model_id": "m", "forward_backward_input": {"data": []}}, False)
    assert info.value.field == "loss_fn"


def test_forward_backward_output_decodes_with_the_sdk():
    result = ForwardBackwardResult(
        loss_fn_outputs=[
            {"logprobs": np.array([-1.0, -2.0, -0.5], np.float32), "elementwise_loss": np.array([1, 2, 0.5], np.float32)},
            {"logprobs": np.array([-3.0], np.float32), "elementwise_loss": np.array([3.0], np.float32)},
        ],
        metrics={"loss:sum": 6.5},
    )
    blob = encode_forward_backward_output(result)
    out = deserialize_forward_backward_output(blob)
    assert out.metrics == {"loss:sum": 6.5}
    assert len(out.loss_fn_outputs) == 2
    np.testing.assert_allclose(out.loss_fn_outputs[0]["logprobs"].data, [-1.0, -2.0, -0.5])
    np.testing.assert_allclose(out.loss_fn_outputs[1]["elementwise_loss"].data, [3.0])
    assert out.loss_fn_outputs[1]["logprobs"].shape == [1]
    as_json = proto_result_to_json(FWD_BWD_KIND, blob)
    assert as_json["loss_fn_outputs"][0]["logprobs"]["data"] == [-1.0, -2.0, -0.5]


def test_sample_response_decodes_with_the_sdk():
    result = SampleResult(
        sequences=[SampledSequence(tokens=[4, 5, 2], logprobs=[-0.1, -0.2, -0.3], stop_reason="stop"),
                   SampledSequence(tokens=[7], logprobs=[-1.5], stop_reason="length")],
        prompt_logprobs=[None, -2.0, -3.0],
    )
    blob = encode_sample_response(result)
    resp = deserialize_sample_response(blob)
    assert [list(s.tokens) for s in resp.sequences] == [[4, 5, 2], [7]]
    assert [s.stop_reason for s in resp.sequences] == ["stop", "length"]
    np.testing.assert_allclose(resp.sequences[0].logprobs, [-0.1, -0.2, -0.3], rtol=1e-6)
    assert resp.prompt_logprobs == [None, -2.0, -3.0]
    assert proto_result_to_json(SAMPLE_KIND, blob)["sequences"][1]["tokens"] == [7]


def test_sample_request_maps_stop_semantics():
    def job(stop):
        req = types.SampleRequest(prompt=types.ModelInput.from_ints([1, 2]), num_samples=2, base_model="b",
                                  sampling_params=types.SamplingParams(max_tokens=3, stop=stop))
        return sample_job_from_request(req)

    assert job(None).params.stop_at_eos is True
    assert job([]).params.stop_at_eos is False
    assert job(["\n"]).params.stop_strings == ("\n",)
    assert job([5, 6]).params.stop_token_ids == (5, 6)
    assert job("x").params.stop_strings == ("x",)
