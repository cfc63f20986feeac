"""The SDK's logprob options of a sample request: decoded and checked on the way in, encoded on the way out.

`SamplingClient.sample` sends, besides `prompt_logprobs` / `prompt_logprobs_last_n`:
`topk_prompt_logprobs`, `topk_sample_logprobs`, `target_prompt_logprobs` (an int64 tensor,
dense or sparse CSR) and `prompt_alt_tokens_k`. Their answers travel in the SDK's own protobuf
fields (`TopkLogprobs`, `Tensor`, `PromptAltTokens`), which the SDK turns into lists of
(token id, logprob) per position, None where a position was not scored (always the first).

    >>> job = SampleJob(prompt, 1, params, **decode_options(request, prompt))   # 400s name the field
    >>> check_options(job, vocab_size=151936, limit=20)                         # TINK_MAX_TOPK_LOGPROBS
    >>> encode_options(msg, job, result)                                        # into a pb.SampleResponse
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tinker import types as sdk
from tinker.proto import tinker_public_pb2 as pb
from tinker.types.topk_logprobs import MASK_LOGPROB

from .backends import SampleJob, SampleResult, TargetIds, TopK, UserInputError

# The widest top-k / number of target ids any sampler serves: vLLM's cap on `logprob_token_ids`
# (MAX_LOGPROB_TOKEN_IDS); TINK_MAX_TOPK_LOGPROBS may not exceed it.
MAX_TOPK_LOGPROBS = 128
_MAX_TARGET_CELLS = 1 << 26  # a target tensor's dense size; a few bytes of CSR must not allocate terabytes
_WIDTHS = ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k")
_TARGET = "target_prompt_logprobs"


def decode_options(req: sdk.SampleRequest, prompt: list[int]) -> dict[str, Any]:
    """`SampleJob` keyword arguments for the options above; a malformed one is a `UserInputError`."""
    options: dict[str, Any] = {}
    for field in _WIDTHS:
        value = getattr(req, field)
        if value < 0:
            raise UserInputError(f"{field} must be 0 (off) or a positive number of tokens, got {value}", field)
        options[field] = value
    if req.target_prompt_logprobs is not None:
        options[_TARGET] = _target_ids(req.target_prompt_logprobs, len(prompt))
    return options


def check_options(job: SampleJob, vocab_size: int, limit: int = MAX_TOPK_LOGPROBS,
                  setting: str = "TINK_MAX_TOPK_LOGPROBS") -> None:
    """Raise `UserInputError` naming the field unless every width is within `limit` and every id in the vocabulary."""
    for field in _WIDTHS:
        value = getattr(job, field)
        if not 0 <= value <= min(limit, vocab_size):
            raise UserInputError(f"{field} must be between 0 and {min(limit, vocab_size)} ({setting}), got {value}",
                                 field)
    if job.target_prompt_logprobs is None:
        return
    ids = job.target_prompt_logprobs.ids
    if ids.ndim != 2 or ids.shape[0] != len(job.prompt) - 1:
        raise UserInputError(f"{_TARGET} must have shape [len(prompt) - 1, K] = [{len(job.prompt) - 1}, K], "
                             f"got {list(ids.shape)}", _TARGET)
    if ids.size and int(ids.max()) >= vocab_size:
        raise UserInputError(f"{_TARGET} names token id {int(ids.max())}, outside the vocabulary [0, {vocab_size})",
                             _TARGET)
    distinct = len(np.unique(ids[ids >= 0]))
    if distinct > limit:
        raise UserInputError(f"{_TARGET} names {distinct} distinct token ids; at most {limit} ({setting}) per request",
                             _TARGET)


def apply_last_n(job: SampleJob, result: SampleResult) -> SampleResult:
    """Blank the positions before `prompt_logprobs_last_n` in both prompt answers it governs."""
    if not job.prompt_logprobs_last_n:
        return result
    for name in ("prompt_logprobs", "topk_prompt_logprobs"):
        values = getattr(result, name)
        if values is not None:
            keep_from = len(values) - job.prompt_logprobs_last_n
            setattr(result, name, [None] * keep_from + list(values[keep_from:]))
    return result


def encode_options(msg: pb.SampleResponse, job: SampleJob | None, result: SampleResult) -> None:
    """Write the answers `result` carries into `msg` (whose sequences are already filled, in order)."""
    if result.topk_prompt_logprobs is not None:
        _fill_topk(msg.topk_prompt_logprobs, result.topk_prompt_logprobs, job.topk_prompt_logprobs if job else 0)
    for encoded, seq in zip(msg.sequences, result.sequences):
        if seq.topk_logprobs is not None:
            _fill_topk(encoded.topk_sampled_logprobs, seq.topk_logprobs, job.topk_sample_logprobs if job else 0)
    if result.target_prompt_logprobs is not None:
        csr = job.target_prompt_logprobs.csr if job and job.target_prompt_logprobs else None
        _fill_tensor(msg.target_prompt_logprobs, result.target_prompt_logprobs.astype(np.float32), csr)
    if result.prompt_alt_tokens is not None:
        _fill_tensor(msg.prompt_alt_tokens.tokens, result.prompt_alt_tokens.tokens.astype(np.int64))
        _fill_tensor(msg.prompt_alt_tokens.logprobs, result.prompt_alt_tokens.logprobs.astype(np.float32))


def response_options_json(resp: Any) -> dict[str, Any]:
    """The answers of an SDK `SampleResponse` as JSON fields (for clients that did not ask for protobuf)."""
    out: dict[str, Any] = {}
    if resp.topk_prompt_logprobs is not None:
        out["topk_prompt_logprobs"] = _topk_json(resp.topk_prompt_logprobs)
    if resp.target_prompt_logprobs is not None:
        out[_TARGET] = _tensor_json(resp.target_prompt_logprobs)
    if resp.prompt_alt_tokens is not None:
        out["prompt_alt_tokens"] = {"tokens": _tensor_json(resp.prompt_alt_tokens.tokens),
                                    "logprobs": _tensor_json(resp.prompt_alt_tokens.logprobs)}
    return out


def sequence_options_json(seq: Any) -> dict[str, Any]:
    """A sampled sequence's `topk_logprobs` as a JSON field, if it has them."""
    return {} if seq.topk_logprobs is None else {"topk_logprobs": _topk_json(seq.topk_logprobs)}


# ----------------------------------------------------------------------------- internals


def _target_ids(td: Any, prompt_length: int) -> TargetIds:
    """The request's tensor as dense int64 ids (-1 where nothing is asked), keeping a sparse layout."""
    rows = prompt_length - 1
    if td.dtype != "int64":
        raise UserInputError(f"{_TARGET} must be an int64 tensor of token ids, got {td.dtype}", _TARGET)
    shape = list(td.shape or [])
    if len(shape) != 2 or shape[0] != rows or shape[1] < 1:
        raise UserInputError(f"{_TARGET} must have shape [len(prompt) - 1, K] = [{rows}, K] with K >= 1, "
                             f"got {td.shape}", _TARGET)
    if shape[0] * shape[1] > _MAX_TARGET_CELLS:
        raise UserInputError(f"{_TARGET} has {shape[0] * shape[1]} cells; at most {_MAX_TARGET_CELLS}", _TARGET)
    values = np.asarray(td.data, dtype=np.float64)
    if values.size and (values != np.round(values)).any():
        raise UserInputError(f"{_TARGET} must hold integer token ids", _TARGET)
    values = values.astype(np.int64)
    csr = None
    if td.sparse_crow_indices is not None or td.sparse_col_indices is not None:
        crow, col = list(td.sparse_crow_indices or []), list(td.sparse_col_indices or [])
        ids = np.full(shape, -1, dtype=np.int64)
        row_of = _check_csr(crow, col, len(values), shape)
        ids[row_of, col] = values
        csr = (crow, col)
    else:
        if values.size != shape[0] * shape[1]:
            raise UserInputError(f"{_TARGET} has {values.size} values for shape {shape}", _TARGET)
        ids = values.reshape(shape)
    if (ids < -1).any():
        raise UserInputError(f"{_TARGET} holds {int(ids.min())}; ids must be >= 0, or -1 for no id", _TARGET)
    if not (ids >= 0).any():
        raise UserInputError(f"{_TARGET} names no token id; send at least one id >= 0, or leave the field out",
                             _TARGET)
    return TargetIds(ids, csr)


def _check_csr(crow: list[int], col: list[int], nnz: int, shape: list[int]) -> np.ndarray:
    """The row of each listed cell, after checking the CSR layout (torch's invariants: sorted, unique columns)."""
    crow_arr, col_arr = np.asarray(crow, dtype=np.int64), np.asarray(col, dtype=np.int64)
    problem = None
    if len(crow_arr) != shape[0] + 1 or (len(crow_arr) and crow_arr[0] != 0):
        problem = f"sparse_crow_indices must have len(prompt) = {shape[0] + 1} entries starting at 0"
    elif (np.diff(crow_arr) < 0).any() or crow_arr[-1] != nnz or len(col_arr) != nnz:
        problem = "sparse_crow_indices must be non-decreasing and end at the number of values"
    elif nnz and ((col_arr < 0).any() or (col_arr >= shape[1]).any()):
        problem = f"sparse_col_indices must be in [0, {shape[1]})"
    row_of = np.repeat(np.arange(shape[0]), np.diff(crow_arr)) if problem is None else None
    if problem is None and nnz > 1:
        same_row = row_of[1:] == row_of[:-1]
        if (np.diff(col_arr)[same_row] <= 0).any():
            problem = "sparse_col_indices must be strictly increasing within each row"
    if problem is not None:
        raise UserInputError(f"{_TARGET}: {problem}", _TARGET)
    return row_of


def _fill_topk(msg: pb.TopkLogprobs, rows: list[TopK | None], k: int) -> None:
    """Dense [len(rows), k] matrices; a row that was not scored, and the tail of a short one, hold the
    SDK's sentinel (token 0, logprob -99999), which it reads back as None / a shorter list."""
    k = max(k, max((len(r) for r in rows if r), default=0), 1)
    ids = np.zeros((len(rows), k), dtype=np.int32)
    logprobs = np.full((len(rows), k), MASK_LOGPROB, dtype=np.float32)
    for i, row in enumerate(rows):
        for j, (token, logprob) in enumerate(row or []):
            ids[i, j], logprobs[i, j] = token, logprob
    msg.token_ids, msg.logprobs, msg.k, msg.length = ids.tobytes(), logprobs.tobytes(), k, len(rows)


def _fill_tensor(msg: pb.Tensor, values: np.ndarray, csr: tuple[list[int], list[int]] | None = None) -> None:
    msg.dtype = pb.DTYPE_INT64 if np.issubdtype(values.dtype, np.integer) else pb.DTYPE_FLOAT32
    msg.shape.extend(values.shape)
    if csr is None:
        msg.dense = values.tobytes()
        return
    crow, col = (np.asarray(x, dtype=np.int64) for x in csr)
    rows = np.repeat(np.arange(values.shape[0]), np.diff(crow))
    msg.sparse_csr.values = values[rows, col].tobytes()
    msg.sparse_csr.crow_indices = crow.tobytes()
    msg.sparse_csr.col_indices = col.tobytes()


def _topk_json(rows: list[Any]) -> list[Any]:
    return [None if row is None else [[int(t), float(lp)] for t, lp in row] for row in rows]


def _tensor_json(td: Any) -> dict[str, Any]:
    """The SDK's JSON `TensorData` shape (as in `loss_fn_inputs`), sparse CSR kept sparse."""
    out = {"data": np.asarray(td.data).tolist(), "dtype": td.dtype, "shape": td.shape}
    if td.sparse_crow_indices is not None:
        out.update(sparse_crow_indices=list(td.sparse_crow_indices), sparse_col_indices=list(td.sparse_col_indices))
    return out
