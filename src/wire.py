"""The Tinker wire format: decoding requests into backend values, encoding results.

JSON request bodies are validated with the `tinker` SDK's own pydantic types, so field
names and defaults are exactly the SDK's. Protobuf bodies (forward_backward) and protobuf
results (ForwardBackwardOutput, SampleResponse) use the SDK's generated module
`tinker.proto.tinker_public_pb2`: no hand-written copy of the schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pydantic
from tinker import types as sdk
from tinker.proto import tinker_public_pb2 as pb
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response
from tinker.types._pydantic_types.forward_backward_input import ForwardBackwardInput as SdkFwdBwdInput

from .backends import (
    ForwardBackwardResult,
    SampleJob,
    SampleResult,
    SamplingParams,
    TrainDatum,
    UserInputError,
)
from .logprob_options import decode_options, encode_options, response_options_json, sequence_options_json

PROTO_CONTENT_TYPE = "application/x-protobuf"
FWD_BWD_KIND = "proto:ForwardBackwardOutput"
SAMPLE_KIND = "proto:SampleResponse"

M = TypeVar("M", bound=pydantic.BaseModel)

_MAX_SPARSE_VALUES = 1 << 26  # a sparse tensor's dense size: far above [tokens, K] for any real datum

_NP_BY_PROTO_DTYPE = {
    pb.DTYPE_FLOAT32: np.float32,
    pb.DTYPE_INT64: np.int64,
    pb.DTYPE_INT32: np.int32,
}


def parse_json(model: type[M], body: Any, prefix: str = "") -> M:
    """Validate a JSON body (or the part of one at `prefix`) against an SDK type; errors name the
    first bad field."""
    if not isinstance(body, dict):
        raise UserInputError(f"{prefix or 'request body'} must be a JSON object", prefix or "body")
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        field = _field_name(first["loc"], body, prefix)
        raise UserInputError(f"{field}: {first['msg']}", field) from None


class CancelFutureRequest(pydantic.BaseModel):
    """`cancel_future`'s body; the SDK sends it untyped (`{"request_id": ...}`), so it is declared here."""

    model_config = pydantic.ConfigDict(extra="forbid")
    request_id: str


class FinishReason(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    type: sdk.ClientSessionFinishReasonType  # success | errored | interrupted


class FinishSessionRequest(pydantic.BaseModel):
    """`sessions/<id>/finish`'s body as `ServiceClient.close(status, detail)` sends it (untyped in the SDK)."""

    model_config = pydantic.ConfigDict(extra="forbid")
    reason: FinishReason
    detail: str | None = None


def _field_name(loc: tuple[int | str, ...], body: Any, prefix: str) -> str:
    """pydantic's error location as the client wrote it (`data[0].loss_fn_inputs.weights`), without
    the union-member tags pydantic puts in it (`AdamParams`, `list[int]`, `str`), which name no field."""
    name, value = prefix, body
    for i, part in enumerate(loc):
        if isinstance(value, dict) and part in value:
            name, value = (f"{name}.{part}" if name else str(part)), value[part]
        elif isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            name, value = f"{name}[{part}]", value[part]
        elif i == len(loc) - 1 and isinstance(value, dict) and isinstance(part, str):
            name = f"{name}.{part}" if name else part  # a required field that is missing
    return name or "body"


# ----------------------------------------------------------------------------- forward_backward


@dataclass
class ForwardBackwardCall:
    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, float | str] | None
    forward_only: bool
    data: list[TrainDatum]


def decode_forward_backward_proto(body: bytes) -> ForwardBackwardCall:
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception:
        raise UserInputError("body is not a valid ForwardBackwardRequest protobuf", "body") from None
    config: dict[str, float | str] = {}
    for key, value in msg.loss_fn_config_v2.items():
        config[key] = value.text if value.WhichOneof("value") == "text" else value.number
    if not config:
        config = {k: float(v) for k, v in msg.loss_fn_config.items()}
    data = []
    for i, datum in enumerate(msg.data):
        tokens: list[int] = []
        for chunk in datum.model_input:
            if chunk.WhichOneof("chunk") != "encoded_text":
                raise UserInputError(
                    "only token (encoded_text) chunks are supported by this worker",
                    f"data[{i}].model_input",
                )
            if len(chunk.encoded_text.tokens) % 4:
                raise UserInputError("encoded_text tokens must be little-endian int32s (a multiple of 4 bytes)",
                                     f"data[{i}].model_input")
            tokens.extend(np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32).tolist())
        inputs = {
            name: _tensor_from_proto(t, f"data[{i}].loss_fn_inputs.{name}")
            for name, t in datum.loss_fn_inputs.items()
        }
        data.append(TrainDatum(tokens=tokens, loss_fn_inputs=inputs))
    return ForwardBackwardCall(
        model_id=msg.model_id,
        seq_id=msg.seq_id,
        loss_fn=msg.loss_fn,
        loss_fn_config=config or None,
        forward_only=msg.forward_only,
        data=data,
    )


def decode_forward_backward_json(body: Any, forward_only: bool) -> ForwardBackwardCall:
    """The JSON form for plain HTTP clients: `{"model_id", "forward_backward_input": {...}}`."""
    if not isinstance(body, dict):
        raise UserInputError("request body must be a JSON object", "body")
    key = "forward_input" if "forward_input" in body else "forward_backward_input"
    if not isinstance(body.get("model_id"), str):
        raise UserInputError("model_id is required (a string)", "model_id")
    if not isinstance(body.get(key), dict):
        raise UserInputError(f"{key} is required: an object with loss_fn and data", key)
    seq_id = body.get("seq_id")
    if seq_id is not None and (isinstance(seq_id, bool) or not isinstance(seq_id, int)):
        raise UserInputError("seq_id must be an integer", "seq_id")
    # Field names inside the input are the SDK's (`data[0].model_input`, `loss_fn`), as for protobuf.
    fb = parse_json(SdkFwdBwdInput, body[key])
    data = []
    for i, datum in enumerate(fb.data):
        try:
            tokens = datum.model_input.to_ints()
        except ValueError:
            raise UserInputError("only token chunks are supported", f"data[{i}].model_input") from None
        inputs = {}
        for name, td in datum.loss_fn_inputs.items():
            try:
                inputs[name] = np.asarray(td.to_numpy())
            except Exception as exc:
                raise UserInputError(f"cannot read tensor: {exc}", f"data[{i}].loss_fn_inputs.{name}") from None
        data.append(TrainDatum(tokens=tokens, loss_fn_inputs=inputs))
    return ForwardBackwardCall(
        model_id=body["model_id"],
        seq_id=seq_id or 0,
        loss_fn=fb.loss_fn,
        loss_fn_config=dict(fb.loss_fn_config) if fb.loss_fn_config else None,
        forward_only=forward_only,
        data=data,
    )


def _tensor_from_proto(t: pb.Tensor, field: str) -> np.ndarray:
    np_dtype = _NP_BY_PROTO_DTYPE.get(t.dtype)
    if np_dtype is None:
        raise UserInputError(f"unsupported tensor dtype {t.dtype}", field)
    shape = list(t.shape)
    try:
        if t.HasField("sparse_csr"):
            values = np.frombuffer(t.sparse_csr.values, dtype=np_dtype)
            crow = np.frombuffer(t.sparse_csr.crow_indices, dtype=np.int64)
            col = np.frombuffer(t.sparse_csr.col_indices, dtype=np.int64)
            if len(shape) != 2 or len(crow) != shape[0] + 1 or len(col) != len(values):
                raise ValueError("inconsistent sparse CSR layout")
            if min(shape) < 0 or shape[0] * shape[1] > _MAX_SPARSE_VALUES:  # a few bytes must not allocate terabytes
                raise ValueError(f"shape {shape} must be non-negative with at most {_MAX_SPARSE_VALUES} values")
            dense = np.zeros(shape, dtype=np_dtype)
            rows = np.repeat(np.arange(shape[0]), np.diff(crow))
            dense[rows, col] = values
            return dense
        arr = np.frombuffer(t.dense, dtype=np_dtype).copy()
        return arr.reshape(shape) if shape else arr
    except (ValueError, IndexError) as exc:  # IndexError: CSR column or row offsets out of range
        raise UserInputError(f"malformed tensor: {exc}", field) from None


def encode_forward_backward_output(result: ForwardBackwardResult) -> bytes:
    """One ArrayRecord holding every output field, batched over datums (the SDK's v1 layout)."""
    msg = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for k, v in result.metrics.items():
        msg.metrics[k] = float(v)
    record = msg.loss_fn_outputs.add()
    record.type_tag = "ArrayRecord"
    record.num_datums = len(result.loss_fn_outputs)
    names = sorted({name for out in result.loss_fn_outputs for name in out})
    for name in names:
        arrays = [np.asarray(out[name]) for out in result.loss_fn_outputs]
        is_int = np.issubdtype(arrays[0].dtype, np.integer)
        arrays = [a.astype(np.int64 if is_int else np.float32) for a in arrays]
        blob = b"".join(a.tobytes() for a in arrays)
        offsets = np.cumsum([0] + [a.nbytes for a in arrays], dtype=np.int64)
        bt = record.fields[name]
        bt.data = blob
        bt.offsets = offsets.tobytes()
        bt.dtype = pb.DTYPE_INT64 if is_int else pb.DTYPE_FLOAT32
        bt.trailing_shape.extend(list(arrays[0].shape[1:]))
    return msg.SerializeToString()


# ----------------------------------------------------------------------------- sampling


def sampling_params_from_sdk(params: sdk.SamplingParams, max_tokens_default: int = 16) -> SamplingParams:
    stop = params.stop
    stop_strings: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()
    stop_at_eos = True
    if isinstance(stop, str):
        stop_strings = (stop,)
    elif stop is not None:
        items = list(stop)
        if not items:
            stop_at_eos = False  # the SDK's contract: [] disables every stop, EOS included
        elif all(isinstance(s, str) for s in items):
            stop_strings = tuple(items)
        elif all(isinstance(s, int) and not isinstance(s, bool) for s in items):
            stop_ids = tuple(items)
        else:
            raise UserInputError("stop must be a string, a list of strings or a list of token ids",
                                 "sampling_params.stop")
    max_tokens = params.max_tokens if params.max_tokens is not None else max_tokens_default
    if max_tokens < 1:
        raise UserInputError("max_tokens must be >= 1", "sampling_params.max_tokens")
    if params.temperature < 0:
        raise UserInputError("temperature must be >= 0", "sampling_params.temperature")
    if not 0 < params.top_p <= 1:
        raise UserInputError("top_p must be in (0, 1]", "sampling_params.top_p")
    if params.top_k == 0 or params.top_k < -1:
        raise UserInputError("top_k must be -1 (off) or >= 1", "sampling_params.top_k")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        seed=params.seed,
        stop_strings=stop_strings,
        stop_token_ids=stop_ids,
        stop_at_eos=stop_at_eos,
    )


def sample_job_from_request(req: sdk.SampleRequest) -> SampleJob:
    try:
        prompt = req.prompt.to_ints()
    except ValueError:
        raise UserInputError("only token chunks are supported in prompts", "prompt") from None
    if not prompt:
        raise UserInputError("prompt must contain at least one token", "prompt")
    if req.num_samples < 1:
        raise UserInputError("num_samples must be >= 1", "num_samples")
    last_n = req.prompt_logprobs_last_n
    if last_n is not None:
        if not req.prompt_logprobs:
            raise UserInputError("prompt_logprobs_last_n requires prompt_logprobs", "prompt_logprobs_last_n")
        if not 1 <= last_n <= len(prompt) - 1:
            raise UserInputError(
                f"prompt_logprobs_last_n must be between 1 and len(prompt) - 1 = {len(prompt) - 1}",
                "prompt_logprobs_last_n")
    return SampleJob(
        prompt=prompt,
        num_samples=req.num_samples,
        params=sampling_params_from_sdk(req.sampling_params),
        prompt_logprobs=bool(req.prompt_logprobs),
        prompt_logprobs_last_n=last_n,
        **decode_options(req, prompt),  # topk_*, target_prompt_logprobs, prompt_alt_tokens_k
    )


def encode_sample_response(result: SampleResult, job: SampleJob | None = None) -> bytes:
    msg = pb.SampleResponse()
    for seq in result.sequences:
        s = msg.sequences.add()
        s.stop_reason = pb.STOP_REASON_STOP if seq.stop_reason == "stop" else pb.STOP_REASON_LENGTH
        s.tokens = np.asarray(seq.tokens, dtype=np.int32).tobytes()
        s.logprobs = np.asarray(seq.logprobs, dtype=np.float32).tobytes()
    if result.prompt_logprobs is not None:
        values = [np.nan if v is None else v for v in result.prompt_logprobs]
        msg.prompt_logprobs = np.asarray(values, dtype=np.float32).tobytes()
    encode_options(msg, job, result)
    return msg.SerializeToString()


def sample_result_to_json(result: SampleResult) -> dict[str, Any]:
    return {
        "type": "sample",
        "sequences": [
            {"tokens": s.tokens, "logprobs": s.logprobs, "stop_reason": s.stop_reason} for s in result.sequences
        ],
        "prompt_logprobs": result.prompt_logprobs,
        **({"metrics": result.extras} if result.extras else {}),
    }


def proto_result_to_json(kind: str, blob: bytes) -> dict[str, Any]:
    """The JSON rendering of a stored protobuf result, for clients that did not ask for protobuf."""
    if kind == FWD_BWD_KIND:
        out = deserialize_forward_backward_output(blob)
        return {
            "loss_fn_output_type": out.loss_fn_output_type,
            "loss_fn_outputs": [
                {name: {"data": np.asarray(td.data).tolist(), "dtype": td.dtype, "shape": td.shape}
                 for name, td in datum.items()}
                for datum in out.loss_fn_outputs
            ],
            "metrics": out.metrics,
        }
    if kind == SAMPLE_KIND:
        resp = deserialize_sample_response(blob)
        return {
            "type": "sample",
            "sequences": [
                {"tokens": list(map(int, s.tokens)), "logprobs": s.logprobs, "stop_reason": s.stop_reason,
                 **sequence_options_json(s)}
                for s in resp.sequences
            ],
            "prompt_logprobs": resp.prompt_logprobs,
            **response_options_json(resp),
        }
    raise ValueError(f"unknown result kind {kind}")
